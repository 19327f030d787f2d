"""``eventbus append``: append events from the command line, one (``--json``) or a stream of
JSON lines from stdin, in transactions of ``--batch`` lines; prints each event's position."""

from __future__ import annotations

import datetime as dt
import json
import sys
from collections.abc import Iterator
from typing import Any

import click

from eventbus.cli.options import database_url_option

ENVELOPE = ("event_id", "occurred_at", "correlation_id", "causation_id")
LINE_KEYS = frozenset({"type", "stream", "payload", "expected_version", *ENVELOPE})


class BadLine(Exception):
    """A line that cannot be appended, with the reason (one line)."""


@click.command()
@click.argument("event_type", required=False, metavar="[TYPE]")
@click.option("--stream", "stream_id", metavar="ID", help="The stream to append to.")
@click.option(
    "--expected-version",
    type=click.IntRange(min=0),
    metavar="N",
    help="Append only if the stream is at version N (0: a new stream); else exit 1.",
)
@click.option("--json", "payload", metavar="JSON", help="The event's payload (a JSON object).")
@click.option(
    "--app",
    "modules",
    multiple=True,
    required=True,
    metavar="MODULE",
    help="A module that defines event classes (repeat for several).",
)
@database_url_option
@click.option(
    "--batch",
    type=click.IntRange(min=1),
    default=1000,
    show_default=True,
    help="Lines from stdin per transaction.",
)
def append(
    event_type: str | None,
    stream_id: str | None,
    expected_version: int | None,
    payload: str | None,
    modules: tuple[str, ...],
    database_url: str | None,
    batch: int,
) -> None:
    """Append events to the store: one from --json, or one JSON object a line from stdin.

    eventbus append order.placed --stream order-1 --json '{"total": 5}' --app shop.events
    appends one event and prints its position, stream, stream version, type and id,
    tab-separated. Without --json, each line of stdin is
    {"type": ..., "stream": ..., "payload": {...}} (optional: "expected_version", "event_id",
    "occurred_at", "correlation_id", "causation_id"); TYPE and --stream are the defaults of
    lines without them, and with TYPE a line may be the bare payload. Every event is validated
    as by any append: a bad line is reported with its line number and each bad field, nothing
    of its transaction is written, and the command stops (exit 2); a stale expected version
    exits 1.
    """
    from eventbus.cli.events import load_application
    from eventbus.cli.options import open_checked_store, settings

    app = load_application(modules)
    known = {name: cls for name, cls in app.events.items()}
    if payload is not None:
        if event_type is None or stream_id is None:
            raise click.UsageError("--json needs TYPE and --stream")
        lines: Iterator[tuple[int, str]] = iter([(1, payload)])
        single = True
    else:
        if expected_version is not None:
            raise click.UsageError(
                "--expected-version is for --json; on stdin give each line its expected_version"
            )
        lines = ((n, text) for n, text in enumerate(sys.stdin, start=1) if text.strip())
        single = False
    url = settings("append", database_url=database_url).database_url
    store = open_checked_store("append", None, url, retrying=False)
    try:
        Loader(store, known, event_type, stream_id, expected_version, single).run(lines, batch)
    finally:
        store.close()


class Loader:
    """Parses, validates and appends lines, a transaction per batch, printing positions."""

    def __init__(
        self,
        store: Any,
        known: dict[str, Any],
        event_type: str | None,
        stream_id: str | None,
        expected_version: int | None,
        single: bool,
    ) -> None:
        self.store = store
        self.known = known
        self.event_type = event_type
        self.stream_id = stream_id
        self.expected_version = expected_version
        self.single = single
        self.written = 0

    def run(self, lines: Iterator[tuple[int, str]], size: int) -> None:
        from tqdm import tqdm

        progress = tqdm(file=sys.stderr, unit=" events", disable=None if not self.single else True)
        chunk: list[tuple[int, str]] = []
        for item in lines:
            chunk.append(item)
            if len(chunk) == size:
                self._batch(chunk)
                progress.update(len(chunk))
                chunk = []
        if chunk:
            self._batch(chunk)
            progress.update(len(chunk))
        progress.close()
        if not self.single:
            click.echo(f"appended {self.written} events", err=True)

    def _batch(self, chunk: list[tuple[int, str]]) -> None:
        from eventbus.errors import ConcurrencyError, StoreError
        from eventbus.store.lookup import positions

        parsed, bad = [], []
        for number, text in chunk:
            try:
                parsed.append((number, *self._parse(text)))
            except BadLine as exc:
                bad.append(self._where(number) + str(exc))
        if bad:
            self._stop(2, bad, chunk)
        groups = _groups(parsed)
        stored = []
        try:
            with self.store.engine.begin() as conn:
                for number, stream, expected, events in groups:
                    try:
                        stored += self.store.append(
                            stream, events, expected_version=expected, connection=conn
                        )
                    except StoreError as exc:
                        raise _AtLine(number, exc) from exc
        except _AtLine as exc:
            code = 1 if isinstance(exc.error, ConcurrencyError) else 2
            self._stop(code, [self._where(exc.number) + str(exc.error)], chunk)
        found = positions(self.store.engine, [e.event_id for e in stored])
        for event in stored:
            position = found.get(event.event_id)
            shown = "-" if position is None else str(position)
            click.echo(
                f"{shown}\t{event.stream_id}\t{event.stream_version}\t{event.type}\t{event.event_id}"
            )
        self.written += len(stored)

    def _where(self, number: int) -> str:
        return "" if self.single else f"line {number}: "

    def _stop(self, code: int, reasons: list[str], chunk: list[tuple[int, str]]) -> None:
        for reason in reasons:
            click.echo(f"eventbus append: {reason}", err=True)
        if not self.single:
            click.echo(
                f"eventbus append: nothing of lines {chunk[0][0]}-{chunk[-1][0]} was written; "
                f"{self.written} events before them were",
                err=True,
            )
        sys.exit(code)

    def _parse(self, text: str) -> tuple[str, int | None, Any]:
        """``(stream, expected_version, event)`` of a line; ``BadLine`` says why not."""
        from eventbus.errors import EventbusError

        try:
            data = json.loads(text)
        except ValueError as exc:
            raise BadLine(f"not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise BadLine("not a JSON object")
        if self.single:
            data = {"payload": data, "expected_version": self.expected_version}
        elif "payload" not in data and self.event_type is not None:
            data = {"payload": data}
        if "payload" not in data:
            raise BadLine('no "payload"; or give TYPE to pass bare payloads, one a line')
        unknown = sorted(set(data) - LINE_KEYS)
        if unknown:
            raise BadLine(f"unknown keys {unknown}; a line has {sorted(LINE_KEYS)}")
        type_name = data.get("type", self.event_type)
        stream = data.get("stream", self.stream_id)
        payload = data.get("payload")
        expected = data.get("expected_version")
        if not isinstance(type_name, str):
            raise BadLine('no event type: give "type" or TYPE')
        if not isinstance(stream, str):
            raise BadLine('no stream: give "stream" or --stream')
        if not isinstance(payload, dict):
            raise BadLine('"payload" must be a JSON object')
        if expected is not None and (type(expected) is not int or expected < 0):
            raise BadLine('"expected_version" must be an integer >= 0')
        cls = self.known.get(type_name)
        if cls is None:
            names = ", ".join(sorted(self.known)) or "none"
            raise BadLine(f"unknown event type {type_name!r}; the modules define: {names}")
        clash = sorted(set(payload) & set(ENVELOPE))
        if clash:
            raise BadLine(f'payload fields {clash} belong to the envelope, beside "payload"')
        taken = sorted(set(payload) & _parameters(cls))
        if taken:
            raise BadLine(f"payload fields {taken} are not fields of {cls._label()}")
        envelope = {k: data[k] for k in ENVELOPE if data.get(k) is not None}
        if "occurred_at" in envelope:
            try:
                envelope["occurred_at"] = dt.datetime.fromisoformat(envelope["occurred_at"])
            except (TypeError, ValueError):
                raise BadLine('"occurred_at" is not an ISO 8601 date and time') from None
        try:
            return stream, expected, cls(**payload, **envelope)
        except EventbusError as exc:
            raise BadLine(str(exc)) from None
        except TypeError as exc:  # a payload the constructor's signature refuses
            raise BadLine(f"{cls._label()}: {exc}") from None


def _parameters(cls: type) -> set[str]:
    """The named parameters of an event class's constructor (``self`` too): a payload field
    of one of these names cannot be passed (those of the envelope are checked before)."""
    import inspect

    params = inspect.signature(cls).parameters.values()  # without self, bound in any case
    named = {p.name for p in params if p.kind is not inspect.Parameter.VAR_KEYWORD}
    return ({"self"} | named) - set(ENVELOPE)


class _AtLine(Exception):
    def __init__(self, number: int, error: Exception) -> None:
        super().__init__(str(error))
        self.number, self.error = number, error


def _groups(
    parsed: list[tuple[int, str, int | None, Any]],
) -> list[tuple[int, str, int | None, list[Any]]]:
    """Consecutive lines of one stream as one append: a line with an expected version starts
    a new group."""
    groups: list[tuple[int, str, int | None, list[Any]]] = []
    for number, stream, expected, event in parsed:
        if groups and groups[-1][1] == stream and expected is None:
            groups[-1][3].append(event)
        else:
            groups.append((number, stream, expected, [event]))
    return groups
