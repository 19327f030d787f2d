"""Partitioned handlers: per-stream order across competing workers (``docs/partitions.md``).

On RabbitMQ each partition queue is consumed on a channel of its own and delivered to one worker
at a time (single active consumer). A partition's jobs all go to one *lane* (a handler thread),
so they run serially and in order; a failing event is retried in place while it and its
partition's later messages wait, unacked, in the lane. A worker gives a partition up only by
closing its channel (pause, balance, reconnect): the broker then puts its unacked messages back
in order before the next consumer gets any.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import queue as queues
import random
import time
import zlib
from collections.abc import Callable
from typing import Any

import kombu

from eventbus.bus.runtime import Acks, Delivery, consume, text
from eventbus.run.jobs import (
    IDLE,
    Job,
    Outcome,
    Parked,
    WorkerBase,
    error_fields,
    gone,
    kept,
    log_fields,
)
from eventbus.subscribe.subscriptions import Handler

PARKED_POLL = 0.1  # a lane holding jobs looks at stop, pause and its retries this often
DATABASE_RETRY = 1.0  # seconds a partition waits for the database before trying again


class Lanes(WorkerBase):
    """The handler threads of partitioned handlers, and what feeds them."""

    def _partition_taker(
        self, generation: int, handler: Handler
    ) -> Callable[[Delivery, int, Acks], None]:
        """What a partition's consumer does with a delivery: into the partition's lane."""
        offset = self._lane_offset[handler.queue]
        lanes = self._lanes

        def take(delivery: Delivery, partition: int, acks: Acks) -> None:
            acks.received(delivery.delivery_tag)
            with self._lock:
                self._in_flight += 1
            job = Job(generation, handler, delivery, partition=partition, acks=acks)
            lanes[(offset + partition) % len(lanes)].put(job)

        return take

    def _stream_taker(
        self, generation: int, handler: Handler, acks: Acks
    ) -> Callable[[Delivery], None]:
        """A partitioned handler on a virtual transport: one queue, whose messages this worker
        spreads over ``handler.partitions`` lanes by a hash of their stream id."""
        offset = self._lane_offset[handler.queue]
        lanes, count = self._lanes, handler.partitions or 1

        def take(delivery: Delivery) -> None:
            acks.received(delivery.delivery_tag)
            with self._lock:
                self._in_flight += 1
            stream = text(delivery.headers.get("stream_id")) or ""
            partition = zlib.crc32(stream.encode()) % count
            job = Job(generation, handler, delivery, partition=partition)
            lanes[(offset + partition) % len(lanes)].put(job)

        return take

    def _lane_loop(self, lane: queues.Queue[Job | None]) -> None:
        """A handler thread of partitioned handlers: each of its partitions serially, in order.

        A partition's jobs all come to the same lane, so its events never run side by side. A
        failing event is retried in place: it and its partition's later jobs are parked here,
        unacked, for ``retry_delay`` (doubling), while the lane's other partitions go on; after
        ``max_attempts`` it is dead-lettered and the parked ones run. Jobs whose channel closed
        (pause, balance, reconnect) are dropped: the broker gives their messages back in order.
        """
        parked: dict[tuple[str, int], Parked] = {}
        while True:
            wait: float | None = None
            if parked:
                dues = [p.due for p in parked.values() if p.due is not None]
                wait = min([PARKED_POLL, *(d - time.monotonic() for d in dues)])
            try:
                first = lane.get(timeout=wait) if wait is None or wait > 0 else lane.get_nowait()
            except queues.Empty:
                first = IDLE
            if first is None:
                for held in parked.values():
                    self._drop(held.jobs)
                return
            batch = [] if first is IDLE else self._collect(lane, first)
            work = self._lane_work(parked, batch)
            if not work:
                if batch:
                    self._wake()
                continue
            if not self._handle_batch_safely(work, finish=kept):
                for job in work:
                    job.outcome = Outcome.REQUEUE
            self._after_lane_batch(parked, work)
            self._wake()

    def _lane_work(self, parked: dict[tuple[str, int], Parked], batch: list[Job]) -> list[Job]:
        """What a lane runs now: parked partitions whose time came, then the new jobs of the
        partitions not parked (in order); the others are parked behind, or dropped."""
        with self._lock:
            current = self._generation
        stopping = self._stop.is_set()
        now = time.monotonic()
        work: list[Job] = []
        for key, held in list(parked.items()):
            if held.after is not None and not held.after.settled:
                if not (stopping or gone(held.after, current)):
                    continue  # its dead letter is on its way: wait (polled every PARKED_POLL)
                # Its channel closed first: the broker gives it back, and what follows it.
                self._drop(held.jobs)
                del parked[key]
                continue
            kept = [j for j in held.jobs if not (stopping or gone(j, current))]
            if len(kept) < len(held.jobs):
                self._drop([j for j in held.jobs if j not in kept])
                held.jobs = kept
                if not kept:
                    del parked[key]
                    continue
            if key[0] not in self._paused and (held.due is None or held.due <= now):
                work += held.jobs
                del parked[key]
        for job in batch:
            key = (job.handler.queue, job.partition or 0)
            if stopping or gone(job, current):
                self._drop([job])  # the broker gives it back when its channel closes
            elif key in parked:
                parked[key].jobs.append(job)
            elif job.handler.queue in self._paused:  # memory:// (on RabbitMQ it is gone)
                parked[key] = Parked([job], None)  # kept in order until the resume
            else:
                work.append(job)
        return work

    def _after_lane_batch(self, parked: dict[tuple[str, int], Parked], work: list[Job]) -> None:
        """Settle what ran; park a failed event (and what follows it) for its retry in place."""
        now = time.monotonic()
        for job in work:
            key = (job.handler.queue, job.partition or 0)
            if job.outcome is Outcome.RETRY:
                self._failed_in_place(parked, key, job)
            elif job.outcome in (
                Outcome.HELD,
                Outcome.REQUEUE,
            ):  # behind a failure; the database is away
                held = parked.get(key)
                if held is None:
                    parked[key] = Parked([job], now + DATABASE_RETRY)
                else:
                    held.jobs.append(job)
            else:
                self._finish(job)

    def _failed_in_place(
        self, parked: dict[tuple[str, int], Parked], key: tuple[str, int], job: Job
    ) -> None:
        handler = job.handler
        job.failures += 1
        if job.first_failure is None:
            job.first_failure = dt.datetime.now(dt.UTC).isoformat(timespec="microseconds")
        self._metrics[handler.queue].failed()
        if job.failures >= handler.max_attempts:
            job.outcome = Outcome.EXHAUSTED  # dead-lettered by the connection's thread
            self._finish(job)
            # The partition goes on once the dead letter is confirmed and the event acked: were
            # the partition to move before, its next worker would run the event again, after
            # the events behind it.
            parked[key] = Parked([], None, after=job)
            return
        delay = handler.retry_delays()[job.failures - 1]
        parked[key] = Parked([job], time.monotonic() + delay)
        self._count("retried")
        self._metrics[handler.queue].retried()
        self._log.bind(**log_fields(job, job.failures)).warning(
            "event.retry_scheduled", retry_in=delay, in_place=True, **error_fields(job.exception)
        )


class Consumers:
    """A channel's consumers, one per queue: cancelled on pause, started again on resume."""

    def __init__(
        self,
        channel: Any,
        takers: dict[str, Callable[[Delivery], None]],
        groups: dict[str, Partitions],
        order: list[str],
        *,
        raw: bool,
    ) -> None:
        self.channel = channel
        self.takers = takers
        self.groups = groups  # partitioned handlers on RabbitMQ: channels of their own
        self.raw = raw
        self.queues = order  # handler queues (the names pauses use)
        self.cancels: dict[str, Callable[[], None]] = {}  # the queues consumed now

    def start(self, queue: str) -> None:
        group = self.groups.get(queue)
        if group is not None:
            group.start()
        elif queue not in self.cancels:
            take = self.takers[queue]
            self.cancels[queue] = consume(self.channel, queue, take, raw=self.raw)

    def cancel(self, queue: str) -> None:
        group = self.groups.get(queue)
        if group is not None:
            group.stop()
            return
        cancel = self.cancels.pop(queue, None)
        if cancel is not None:
            cancel()

    def stop_taking(self) -> None:
        """Cancel the consumers, except the partitions': those the connection's close ends,
        after their messages in flight are acked (see ``Partitions``)."""
        for queue in list(self.cancels):
            self.cancel(queue)

    def balance(self) -> None:
        for group in self.groups.values():
            group.balance(self.channel)


@dataclasses.dataclass(eq=False)
class _Slot:
    """One partition queue's consumer: its channel, the acks of that channel, and whether this
    worker is the partition's active consumer (it received a message from it)."""

    index: int
    queue: str
    channel: Any = None
    acks: Acks | None = None
    active: bool = False


class Partitions:
    """A partitioned handler's consumers on RabbitMQ: one channel per partition queue.

    Every worker consumes every partition; the broker delivers each to one of them at a time
    (single active consumer), the first to subscribe, and on its loss to the waiting consumer
    with the highest ``x-priority`` (random here, so that a lost worker's partitions spread).
    A worker gives a partition up only by closing its channel: the broker then puts the unacked
    messages back in order before the next consumer gets any (after a cancel it would deliver
    the next ones to another worker while this one still holds earlier ones).
    """

    def __init__(
        self,
        connection: kombu.Connection,
        handler: Handler,
        take: Callable[[Delivery, int, Acks], None],
        *,
        prefetch: int,
        log: Any,
    ) -> None:
        self.connection = connection
        self.handler = handler
        self.take = take
        self.prefetch = prefetch
        self.log = log
        self.slots = [_Slot(i, q) for i, q in enumerate(handler.partition_queues())]
        self.consuming = False

    def start(self) -> None:
        if not self.consuming:
            for slot in self.slots:
                self._open(slot, priority=random.randint(1, 9))
            self.consuming = True

    def stop(self) -> None:
        """Close every partition's channel: its messages go back, in order, to the next worker."""
        for slot in self.slots:
            self._close(slot)
        self.consuming = False

    def balance(self, channel: Any) -> None:
        """Give up the partitions beyond this worker's share: ceil(partitions / workers).

        Workers: the consumers of this worker's partition queues (every worker consumes every
        partition; the waiting ones count). A given-up partition is consumed again at the
        lowest priority, so another waiting worker takes it. A partition that delivered nothing
        yet is not counted as this worker's (it cannot tell), so an idle one may stay with a
        worker over its share until it is busy.
        """
        mine = [s for s in self.slots if s.active]
        if not self.consuming or len(mine) <= 1:
            return
        workers = max(int(channel.queue_declare(s.queue, passive=True)[2]) for s in mine)
        share = -(-len(self.slots) // max(1, workers))
        # Idle partitions go first: one holding unsettled messages (a batch running, an event
        # waiting for its retry in place) would start that event's attempts again elsewhere.
        mine.sort(key=lambda s: (not (s.acks is not None and s.acks.unsettled), s.index))
        for slot in mine[share:]:
            self._close(slot)
            self._open(slot, priority=0)
            self.log.info(
                "partition.released",
                queue=self.handler.queue,
                partition=slot.index,
                held=len(mine),
                share=share,
                workers=workers,
            )

    def _open(self, slot: _Slot, *, priority: int) -> None:
        channel = self.connection.channel()
        channel.basic_qos(0, self.prefetch, False)
        acks = Acks(channel, multiple=True)
        slot.channel, slot.acks, slot.active = channel, acks, False

        def take(delivery: Delivery) -> None:
            if not slot.active and slot.acks is acks:
                slot.active = True
                self.log.info("partition.active", queue=self.handler.queue, partition=slot.index)
            self.take(delivery, slot.index, acks)

        arguments = {"x-priority": priority}
        consume(channel, slot.queue, take, raw=True, arguments=arguments)

    def _close(self, slot: _Slot) -> None:
        if slot.acks is not None:
            slot.acks.closed = True  # its jobs are dropped, not acked
        channel, slot.channel, slot.active = slot.channel, None, False
        if channel is not None:
            channel.close()
