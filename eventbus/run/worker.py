"""Workers: consume a service's queues, run its handlers, ack only after their effects committed.

One thread owns the broker connection: it declares the topology, receives messages, sends acks,
retries and dead letters, and keeps AMQP heartbeats flowing. Handlers run on ``concurrency``
other threads, so a slow handler never starves the heartbeat.

For each batch of messages a handler thread takes (up to ``batch_size``, by default half the
prefetch: whatever arrives without a pause of a millisecond, for at most 10 ms):
1. decode; a malformed message (not JSON, unknown type, invalid fields, unsupported version)
   goes to ``<queue>.dead`` at once with the reason in ``x-dead-reason``;
2. in one database transaction, record every event as processed by this handler (insert, on
   conflict do nothing): an event already recorded is a redelivery or a re-publish and is acked
   without running the handler again; on PostgreSQL a concurrent duplicate waits for the first;
3. run the handler per event, in a savepoint if it uses ``ctx.connection``; an exception rolls
   back that event's savepoint and record, and the event is retried;
4. commit, then ack. A crash before the commit leaves nothing behind and the broker redelivers.

Retries go through delay queues: the message is republished (with publisher confirm) to
``<queue>.retry.<ms>``, whose TTL dead-letters it back to the queue, then the original is acked.
After ``max_attempts`` it goes to ``<queue>.dead`` with ``x-exception``, ``x-exception-message``,
``x-attempts``, ``x-original-routing-key`` and ``x-first-failure-at`` headers.

A lost connection is re-established with backoff; work in flight on the old connection is not
acked (the broker redelivers it; step 2 drops the duplicate). SIGTERM/SIGINT stop consumption,
let in-flight messages finish and be acked, and return.

Pause and resume: a watch thread reads ``eventbus_paused`` every second (and refreshes the lag
metrics every 5 s); the connection's thread cancels the consumer of a paused queue, and consumes
it again on resume or after a reconnect only if it is not paused. In-flight messages finish and
are acked; prefetched ones not started go back to the queue. SIGUSR1 pauses every handler of
the process, SIGUSR2 undoes that. Apart from one read when it connects, the connection's thread
leaves the database to the watch thread, so a slow database never delays heartbeats.

Partitioned handlers (``handles(..., partitions=N)``, docs/partitions.md): on RabbitMQ each
partition queue is consumed on a channel of its own, and the broker delivers it to one worker at a
time (single active consumer). Each partition's jobs go to one fixed *lane* (a handler thread of
its own, ``concurrency`` of them), so they run serially and in order. A failing event is retried
in place: it and its partition's later messages wait, unacked, in the lane. A worker gives a
partition up only by closing its channel (on pause, to balance, or with the connection), because
that is what makes the broker put the unacked messages back in order *before* the next consumer
gets any; every ``_BALANCE_INTERVAL`` it gives up the partitions beyond its share.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import os
import queue as queues
import random
import signal
import threading
import time
import traceback
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import amqp.exceptions
import kombu
import kombu.exceptions
import sqlalchemy as sa
import structlog

from eventbus.bus.runtime import connect, wait_for_frames
from eventbus.bus.wire import PROPERTIES, Message, Publisher, declare_exchange, decode, is_amqp
from eventbus.errors import BusError, MalformedMessage, PublishError
from eventbus.events.model import Event
from eventbus.events.topics import virtual_patterns
from eventbus.logging import redact
from eventbus.ops import control, metrics
from eventbus.store.store import EventStore
from eventbus.store.tables import bindings as B
from eventbus.store.tables import insert as dialect_insert
from eventbus.subscribe.exactly_once import (
    forget_processed,
    invoke,
    log_context,
    processed_recorder,
)
from eventbus.subscribe.replay import Interrupted, apply_through, catch_up
from eventbus.subscribe.subscriptions import Handler, Service

log = structlog.get_logger("eventbus.worker")

# A handler thread collects a batch while messages keep coming (each within _GAP seconds of the
# last), for at most _LINGER seconds: big batches under load, ~1 ms added when idle.
_LINGER = 0.010
_GAP = 0.001
_PAUSE_POLL = 1.0  # seconds between reads of eventbus_paused
_BALANCE_INTERVAL = 1.0  # seconds between a worker's checks of its share of partitions
_PARKED_POLL = 0.1  # a lane holding jobs looks at stop, pause and its retries this often
_DATABASE_RETRY = 1.0  # seconds a partition waits for the database before trying again

_IDLE: Any = object()  # a lane's wait ended without a job


@dataclasses.dataclass(eq=False)
class _Job:
    generation: int
    handler: Handler
    message: _Delivery
    # ack | retry | dead | requeue; partitioned handlers also: held (behind a failure of its
    # partition), exhausted (dead-letter after in-place retries), drop (neither ack nor reject:
    # the broker gives it back when its channel closes)
    outcome: str = ""
    reason: str = ""
    exception: BaseException | None = None
    event: Event | None = None
    finished: bool = False  # handed to the connection's thread
    # Partitioned handlers only: the partition, the acks of the channel it came on (None: the
    # worker's main channel), failed attempts in place so far and when the first one failed.
    partition: int | None = None
    acks: _Acks | None = None
    failures: int = 0
    first_failure: str | None = None
    # Set by the connection's thread once an exhausted job is dead-lettered (confirmed) and acked.
    settled: bool = False


@dataclasses.dataclass
class _Parked:
    """A partition's jobs waiting in their lane: for a retry (``due``) or for a resume (None);
    behind an exhausted event (``after``) until the broker has its dead letter and its ack."""

    jobs: list[_Job]
    due: float | None
    after: _Job | None = None


class Worker:
    """Runs one service's handlers against the broker and the database.

    ``Worker(service, broker_url=..., database_url=...).run()`` blocks until SIGTERM/SIGINT (or
    ``stop()``); ``start()`` runs it in a thread of this process instead. ``paused`` names the
    queues it does not consume now (``eventbus pause``, SIGUSR1).
    """

    def __init__(
        self,
        service: Service,
        *,
        broker_url: str,
        database_url: str | None = None,
        store: EventStore | None = None,
        exchange: str = "eventbus",
        prefetch: int = 100,
        concurrency: int = 1,
        batch_size: int | None = None,
        heartbeat: int = 30,
        queue_type: str = "classic",
        max_backoff: float = 10.0,
    ) -> None:
        if not service.handlers:
            raise ValueError(f"service {service.name!r} has no handlers")
        if store is None:
            if database_url is None:
                raise ValueError("pass database_url or store")
            store = EventStore(database_url)
        if queue_type not in ("classic", "quorum"):
            raise ValueError(f"queue_type must be 'classic' or 'quorum', not {queue_type!r}")
        for label, value in (("prefetch", prefetch), ("concurrency", concurrency)):
            if value < 1:
                raise ValueError(f"{label} must be >= 1")
        self.service = service
        self.store = store
        self.broker_url = broker_url
        self.exchange = exchange
        self.prefetch = prefetch
        self.concurrency = concurrency
        # Half the prefetch by default: the broker keeps sending while a batch is processed.
        self.batch_size = max(1, batch_size or prefetch // 2)
        self.heartbeat = heartbeat
        self.queue_type = queue_type
        self.max_backoff = max_backoff
        self.counts = {"processed": 0, "duplicate": 0, "retried": 0, "dead": 0}
        self.ready = threading.Event()  # set while consuming
        self.error: BaseException | None = None  # why run() gave up, if it did
        self._stop = threading.Event()
        self._generation = 0
        self._jobs: queues.Queue[_Job | None] = queues.Queue()
        self._done: queues.Queue[_Job] = queues.Queue()
        self._in_flight = 0
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._log = log.bind(service=service.name)
        self._insert_processed = processed_recorder(store.engine.dialect.name)
        self._wake_r = self._wake_w = -1  # a pipe while running: handler threads -> connection
        self._metrics = {h.queue: metrics.HandlerMetrics(h) for h in service.handlers.values()}
        metrics.track_in_flight(service.name, self)
        # Lanes: the handler threads of partitioned handlers, a job queue each (see _lane_loop).
        self._lanes: list[queues.Queue[_Job | None]] = []
        self._lane_offset = {
            h.queue: zlib.crc32(h.queue.encode()) for h in service.handlers.values() if h.partitions
        }
        # Pauses: what the watch thread read (queue -> reason) and what SIGUSR1/SIGUSR2 ask for;
        # ``_paused``: what the connection's thread applied (its queues without a consumer).
        self._db_pauses: dict[str, str | None] = {}
        self._signal_paused = False
        self._paused: frozenset[str] = frozenset()

    @property
    def paused(self) -> frozenset[str]:
        """The queues whose consumer is cancelled now (``eventbus pause`` or SIGUSR1)."""
        return self._paused

    @property
    def in_flight(self) -> int:
        """Messages received and not settled yet."""
        return self._in_flight

    # -- running -----------------------------------------------------------------------------

    def run(self, *, install_signal_handlers: bool = True) -> None:
        """Consume until stopped; SIGTERM/SIGINT stop it gracefully when run in the main thread."""
        if install_signal_handlers and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda signum, _frame: self._on_signal(signum))
            for sig in (signal.SIGUSR1, signal.SIGUSR2):
                signal.signal(sig, lambda signum, _frame: self._on_pause_signal(signum))
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        handlers = self.service.handlers.values()
        shared = self.concurrency if any(not h.partitions for h in handlers) else 0
        self._lanes = [queues.Queue() for _ in range(self.concurrency if self._lane_offset else 0)]
        threads = [
            threading.Thread(target=self._handle_loop, name=f"eventbus-handler-{i}", daemon=True)
            for i in range(shared)
        ] + [
            threading.Thread(
                target=self._lane_loop, args=(lane,), name=f"eventbus-lane-{i}", daemon=True
            )
            for i, lane in enumerate(self._lanes)
        ]
        for t in threads:
            t.start()
        watch_stop = threading.Event()
        watch = threading.Thread(
            target=self._watch, args=(watch_stop,), name="eventbus-watch", daemon=True
        )
        watch.start()
        failures = 0
        self._log.info(
            "worker.started",
            broker=redact(self.broker_url),
            queues=[h.queue for h in self.service.handlers.values()],
            prefetch=self.prefetch,
            concurrency=self.concurrency,
        )
        try:
            prepared = False
            while not self._stop.is_set():
                try:
                    if not prepared:
                        self._prepare()
                        prepared = True
                        if self._stop.is_set():
                            break
                    self._consume()
                    failures = 0
                except _recoverable() as exc:
                    self.ready.clear()
                    failures += 1
                    with self._lock:
                        self._generation += 1  # results for the lost channel are dropped
                    delay = min(self.max_backoff, 0.1 * 2 ** min(failures, 10))
                    delay *= random.uniform(0.5, 1.0)
                    self._log.warning(
                        "worker.reconnecting",
                        error=redact(f"{type(exc).__name__}: {exc}"),
                        attempt=failures,
                        retry_in=round(delay, 2),
                    )
                    self._stop.wait(delay)
        except BaseException as exc:
            self.error = exc
            self._log.error("worker.failed", error=redact(f"{type(exc).__name__}: {exc}"))
            raise
        finally:
            watch_stop.set()
            for _ in range(shared):
                self._jobs.put(None)
            for lane in self._lanes:
                lane.put(None)
            for t in threads:
                t.join(timeout=60)
            watch.join(timeout=60)
            pipe = (self._wake_r, self._wake_w)
            self._wake_r = self._wake_w = -1
            for fd in pipe:
                os.close(fd)
            self._log.info("worker.stopped", **self.counts)

    def _prepare(self) -> None:
        """Declare the queues, then bring subscribers that start behind up to the head.

        The queues exist before the catch-up reads the head, so every later event is in them:
        nothing falls between the store and live delivery. No broker connection is held while
        the catch-up runs (it may take long).
        """
        self.declare_queues()
        for handler in self.service.handlers.values():
            if self._stop.is_set():
                return
            try:
                catch_up(self.store, handler, stop=self._stop)
            except Interrupted:
                return
            except Exception as exc:
                self._log.error(
                    "worker.catch_up_failed",
                    queue=handler.queue,
                    error=redact(f"{type(exc).__name__}: {exc}"),
                )
                raise

    def declare_queues(self) -> None:
        """Declare the exchange and the service's queues and bindings (idempotent).

        ``eventbus replay`` calls it before replaying a handler, so that what is appended during
        the replay reaches the handler's queue.
        """
        with connect(self.broker_url) as conn:
            channel = conn.channel()
            try:
                self._declare(conn, channel)
            except amqp.exceptions.PreconditionFailed as exc:
                raise _declare_error(self.service, exc) from exc
            finally:
                with contextlib.suppress(Exception):
                    channel.close()

    def start(self) -> Worker:
        """Run in a daemon thread of this process; ``ready`` is set once it consumes."""
        self._stop.clear()  # a stopped worker may be started again
        self._thread = threading.Thread(
            target=self._run_in_thread,
            name=f"eventbus-worker-{self.service.name}",
            daemon=True,
        )
        self._thread.start()
        return self

    def _run_in_thread(self) -> None:
        with contextlib.suppress(Exception):  # recorded in self.error and logged by run()
            self.run(install_signal_handlers=False)

    def stop(self, timeout: float = 60.0) -> None:
        """Stop taking messages, finish and ack the in-flight ones, disconnect."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _on_signal(self, signum: int) -> None:
        self._log.info("worker.stopping", signal=signal.Signals(signum).name)
        self._stop.set()

    def _on_pause_signal(self, signum: int) -> None:
        # Only a flag: the connection's thread (perhaps the very one interrupted) applies it.
        self._signal_paused = signum == signal.SIGUSR1

    # -- pauses and lag: the watch thread ----------------------------------------------------

    def _watch(self, done: threading.Event) -> None:
        """Read the paused queues every second, refresh the lag metrics every 5 s."""
        queues = list(self._metrics)
        next_lag = 0.0
        failing = False
        while not done.is_set():
            try:
                with self.store.reader() as db:
                    self._read_pauses(db)
                    if time.monotonic() >= next_lag:
                        next_lag = time.monotonic() + metrics.REFRESH_INTERVAL
                        for queue, lag in metrics.subscriber_lag(db, queues).items():
                            self._metrics[queue].lag(lag)
                failing = False
            except Exception as exc:  # keep the pauses read last; say so once per outage
                if not failing:
                    self._log.warning(
                        "worker.pauses_unread", error=redact(f"{type(exc).__name__}: {exc}")
                    )
                failing = True
            done.wait(_PAUSE_POLL)

    def _read_pauses(self, db: sa.Connection) -> None:
        found = control.paused(db)
        mine = {q: p.reason for q, p in found.items() if q in self._metrics}
        if mine != self._db_pauses:
            self._db_pauses = mine  # a new dict: the connection's thread sees it changed

    def _apply_pauses(self, consumers: _Consumers) -> tuple[dict[str, str | None], bool]:
        """Cancel the consumers of paused queues, consume the others; returns what it applied.

        Runs on the connection's thread. A handler thread gives a message of a queue in
        ``_paused`` back to the broker instead of starting it, so ``_paused`` grows only after
        the cancel and shrinks before the consumer starts again.
        """
        db_pauses, by_signal = self._db_pauses, self._signal_paused
        reasons = {
            q: db_pauses.get(q, "SIGUSR1") for q in consumers.queues if q in db_pauses or by_signal
        }
        for queue in reasons:
            consumers.cancel(queue)
        before, self._paused = self._paused, frozenset(reasons)
        for queue in consumers.queues:
            if queue not in reasons:
                consumers.start(queue)
        for queue in sorted(self._paused - before):
            self._metrics[queue].paused(True)
            self._log.info("handler.paused", queue=queue, reason=reasons[queue])
        for queue in sorted(before - self._paused):
            self._metrics[queue].paused(False)
            self._log.info("handler.resumed", queue=queue)
        return db_pauses, by_signal

    # -- the connection's thread -------------------------------------------------------------

    def _consume(self) -> None:
        conn = connect(
            self.broker_url,
            heartbeat=self.heartbeat,
            transport_options={"polling_interval": 0.005},
        )
        with conn:
            with self._lock:
                generation = self._generation
            channel = conn.channel()
            publisher = Publisher(conn, "")  # retries and dead letters, confirmed
            try:
                self._declare(conn, channel)
            except amqp.exceptions.PreconditionFailed as exc:
                raise _declare_error(self.service, exc) from exc
            channel.basic_qos(0, self.prefetch, False)
            amqp_socket = conn.connection.sock if is_amqp(conn) else None
            acks = _Acks(channel, multiple=amqp_socket is not None)
            takers: dict[str, Callable[[_Delivery], None]] = {}
            groups: dict[str, _Partitions] = {}
            for handler in self.service.handlers.values():
                if handler.partitions and amqp_socket is not None:
                    take_from = self._partition_taker(generation, handler)
                    groups[handler.queue] = _Partitions(
                        conn, handler, take_from, prefetch=self.prefetch, log=self._log
                    )
                    continue
                if handler.partitions:  # virtual transports: one queue, partitioned here
                    takers[handler.queue] = self._stream_taker(generation, handler, acks)
                    continue

                def take(delivery: _Delivery, handler: Handler = handler) -> None:
                    acks.received(delivery.delivery_tag)
                    with self._lock:
                        self._in_flight += 1
                    self._jobs.put(_Job(generation, handler, delivery))

                takers[handler.queue] = take
            order = [h.queue for h in self.service.handlers.values()]
            consumers = _Consumers(channel, takers, groups, order, raw=bool(amqp_socket))
            self._refresh_pauses()  # a paused queue is not consumed, not even for a second
            applied = self._apply_pauses(consumers)
            self.ready.set()
            self._log.info("worker.consuming", generation=generation, paused=sorted(self._paused))
            cancelled = False
            balance_at = time.monotonic() + _BALANCE_INTERVAL
            while True:
                if self._stop.is_set() and not cancelled:
                    consumers.stop_taking()
                    cancelled = True
                    self._log.info("worker.draining", in_flight=self._in_flight)
                elif not cancelled and (
                    applied[0] is not self._db_pauses or applied[1] != self._signal_paused
                ):
                    # Settle first what is done: closing a channel would lose those acks.
                    self._settle(publisher, generation, acks)
                    applied = self._apply_pauses(consumers)
                elif not cancelled and groups and time.monotonic() >= balance_at:
                    self._settle(publisher, generation, acks)
                    consumers.balance()
                    balance_at = time.monotonic() + _BALANCE_INTERVAL
                self._settle(publisher, generation, acks)
                if cancelled and self._in_flight == 0:
                    return
                self._wait(conn, amqp_socket)
                conn.heartbeat_check()

    def _partition_taker(
        self, generation: int, handler: Handler
    ) -> Callable[[_Delivery, int, _Acks], None]:
        """What a partition's consumer does with a delivery: into the partition's lane."""
        offset = self._lane_offset[handler.queue]
        lanes = self._lanes

        def take(delivery: _Delivery, partition: int, acks: _Acks) -> None:
            acks.received(delivery.delivery_tag)
            with self._lock:
                self._in_flight += 1
            job = _Job(generation, handler, delivery, partition=partition, acks=acks)
            lanes[(offset + partition) % len(lanes)].put(job)

        return take

    def _stream_taker(
        self, generation: int, handler: Handler, acks: _Acks
    ) -> Callable[[_Delivery], None]:
        """A partitioned handler on a virtual transport: one queue, whose messages this worker
        spreads over ``handler.partitions`` lanes by a hash of their stream id."""
        offset = self._lane_offset[handler.queue]
        lanes, count = self._lanes, handler.partitions or 1

        def take(delivery: _Delivery) -> None:
            acks.received(delivery.delivery_tag)
            with self._lock:
                self._in_flight += 1
            stream = _text(delivery.headers.get("stream_id")) or ""
            partition = zlib.crc32(stream.encode()) % count
            job = _Job(generation, handler, delivery, partition=partition)
            lanes[(offset + partition) % len(lanes)].put(job)

        return take

    def _refresh_pauses(self) -> None:
        """Read ``eventbus_paused`` now; on a database error keep what was read last."""
        try:
            with self.store.reader() as db:
                self._read_pauses(db)
        except Exception as exc:  # the database being away must not cost the broker connection
            self._log.warning("worker.pauses_unread", error=redact(f"{type(exc).__name__}: {exc}"))

    def _wait(self, conn: kombu.Connection, amqp_socket: Any) -> None:
        """Receive what the broker sends, or return early when handler threads finished work.

        On AMQP the connection's socket and a pipe the handler threads write to are watched
        together, so results are acked at once (the broker sends nothing more once ``prefetch``
        messages are unacked). Virtual transports poll.
        """
        wait_for_frames(conn, amqp_socket, self._wake_r, bool(self._in_flight))

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):  # a full pipe already wakes it
            os.write(self._wake_w, b"!")

    def _declare(self, conn: kombu.Connection, channel: Any) -> None:
        declare_exchange(conn, channel, self.exchange)
        exchange = kombu.Exchange(self.exchange, "topic", durable=True)
        virtual = not is_amqp(conn)
        args = {"x-queue-type": self.queue_type} if not virtual else {}
        for handler in self.service.handlers.values():
            patterns = set(handler.patterns)
            if virtual:
                patterns = set().union(*(virtual_patterns(p) for p in patterns))
            with self._declaring(handler.queue) as db:
                bound_before, partitions_before = self._recorded(db, handler.queue)
                partitions: list[str] | None = None  # None: leave the recorded ones alone
                if handler.partitions and not virtual:
                    partitions = handler.partition_queues()
                    self._declare_partitions(
                        conn, channel, handler, patterns, bound_before, partitions_before, args
                    )
                else:
                    if partitions_before and not virtual:  # it was partitioned: retire those
                        why = "it has no partitions any more"
                        self._retire(conn, channel, handler, partitions_before, why)
                        channel.exchange_delete(handler.partition_exchange)
                        partitions = []
                    queue = kombu.Queue(
                        handler.queue,
                        durable=True,
                        auto_delete=False,
                        queue_arguments=args,
                        channel=channel,
                    )
                    queue.declare()
                    for pattern in sorted(bound_before - patterns):
                        queue.unbind_from(exchange, routing_key=pattern)
                        self._log.info("queue.unbound", queue=handler.queue, pattern=pattern)
                    for pattern in sorted(patterns):
                        queue.bind_to(exchange, routing_key=pattern)
                self._record_bindings(db, handler, patterns, partitions)
            kombu.Queue(
                handler.dead_letter_queue,
                durable=True,
                auto_delete=False,
                queue_arguments=args,
                channel=channel,
            ).declare()
            if virtual or handler.ordered or handler.partitions:
                # Virtual transports: retries are timers in this process (no TTL there).
                # Projections and partitioned handlers retry in place, so that no later event
                # (of the stream) overtakes a failed one.
                continue
            for attempt, delay in enumerate(handler.retry_delays(), start=1):
                kombu.Queue(
                    handler.retry_queue(attempt),
                    durable=True,
                    auto_delete=False,
                    channel=channel,
                    queue_arguments={
                        **args,
                        "x-message-ttl": round(delay * 1000),
                        "x-dead-letter-exchange": "",
                        "x-dead-letter-routing-key": handler.queue,
                    },
                ).declare()

    def _declare_partitions(
        self,
        conn: kombu.Connection,
        channel: Any,
        handler: Handler,
        patterns: set[str],
        bound_before: set[str],
        partitions_before: list[str],
        args: dict[str, Any],
    ) -> None:
        """A partitioned handler's topology on RabbitMQ (docs/partitions.md).

        topic exchange --patterns--> ``<queue>.partitions`` (``x-consistent-hash`` on the
        ``stream_id`` header) --weight 1 each--> ``<queue>.p00`` .. (single active consumer).
        The partition queues are bound in order before the exchange is, so that no event finds
        the hash ring empty. A new number of partitions moves streams between partitions: it
        is refused while the old partitions hold messages or have consumers.
        """
        wanted = handler.partition_queues()
        removed: list[str] = []
        if partitions_before and partitions_before != wanted:
            why = f"its partitions change from {len(partitions_before)} to {len(wanted)}"
            self._retire(conn, channel, handler, partitions_before, why, delete=False)
            removed = [q for q in partitions_before if q not in wanted]
        if _queue_state(conn, handler.queue) is not None:  # it ran unpartitioned before
            retries = [handler.retry_queue(a) for a in range(1, handler.max_attempts)]
            self._retire(conn, channel, handler, [handler.queue, *retries], "it is partitioned")
        ring = handler.partition_exchange
        try:
            channel.exchange_declare(
                ring,
                "x-consistent-hash",
                durable=True,
                auto_delete=False,
                arguments={"hash-header": "stream_id"},
            )
        except amqp.exceptions.InvalidCommand as exc:  # 503: an exchange type it does not know
            raise BusError(
                f"handler {handler.queue} has partitions, which need RabbitMQ's consistent-hash "
                "exchange: enable it with 'rabbitmq-plugins enable "
                f"rabbitmq_consistent_hash_exchange' ({exc})"
            ) from exc
        for name in wanted:
            channel.queue_declare(
                name,
                durable=True,
                auto_delete=False,
                arguments={**args, "x-single-active-consumer": True},
            )
            channel.queue_bind(name, ring, routing_key="1")
        for name in removed:
            channel.queue_unbind(name, ring, routing_key="1")
            channel.queue_delete(name, if_unused=True, if_empty=True)
            self._log.info("partition.removed", queue=handler.queue, partition_queue=name)
        for pattern in sorted(bound_before - patterns):
            channel.exchange_unbind(destination=ring, source=self.exchange, routing_key=pattern)
            self._log.info("queue.unbound", queue=handler.queue, pattern=pattern)
        for pattern in sorted(patterns):
            channel.exchange_bind(destination=ring, source=self.exchange, routing_key=pattern)

    def _retire(
        self,
        conn: kombu.Connection,
        channel: Any,
        handler: Handler,
        names: list[str],
        why: str,
        *,
        delete: bool = True,
    ) -> None:
        """Check that queues the handler no longer uses are drained, then delete them.

        A stream's earlier events waiting there would otherwise be handled beside (or after)
        its later ones in the new layout: refuse, and say how to drain them.
        """
        busy = []
        for name in names:
            state = _queue_state(conn, name)
            if state is not None and (state[0] or state[1]):
                busy.append(f"{name} ({state[0]} ready, {state[1]} consumers)")
        if busy:
            raise BusError(
                f"handler {handler.queue}: {why}, but {', '.join(busy)} still hold messages or "
                "have consumers, and a stream's events would be handled out of order. Drain "
                "first: stop the relay (events wait in the store), let the running workers "
                "empty these queues, stop them, then start the new workers and the relay "
                "(docs/partitions.md)"
            )
        if delete:
            for name in names:
                channel.queue_delete(name, if_unused=True, if_empty=True)
            self._log.info("queues.retired", queue=handler.queue, retired=names, reason=why)

    @contextlib.contextmanager
    def _declaring(self, queue: str) -> Iterator[sa.Connection]:
        """A transaction in which one worker at a time declares ``queue``'s topology and records
        it, so that workers starting together agree on what was there before (a PostgreSQL
        advisory lock on the queue's name; on SQLite the write lock does it)."""
        with self.store.engine.begin() as db:
            if db.dialect.name == "postgresql":
                db.execute(
                    sa.text("SELECT pg_advisory_xact_lock(hashtext(:key))"),
                    {"key": f"eventbus_bindings:{queue}"},
                )
            yield db

    def _recorded(self, db: sa.Connection, queue: str) -> tuple[set[str], list[str]]:
        """The patterns ``queue`` was bound with at its last start, and its partition queues."""
        ring = f"{queue}.partitions"
        rows = db.execute(
            sa.select(B.c.queue, B.c.exchange, B.c.pattern).where(
                sa.or_(
                    sa.and_(B.c.queue == queue, B.c.exchange == self.exchange),
                    B.c.exchange == ring,
                )
            )
        ).all()
        patterns = {r.pattern for r in rows if r.exchange == self.exchange}
        return patterns, sorted(r.queue for r in rows if r.exchange == ring)

    def _record_bindings(
        self, db: sa.Connection, handler: Handler, patterns: set[str], partitions: list[str] | None
    ) -> None:
        """Record the patterns (and the partition queues, unless None) as declared now.

        A partitioned handler's patterns are recorded under its queue name, though RabbitMQ
        binds its ``<queue>.partitions`` exchange; each partition queue is recorded as bound to
        that exchange with the weight "1" (that is how ``eventbus status`` finds them).
        """
        queue, ring = handler.queue, handler.partition_exchange
        _replace_rows(
            db,
            (B.c.queue == queue) & (B.c.exchange == self.exchange),
            "pattern",
            {"queue": queue, "exchange": self.exchange},
            patterns,
        )
        if partitions is not None:
            _replace_rows(
                db,
                B.c.exchange == ring,
                "queue",
                {"exchange": ring, "pattern": "1"},
                set(partitions),
            )

    def _settle(self, publisher: Publisher, generation: int, acks: _Acks) -> None:
        """Ack, retry or dead-letter what the handler threads finished (on this thread only).

        A partition's job settles on the acks of its own channel; none if that channel is
        closed (the broker gave its messages back) or the job was dropped (its channel's
        closing will).
        """
        partitions: set[_Acks] = set()
        while True:
            try:
                job = self._done.get_nowait()
            except queues.Empty:
                acks.flush()
                for own in partitions:
                    if not own.closed:
                        own.flush()
                return
            try:
                if job.generation != generation:
                    continue  # its channel is gone; the broker redelivers it
                settle = acks if job.acks is None else job.acks
                if settle.closed or job.outcome == "drop":
                    continue  # never covered by a multiple ack: it stays unsettled
                if settle is not acks:
                    partitions.add(settle)
                settle.settled(job.message.delivery_tag)
                if job.outcome == "ack":
                    settle.ack(job.message)
                elif job.outcome == "requeue":
                    job.message.reject(True)
                elif job.outcome == "retry":
                    self._retry(publisher, job)
                elif job.outcome == "exhausted":
                    headers = self._failure_headers(job, job.failures, job.first_failure or "")
                    self._give_up(publisher, job, headers, job.failures)
                    job.settled = True
                else:
                    self._dead_letter(publisher, job, job.reason)
            except _recoverable():
                raise
            except Exception as exc:
                # Its headers could not be sent back (a value AMQP cannot encode, say): dead-letter
                # it with the body, its properties and only eventbus's own headers.
                self._dead_letter(
                    publisher,
                    job,
                    f"{job.reason or job.outcome}; its headers could not be republished "
                    f"({type(exc).__name__}: {exc})",
                    keep_headers=False,
                )
                job.settled = True
            finally:
                with self._lock:
                    self._in_flight -= 1

    def _failure_headers(self, job: _Job, attempt: int, first_failure: str) -> dict[str, Any]:
        """The message's headers plus why and how often it failed (for a retry or dead letter)."""
        message, exc = job.message, job.exception
        headers = dict(message.headers or {})
        headers.setdefault("x-first-failure-at", first_failure)
        headers.setdefault("x-original-routing-key", _routing_key(message))
        headers["x-attempts"] = attempt
        headers["x-exception"] = type(exc).__name__ if exc else "Exception"
        headers["x-exception-message"] = _truncate(str(exc) if exc else job.reason)
        return headers

    def _retry(self, publisher: Publisher, job: _Job) -> None:
        handler, message = job.handler, job.message
        attempt = _attempt(message.headers or {}, handler.max_attempts)
        now = dt.datetime.now(dt.UTC).isoformat(timespec="microseconds")
        headers = self._failure_headers(job, attempt, now)
        exc = job.exception
        bound = self._log.bind(**_context(job, attempt))
        if attempt >= handler.max_attempts:
            self._metrics[handler.queue].failed()
            self._give_up(publisher, job, headers, attempt)
            return
        delay = handler.retry_delays()[attempt - 1]
        if is_amqp(publisher.connection):
            _publish(publisher, handler.retry_queue(attempt), _republish(message, headers))
        else:
            self._retry_in_process(handler.queue, _republish(message, headers), delay)
        message.ack()
        self._count("retried")
        self._metrics[handler.queue].failed()
        self._metrics[handler.queue].retried()
        bound.warning("event.retry_scheduled", retry_in=delay, **_exc_fields(exc))

    def _give_up(
        self, publisher: Publisher, job: _Job, headers: dict[str, Any], attempt: int
    ) -> None:
        """Dead-letter an event whose attempts are exhausted (its last failure was counted)."""
        handler, message = job.handler, job.message
        _publish(publisher, handler.dead_letter_queue, _republish(message, headers))
        message.ack()
        self._count("dead")
        self._metrics[handler.queue].dead_lettered("attempts_exhausted")
        self._log.bind(**_context(job, attempt)).error(
            "event.dead_lettered", reason="attempts exhausted", **_exc_fields(job.exception)
        )

    def _retry_in_process(self, queue: str, msg: Message, delay: float) -> None:
        def put_back() -> None:
            try:
                with connect(self.broker_url) as conn:
                    Publisher(conn, "").publish([(queue, msg)])
            except Exception as exc:
                self._log.error("event.retry_lost", queue=queue, error=str(exc))

        timer = threading.Timer(delay, put_back)
        timer.daemon = True
        timer.start()

    def _dead_letter(
        self, publisher: Publisher, job: _Job, reason: str, *, keep_headers: bool = True
    ) -> None:
        handler, message = job.handler, job.message
        headers = dict(message.headers or {}) if keep_headers else {}
        headers["x-dead-reason"] = _truncate(reason)
        headers.setdefault("x-original-routing-key", _routing_key(message))
        headers["x-failed-at"] = dt.datetime.now(dt.UTC).isoformat(timespec="microseconds")
        headers["x-queue"] = handler.queue
        _publish(publisher, handler.dead_letter_queue, _republish(message, headers))
        message.ack()
        self._count("dead")
        self._metrics[handler.queue].dead_lettered("malformed")
        self._log.error(
            "message.dead_lettered",
            queue=handler.queue,
            handler=handler.name,
            message_id=_text(message.properties.get("message_id")),
            message_type=_text(message.properties.get("type")),
            reason=reason,
        )

    # -- handler threads ---------------------------------------------------------------------

    def _collect(self, jobs: queues.Queue[_Job | None], first: _Job) -> list[_Job]:
        """``first`` and the jobs right behind it, as one batch.

        Lingers a moment for the messages right behind the first: one transaction (and one
        commit's fsync) per batch is what makes the processed records cheap.
        """
        batch = [first]
        deadline = time.monotonic() + _LINGER
        while len(batch) < self.batch_size:
            wait = min(_GAP, deadline - time.monotonic())
            try:
                more = jobs.get(timeout=wait) if wait > 0 else jobs.get_nowait()
            except queues.Empty:
                break
            if more is None:
                jobs.put(None)
                break
            batch.append(more)
        return batch

    def _handle_loop(self) -> None:
        while True:
            first = self._jobs.get()
            if first is None:
                return
            batch = self._collect(self._jobs, first)
            with self._lock:
                current = self._generation
            live = []
            if len(batch) > len([j for j in batch if j.generation == current]):
                self._wake()
            for job in batch:
                if job.generation != current:
                    self._finish(job)  # dropped by _settle; the broker redelivers it
                elif self._stop.is_set() or job.handler.queue in self._paused:
                    job.outcome = "requeue"  # prefetched, not started: back to the queue
                    self._finish(job)
                else:
                    live.append(job)
            if not live:
                continue
            try:
                self._handle_batch(live)
            except Exception as exc:  # a bug of ours: never lose the messages or this thread
                self._log.exception(
                    "worker.batch_failed",
                    queues=sorted({j.handler.queue for j in live}),
                    events=len(live),
                    error=f"{type(exc).__name__}: {exc}",
                )
                time.sleep(1.0)
                for job in live:
                    if not job.finished:
                        job.outcome = "requeue"
                        self._finish(job)
            finally:
                self._wake()

    def _lane_loop(self, lane: queues.Queue[_Job | None]) -> None:
        """A handler thread of partitioned handlers: each of its partitions serially, in order.

        A partition's jobs all come to the same lane, so its events never run side by side. A
        failing event is retried in place: it and its partition's later jobs are parked here,
        unacked, for ``retry_delay`` (doubling), while the lane's other partitions go on; after
        ``max_attempts`` it is dead-lettered and the parked ones run. Jobs whose channel closed
        (pause, balance, reconnect) are dropped: the broker gives their messages back in order.
        """
        parked: dict[tuple[str, int], _Parked] = {}
        while True:
            wait: float | None = None
            if parked:
                dues = [p.due for p in parked.values() if p.due is not None]
                wait = min([_PARKED_POLL, *(d - time.monotonic() for d in dues)])
            try:
                first = lane.get(timeout=wait) if wait is None or wait > 0 else lane.get_nowait()
            except queues.Empty:
                first = _IDLE
            if first is None:
                for held in parked.values():
                    self._drop(held.jobs)
                return
            batch = [] if first is _IDLE else self._collect(lane, first)
            work = self._lane_work(parked, batch)
            if not work:
                if batch:
                    self._wake()
                continue
            try:
                self._handle_batch(work, finish=_kept)
            except Exception as exc:  # a bug of ours: never lose the messages or this thread
                self._log.exception(
                    "worker.batch_failed",
                    queues=sorted({j.handler.queue for j in work}),
                    events=len(work),
                    error=f"{type(exc).__name__}: {exc}",
                )
                for job in work:
                    job.outcome = "requeue"
            self._after_lane_batch(parked, work)
            self._wake()

    def _lane_work(self, parked: dict[tuple[str, int], _Parked], batch: list[_Job]) -> list[_Job]:
        """What a lane runs now: parked partitions whose time came, then the new jobs of the
        partitions not parked (in order); the others are parked behind, or dropped."""
        with self._lock:
            current = self._generation
        stopping = self._stop.is_set()
        now = time.monotonic()
        work: list[_Job] = []
        for key, held in list(parked.items()):
            if held.after is not None and not held.after.settled:
                if not (stopping or _gone(held.after, current)):
                    continue  # its dead letter is on its way: wait (polled every _PARKED_POLL)
                # Its channel closed first: the broker gives it back, and what follows it.
                self._drop(held.jobs)
                del parked[key]
                continue
            kept = [j for j in held.jobs if not (stopping or _gone(j, current))]
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
            if stopping or _gone(job, current):
                self._drop([job])  # the broker gives it back when its channel closes
            elif key in parked:
                parked[key].jobs.append(job)
            elif job.handler.queue in self._paused:  # memory:// (on RabbitMQ it is gone)
                parked[key] = _Parked([job], None)  # kept in order until the resume
            else:
                work.append(job)
        return work

    def _after_lane_batch(self, parked: dict[tuple[str, int], _Parked], work: list[_Job]) -> None:
        """Settle what ran; park a failed event (and what follows it) for its retry in place."""
        now = time.monotonic()
        for job in work:
            key = (job.handler.queue, job.partition or 0)
            if job.outcome == "retry":
                self._failed_in_place(parked, key, job)
            elif job.outcome in ("held", "requeue"):  # behind a failure; the database is away
                held = parked.get(key)
                if held is None:
                    parked[key] = _Parked([job], now + _DATABASE_RETRY)
                else:
                    held.jobs.append(job)
            else:
                self._finish(job)

    def _failed_in_place(
        self, parked: dict[tuple[str, int], _Parked], key: tuple[str, int], job: _Job
    ) -> None:
        handler = job.handler
        job.failures += 1
        if job.first_failure is None:
            job.first_failure = dt.datetime.now(dt.UTC).isoformat(timespec="microseconds")
        self._metrics[handler.queue].failed()
        if job.failures >= handler.max_attempts:
            job.outcome = "exhausted"  # dead-lettered by the connection's thread
            self._finish(job)
            # The partition goes on once the dead letter is confirmed and the event acked: were
            # the partition to move before, its next worker would run the event again, after
            # the events behind it.
            parked[key] = _Parked([], None, after=job)
            return
        delay = handler.retry_delays()[job.failures - 1]
        parked[key] = _Parked([job], time.monotonic() + delay)
        self._count("retried")
        self._metrics[handler.queue].retried()
        self._log.bind(**_context(job, job.failures)).warning(
            "event.retry_scheduled", retry_in=delay, in_place=True, **_exc_fields(job.exception)
        )

    def _drop(self, jobs: list[_Job]) -> None:
        for job in jobs:
            job.outcome = "drop"
            self._finish(job)

    def _finish(self, job: _Job) -> None:
        job.finished = True
        self._done.put(job)

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counts[name] += n

    def _handle_batch(
        self, batch: list[_Job], finish: Callable[[_Job], None] | None = None
    ) -> None:
        """Decode, run and record a batch; ``finish`` (default: settle) takes each job."""
        finish = finish or self._finish
        good: list[_Job] = []
        for job in batch:
            try:
                message = job.message
                job.event = decode(message.body, message.properties, message.headers)
            except MalformedMessage as exc:
                job.outcome, job.reason = "dead", exc.reason
                finish(job)
                continue
            except Exception as exc:  # whatever else a hostile message makes the decoder raise
                job.outcome = "dead"
                job.reason = f"cannot be decoded: {type(exc).__name__}: {exc}"
                finish(job)
                continue
            if not job.handler.accepts(job.event):
                job.outcome = "dead"
                names = ", ".join(c.__name__ for c in job.handler.event_classes)
                job.reason = f"handler {job.handler.queue} takes {names}, not {job.event.type}"
                finish(job)
                continue
            if job.handler.ordered and job.event.position is None:
                job.outcome = "dead"
                job.reason = (
                    f"projection {job.handler.queue} applies stored events only: the message "
                    "has no 'position' header (it was not published from the event store)"
                )
                finish(job)
                continue
            good.append(job)
        ordered: dict[str, list[_Job]] = {}
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

    def _apply_ordered(self, jobs: list[_Job]) -> None:
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
                if self._stop.wait(0.5 * attempt if _connectivity(exc) else 1.0):
                    break
                if not _connectivity(exc):
                    break
                continue
            self._count("processed", report.applied)
            self._metrics[handler.queue].processed(report.applied)
            self._metrics[handler.queue].failed(report.failed)  # given up on, after retries
            reached = report.checkpoint or 0
            break
        for job in jobs:
            position = job.event.position if job.event is not None else None
            job.outcome = "ack" if position is not None and position <= reached else "requeue"

    def _run_safely(self, jobs: list[_Job]) -> None:
        """Run a batch; a database error other than a lost connection is pinned on one event.

        Connection errors are retried, then the messages go back to the broker. Any other
        database error (a constraint an effect violates at commit, say) runs the batch again one
        event per transaction: the event whose transaction fails is retried and dead-lettered
        like a handler exception; the others commit.
        """
        error: sa.exc.DBAPIError | None = None
        for attempt in range(1, 4):
            try:
                self._run_handlers(jobs)
                return
            except sa.exc.DBAPIError as exc:
                error = exc
                self._log.warning(
                    "worker.database_error",
                    error=redact(f"{type(exc).__name__}: {exc.orig}"),
                    attempt=attempt,
                    events=len(jobs),
                )
                if not _connectivity(exc):
                    break
                time.sleep(0.5 * attempt)
        else:
            for job in jobs:
                job.outcome = "requeue"
            return
        if len(jobs) == 1:
            (job,) = jobs
            job.outcome, job.exception = "retry", error
            job.reason = f"{type(error).__name__}: {error.orig if error else ''}"
            return
        blocked: set[tuple[str, int]] = set()  # partitions with a failure: their later jobs wait
        for job in jobs:
            key = (job.handler.queue, job.partition or 0)
            if job.partition is not None and key in blocked:
                job.outcome = "held"
                continue
            self._run_safely([job])
            if job.partition is not None and job.outcome in ("retry", "requeue"):
                blocked.add(key)

    def _run_handlers(self, jobs: list[_Job]) -> None:
        now = dt.datetime.now(dt.UTC)
        for job in jobs:
            job.outcome, job.reason, job.exception = "", "", None
        with self.store.engine.connect() as db, db.begin():
            fresh: set[Any] = set()
            by_handler: dict[str, list[_Job]] = {}
            for job in jobs:
                by_handler.setdefault(job.handler.queue, []).append(job)
            for queue_name, group in by_handler.items():
                events = [j.event for j in group if j.event is not None]
                inserted = self._insert_processed(db, queue_name, events, now)
                fresh.update((queue_name, event_id) for event_id in inserted)
            blocked: set[tuple[str, int]] | None = None  # partitions with a failed event
            for job in jobs:
                assert job.event is not None
                key = (job.handler.queue, job.event.event_id)
                if key not in fresh:
                    job.outcome = "ack"
                    job.reason = "duplicate"
                    continue
                fresh.discard(key)  # the same event twice in one batch runs once
                if job.partition is not None:
                    partition = (job.handler.queue, job.partition)
                    if blocked and partition in blocked:  # waits for the failed one, in order
                        forget_processed(db, job.handler.queue, [job.event])
                        job.outcome = "held"
                        continue
                    self._run_one(db, job)
                    if job.outcome == "retry":
                        blocked = (blocked or set()) | {partition}
                    continue
                self._run_one(db, job)
        processed: dict[str, int] = {}
        for job in jobs:  # committed
            if job.reason == "duplicate":
                self._count("duplicate")
                self._metrics[job.handler.queue].duplicate()
                self._log.info("event.duplicate_skipped", **_context(job, None))
            elif job.outcome == "ack":
                self._count("processed")
                processed[job.handler.queue] = processed.get(job.handler.queue, 0) + 1
        for queue, count in processed.items():  # one increment per batch, not per event
            self._metrics[queue].processed(count)

    def _run_one(self, db: Any, job: _Job) -> None:
        assert job.event is not None
        handler = job.handler
        if job.partition is None:
            attempt = _attempt(job.message.headers or {}, handler.max_attempts)
        else:  # retried in place: the worker counts
            attempt = job.failures + 1
        started = time.perf_counter()
        error = invoke(handler, job.event, db, store=self.store, attempt=attempt, log=self._log)
        seconds = time.perf_counter() - started
        self._metrics[handler.queue].handled(seconds)
        if error is not None:
            forget_processed(db, handler.queue, [job.event])
            job.outcome, job.exception = "retry", error
            job.reason = "".join(traceback.format_exception_only(error)).strip()
            return
        job.outcome = "ack"
        self._log.debug(
            "event.handled",
            **_context(job, attempt),
            ms=round(seconds * 1000, 2),
        )


class _Consumers:
    """A channel's consumers, one per queue: cancelled on pause, started again on resume."""

    def __init__(
        self,
        channel: Any,
        takers: dict[str, Callable[[_Delivery], None]],
        groups: dict[str, _Partitions],
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
            self.cancels[queue] = _consume_queue(self.channel, queue, take, raw=self.raw)

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
        after their messages in flight are acked (see ``_Partitions``)."""
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
    acks: _Acks | None = None
    active: bool = False


class _Partitions:
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
        take: Callable[[_Delivery, int, _Acks], None],
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
        acks = _Acks(channel, multiple=True)
        slot.channel, slot.acks, slot.active = channel, acks, False

        def take(delivery: _Delivery) -> None:
            if not slot.active and slot.acks is acks:
                slot.active = True
                self.log.info("partition.active", queue=self.handler.queue, partition=slot.index)
            self.take(delivery, slot.index, acks)

        arguments = {"x-priority": priority}
        _consume_queue(channel, slot.queue, take, raw=True, arguments=arguments)

    def _close(self, slot: _Slot) -> None:
        if slot.acks is not None:
            slot.acks.closed = True  # its jobs are dropped, not acked
        channel, slot.channel, slot.active = slot.channel, None, False
        if channel is not None:
            channel.close()


class _Acks:
    """Acks on one channel; on AMQP sent as one ``multiple`` ack where delivery order allows."""

    def __init__(self, channel: Any, *, multiple: bool) -> None:
        self.channel = channel
        self.multiple = multiple
        self.closed = False  # its channel was closed: the broker gave its messages back
        self.unsettled: set[int] = set()  # delivered, no outcome sent yet
        self.ready: list[int] = []  # to ack at the next flush

    def received(self, tag: int) -> None:
        self.unsettled.add(tag)

    def settled(self, tag: int) -> None:
        self.unsettled.discard(tag)

    def ack(self, message: Any) -> None:
        if self.multiple:
            self.ready.append(message.delivery_tag)
        else:
            message.ack()

    def flush(self) -> None:
        """Ack every ready tag below the oldest unsettled one at once; the others one by one."""
        if not self.ready:
            return
        floor = min(self.unsettled, default=None)
        below = [t for t in self.ready if floor is None or t < floor]
        if below:
            self.channel.basic_ack(max(below), multiple=True)
        for tag in self.ready:
            if floor is not None and tag > floor:
                self.channel.basic_ack(tag)
        self.ready.clear()


def _replace_rows(
    db: sa.Connection, where: Any, column: str, fixed: dict[str, str], values: set[str]
) -> None:
    """Make the binding rows matching ``where`` exactly ``fixed`` + each of ``values`` in
    ``column``: delete the others, insert the missing ones. Workers of one service starting
    together do this concurrently; neither fails on the other's rows (ON CONFLICT DO NOTHING).
    """
    db.execute(sa.delete(B).where(where, B.c[column].not_in(values)))
    if not values:
        return
    rows = [{**fixed, column: v} for v in sorted(values)]
    db.execute(dialect_insert(db.dialect.name, B).on_conflict_do_nothing(), rows)


def _declare_error(service: Service, exc: BaseException) -> BusError:
    # A queue exists with other arguments (classic vs quorum, another TTL): retrying cannot fix
    # that, a person must.
    return BusError(
        f"service {service.name}: cannot declare its queues: {exc}. "
        "Delete the queue or use the queue type it was declared with."
    )


def _recoverable() -> tuple[type[BaseException], ...]:
    """Errors that mean "reconnect and go on": the broker, the network or the database."""
    conn = kombu.Connection("amqp://")
    return (
        *conn.connection_errors,
        *conn.channel_errors,
        OSError,
        PublishError,
        sa.exc.OperationalError,
        sa.exc.InterfaceError,
        kombu.exceptions.OperationalError,
    )


def _connectivity(exc: sa.exc.DBAPIError) -> bool:
    """A lost or unavailable database (worth waiting for), not an error of the statements."""
    return exc.connection_invalidated or isinstance(
        exc, sa.exc.OperationalError | sa.exc.InterfaceError
    )


def _publish(publisher: Publisher, queue: str, message: Message) -> None:
    """Publish to a queue by name; a queue that is gone is an error (reconnect, redeclare)."""
    if publisher.publish([(queue, message)]):
        raise PublishError(f"queue {queue!r} does not exist: the message was returned")


def _attempt(headers: Any, max_attempts: int) -> int:
    """This delivery's attempt, from ``x-attempts`` (failures so far), within 1..max_attempts."""
    failures = _int(headers.get("x-attempts"), 0)
    return min(max(failures, 0), max_attempts - 1) + 1


def _context(job: _Job, attempt: int | None) -> dict[str, Any]:
    context = log_context(job.handler, job.event, attempt)
    if job.partition is not None:
        context["partition"] = job.partition
    return context


def _gone(job: _Job, generation: int) -> bool:
    """Its channel is closed: the broker has given the message back (or will)."""
    return job.generation != generation or (job.acks is not None and job.acks.closed)


def _kept(job: _Job) -> None:
    """A lane settles its jobs itself, after the batch (see ``_after_lane_batch``)."""


def _queue_state(conn: kombu.Connection, queue: str) -> tuple[int, int] | None:
    """(ready messages, consumers) of ``queue`` (a passive declare); None if it does not exist."""
    channel = conn.channel()
    try:
        _, ready, consumers = channel.queue_declare(queue, passive=True)
    except amqp.exceptions.NotFound:
        return None  # the broker closed the channel
    with contextlib.suppress(Exception):
        channel.close()
    return int(ready), int(consumers)


def _exc_fields(exc: BaseException | None) -> dict[str, Any]:
    if exc is None:
        return {}
    return {"error": redact(f"{type(exc).__name__}: {exc}")}


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _int(value: Any, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _truncate(text: str, limit: int = 1000) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


@dataclasses.dataclass(slots=True)
class _Delivery:
    """A received message, from py-amqp (on RabbitMQ) or kombu (virtual transports)."""

    body: bytes
    properties: dict[str, Any]  # AMQP properties (content_type, message_id, type, ...)
    headers: dict[str, Any]
    routing_key: str
    delivery_tag: int
    ack: Callable[[], None]
    reject: Callable[..., None]  # reject(requeue=bool)


def _consume_queue(
    channel: Any,
    queue: str,
    take: Callable[[_Delivery], None],
    *,
    raw: bool,
    arguments: dict[str, Any] | None = None,
) -> Callable[[], None]:
    """Consume ``queue`` on ``channel``, handing each message to ``take``; returns a cancel.

    On RabbitMQ the py-amqp channel is used directly (kombu's Message adds nothing the worker
    needs, at a cost per message); virtual transports go through a kombu Consumer.
    """
    if raw:

        def on_amqp(msg: Any) -> None:
            props = msg.properties
            tag = msg.delivery_tag
            take(
                _Delivery(
                    body=_bytes(msg.body),
                    properties=props,
                    headers=props.get("application_headers") or {},
                    routing_key=msg.delivery_info.get("routing_key") or "",
                    delivery_tag=tag,
                    ack=lambda: channel.basic_ack(tag),
                    reject=lambda requeue: channel.basic_reject(tag, requeue),
                )
            )

        consumer_tag = channel.basic_consume(
            queue, callback=on_amqp, no_ack=False, arguments=arguments
        )
        return lambda: channel.basic_cancel(consumer_tag)

    def on_kombu(message: Any) -> None:
        props = dict(message.properties or {})
        props["content_type"] = message.content_type or props.get("content_type")
        take(
            _Delivery(
                body=_bytes(message.body),
                properties=props,
                headers=message.headers or {},
                routing_key=str((message.delivery_info or {}).get("routing_key", "")),
                delivery_tag=message.delivery_tag,
                ack=message.ack,
                reject=lambda requeue: message.reject(requeue=requeue),
            )
        )

    consumer = kombu.Consumer(
        channel,
        queues=[kombu.Queue(queue, channel=channel, no_declare=True)],
        on_message=on_kombu,
        no_ack=False,
    )
    consumer.consume()
    return consumer.cancel  # type: ignore[no-any-return]


def _bytes(body: Any) -> bytes:
    return body if isinstance(body, bytes) else str(body).encode()


def _routing_key(message: _Delivery) -> str:
    return message.routing_key


def _republish(message: _Delivery, headers: dict[str, Any]) -> Message:
    props = message.properties
    properties = {k: props[k] for k in PROPERTIES if props.get(k) is not None}
    properties["delivery_mode"] = 2
    return message.body, properties, headers


@contextlib.contextmanager
def running(*workers: Any) -> Iterator[None]:
    """Start relays/workers in threads for the block, stop them after (tests, embedded mode)."""
    for w in workers:
        w.start()
    try:
        yield
    finally:
        for w in reversed(workers):
            w.stop()
