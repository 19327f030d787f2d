"""Dead letters: look at them, send them back to their queue, or delete them.

Nothing here loses or reorders a message: ``peek`` leaves messages unacked, and RabbitMQ puts
them back; ``retry`` acks the dead copy only once the broker confirmed the republished one;
``purge`` deletes only the chosen ones. Each operation takes at most the messages the queue held
when it started.

Showing a letter never fails, whatever the worker dead-lettered: a body nested deeper than
``JSON_DEPTH`` levels is shown as its text (with a note), header values deeper than
``VALUE_DEPTH`` are cut short, and nothing is parsed or serialized recursively beyond that.

Details: ``docs/operations.md``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import decimal
import hashlib
import itertools
import json
import math
import re
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import amqp.exceptions

from eventbus.bus.amqp import UNDECODABLE
from eventbus.bus.runtime import connect
from eventbus.bus.wire import PROPERTIES, Message, Publisher, is_amqp
from eventbus.errors import DeadLetterError

DEAD_SUFFIX = ".dead"
# Headers of a failure: removed on retry, so the worker counts attempts from the start.
_FAILURE_PREFIXES = ("x-dead-", "x-exception", "x-death", "x-first-death-", "x-last-death-")
_FAILURE_HEADERS = frozenset(
    ("x-attempts", "x-first-failure-at", "x-failed-at", "x-queue", "x-delivery-count")
)
_WINDOW = 500  # messages republished per confirm window
# Bodies nested deeper are shown as text, never parsed: more than an event holds (a field may
# be 200 levels deep), little enough to parse and pretty-print well within the recursion limit.
JSON_DEPTH = 256
VALUE_DEPTH = 64  # levels of a header or property value shown; deeper ones are summarised
# A JSON string (or an unterminated one, up to the end), and what is not a bracket: what is left
# of a body without them are the brackets whose running count is its nesting (linear, no parse).
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"?', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}
_SURROGATE = re.compile("[\ud800-\udfff]")
# What a terminal must not be sent as it is: control characters but newline and tab, DEL, the
# C1 controls, bidirectional overrides and lone surrogates (they cannot even be encoded).
_UNPRINTABLE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


@dataclass(frozen=True)
class Body:
    """A dead letter's body as shown: ``text`` in ``format`` (``json``: pretty-printed,
    ``text``: as it is, ``hex``: its bytes), cut at a limit (``truncated``), and a ``note`` when
    a body that looks like JSON is not shown as JSON."""

    text: str
    format: str
    truncated: bool
    note: str | None = None


@dataclass(frozen=True)
class DeadLetter:
    """One message of a ``.dead`` queue, as it was dead-lettered."""

    id: str
    body: bytes
    properties: dict[str, Any]  # AMQP properties, headers excluded
    headers: dict[str, Any]
    redelivered: bool  # looked at before (or returned once)

    @property
    def type(self) -> str | None:
        return _text(self.properties.get("type"))

    @property
    def reason(self) -> str:
        """Why it is here: ``x-dead-reason``, else the exception and its message."""
        reason = _text(self.headers.get("x-dead-reason"))
        if reason:
            return reason
        exception = _text(self.headers.get("x-exception"))
        message = _text(self.headers.get("x-exception-message"))
        if exception:
            return f"{exception}: {message}" if message else exception
        return _text(self.headers.get(UNDECODABLE)) or (
            "unknown (no x-dead-reason or x-exception header)"
        )

    @property
    def unreadable(self) -> str | None:
        """The error that kept the AMQP client from reading its properties (they are in its
        headers as hex then), None if it read them; ``eventbus.bus.amqp`` says so."""
        return _text(self.properties.get(UNDECODABLE))

    @property
    def attempts(self) -> int | None:
        value = self.headers.get("x-attempts")
        if isinstance(value, int) and not isinstance(value, bool) and _fits(value):
            return value
        return None

    @property
    def failed_at(self) -> str | None:
        return _text(self.headers.get("x-failed-at") or self.headers.get("x-first-failure-at"))

    def body_text(self, limit: int | None = None) -> tuple[str, str, bool]:
        """(text, format, truncated): pretty JSON, else UTF-8 text, else hex of the bytes."""
        body = self.shown_body(limit)
        return body.text, body.format, body.truncated

    def shown_body(self, limit: int | None = None) -> Body:
        """The body as shown (at most ``limit`` characters): pretty JSON, else UTF-8 text, else
        hex of the bytes. Never raises, and its text always encodes as UTF-8."""
        try:
            text = self.body.decode("utf-8")
        except UnicodeDecodeError:
            shown = self.body if limit is None else self.body[: (limit + 1) // 2]
            hexed = shown.hex() if limit is None else shown.hex()[:limit]
            return Body(hexed, "hex", limit is not None and 2 * len(self.body) > limit)
        depth = nesting(text)
        if depth > JSON_DEPTH:
            note = f"nested {depth:,} levels deep (more than {JSON_DEPTH}): not parsed as JSON"
            return _cut(text, "text", limit, note)
        try:
            pretty = _pretty(json.loads(text), limit)
        except ValueError:
            return _cut(text, "text", limit)
        except RecursionError:  # not expected within JSON_DEPTH levels; never fatal all the same
            note = f"nested {depth:,} levels deep: too deep to parse here, shown as text"
            return _cut(text, "text", limit, note)
        return _cut(pretty, "json", limit)

    def to_dict(self, body_limit: int | None = 4000) -> dict[str, Any]:
        """JSON-safe form (``--json``, the dashboard's API), of bounded depth, never NaN;
        ``body_note`` only when there is a note."""
        body = self.shown_body(body_limit)
        shown = {
            "id": self.id,
            "message_id": _text(self.properties.get("message_id")),
            "type": self.type,
            "reason": self.reason,
            "attempts": self.attempts,
            "failed_at": self.failed_at,
            "original_routing_key": _text(self.headers.get("x-original-routing-key")),
            "redelivered": self.redelivered,
            "properties": _table(self.properties),
            "headers": _table(self.headers),
            "body": body.text,
            "body_format": body.format,
            "body_size": len(self.body),
            "body_truncated": body.truncated,
        }
        if body.note:
            shown["body_note"] = body.note
        return shown


@dataclass(frozen=True)
class Peek:
    """What ``peek`` saw: the queue's size and its first messages."""

    queue: str  # the handler's queue
    dead_letter_queue: str
    total: int
    letters: list[DeadLetter]


@dataclass(frozen=True)
class Outcome:
    """What ``retry`` or ``purge`` did."""

    queue: str
    dead_letter_queue: str
    done: int  # messages retried or purged
    seen: int  # messages looked at
    missing: list[str]  # ids asked for and not found


def queues_of(queue: str) -> tuple[str, str]:
    """(handler queue, dead-letter queue) for a handler queue or its ``.dead`` queue."""
    if queue.endswith(DEAD_SUFFIX):
        return queue[: -len(DEAD_SUFFIX)], queue
    return queue, queue + DEAD_SUFFIX


def peek(broker_url: str, queue: str, *, limit: int | None = 100) -> Peek:
    """The first ``limit`` dead letters of ``queue`` (all if None), left in place, in order."""
    origin, dead = queues_of(queue)
    with _taking(broker_url, dead) as (_, channel, total):
        letters = [letter for _, letter in _take(channel, dead, _bounded(total, limit))]
    return Peek(origin, dead, total, letters)


def find(broker_url: str, queue: str, letter_id: str) -> list[DeadLetter]:
    """Every dead letter of ``queue`` named ``letter_id`` (left in place)."""
    dead = queues_of(queue)[1]
    with _taking(broker_url, dead) as (_, channel, total):
        return [letter for _, letter in _take(channel, dead, total) if letter.id == letter_id]


def retry(broker_url: str, queue: str, *, ids: Collection[str] | None = None) -> Outcome:
    """Send dead letters (all, or those named by ``ids``) back to their handler's queue.

    Republished through the default exchange to the handler queue, persistent, with publisher
    confirms, without the failure's headers; each dead copy is acked only after its window
    was confirmed. Raises ``DeadLetterError`` if the handler's queue does not exist.
    """
    origin, dead = queues_of(queue)
    wanted = None if ids is None else set(ids)
    with _taking(broker_url, dead) as (conn, channel, total):
        if _counts(conn, origin) is None:
            raise DeadLetterError(
                f"queue {origin} does not exist: start its worker (it declares the queue), "
                "then retry"
            )
        taken = list(_take(channel, dead, total))
        chosen = [(tag, letter) for tag, letter in taken if wanted is None or letter.id in wanted]
        for _, letter in chosen:
            if letter.unreadable:  # republished, it would lose what could not be read
                raise DeadLetterError(
                    f"dead letter {letter.id}: the AMQP client cannot read its properties "
                    f"({letter.unreadable}), and a retry would send it without them; it stays "
                    f"in {dead}, as do the others (purge it with --id, then retry)"
                )
        publisher = Publisher(conn, "")
        done = 0
        try:
            for start in range(0, len(chosen), _WINDOW):
                window = chosen[start : start + _WINDOW]
                messages = [(origin, republished(ltr)) for _, ltr in window]
                try:
                    returned = publisher.publish(messages)
                except RecursionError:  # py-amqp writes header tables recursively
                    raise DeadLetterError(
                        f"a dead letter's headers are nested too deep for the AMQP client to "
                        f"write; {done} were retried, the others stay in {dead} (some may "
                        "have reached the queue too: handlers drop duplicates by event id)"
                    ) from None
                if returned:  # the queue vanished meanwhile: keep the dead copies
                    raise DeadLetterError(
                        f"queue {origin} refused {len(returned)} messages (deleted meanwhile?); "
                        f"{done} were retried, the others stay in {dead}"
                    )
                for tag, _ in window:
                    channel.basic_ack(tag)
                done += len(window)
        finally:
            publisher.close()
        found = {letter.id for _, letter in taken}
    return Outcome(origin, dead, done, len(taken), sorted((wanted or set()) - found))


def purge(
    broker_url: str,
    queue: str,
    *,
    ids: Collection[str] | None = None,
    at_most: int | None = None,
) -> Outcome:
    """Delete dead letters: all (at most ``at_most``, the first ones), or those named by ``ids``."""
    origin, dead = queues_of(queue)
    wanted = None if ids is None else set(ids)
    with _taking(broker_url, dead) as (_, channel, total):
        taken = list(_take(channel, dead, total))
        chosen = [tag for tag, letter in taken if wanted is None or letter.id in wanted]
        if at_most is not None:
            chosen = chosen[:at_most]
        for tag in chosen:
            channel.basic_ack(tag)
        found = {letter.id for _, letter in taken}
    return Outcome(origin, dead, len(chosen), len(taken), sorted((wanted or set()) - found))


def republished(letter: DeadLetter) -> Message:
    """The message a retry publishes: same body and envelope, without the failure's headers."""
    headers = {
        k: v
        for k, v in letter.headers.items()
        if not (isinstance(k, str) and (k in _FAILURE_HEADERS or k.startswith(_FAILURE_PREFIXES)))
    }
    properties = {k: letter.properties[k] for k in PROPERTIES if letter.properties.get(k)}
    properties["delivery_mode"] = 2
    return letter.body, properties, headers


def letter_id(message_id: Any, body: bytes) -> str:
    """A dead letter's name: its message id, or ``body-`` and a hash of its body."""
    text = _text(message_id)
    if text and text.strip():
        return text.strip()
    return "body-" + hashlib.sha256(body).hexdigest()[:16]


def json_safe(value: Any, _depth: int = 0) -> Any:
    """A header or property value as JSON can carry it (bytes as text or hex, times as ISO,
    NaN and infinities as text); tables and arrays deeper than ``VALUE_DEPTH`` are summarised."""
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int):  # beyond 64 bits (no AMQP client sends those): as text
        if _fits(value):
            return value
        bits = value.bit_length()
        return str(value) if bits <= 4096 else f"(an integer of {bits:,} bits: not shown)"
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, bytes | bytearray | memoryview):
        raw = bytes(value)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "hex:" + raw.hex()
    if isinstance(value, dt.datetime):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, dict | list | tuple):
        if _depth >= VALUE_DEPTH:
            kind = "table" if isinstance(value, dict) else "array"
            return f"({kind} nested deeper than {VALUE_DEPTH} levels: not shown)"
        if isinstance(value, dict):
            return {_key(k): json_safe(v, _depth + 1) for k, v in value.items()}
        return [json_safe(v, _depth + 1) for v in value]
    return repr(value)


def nesting(text: str) -> int:
    """How deep the brackets of ``text`` (JSON or not) nest, outside strings; without parsing."""
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text))
    return max(0, max(itertools.accumulate(map(_STEP.__getitem__, brackets)), default=0))


def printable(text: str) -> str:
    """``text`` safe to print on a terminal: control characters (but newline and tab),
    bidirectional overrides and lone surrogates escaped as ``\\xNN`` or ``\\uNNNN``."""
    return _UNPRINTABLE.sub(_escape, text)


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def _pretty(value: Any, limit: int | None) -> str:
    """``value`` as indented JSON (as ``json.dumps(value, indent=2, ensure_ascii=False)``),
    encoded only up to just past ``limit`` characters, lone surrogates escaped."""
    chunks: list[str] = []
    size = 0
    for chunk in json.JSONEncoder(indent=2, ensure_ascii=False).iterencode(value):
        chunks.append(chunk)
        size += len(chunk)
        if limit is not None and size > limit:
            break
    text = "".join(chunks)
    return _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def _cut(text: str, form: str, limit: int | None, note: str | None = None) -> Body:
    if limit is not None and len(text) > limit:
        return Body(text[:limit], form, True, note)
    return Body(text, form, False, note)


def _table(table: Mapping[Any, Any]) -> dict[str, Any]:
    """Properties or headers, JSON-safe, by name (names that are not UTF-8 as ``hex:``)."""
    named = [(_key(k), v) for k, v in table.items()]
    return {k: json_safe(v) for k, v in sorted(named, key=lambda item: item[0])}


def _key(key: Any) -> str:
    if isinstance(key, bytes):
        try:
            return key.decode("utf-8")
        except UnicodeDecodeError:
            return "hex:" + key.hex()
    return str(key)


# -- the broker ----------------------------------------------------------------------------------


@contextlib.contextmanager
def _taking(broker_url: str, dead: str) -> Iterator[tuple[Any, Any, int]]:
    """(connection, a channel of its own, messages ready in ``dead``); closing the channel
    puts every message taken and not acked back in place."""
    if broker_url.split("://", 1)[0] not in ("amqp", "amqps", "pyamqp"):
        raise DeadLetterError(
            f"dead letters are kept by a broker shared between processes (RabbitMQ, amqp://); "
            f"{broker_url.split('://', 1)[0]}:// keeps them inside the worker's process"
        )
    with connect(broker_url) as conn:
        if not is_amqp(conn):
            raise DeadLetterError("dead-letter tools need RabbitMQ (the py-amqp transport)")
        counts = _counts(conn, dead)
        if counts is None:
            raise DeadLetterError(
                f"queue {dead} does not exist (a worker declares it beside its queue when it "
                "starts; is the queue name right? see eventbus status)"
            )
        channel = conn.channel()
        try:
            yield conn, channel, counts[0]
        finally:
            with contextlib.suppress(Exception):
                channel.close()


def _counts(conn: Any, name: str) -> tuple[int, int] | None:
    channel = conn.channel()
    try:
        _, ready, consumers = channel.queue_declare(queue=name, passive=True)
    except (*conn.channel_errors, amqp.exceptions.NotFound):
        return None
    with contextlib.suppress(Exception):
        channel.close()
    return int(ready), int(consumers)


def _take(channel: Any, dead: str, count: int) -> Iterator[tuple[int, DeadLetter]]:
    """Up to ``count`` messages from the head of ``dead``, unacked: (delivery tag, letter).

    Raises ``DeadLetterError`` at a message whose headers the AMQP client could not read for
    their depth (their hex would say little): the caller takes none, all stay in place."""
    for taken in range(count):
        message = channel.basic_get(dead, no_ack=False)
        if message is None:
            return
        properties = dict(message.properties)
        if properties.get(UNDECODABLE) == RecursionError.__name__:
            raise DeadLetterError(
                f"a message's headers are nested too deep for the AMQP client to read (message "
                f"{taken + 1} of {dead}); it stays in the queue, as do the others"
            )
        headers = dict(properties.pop("application_headers", None) or {})
        body = message.body if isinstance(message.body, bytes) else str(message.body).encode()
        yield (
            message.delivery_info["delivery_tag"],
            DeadLetter(
                id=letter_id(properties.get("message_id"), body),
                body=body,
                properties=properties,
                headers=headers,
                redelivered=bool(message.delivery_info.get("redelivered")),
            ),
        )


def _bounded(total: int, limit: int | None) -> int:
    return total if limit is None else min(total, max(limit, 0))


def _fits(value: int) -> bool:
    """``value`` is within the 64-bit range AMQP carries."""
    return -(2**63) <= value < 2**64


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, dict | list | tuple):  # a table where text belongs: as bounded JSON
        return json.dumps(json_safe(value))
    if isinstance(value, int) and not isinstance(value, bool):
        return str(json_safe(value))  # str() refuses integers of more than 4,300 digits
    return str(value)
