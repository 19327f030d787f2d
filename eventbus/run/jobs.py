"""The worker's units of work (``Job``, ``Outcome``) and the state its parts share (``WorkerBase``).

A job is one received message on its way through a handler: decoded, run, and given an
``Outcome`` that the connection's thread then carries out (ack, retry, dead-letter, ...).
"""

from __future__ import annotations

import dataclasses
import enum
import queue as queues
import time
from typing import TYPE_CHECKING, Any

from eventbus.bus.runtime import Acks, Delivery, Runtime, int_or
from eventbus.events.model import Event
from eventbus.logging import redact
from eventbus.ops import metrics
from eventbus.store.store import EventStore
from eventbus.subscribe.exactly_once import RecordProcessed, log_context
from eventbus.subscribe.subscriptions import Handler, Service

# A handler thread collects a batch while messages keep coming (each within GAP seconds of the
# last), for at most LINGER seconds: big batches under load, ~1 ms added when idle.
LINGER = 0.010
GAP = 0.001

IDLE: Any = object()  # a lane's wait ended without a job


class Outcome(enum.Enum):
    """What the connection's thread does with a finished job."""

    NONE = "none"  # not decided yet
    ACK = "ack"
    RETRY = "retry"  # through a delay queue (or in place, for partitions)
    DEAD = "dead"  # malformed: to the dead-letter queue at once
    REQUEUE = "requeue"  # not started (stopping, paused, database away): back to the queue
    HELD = "held"  # partitions: behind a failure of its partition
    EXHAUSTED = "exhausted"  # partitions: dead-letter after the retries in place
    DROP = "drop"  # partitions: neither ack nor reject, its channel's closing gives it back
    EXPIRED = "expired"  # received after its event's expires_at: acked or dead-lettered, not run


@dataclasses.dataclass(eq=False)
class Job:
    generation: int
    handler: Handler
    message: Delivery
    outcome: Outcome = Outcome.NONE
    reason: str = ""
    exception: BaseException | None = None
    event: Event | None = None
    finished: bool = False  # handed to the connection's thread
    # Partitioned handlers only: the partition, the acks of the channel it came on (None: the
    # worker's main channel), failed attempts in place so far and when the first one failed.
    partition: int | None = None
    acks: Acks | None = None
    failures: int = 0
    first_failure: str | None = None
    # Set by the connection's thread once an exhausted job is dead-lettered (confirmed) and acked.
    settled: bool = False


@dataclasses.dataclass
class Parked:
    """A partition's jobs waiting in their lane: for a retry (``due``) or for a resume (None);
    behind an exhausted event (``after``) until the broker has its dead letter and its ack."""

    jobs: list[Job]
    due: float | None
    after: Job | None = None


class WorkerBase(Runtime):
    """What the worker's parts (settling, lanes, batches) share; ``Worker`` sets it up."""

    kind = "worker"
    service: Service
    store: EventStore
    exchange: str
    batch_size: int
    counts: dict[str, int]
    _jobs: queues.Queue[list[Job] | None]  # what the consumers took, a run of frames at once
    _done: queues.Queue[Job | list[Job]]  # finished: one job, or a handler thread's batch
    _metrics: dict[str, metrics.HandlerMetrics]
    _insert_processed: RecordProcessed
    _paused: frozenset[str]
    _lanes: list[queues.Queue[Job | None]]
    _lane_offset: dict[str, int]

    if TYPE_CHECKING:

        def _handle_batch(self, batch: list[Job], finish: Any = None) -> None: ...

        def _handle_batch_safely(self, batch: list[Job], finish: Any = None) -> bool: ...

        def _detoured(self, handler: Handler) -> Any: ...

    def _collect(self, jobs: queues.Queue[Job | None], first: Job) -> list[Job]:
        """``first`` and the jobs right behind it, as one batch.

        Lingers a moment for the messages right behind the first: one transaction (and one
        commit's fsync) per batch is what makes the processed records cheap.
        """
        batch = [first]
        deadline = time.monotonic() + LINGER
        while len(batch) < self.batch_size:
            wait = min(GAP, deadline - time.monotonic())
            try:
                more = jobs.get(timeout=wait) if wait > 0 else jobs.get_nowait()
            except queues.Empty:
                break
            if more is None:
                jobs.put(None)
                break
            batch.append(more)
        return batch

    def _drop(self, jobs: list[Job]) -> None:
        for job in jobs:
            job.outcome = Outcome.DROP
            self._finish(job)

    def _finish(self, job: Job) -> None:
        job.finished = True
        self._done.put(job)

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counts[name] = self.counts.get(name, 0) + n  # "expired": from the first one


def log_fields(job: Job, attempt: int | None) -> dict[str, Any]:
    context = log_context(job.handler, job.event, attempt)
    if job.partition is not None:
        context["partition"] = job.partition
    return context


def gone(job: Job, generation: int) -> bool:
    """Its channel is closed: the broker has given the message back (or will)."""
    return job.generation != generation or (job.acks is not None and job.acks.closed)


def kept(job: Job) -> None:
    """A lane settles its jobs itself, after the batch (see ``_after_lane_batch``)."""


def error_fields(exc: BaseException | None) -> dict[str, Any]:
    if exc is None:
        return {}
    return {"error": redact(f"{type(exc).__name__}: {exc}")}


def attempt_of(headers: Any, max_attempts: int) -> int:
    """This delivery's attempt, from ``x-attempts`` (failures so far), within 1..max_attempts."""
    failures = int_or(headers.get("x-attempts"), 0)
    return min(max(failures, 0), max_attempts - 1) + 1
