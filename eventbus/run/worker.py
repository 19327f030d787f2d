"""Workers: consume a service's queues, run its handlers, ack only after their effects committed.

A worker is the connection runtime (``eventbus.bus.runtime``) with its topology, batches
(``eventbus.run.batch``), settling (``eventbus.run.settle``) and partition lanes
(``eventbus.run.partitions``). Here: starting, catch-up before live delivery, and pauses, read
by a watch thread so that a slow database never delays heartbeats.

Details: ``docs/operations.md`` (workers and pauses).
"""

from __future__ import annotations

import contextlib
import queue as queues
import signal
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import sqlalchemy as sa
import structlog

from eventbus.bus.runtime import Acks, Delivery, broker_errors, connect
from eventbus.bus.topology import Topology
from eventbus.bus.wire import Publisher, is_amqp
from eventbus.logging import redact
from eventbus.ops import control, metrics
from eventbus.run.batch import Batches
from eventbus.run.control import WorkerControl
from eventbus.run.jobs import GAP, LINGER, Job, Outcome
from eventbus.run.partitions import Consumers, Lanes, Partitions
from eventbus.run.settle import Settling
from eventbus.store.store import EventStore
from eventbus.subscribe.exactly_once import processed_recorder
from eventbus.subscribe.feed import Interrupted, catch_up
from eventbus.subscribe.subscriptions import Handler, Service

log = structlog.get_logger("eventbus.worker")

_PAUSE_POLL = 1.0  # seconds between reads of eventbus_paused
_BALANCE_INTERVAL = 1.0  # seconds between a worker's checks of its share of partitions


class Worker(Settling, Lanes, Batches, WorkerControl):
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
        super().__init__(
            service.name,
            broker_url,
            heartbeat=heartbeat,
            max_backoff=max_backoff,
            log=log.bind(service=service.name),
        )
        self.service = service
        self.store = store
        self.exchange = exchange
        self.prefetch = prefetch
        self.concurrency = concurrency
        # Half the prefetch by default: the broker keeps sending while a batch is processed.
        self.batch_size = max(1, batch_size or prefetch // 2)
        self.queue_type = queue_type
        self.counts = {"processed": 0, "duplicate": 0, "retried": 0, "dead": 0}
        self._jobs = queues.Queue()
        self._done = queues.Queue()
        self._arrived: list[Job] = []  # taken on the connection's thread, not handed over yet
        self._insert_processed = processed_recorder(store.engine.dialect.name)
        self._topology = Topology(
            service, store, exchange=exchange, queue_type=queue_type, log=self._log
        )
        self._metrics = {h.queue: metrics.HandlerMetrics(h) for h in service.handlers.values()}
        metrics.track_in_flight(service.name, self)
        # Lanes: the handler threads of partitioned handlers, a job queue each (see _lane_loop).
        self._lanes = []
        self._lane_offset = {
            h.queue: zlib.crc32(h.queue.encode()) for h in service.handlers.values() if h.partitions
        }
        # Pauses: what the watch thread read (queue -> reason) and what SIGUSR1/SIGUSR2 ask for;
        # ``_paused``: what the connection's thread applied (its queues without a consumer).
        self._db_pauses: dict[str, str | None] = {}
        self._signal_paused = False
        self._holder = control.signal_holder()  # how this process's SIGUSR1 marks name it
        self._paused = frozenset()
        self._shared = 0  # handler threads of the unpartitioned handlers, while running
        self._init_control()  # the control bus: live pauses and detours (eventbus.run.control)

    @property
    def paused(self) -> frozenset[str]:
        """The queues whose consumer is cancelled now (``eventbus pause`` or SIGUSR1)."""
        return self._paused

    # -- the runtime's hooks ---------------------------------------------------------------

    def _threads(self) -> list[threading.Thread]:
        handlers = self.service.handlers.values()
        self._shared = self.concurrency if any(not h.partitions for h in handlers) else 0
        self._lanes = [queues.Queue() for _ in range(self.concurrency if self._lane_offset else 0)]
        self._prepared = False
        return (
            [
                threading.Thread(
                    target=self._handle_loop, name=f"eventbus-handler-{i}", daemon=True
                )
                for i in range(self._shared)
            ]
            + [
                threading.Thread(
                    target=self._lane_loop, args=(lane,), name=f"eventbus-lane-{i}", daemon=True
                )
                for i, lane in enumerate(self._lanes)
            ]
            + [threading.Thread(target=self._watch, name="eventbus-watch", daemon=True)]
            + self._control_threads()
        )

    def _end_threads(self) -> None:
        for _ in range(self._shared):
            self._jobs.put(None)
        for lane in self._lanes:
            lane.put(None)

    def _serve(self) -> None:
        if not self._prepared:
            self._prepare()
            self._prepared = True
            if self._stop.is_set():
                return
        self._consume()

    def _recoverable(self) -> tuple[type[BaseException], ...]:
        """The broker's and the network's errors, and the database's: reconnect and go on."""
        return (*broker_errors(), sa.exc.OperationalError, sa.exc.InterfaceError)

    def _describe(self) -> dict[str, Any]:
        return {
            "queues": [h.queue for h in self.service.handlers.values()],
            "prefetch": self.prefetch,
            "concurrency": self.concurrency,
        }

    def _summary(self) -> dict[str, Any]:
        return dict(self.counts)

    def _install_signal_handlers(self) -> None:
        super()._install_signal_handlers()
        for sig in (signal.SIGUSR1, signal.SIGUSR2):
            signal.signal(sig, lambda signum, _frame: self._on_pause_signal(signum))

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
                self._topology.declare(conn, channel)
            finally:
                with contextlib.suppress(Exception):
                    channel.close()

    def _on_pause_signal(self, signum: int) -> None:
        # Only a flag: the connection's thread (perhaps the very one interrupted) applies it.
        self._signal_paused = signum == signal.SIGUSR1

    def _watch(self) -> None:
        """Read the paused queues every second (and mark a SIGUSR1 pause there, for
        ``eventbus status``), refresh the lag metrics every 5 s."""
        done = self._ended
        queues = list(self._metrics)
        next_lag = 0.0
        failing = False
        while not done.is_set():
            try:
                with self.store.reader() as db:
                    found = self._read_pauses(db)
                    if time.monotonic() >= next_lag:
                        next_lag = time.monotonic() + metrics.REFRESH_INTERVAL
                        for queue, lag in metrics.subscriber_lag(db, queues).items():
                            self._metrics[queue].lag(lag)
                self._mark_signal_pause(found, self._signal_paused)
                failing = False
            except Exception as exc:  # keep the pauses read last; say so once per outage
                if not failing:
                    self._log.warning(
                        "worker.pauses_unread", error=redact(f"{type(exc).__name__}: {exc}")
                    )
                failing = True
            done.wait(_PAUSE_POLL)
        with contextlib.suppress(Exception):  # the marks of a process that is gone are ignored
            with self.store.reader() as db:
                found = control.paused(db)
            self._mark_signal_pause(found, False)

    def _read_pauses(self, db: sa.Connection) -> dict[str, control.Pause]:
        read_at = time.monotonic()
        self._read_detours(db, read_at)
        found = control.paused(db)
        mine = {
            q: p.reason
            for q, p in found.items()
            if q in self._metrics and not control.is_signal_mark(p.reason)
        }
        self._read_live_pauses(mine, read_at)  # with the control bus's newer commands
        return found

    def _mark_signal_pause(self, found: dict[str, control.Pause], paused: bool) -> None:
        """Add this process to (or remove it from) the SIGUSR1 marks of its queues."""
        changes = control.marks_to_change(found, self._metrics, self._holder, paused)
        if changes:
            control.mark_signal_pause(self.store.engine, changes, self._holder, paused)

    def _apply_pauses(self, consumers: Consumers) -> tuple[dict[str, str | None], bool]:
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

    def _consume(self) -> None:
        with self._connect() as conn:
            generation = self._current_generation()
            channel = conn.channel()
            publisher = Publisher(conn, "")  # retries and dead letters, confirmed
            self._topology.declare(conn, channel)
            channel.basic_qos(0, self.prefetch, False)
            amqp_socket = conn.connection.sock if is_amqp(conn) else None
            acks = Acks(channel, multiple=amqp_socket is not None)
            takers: dict[str, Callable[[Delivery], None]] = {}
            groups: dict[str, Partitions] = {}
            for handler in self.service.handlers.values():
                if handler.partitions and amqp_socket is not None:
                    take_from = self._partition_taker(generation, handler)
                    groups[handler.queue] = Partitions(
                        conn, handler, take_from, prefetch=self.prefetch, log=self._log
                    )
                elif handler.partitions:  # virtual transports: one queue, partitioned here
                    takers[handler.queue] = self._stream_taker(generation, handler, acks)
                else:
                    takers[handler.queue] = self._taker(generation, handler, acks)
            order = [h.queue for h in self.service.handlers.values()]
            consumers = Consumers(channel, takers, groups, order, raw=bool(amqp_socket))
            self._refresh_pauses()  # a paused queue is not consumed, not even for a second
            applied = self._apply_pauses(consumers)
            self._consuming(generation=generation, paused=sorted(self._paused))
            balance_at = time.monotonic() + _BALANCE_INTERVAL

            def settle() -> None:
                self._hand_over()
                self._settle(publisher, generation, acks)

            def between() -> None:
                nonlocal applied, balance_at
                if applied[0] is not self._db_pauses or applied[1] != self._signal_paused:
                    settle()  # first what is done: closing a channel would lose those acks
                    applied = self._apply_pauses(consumers)
                elif groups and time.monotonic() >= balance_at:
                    settle()
                    consumers.balance()
                    balance_at = time.monotonic() + _BALANCE_INTERVAL

            self._drain(
                conn, amqp_socket, stop_taking=consumers.stop_taking, settle=settle, between=between
            )

    def _taker(self, generation: int, handler: Handler, acks: Acks) -> Callable[[Delivery], None]:
        """What an unpartitioned handler's consumer does with a delivery: to a handler thread."""

        def take(delivery: Delivery) -> None:
            acks.received(delivery.delivery_tag)
            with self._lock:
                self._in_flight += 1
            self._arrived.append(Job(generation, handler, delivery))

        return take

    def _hand_over(self) -> None:
        """Give the handler threads what was taken since the last call, as one list: one
        hand-over per run of frames read, not one per message (connection's thread only)."""
        if self._arrived:
            self._jobs.put(self._arrived)
            self._arrived = []

    def _refresh_pauses(self) -> None:
        """Read ``eventbus_paused`` now; on a database error keep what was read last."""
        try:
            with self.store.reader() as db:
                self._read_pauses(db)
        except Exception as exc:  # the database being away must not cost the broker connection
            self._log.warning("worker.pauses_unread", error=redact(f"{type(exc).__name__}: {exc}"))

    def _handle_loop(self) -> None:
        carried: list[Job] = []  # taken beyond the last batch's size: the next batch's start
        while True:
            batch = self._next_batch(carried)
            if batch is None:
                return
            with self._lock:
                current = self._generation
            live = []
            done: list[Job] = []  # finished: handed to the connection's thread as one list
            finish = _finishing_into(done)
            for job in batch:
                if job.generation != current:
                    finish(job)  # dropped by _settle; the broker redelivers it
                elif self._stop.is_set() or job.handler.queue in self._paused:
                    job.outcome = Outcome.REQUEUE  # prefetched, not started: back to the queue
                    finish(job)
                else:
                    live.append(job)
            if live and not self._handle_batch_safely(live, finish):
                time.sleep(1.0)
                for job in live:
                    if not job.finished:
                        job.outcome = Outcome.REQUEUE
                        finish(job)
            self._done.put(done)
            self._wake()

    def _next_batch(self, carried: list[Job]) -> list[Job] | None:
        """The jobs carried over, then the lists right behind them, up to ``batch_size`` (the
        rest carried over again); None once the worker ends. Lingers like ``_collect``: one
        transaction (and one commit's fsync) per batch is what makes processed records cheap."""
        if carried:
            jobs = carried[:]
        else:
            first = self._jobs.get()
            if first is None:
                return None
            jobs = first
        deadline = time.monotonic() + LINGER
        while len(jobs) < self.batch_size:
            wait = min(GAP, deadline - time.monotonic())
            try:
                more = self._jobs.get(timeout=wait) if wait > 0 else self._jobs.get_nowait()
            except queues.Empty:
                break
            if more is None:
                self._jobs.put(None)
                break
            jobs.extend(more)
        carried[:] = jobs[self.batch_size :]
        return jobs[: self.batch_size]


def _finishing_into(done: list[Job]) -> Callable[[Job], None]:
    """A ``finish`` for ``_handle_batch`` that collects the finished jobs in ``done``."""

    def finish(job: Job) -> None:
        job.finished = True
        done.append(job)

    return finish


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
