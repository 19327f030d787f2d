"""Replay: feed stored events to a handler or projection, resumably, exactly once in effect.

``replay(store, handler)`` reads the store in position order from the subscriber's checkpoint
(or ``from_position``) to the head (or ``until_position``) and runs the handler on every event it
subscribes to, in chunks of events (1,000 for a replay, 100 for the worker's catch-up and live
steps), one transaction each. Each chunk commits with the subscriber's checkpoint, so an
interrupted replay leaves a consistent checkpoint and the next run resumes.

Exactly once:
- a **projection** (ordered) applies only positions above its checkpoint, read under a row lock
  in the same transaction; its live worker does the same, so the two never apply an event twice;
- a **handler** records each event as processed (``eventbus_processed``) in the transaction that
  runs it, like live delivery; an event it already processed, live or replayed, is skipped.

Hand-over to live delivery: a handler's queue must exist before the replay reads the head (the
worker and ``eventbus replay`` declare it first); every later event is then in the queue, and
what both deliver is processed once. A projection needs no such care: its live worker fills any
gap between its checkpoint and a message's position from the store.

An event whose handler raises stops the replay at that position (``ReplayStopped``: the event,
its type and the exception; the checkpoint is the position before it). With ``skip_failed`` it
is recorded in ``eventbus_failures`` and the replay goes on. The worker retries a failing event
first (``max_attempts``, ``retry_delay`` doubling): what came before it commits, the wait holds
no transaction or lock, and the retry starts again from the checkpoint. A database error at
commit (a deferred constraint) is pinned on its event by running the chunk again one event per
transaction. ``dry_run`` runs everything in one transaction that is rolled back and reports the
rows each table would have received and the errors per event type.
"""

from __future__ import annotations

import collections
import contextlib
import datetime as dt
import queue
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
import structlog
from sqlalchemy.engine import Connection

from eventbus.errors import ReplayRefused, ReplayStopped
from eventbus.events.model import Event, registered_types
from eventbus.store.store import EventStore, Page, Undecodable
from eventbus.store.tables import failures as F
from eventbus.store.tables import processed as P
from eventbus.subscribe.exactly_once import (
    describe,
    ensure_checkpoint,
    forget_processed,
    invoke,
    lock_checkpoint,
    processed_recorder,
    read_checkpoint,
    record_failure,
    save_checkpoint,
)
from eventbus.subscribe.subscriptions import Handler, Projection

log = structlog.get_logger("eventbus.replay")

Progress = Callable[[int, int], None]
"""``progress(advanced, total)``: ``advanced`` more positions of ``total`` were considered."""


@dataclass
class ReplayReport:
    """What a replay did (or, in a dry run, would have done)."""

    subscriber: str
    first: int  # the first position considered
    last: int  # the last position considered
    checkpoint: int | None = None  # the subscriber's checkpoint afterwards (None: dry run)
    applied: int = 0
    skipped: int = 0  # already applied before (live or by an earlier replay)
    failed: int = 0  # recorded in eventbus_failures (skip_failed) or, in a dry run, errors
    dry_run: bool = False
    interrupted: bool = False  # stopped between chunks (``stop`` was set)
    rows: dict[str, int] = field(default_factory=dict)  # "INSERT table" -> rows (dry run)
    errors: dict[str, list[str]] = field(default_factory=dict)  # event type -> errors

    @property
    def considered(self) -> int:
        """Positions covered, including events of types the subscriber does not take."""
        return max(0, self.last - self.first + 1)


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
    runner = _Runner(store, handler, skip_failed=skip_failed, dry_run=dry_run, stop=stop)
    return runner.run(
        from_position=from_position,
        until_position=until_position,
        types=types,
        reset=reset,
        progress=progress,
    )


def catch_up(
    store: EventStore, handler: Handler, *, stop: threading.Event | None = None
) -> ReplayReport | None:
    """Bring a subscriber that starts behind up to the head; None when it is not behind.

    A projection always catches up from its checkpoint. A handler of a ``catch_up`` service
    does on its first start (no checkpoint) and to finish an interrupted catch-up; other
    handlers start with live delivery only. Failing events are retried up to the handler's
    ``max_attempts``, then recorded in ``eventbus_failures``.
    """
    if not handler.catch_up:
        return None
    if not handler.ordered:
        with store.reader() as db:
            checkpoint = read_checkpoint(db, handler.queue)
        if checkpoint is not None and checkpoint[1]:
            return None
    runner = _Runner(store, handler, skip_failed=True, mode="catch_up", stop=stop)
    report = runner.run()
    if report.applied or report.failed:
        log.info(
            "subscriber.caught_up",
            queue=handler.queue,
            checkpoint=report.checkpoint,
            applied=report.applied,
            skipped=report.skipped,
            failed=report.failed,
            interrupted=report.interrupted,
        )
    return report


def apply_through(
    store: EventStore, handler: Handler, position: int, *, stop: threading.Event | None = None
) -> ReplayReport:
    """A projection's live step: apply what it has not applied, up to ``position``.

    The messages that woke it say ``position``; the events themselves come from the store, so
    none is skipped and none applied twice, whatever order or number the messages came in.
    ``report.checkpoint`` says how far it got (short of ``position`` when ``stop`` was set).
    """
    runner = _Runner(store, handler, skip_failed=True, mode="live", stop=stop)
    return runner.run(until_position=position, sequence=False)


class Interrupted(Exception):
    """The worker is stopping while an event waits for its retry; what came before is kept."""


@dataclass(frozen=True)
class _Rewound:
    checkpoint: int  # another process moved the checkpoint back (a reset): start from there


@dataclass(frozen=True)
class _RetryLater:
    event: Event
    delay: float


_Outcome = ReplayStopped | _Rewound | _RetryLater | None
Item = Event | Undecodable


class _Runner:
    def __init__(
        self,
        store: EventStore,
        handler: Handler,
        *,
        skip_failed: bool,
        dry_run: bool = False,
        mode: str = "replay",  # replay | catch_up | live
        stop: threading.Event | None = None,
    ) -> None:
        self.store = store
        self.handler = handler
        self.queue = handler.queue
        self.skip_failed = skip_failed
        self.dry_run = dry_run
        self.mode = mode
        self.attempts = 1 if mode == "replay" else handler.max_attempts
        self.chunk = 1000 if mode == "replay" else 100
        self.stop = stop
        self.log = log.bind(queue=handler.queue, handler=handler.name)
        self.record_processed = processed_recorder(store.engine.dialect.name)
        self._rows: collections.Counter[str] = collections.Counter()
        self._dry_checkpoint = 0
        self._failures: collections.Counter[Any] = collections.Counter()
        self._moves_checkpoint = True

    # -- the run -----------------------------------------------------------------------------

    def run(
        self,
        *,
        from_position: int | None = None,
        until_position: int | None = None,
        types: Iterable[str | type[Event]] | None = None,
        reset: bool = False,
        progress: Progress | None = None,
        sequence: bool = True,
    ) -> ReplayReport:
        names = self._check(from_position, types, reset)
        full = from_position is None and until_position is None and names is None
        with self._transactions() as begin:
            if reset:
                with begin() as db:
                    self._reset(db)
                position = 0
            else:
                with self.store.reader() as db:
                    found = read_checkpoint(db, self.queue)
                position = found[0] if found else 0
            ordered_strict = self.handler.ordered and not reset and not self.dry_run
            if ordered_strict and from_position is not None and from_position > position + 1:
                raise ReplayRefused(
                    f"projection {self.queue} resumes after its checkpoint {position}; "
                    f"from_position={from_position} would pass over positions {position + 1}-"
                    f"{from_position - 1} for good. Rebuild from there with reset=True "
                    f"from_position={from_position}, or try it with dry_run=True"
                )
            self._dry_checkpoint = position
            self._moves_checkpoint = names is None and (from_position or 1) <= position + 1
            first = position + 1 if from_position is None else from_position
            if self.handler.ordered:
                first = max(first, position + 1)
            head = self.store.head() if sequence else self.store.head(sequence=False)
            last = head if until_position is None else min(until_position, head)
            report = ReplayReport(self.queue, first, max(first - 1, last), dry_run=self.dry_run)
            report.checkpoint = None if self.dry_run else position
            if last >= first:
                self.log.debug("replay.started", first=first, last=last, dry_run=self.dry_run)
                self._loop(begin, report, position, first, last, names, full, progress)
            elif full and not self.dry_run and not self.handler.ordered:
                with begin() as db:  # nothing to feed it: caught up as it is
                    self._save(db, max(position, last), caught_up=True)
            if self.dry_run:
                report.rows = dict(self._rows)
        (self.log.debug if self.mode == "live" else self.log.info)(
            "replay.finished",
            checkpoint=report.checkpoint,
            applied=report.applied,
            skipped=report.skipped,
            failed=report.failed,
            interrupted=report.interrupted,
            dry_run=self.dry_run,
        )
        return report

    def _check(
        self, from_position: int | None, types: Iterable[str | type[Event]] | None, reset: bool
    ) -> list[str] | None:
        """Refuse what would lose events; the type names to read (None: the subscription)."""
        if from_position is not None and from_position < 1:
            raise ValueError(f"{self.queue}: from_position must be >= 1, not {from_position}")
        if reset and not isinstance(self.handler.owner, Projection):
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

    def _loop(
        self,
        begin: Callable[[], AbstractContextManager[Connection]],
        report: ReplayReport,
        position: int,
        first: int,
        last: int,
        names: list[str] | None,
        full: bool,
        progress: Progress | None,
    ) -> None:
        """Chunks from ``first`` to ``last``; starts again where a retry or a reset says."""
        total = last - first + 1
        done = first - 1
        expected = position  # the checkpoint as this loop left it
        start = first
        while True:
            restart: int | None = None
            for items, covered in self._chunks(start, last, names):
                if self.stop is not None and self.stop.is_set():
                    report.interrupted = True
                    return
                outcome = self._commit_chunk(begin, items, covered, report, expected, full)
                if isinstance(outcome, ReplayStopped):
                    raise outcome
                if isinstance(outcome, _Rewound):
                    self.log.warning("replay.rewound", checkpoint=outcome.checkpoint)
                    restart = outcome.checkpoint + 1
                    expected = outcome.checkpoint
                    break
                if isinstance(outcome, _RetryLater):
                    if self.stop is not None:
                        if self.stop.wait(outcome.delay):
                            report.interrupted = True
                            raise Interrupted(f"stopping before the retry of {outcome.event}")
                    else:
                        time.sleep(outcome.delay)
                    restart = outcome.event.position or start
                    expected = report.checkpoint or 0
                    break
                if progress:
                    progress(max(0, covered - done), total)
                done = max(done, covered)
                expected = covered
            if restart is None:
                return
            start = restart

    def _commit_chunk(
        self,
        begin: Callable[[], AbstractContextManager[Connection]],
        items: list[Item],
        covered: int,
        report: ReplayReport,
        expected: int,
        full: bool,
    ) -> _Outcome:
        """One chunk in one transaction; a commit-time database error is pinned on its event."""
        counts = (report.applied, report.skipped, report.failed, report.checkpoint)
        try:
            with begin() as db:
                return self._apply(db, items, covered, report, expected, full)
        except sa.exc.DBAPIError as exc:
            report.applied, report.skipped, report.failed, report.checkpoint = counts
            if _connectivity(exc) or self.dry_run:
                raise
            if len(items) > 1:
                self.log.warning(
                    "replay.chunk_failed_at_commit",
                    error=describe(exc.orig or exc),
                    hint="running its events one per transaction to find the one at fault",
                )
                return self._one_by_one(begin, items, covered, report, expected, full)
            if len(items) != 1 or not isinstance(items[0], Event):
                raise
            return self._failed(begin, items[0], exc, report)

    def _one_by_one(
        self,
        begin: Callable[[], AbstractContextManager[Connection]],
        items: list[Item],
        covered: int,
        report: ReplayReport,
        expected: int,
        full: bool,
    ) -> _Outcome:
        for item in items:
            position = item.position or expected
            outcome = self._commit_chunk(begin, [item], position, report, expected, False)
            if outcome is not None:
                return outcome
            expected = max(expected, position)
        return self._commit_chunk(begin, [], covered, report, expected, full)

    def _failed(
        self,
        begin: Callable[[], AbstractContextManager[Connection]],
        event: Event,
        error: BaseException,
        report: ReplayReport,
    ) -> _Outcome:
        """An event whose transaction failed at commit: retry, record or stop, in a new one."""
        with begin() as db:
            outcome = self._give_up_or_retry(db, event, error, report)
            if outcome is None:  # recorded: the checkpoint passes it
                report.checkpoint = self._save(db, event.position or 0, caught_up=False)
            return outcome

    # -- transactions ----------------------------------------------------------------------

    @contextlib.contextmanager
    def _transactions(self) -> Iterator[Callable[[], AbstractContextManager[Connection]]]:
        """Yields ``begin()``: a transaction per page, or, in a dry run, savepoints of one
        transaction that is rolled back at the end."""
        if not self.dry_run:
            yield self.store.engine.begin
            return
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

    # -- reading -----------------------------------------------------------------------------

    def _chunks(
        self, first: int, last: int, names: list[str] | None
    ) -> Iterator[tuple[list[Item], int]]:
        """Chunks of the events the handler subscribes to, and the last position each covers."""
        own = self.handler.type_names()
        if names is not None and own is not None:
            names = sorted(set(names) & set(own))
        elif names is None:
            names = own
        patterns = None if own is not None else list(self.handler.patterns)
        covered = first - 1
        pages: Iterator[Page] = self.store.read_pages(
            first, until_position=last, types=names, patterns=patterns, report_undecodable=True
        )
        if self.mode != "live" and self.store.engine.dialect.name == "postgresql":
            # Replay and catch-up read the next page while this one is applied: the wait for
            # the database overlaps the decoding and the handler (a file or in-memory SQLite
            # connection is not shared between threads).
            pages = _read_ahead(pages)
        for page in pages:
            items: list[Item] = [*page.events, *page.undecodable]
            if page.undecodable:
                items.sort(key=lambda e: e.position or 0)
            for start in range(0, len(items), self.chunk):
                part = items[start : start + self.chunk]
                end = page.last if start + self.chunk >= len(items) else part[-1].position
                yield part, end or page.last
            if not items:
                yield [], page.last
            covered = page.last
        if covered < last:
            yield [], last  # the tail holds no event it takes: the checkpoint passes it

    # -- applying ----------------------------------------------------------------------------

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

    def _apply(
        self,
        db: Connection,
        items: list[Item],
        covered: int,
        report: ReplayReport,
        expected: int,
        full: bool,
    ) -> _Outcome:
        """Apply one chunk in ``db``'s transaction, then move the checkpoint to ``covered``."""
        handler = self.handler
        if handler.ordered:
            if self.dry_run:
                current = self._dry_checkpoint
            else:
                ensure_checkpoint(db, self.queue, 0, False)
                locked = lock_checkpoint(db, self.queue)
                current = locked[0] if locked else 0
                if current < expected:
                    return _Rewound(current)
            if covered <= current:
                report.skipped += len(items)
                report.checkpoint = None if self.dry_run else current
                return None
            fresh = [e for e in items if (e.position or 0) > current]
        else:
            decoded = [e for e in items if isinstance(e, Event)]
            new_ids = self._fresh(db, decoded)
            fresh = [e for e in items if isinstance(e, Undecodable) or e.event_id in new_ids]
        report.skipped += len(items) - len(fresh)
        for index, item in enumerate(fresh):
            if isinstance(item, Undecodable):
                # A stored event this code cannot decode fails like a handler exception.
                error: BaseException | None = item.error
            else:
                error = self._run(db, item)
            if error is None:
                report.applied += 1
                continue
            if not handler.ordered and not self.dry_run:
                later = [e for e in fresh[index:] if isinstance(e, Event)]
                forget_processed(db, self.queue, later)
            outcome = self._give_up_or_retry(db, item, error, report)
            if outcome is None:
                continue  # recorded (or, in a dry run, counted): go on
            stopped_at = (item.position or 1) - 1
            report.checkpoint = self._save(db, max(stopped_at, current), caught_up=False)
            if isinstance(outcome, ReplayStopped):
                outcome = ReplayStopped(self.queue, item, error, report.checkpoint)
            return outcome
        report.checkpoint = self._save(db, covered, caught_up=full and covered >= report.last)
        return None

    def _fresh(self, db: Connection, events: list[Event]) -> set[Any]:
        """The events a handler has not processed; recorded now (a dry run only looks)."""
        if not events:
            return set()
        if self.dry_run:  # no inserts: they would hold locks a live worker waits on
            seen = db.execute(
                sa.select(P.c.event_id).where(
                    P.c.handler == self.queue, P.c.event_id.in_([e.event_id for e in events])
                )
            ).scalars()
            return {e.event_id for e in events} - set(seen)
        now = dt.datetime.now(dt.UTC)
        return set(self.record_processed(db, self.queue, events, now))

    def _give_up_or_retry(
        self, db: Connection, item: Item, error: BaseException, report: ReplayReport
    ) -> _Outcome:
        """None when the replay goes on past the failed ``item``; else what to do."""
        if self.dry_run:
            report.failed += 1
            report.errors.setdefault(item.type, []).append(
                f"position {item.position}, event {item.event_id}: {describe(error)}"
            )
            return None
        self._failures[item.event_id] += 1
        tries = self._failures[item.event_id]
        if isinstance(item, Event) and tries < self.attempts:
            delay = self.handler.retry_delay * 2 ** (tries - 1)
            self.log.warning(
                "event.retry_scheduled",
                event_id=str(item.event_id),
                event_type=item.type,
                position=item.position,
                attempt=tries,
                retry_in=delay,
                error=describe(error),
            )
            return _RetryLater(item, delay)
        if self.skip_failed:
            record_failure(db, self.queue, item, describe(error))
            report.failed += 1
            self.log.error(
                "event.gave_up",
                event_id=str(item.event_id),
                event_type=item.type,
                position=item.position,
                attempts=tries,
                error=describe(error),
                hint="recorded in eventbus_failures",
            )
            return None
        return ReplayStopped(self.queue, item, error, None)

    def _save(self, db: Connection, position: int, *, caught_up: bool) -> int | None:
        """Move the checkpoint to ``position``; returns it (None in a dry run).

        A handler's checkpoint says how far the store's history was given to it, so a replay
        narrowed by type, or starting beyond it, leaves it where it is.
        """
        if self.dry_run:
            self._dry_checkpoint = position
            return None
        if self.handler.ordered:
            save_checkpoint(db, self.queue, position, caught_up)
            return position
        found = lock_checkpoint(db, self.queue)
        if not self._moves_checkpoint:
            return found[0] if found else None
        if found is not None:
            position = max(position, found[0])
            caught_up = caught_up or found[1]
        save_checkpoint(db, self.queue, position, caught_up)
        return position

    def _run(self, db: Connection, event: Event) -> BaseException | None:
        """Run the handler on one event; a failed event's database effects are rolled back."""
        before = collections.Counter(self._rows) if self.dry_run else None
        error = invoke(
            self.handler,
            event,
            db,
            store=self.store,
            attempt=self._failures[event.event_id] + 1,
            log=self.log,
            replaying=self.mode != "live",
            dry_run=self.dry_run,
        )
        if error is not None and before is not None:
            self._rows = before  # what it wrote was rolled back: not "would write"
        return error


def _read_ahead(pages: Iterator[Page]) -> Iterator[Page]:
    """``pages``, read one page ahead by a thread of its own; its errors are raised here, in
    order. Closing this generator stops the thread after the page it is reading."""
    ready: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=1)
    stop = threading.Event()

    def read() -> None:
        try:
            for page in pages:
                ready.put(("page", page))
                if stop.is_set():
                    return
            ready.put(("end", None))
        except BaseException as exc:  # handed to the replaying thread
            ready.put(("error", exc))
        finally:
            with contextlib.suppress(Exception):
                pages.close()  # type: ignore[attr-defined]

    reader = threading.Thread(target=read, name="eventbus-replay-read-ahead", daemon=True)
    reader.start()
    try:
        while True:
            kind, value = ready.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
        with contextlib.suppress(queue.Empty):
            ready.get_nowait()  # a reader blocked on a full queue goes on and sees ``stop``
        reader.join()


def _connectivity(exc: sa.exc.DBAPIError) -> bool:
    """A lost or unavailable database (worth waiting for), not an error of the statements."""
    return exc.connection_invalidated or isinstance(
        exc, sa.exc.OperationalError | sa.exc.InterfaceError
    )


_WRITE = re.compile(
    r"\s*(INSERT\s+(?:OR\s+\w+\s+)?INTO|UPDATE|DELETE\s+FROM)\s+(\"?[\w.]+\"?)", re.IGNORECASE
)
