"""The feed from a checkpoint: stored events, in position order, into one handler or projection.

Shared by catch-up (``catch_up``: a worker brings a subscriber to the head before it consumes),
a projection's live step (``apply_through``) and replay. Chunks of events commit one transaction
each, with the subscriber's checkpoint, so a stop at any point leaves a consistent checkpoint.
A projection applies only positions above its row-locked checkpoint, a handler only events it
has not recorded as processed: no event has a second effect. A failing event is retried, then
recorded in ``eventbus_failures`` or stops the feed at its position. Details: docs/replay.md
"""

from __future__ import annotations

import collections
import contextlib
import datetime as dt
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
import structlog
from sqlalchemy.engine import Connection

from eventbus.errors import ReplayStopped
from eventbus.events.model import Event
from eventbus.store.store import EventStore, Undecodable
from eventbus.subscribe.batches import batch_run, invoke_batch
from eventbus.subscribe.calls import ChunkCalls
from eventbus.subscribe.chunks import Item, chunks
from eventbus.subscribe.exactly_once import (
    describe,
    ensure_checkpoint,
    forget_processed,
    lock_checkpoint,
    processed_recorder,
    read_checkpoint,
    record_failure,
    save_checkpoint,
)
from eventbus.subscribe.subscriptions import Handler, Projection

log = structlog.get_logger("eventbus.replay")

Begin = Callable[[], AbstractContextManager[Connection]]
"""``begin()``: a transaction to apply one chunk in."""
BATCH_REPLAY_CHUNK = 5000  # events per chunk replaying a projection with handles_batch functions


@dataclass
class FeedReport:
    """What a feed did: how far it got and what happened to the events it considered."""

    subscriber: str
    first: int  # the first position considered
    last: int  # the last position considered
    checkpoint: int | None = None  # the subscriber's checkpoint afterwards (None: dry run)
    applied: int = 0
    skipped: int = 0  # already applied before (live or by an earlier replay)
    failed: int = 0  # recorded in eventbus_failures (skip_failed) or, in a dry run, errors
    interrupted: bool = False  # stopped between chunks (``stop`` was set)

    @property
    def considered(self) -> int:
        """Positions covered, including events of types the subscriber does not take."""
        return max(0, self.last - self.first + 1)

    def summary(self) -> dict[str, Any]:
        """The fields a log line about the finished feed carries."""
        return {
            "checkpoint": self.checkpoint,
            "applied": self.applied,
            "skipped": self.skipped,
            "failed": self.failed,
            "interrupted": self.interrupted,
        }


def catch_up(
    store: EventStore, handler: Handler, *, stop: threading.Event | None = None
) -> FeedReport | None:
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
    report = Feed(store, handler, skip_failed=True, mode="catch_up", stop=stop).run()
    if report.applied or report.failed:
        log.info("subscriber.caught_up", queue=handler.queue, **report.summary())
    return report


def apply_through(
    store: EventStore, handler: Handler, position: int, *, stop: threading.Event | None = None
) -> FeedReport:
    """A projection's live step: apply what it has not applied, up to ``position``.

    The messages that woke it say ``position``; the events themselves come from the store, so
    none is skipped and none applied twice, whatever order or number the messages came in.
    ``report.checkpoint`` says how far it got (short of ``position`` when ``stop`` was set).
    """
    feed = Feed(store, handler, skip_failed=True, mode="live", stop=stop)
    return feed.run(until_position=position, sequence=False)


class Interrupted(Exception):
    """The worker is stopping while an event waits for its retry; what came before is kept."""


@dataclass(frozen=True)
class _Rewound:
    checkpoint: int  # another process moved the checkpoint back (a reset): start from there


@dataclass(frozen=True)
class _RetryLater:
    event: Event
    delay: float


Outcome = ReplayStopped | _Rewound | _RetryLater | None


class Feed:
    """Stored events from a subscriber's checkpoint into its handler, a chunk a transaction.

    ``mode``: ``replay`` (chunks of 1,000; 5,000 for a projection with ``handles_batch``
    functions; no retry), ``catch_up`` or ``live`` (chunks of 100,
    the handler's retry policy). One run per instance. Replay's options and dry runs extend it
    (subscribe/replay.py) through the methods marked as hooks.
    """

    dry_run = False
    report: FeedReport  # of the run
    _begin: Begin  # a transaction for one chunk, in the run
    _calls: ChunkCalls  # the handler's calls in the chunk being applied

    def __init__(
        self,
        store: EventStore,
        handler: Handler,
        *,
        skip_failed: bool,
        mode: str = "replay",  # replay | catch_up | live
        stop: threading.Event | None = None,
    ) -> None:
        self.store = store
        self.handler = handler
        self.queue = handler.queue
        self.skip_failed = skip_failed
        self.mode = mode
        self.attempts = 1 if mode == "replay" else handler.max_attempts
        self.chunk = 1000 if mode == "replay" else 100
        self.spans_pages = False
        owner = handler.owner
        if mode == "replay" and isinstance(owner, Projection) and any(r[3] for r in owner._routes):
            self.chunk = BATCH_REPLAY_CHUNK  # set-based SQL costs per chunk more than per event
            self.spans_pages = True
        self.stop = stop
        self.log = log.bind(queue=handler.queue, handler=handler.name)
        self.record_processed = processed_recorder(store.engine.dialect.name)
        self._failures: collections.Counter[Any] = collections.Counter()
        self._moves_checkpoint = True

    # -- the run -----------------------------------------------------------------------------

    def run(
        self,
        *,
        from_position: int | None = None,
        until_position: int | None = None,
        names: list[str] | None = None,
        sequence: bool = True,
    ) -> FeedReport:
        """Feed ``from_position`` (default: after the checkpoint) to ``until_position`` (default:
        the head); ``names``: only these event types (None: all the handler subscribes to)."""
        full = from_position is None and until_position is None and names is None
        with self._transactions() as begin:
            self._begin = begin
            position = self._start(from_position)
            self._moves_checkpoint = names is None and (from_position or 1) <= position + 1
            first = position + 1 if from_position is None else from_position
            if self.handler.ordered:
                first = max(first, position + 1)
            head = self.store.head() if sequence else self.store.head(sequence=False)
            last = head if until_position is None else min(until_position, head)
            report = self.report = self._new_report(first, max(first - 1, last))
            report.checkpoint = position
            if last >= first:
                self.log.debug("replay.started", first=first, last=last, dry_run=self.dry_run)
                self._loop(position, first, last, names, full)
            elif full and not self.handler.ordered:
                with begin() as db:  # nothing to feed it: caught up as it is
                    self._save(db, max(position, last), caught_up=True)
            self._finish()
        (self.log.debug if self.mode == "live" else self.log.info)(
            "replay.finished", **report.summary(), dry_run=self.dry_run
        )
        return report

    def _loop(
        self, position: int, first: int, last: int, names: list[str] | None, full: bool
    ) -> None:
        """Chunks from ``first`` to ``last``; starts again where a retry or a reset says."""
        report = self.report
        expected = position  # the checkpoint as this loop left it
        start = first
        read_ahead = self.mode != "live"  # replay and catch-up, not a live step
        while True:
            restart: int | None = None
            parts = chunks(
                self.store,
                self.handler,
                start,
                last,
                names,
                size=self.chunk,
                read_ahead=read_ahead,
                spans=self.spans_pages,
            )
            for items, covered in parts:
                if self.stop is not None and self.stop.is_set():
                    report.interrupted = True
                    return
                outcome = self._commit_chunk(items, covered, expected, full)
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
                self._advanced(covered)
                expected = covered
            if restart is None:
                return
            start = restart

    def _commit_chunk(self, items: list[Item], covered: int, expected: int, full: bool) -> Outcome:
        """One chunk in one transaction; a commit-time database error is pinned on its event."""
        report = self.report
        counts = (report.applied, report.skipped, report.failed, report.checkpoint)
        try:
            with self._begin() as db:
                return self._apply(db, items, covered, expected, full)
        except sa.exc.DBAPIError as exc:
            report.applied, report.skipped, report.failed, report.checkpoint = counts
            if _connectivity(exc):
                raise
            if len(items) > 1:
                self.log.warning(
                    "replay.chunk_failed_at_commit",
                    error=describe(exc.orig or exc),
                    hint="running its events one per transaction to find the one at fault",
                )
                return self._one_by_one(items, covered, expected, full)
            if len(items) != 1 or not isinstance(items[0], Event):
                raise
            return self._failed(items[0], exc)

    def _one_by_one(self, items: list[Item], covered: int, expected: int, full: bool) -> Outcome:
        for item in items:
            position = item.position or expected
            outcome = self._commit_chunk([item], position, expected, False)
            if outcome is not None:
                return outcome
            expected = max(expected, position)
        return self._commit_chunk([], covered, expected, full)

    def _failed(self, event: Event, error: BaseException) -> Outcome:
        """An event whose transaction failed at commit: retry, record or stop, in a new one."""
        with self._begin() as db:
            outcome = self._give_up_or_retry(db, event, error)
            if outcome is None:  # recorded: the checkpoint passes it
                self.report.checkpoint = self._save(db, event.position or 0, caught_up=False)
            return outcome

    # -- hooks (replay and its dry run override these) -----------------------------------------

    @contextlib.contextmanager
    def _transactions(self) -> Iterator[Begin]:
        """Yields ``begin()``: a transaction per chunk."""
        yield self.store.engine.begin

    def _start(self, from_position: int | None) -> int:
        """The checkpoint the feed starts from."""
        with self.store.reader() as db:
            found = read_checkpoint(db, self.queue)
        return found[0] if found else 0

    def _new_report(self, first: int, last: int) -> FeedReport:
        return FeedReport(self.queue, first, last)

    def _advanced(self, covered: int) -> None:
        """A chunk up to ``covered`` is done."""

    def _finish(self) -> None:
        """The last chunk is done (inside the run's transactions)."""

    # -- applying ----------------------------------------------------------------------------

    def _apply(
        self, db: Connection, items: list[Item], covered: int, expected: int, full: bool
    ) -> Outcome:
        """Apply one chunk in ``db``'s transaction, then move the checkpoint to ``covered``."""
        handler = self.handler
        report = self.report
        if handler.ordered:
            locked = self._lock_position(db, expected)
            if isinstance(locked, _Rewound):
                return locked
            current = locked
            if covered <= current:
                report.skipped += len(items)
                report.checkpoint = current
                return None
            fresh = [e for e in items if (e.position or 0) > current]
        else:
            current = 0  # a handler skips by processed record; its checkpoint only moves on
            decoded = [e for e in items if isinstance(e, Event)]
            new_ids = self._fresh(db, decoded)
            fresh = [e for e in items if isinstance(e, Undecodable) or e.event_id in new_ids]
        report.skipped += len(items) - len(fresh)
        calls = self._calls = ChunkCalls(
            handler,
            db,
            store=self.store,
            log=self.log,
            replaying=self.mode != "live",
            dry_run=self.dry_run,
        )
        try:
            return self._apply_fresh(db, fresh, covered, current, full)
        finally:
            calls.unbind()

    def _apply_fresh(
        self, db: Connection, fresh: list[Item], covered: int, current: int, full: bool
    ) -> Outcome:
        handler, report, calls = self.handler, self.report, self._calls
        index, one_by_one = 0, 0  # events before ``one_by_one`` go one per call
        while index < len(fresh):
            item = fresh[index]
            run = batch_run(handler, fresh, index) if calls.batches and index >= one_by_one else []
            if run:  # a projection's handles_batch function: one call for the run
                calls.unbind()
                if self._run_batch(db, run) is None:
                    report.applied += len(run)
                    index += len(run)
                    continue
                one_by_one = index + len(run)  # failed: rolled back; find the one at fault
            index += 1
            if isinstance(item, Undecodable):
                # A stored event this code cannot decode fails like a handler exception.
                calls.unbind()
                error: BaseException | None = item.error
            else:
                error = self._run(db, item)
            if error is None:
                report.applied += 1
                continue
            calls.unbind()  # what follows logs about this event with its own fields
            if not handler.ordered:
                self._forget(db, [e for e in fresh[index - 1 :] if isinstance(e, Event)])
            outcome = self._give_up_or_retry(db, item, error)
            if outcome is None:
                continue  # recorded (or, in a dry run, counted): go on
            stopped_at = (item.position or 1) - 1
            report.checkpoint = self._save(db, max(stopped_at, current), caught_up=False)
            if isinstance(outcome, ReplayStopped):
                outcome = ReplayStopped(self.queue, item, error, report.checkpoint)
            return outcome
        report.checkpoint = self._save(db, covered, caught_up=full and covered >= report.last)
        return None

    def _lock_position(self, db: Connection, expected: int) -> int | _Rewound:
        """A projection's checkpoint, row-locked; ``_Rewound`` if it went back behind
        ``expected`` (a reset by another process)."""
        ensure_checkpoint(db, self.queue, 0, False)
        locked = lock_checkpoint(db, self.queue)
        current = locked[0] if locked else 0
        return _Rewound(current) if current < expected else current

    def _fresh(self, db: Connection, events: list[Event]) -> set[Any]:
        """The events a handler has not processed; recorded as processed now."""
        if not events:
            return set()
        now = dt.datetime.now(dt.UTC)
        return set(self.record_processed(db, self.queue, events, now))

    def _forget(self, db: Connection, events: list[Event]) -> None:
        """Take back the processed records of events a failure left unrun (they run again)."""
        forget_processed(db, self.queue, events)

    def _give_up_or_retry(self, db: Connection, item: Item, error: BaseException) -> Outcome:
        """None when the feed goes on past the failed ``item``; else what to do."""
        self._failures[item.event_id] += 1
        tries = self._failures[item.event_id]
        if isinstance(item, Event) and tries < self.attempts:
            delay = self.handler.retry_delay * 2 ** (tries - 1)
            self.log.warning(
                "event.retry_scheduled",
                **_about(item),
                attempt=tries,
                retry_in=delay,
                error=describe(error),
            )
            return _RetryLater(item, delay)
        if self.skip_failed:
            record_failure(db, self.queue, item, describe(error))
            self.report.failed += 1
            self.log.error(
                "event.gave_up",
                **_about(item),
                attempts=tries,
                error=describe(error),
                hint="recorded in eventbus_failures",
            )
            return None
        return ReplayStopped(self.queue, item, error, None)

    def _save(self, db: Connection, position: int, *, caught_up: bool) -> int | None:
        """Move the checkpoint to ``position``; returns it.

        A handler's checkpoint says how far the store's history was given to it, so a replay
        narrowed by type, or starting beyond it, leaves it where it is.
        """
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

    def _run_batch(self, db: Connection, events: list[Event]) -> BaseException | None:
        """Run a projection's batch function on ``events``; rolled back if it failed."""
        return invoke_batch(
            self.handler,
            events,
            db,
            store=self.store,
            log=self.log,
            replaying=self.mode != "live",
            dry_run=self.dry_run,
        )

    def _run(self, db: Connection, event: Event) -> BaseException | None:
        """Run the handler on one event; a failed event's database effects are rolled back."""
        failures = self._failures
        return self._calls(event, failures[event.event_id] + 1 if failures else 1)


def _about(item: Item) -> dict[str, Any]:
    """The fields a log line about a failed event starts with."""
    return {"event_id": str(item.event_id), "event_type": item.type, "position": item.position}


def _connectivity(exc: sa.exc.DBAPIError) -> bool:
    """A lost or unavailable database (worth waiting for), not an error of the statements."""
    return exc.connection_invalidated or isinstance(
        exc, sa.exc.OperationalError | sa.exc.InterfaceError
    )
