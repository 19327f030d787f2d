"""Running a batch of jobs: decode, record as processed, run the handlers, commit (then ack).

In one database transaction every event of the batch is recorded as processed by its handler
(insert, on conflict do nothing): one already recorded is a redelivery or a re-publish and is
acked without running again. Each handler runs in a savepoint if it uses ``ctx.connection``; an
exception rolls back that event's savepoint and record, and the event is retried. A projection's
batch is applied from the store instead, in position order under its checkpoint lock.
"""

from __future__ import annotations

import datetime as dt
import time
import traceback
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa

import eventbus.tracing as tracing
from eventbus.bus.delivery import expired
from eventbus.bus.wire import decode
from eventbus.errors import MalformedMessage
from eventbus.events.model import Event
from eventbus.logging import debug_enabled, redact
from eventbus.run.jobs import Job, Outcome, WorkerBase, attempt_of, log_fields
from eventbus.subscribe.exactly_once import connection_lost, forget_processed, invoke
from eventbus.subscribe.feed import Interrupted, apply_through

_LOGGER = "eventbus.worker"  # the worker's structlog logger (eventbus.run.worker)
_LOST = "the database connection was lost: nothing of the batch committed, it runs again"


class Batches(WorkerBase):
    """The worker's batch execution (on its handler threads)."""

    def _handle_batch_safely(
        self, batch: list[Job], finish: Callable[[Job], None] | None = None
    ) -> bool:
        """``_handle_batch``; False after logging a bug of ours (the caller requeues the jobs),
        so that no message and no handler thread is lost to it."""
        try:
            self._handle_batch(batch, finish)
        except Exception as exc:
            self._log.exception(
                "worker.batch_failed",
                queues=sorted({j.handler.queue for j in batch}),
                events=len(batch),
                error=f"{type(exc).__name__}: {exc}",
            )
            return False
        return True

    def _handle_batch(self, batch: list[Job], finish: Callable[[Job], None] | None = None) -> None:
        """Decode, run and record a batch; ``finish`` (default: settle) takes each job."""
        finish = finish or self._finish
        good: list[Job] = []
        # The keys of the batch's sealed personal values, in one SELECT and not cached: once
        # ``forget`` committed, only a batch that looked its keys up before unseals the subject.
        # A database error here fails the batch (logged by the caller, the messages requeued).
        keys = self.store.keys.for_bodies(
            (j.message.properties.get("type"), j.message.body) for j in batch
        )
        for job in batch:
            try:
                message = job.message
                job.event = decode(message.body, message.properties, message.headers, keys)
            except MalformedMessage as exc:
                job.outcome, job.reason = Outcome.DEAD, exc.reason
                finish(job)
                continue
            except Exception as exc:  # whatever else a hostile message makes the decoder raise
                job.outcome = Outcome.DEAD
                job.reason = f"cannot be decoded: {type(exc).__name__}: {exc}"
                finish(job)
                continue
            if not job.handler.accepts(job.event):
                job.outcome = Outcome.DEAD
                names = ", ".join(c.__name__ for c in job.handler.event_classes)
                job.reason = f"handler {job.handler.queue} takes {names}, not {job.event.type}"
                finish(job)
                continue
            if not job.handler.ordered and expired(message.headers):
                job.outcome = Outcome.EXPIRED  # settled by the handler's on_expired
                finish(job)
                continue
            if job.handler.ordered and job.event.position is None:
                job.outcome = Outcome.DEAD
                job.reason = (
                    f"projection {job.handler.queue} applies stored events only: the message "
                    "has no 'position' header (it was not published from the event store)"
                )
                finish(job)
                continue
            good.append(job)
        ordered: dict[str, list[Job]] = {}
        for job in [j for j in good if j.handler.ordered]:
            ordered.setdefault(job.handler.queue, []).append(job)
        for jobs in ordered.values():
            self._apply_ordered(jobs)
            for job in jobs:
                finish(job)
        good = [j for j in good if not j.handler.ordered]
        if good:
            self._run_safely(good)
            for job in good:
                finish(job)

    def _apply_ordered(self, jobs: list[Job]) -> None:
        """A projection's batch: apply from the store every event up to the newest position.

        The messages only say how far to go; what is applied, and in which order, comes from
        the store, under the projection's checkpoint lock. A message is acked once the
        checkpoint covers its position; the others go back to the queue (stopping, or the
        database unavailable), and the store decides again what is new when they return.
        """
        handler = jobs[0].handler
        target = max(j.event.position or 0 for j in jobs if j.event is not None)
        reached = 0
        for attempt in range(1, 4):
            try:
                with tracing.processing(self.broker_url, self.exchange, jobs):
                    report = apply_through(self.store, handler, target, stop=self._stop)
            except Interrupted:
                break
            except sa.exc.DBAPIError as exc:
                self._log.warning(
                    "worker.database_error",
                    queue=handler.queue,
                    through_position=target,
                    error=redact(f"{type(exc).__name__}: {exc.orig}"),
                    attempt=attempt,
                )
                if self._stop.wait(0.5 * attempt if connectivity(exc) else 1.0):
                    break
                if not connectivity(exc):
                    break
                continue
            self._count("processed", report.applied)
            self._metrics[handler.queue].processed(report.applied)
            self._metrics[handler.queue].failed(report.failed)  # given up on, after retries
            reached = report.checkpoint or 0
            break
        for job in jobs:
            position = job.event.position if job.event is not None else None
            job.outcome = (
                Outcome.ACK if position is not None and position <= reached else Outcome.REQUEUE
            )

    def _run_safely(self, jobs: list[Job]) -> None:
        """Run a batch; a database error other than a lost connection is pinned on one event.

        Connection errors (the database away, or lost while a handler ran: ``invoke`` raises
        that) are retried, then the messages go back to the broker; not a handler's failure,
        nothing is counted against the events. Any other database error (a constraint an effect
        violates at commit, say) runs the batch again one event per transaction: the event whose
        transaction fails is retried and dead-lettered like a handler exception; the others
        commit.
        """
        error: sa.exc.DBAPIError | None = None
        for attempt in range(1, 4):
            try:
                self._run_handlers(jobs)
                return
            except sa.exc.DBAPIError as exc:
                error = exc
                lost = bool(exc.connection_invalidated)
                self._log.warning(
                    "worker.database_error",
                    error=redact(f"{type(exc).__name__}: {exc.orig}"),
                    attempt=attempt,
                    events=len(jobs),
                    connection_lost=lost,
                    **({"hint": _LOST} if lost else {}),
                )
                if not connectivity(exc):
                    break
                if self._stop.wait(0.5 * attempt) or attempt == 3:
                    for job in jobs:  # stopping, or still away: back to the broker
                        job.outcome = Outcome.REQUEUE
                    return
        if len(jobs) == 1:
            (job,) = jobs
            job.outcome, job.exception = Outcome.RETRY, error
            job.reason = f"{type(error).__name__}: {error.orig if error else ''}"
            return
        blocked: set[tuple[str, int]] = set()  # partitions with a failure: their later jobs wait
        for job in jobs:
            key = (job.handler.queue, job.partition or 0)
            if job.partition is not None and key in blocked:
                job.outcome = Outcome.HELD
                continue
            self._run_safely([job])
            if job.partition is not None and job.outcome in (Outcome.RETRY, Outcome.REQUEUE):
                blocked.add(key)

    def _run_handlers(self, jobs: list[Job]) -> None:
        """Record the batch as processed, run its handlers, commit; then count what ran.

        Once the worker is stopping, the jobs not started yet are not run: their processed
        records are taken back and they go back to the broker (``Outcome.REQUEUE``, or parked
        and dropped by a partition's lane); what ran commits.
        """
        now = dt.datetime.now(dt.UTC)
        for job in jobs:
            job.outcome, job.reason, job.exception = Outcome.NONE, "", None
        with self.store.engine.connect() as db:
            try:
                with db.begin():
                    self._record_and_run(db, jobs, now)
            except sa.exc.SQLAlchemyError as exc:  # a commit on a connection lost unnoticed
                lost = connection_lost(db, exc)
                if lost is None or lost is exc:
                    raise
                raise lost from exc
        processed: dict[str, int] = {}
        for job in jobs:  # committed
            if job.reason == "duplicate":
                self._count("duplicate")
                self._metrics[job.handler.queue].duplicate()
                self._log.info("event.duplicate_skipped", **log_fields(job, None))
            elif job.outcome is Outcome.ACK:
                self._count("processed")
                processed[job.handler.queue] = processed.get(job.handler.queue, 0) + 1
        for queue, count in processed.items():  # one increment per batch, not per event
            self._metrics[queue].processed(count)

    def _record_and_run(self, db: sa.Connection, jobs: list[Job], now: dt.datetime) -> None:
        """In ``db``'s transaction: record the jobs as processed, run the fresh ones in order
        until the worker is stopping."""
        fresh: set[Any] = set()
        by_handler: dict[str, list[Job]] = {}
        for job in jobs:
            by_handler.setdefault(job.handler.queue, []).append(job)
        for queue_name, group in by_handler.items():
            events = [j.event for j in group if j.event is not None]
            inserted = self._insert_processed(db, queue_name, events, now)
            fresh.update((queue_name, event_id) for event_id in inserted)
        blocked: set[tuple[str, int]] | None = None  # partitions with a failed event
        unstarted: dict[str, list[Event]] = {}
        debug = debug_enabled(_LOGGER)  # once per batch: no line built to be dropped
        for job in jobs:
            assert job.event is not None
            key = (job.handler.queue, job.event.event_id)
            if key not in fresh:
                job.outcome = Outcome.ACK
                job.reason = "duplicate"
                continue
            fresh.discard(key)  # the same event twice in one batch runs once
            if self._stop.is_set():  # not started: its record goes, the message goes back
                unstarted.setdefault(job.handler.queue, []).append(job.event)
                job.outcome = Outcome.REQUEUE
                continue
            if job.partition is not None:
                partition = (job.handler.queue, job.partition)
                if blocked and partition in blocked:  # waits for the failed one, in order
                    forget_processed(db, job.handler.queue, [job.event])
                    job.outcome = Outcome.HELD
                    continue
                self._run_one(db, job, debug)
                if job.outcome is Outcome.RETRY:
                    blocked = (blocked or set()) | {partition}
                continue
            self._run_one(db, job, debug)
        for queue_name, events in unstarted.items():
            forget_processed(db, queue_name, events)

    def _run_one(self, db: Any, job: Job, debug: bool) -> None:
        assert job.event is not None
        handler = job.handler
        if job.partition is None:
            attempt = attempt_of(job.message.headers or {}, handler.max_attempts)
        else:  # retried in place: the worker counts
            attempt = job.failures + 1
        started = time.perf_counter()
        with tracing.processing(self.broker_url, self.exchange, [job]):
            error = invoke(
                self._detoured(handler),
                job.event,
                db,
                store=self.store,
                attempt=attempt,
                log=self._log,
            )
        seconds = time.perf_counter() - started
        self._metrics[handler.queue].handled(seconds)
        if error is not None:
            forget_processed(db, handler.queue, [job.event])
            job.outcome, job.exception = Outcome.RETRY, error
            job.reason = "".join(traceback.format_exception_only(error)).strip()
            return
        job.outcome = Outcome.ACK
        if debug:
            ms = round(seconds * 1000, 2)
            self._log.debug("event.handled", **log_fields(job, attempt), ms=ms)


def connectivity(exc: sa.exc.DBAPIError) -> bool:
    """A lost or unavailable database (worth waiting for), not an error of the statements."""
    return exc.connection_invalidated or isinstance(
        exc, sa.exc.OperationalError | sa.exc.InterfaceError
    )
