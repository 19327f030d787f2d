"""Replay: feed a handler or projection the stored history on demand, resumably, exactly once.

``replay(store, handler)`` runs the feed from a checkpoint (subscribe/feed.py) with replay's
options: a range of positions, some event types, a projection's reset, progress, and a dry run
that rolls everything back and reports the rows each table would have received and the errors
per event type. It refuses what would pass events over for good. A failing event stops it
(``ReplayStopped``) or, with ``skip_failed``, is recorded and passed. Details: docs/replay.md
"""

from __future__ import annotations

import collections
import contextlib
import re
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from eventbus.errors import ReplayRefused
from eventbus.events.model import Event, registered_types
from eventbus.store.store import EventStore
from eventbus.store.tables import failures as F
from eventbus.store.tables import processed as P
from eventbus.subscribe.chunks import Item
from eventbus.subscribe.exactly_once import (
    describe,
    ensure_checkpoint,
    lock_checkpoint,
    save_checkpoint,
)
from eventbus.subscribe.feed import Begin, Feed, FeedReport, Outcome
from eventbus.subscribe.subscriptions import Handler, Projection

Progress = Callable[[int, int], None]
"""``progress(advanced, total)``: ``advanced`` more positions of ``total`` were considered."""


@dataclass
class ReplayReport(FeedReport):
    """What a replay did (or, in a dry run, would have done)."""

    dry_run: bool = False
    rows: dict[str, int] = field(default_factory=dict)  # "INSERT table" -> rows (dry run)
    errors: dict[str, list[str]] = field(default_factory=dict)  # event type -> errors


def replay(
    store: EventStore,
    handler: Handler,
    *,
    from_position: int | None = None,
    until_position: int | None = None,
    types: Iterable[str | type[Event]] | None = None,
    reset: bool = False,
    skip_failed: bool = False,
    dry_run: bool = False,
    progress: Progress | None = None,
    stop: threading.Event | None = None,
) -> ReplayReport:
    """Feed stored events to ``handler`` from its checkpoint to the head; see the module doc.

    ``from_position``: start there instead of after the checkpoint. ``until_position``: stop
    there. ``types``: only these event types. ``reset``: empty a projection's read model and
    checkpoint first. A projection's checkpoint covers every event it takes, so it refuses
    ``types`` and a ``from_position`` above its checkpoint (they would pass events over for
    good) unless ``dry_run``, or ``reset`` for ``from_position`` (rebuild from there).
    ``stop``: set it to stop between chunks (``report.interrupted``).
    """
    kind = _DryRun if dry_run else _Replay
    runner = kind(
        store, handler, skip_failed=skip_failed, reset=reset, progress=progress, stop=stop
    )
    names = runner.check(from_position, types)
    report = runner.run(from_position=from_position, until_position=until_position, names=names)
    assert isinstance(report, ReplayReport)  # made by _Replay._new_report
    return report


class _Replay(Feed):
    """The feed with replay's options: refusals, a projection's reset, progress."""

    def __init__(
        self,
        store: EventStore,
        handler: Handler,
        *,
        skip_failed: bool,
        reset: bool,
        progress: Progress | None,
        stop: threading.Event | None,
    ) -> None:
        super().__init__(store, handler, skip_failed=skip_failed, mode="replay", stop=stop)
        self.reset_first = reset
        self.progress = progress
        self._done = 0  # the last position progress was told about

    def check(
        self, from_position: int | None, types: Iterable[str | type[Event]] | None
    ) -> list[str] | None:
        """Refuse what would lose events; the type names to read (None: the subscription)."""
        if from_position is not None and from_position < 1:
            raise ValueError(f"{self.queue}: from_position must be >= 1, not {from_position}")
        if self.reset_first and not isinstance(self.handler.owner, Projection):
            raise ReplayRefused(
                f"{self.queue} cannot be reset: only a Projection declares how to empty its "
                "read model (a handler's effects are its own; replay it without reset=True)"
            )
        if types is None:
            return None
        wanted = {t if isinstance(t, str) else t.type for t in types}
        known = registered_types()
        for name in sorted(wanted):
            if name not in known:
                raise ReplayRefused(
                    f"{self.queue}: no event type {name!r} is defined in this process"
                )
            cls = known[name]
            if not self.handler.subscribes(name, cls.routing_key):
                raise ReplayRefused(
                    f"{self.queue} does not subscribe to {name!r} "
                    f"(its patterns: {', '.join(self.handler.patterns)})"
                )
        if self.handler.ordered and not self.dry_run:
            raise ReplayRefused(
                f"projection {self.queue}: types= would move its checkpoint past the other "
                "event types it takes, for good; try it with dry_run=True, or rebuild it whole"
            )
        return sorted(wanted)

    def _start(self, from_position: int | None) -> int:
        """Reset first if asked; refuse a projection's start beyond its checkpoint."""
        if self.reset_first:
            with self._begin() as db:
                self._reset(db)
            position = 0
        else:
            position = super()._start(from_position)
        strict = self.handler.ordered and not self.reset_first and not self.dry_run
        if strict and from_position is not None and from_position > position + 1:
            raise ReplayRefused(
                f"projection {self.queue} resumes after its checkpoint {position}; "
                f"from_position={from_position} would pass over positions {position + 1}-"
                f"{from_position - 1} for good. Rebuild from there with reset=True "
                f"from_position={from_position}, or try it with dry_run=True"
            )
        return position

    def _reset(self, db: Connection) -> None:
        projection = self.handler.owner
        assert isinstance(projection, Projection)
        if not self.dry_run:
            ensure_checkpoint(db, self.queue, 0, False)
            lock_checkpoint(db, self.queue)
        projection.reset(db)
        db.execute(sa.delete(F).where(F.c.subscriber == self.queue))
        if not self.dry_run:
            save_checkpoint(db, self.queue, 0, False)
        self.log.warning("projection.reset", dry_run=self.dry_run)

    def _new_report(self, first: int, last: int) -> ReplayReport:
        self._done = first - 1
        return ReplayReport(self.queue, first, last, dry_run=self.dry_run)

    def _advanced(self, covered: int) -> None:
        if self.progress:
            self.progress(max(0, covered - self._done), self.report.considered)
        self._done = max(self._done, covered)


class _DryRun(_Replay):
    """A replay in one transaction that is rolled back: it counts the rows the handler would
    write per table and the errors per event type, and moves no checkpoint."""

    dry_run = True
    _rows: collections.Counter[str]  # "INSERT table" -> rows it would write
    _errors: dict[str, list[str]]  # event type -> errors
    _dry_checkpoint: int  # where the checkpoint would be

    @contextlib.contextmanager
    def _transactions(self) -> Iterator[Begin]:
        """Yields ``begin()``: savepoints of one transaction that is rolled back at the end."""
        self._rows = collections.Counter()
        self._errors = {}
        with self.store.engine.connect() as db:
            outer = db.begin()
            sa.event.listen(db, "after_cursor_execute", self._count_rows)

            @contextlib.contextmanager
            def page() -> Iterator[Connection]:
                with db.begin_nested():
                    yield db

            try:
                yield page
            finally:
                outer.rollback()

    def _count_rows(
        self, _conn: Any, cursor: Any, statement: str, parameters: Any, _ctx: Any, many: bool
    ) -> None:
        match = _WRITE.match(statement)
        if match is None:
            return
        table = match.group(2).strip('"')
        if table.startswith("eventbus_"):
            return  # bookkeeping (processed records, checkpoints), not the handler's effects
        verb = match.group(1).split()[0].upper()
        rowcount = cursor.rowcount
        if rowcount is None or rowcount < 0 or (rowcount == 0 and "RETURNING" in statement):
            # Not known before the rows are fetched (SQLite with RETURNING): one per statement.
            rowcount = len(parameters) if many else 1
        self._rows[f"{verb} {table}"] += rowcount

    def _start(self, from_position: int | None) -> int:
        self._dry_checkpoint = super()._start(from_position)
        return self._dry_checkpoint

    def _finish(self) -> None:
        assert isinstance(self.report, ReplayReport)
        self.report.checkpoint = None
        self.report.rows = dict(self._rows)
        self.report.errors = self._errors

    def _commit_chunk(self, items: list[Item], covered: int, expected: int, full: bool) -> Outcome:
        """A database error is raised as it is (nothing is committed to pin it on an event)."""
        with self._begin() as db:
            return self._apply(db, items, covered, expected, full)

    def _lock_position(self, db: Connection, expected: int) -> int:
        return self._dry_checkpoint

    def _fresh(self, db: Connection, events: list[Event]) -> set[Any]:
        """The events a handler has not processed; only looked up: inserts would hold locks a
        live worker waits on."""
        if not events:
            return set()
        seen = db.execute(
            sa.select(P.c.event_id).where(
                P.c.handler == self.queue, P.c.event_id.in_([e.event_id for e in events])
            )
        ).scalars()
        return {e.event_id for e in events} - set(seen)

    def _forget(self, db: Connection, events: list[Event]) -> None:
        pass  # nothing was recorded

    def _give_up_or_retry(self, db: Connection, item: Item, error: BaseException) -> Outcome:
        """Counted and described; the dry run goes on."""
        self.report.failed += 1
        self._errors.setdefault(item.type, []).append(
            f"position {item.position}, event {item.event_id}: {describe(error)}"
        )
        return None

    def _save(self, db: Connection, position: int, *, caught_up: bool) -> int | None:
        self._dry_checkpoint = position
        return None

    def _run(self, db: Connection, event: Event) -> BaseException | None:
        before = collections.Counter(self._rows)
        error = super()._run(db, event)
        if error is not None:
            self._rows = before  # what it wrote was rolled back: not "would write"
        return error

    def _run_batch(self, db: Connection, events: list[Event]) -> BaseException | None:
        before = collections.Counter(self._rows)
        error = super()._run_batch(db, events)
        if error is not None:
            self._rows = before
        return error


_WRITE = re.compile(
    r"\s*(INSERT\s+(?:OR\s+\w+\s+)?INTO|UPDATE|DELETE\s+FROM)\s+(\"?[\w.]+\"?)", re.IGNORECASE
)
