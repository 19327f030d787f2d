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
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import os
import queue as queues
import random
import select
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import amqp.exceptions
import kombu
import kombu.exceptions
import sqlalchemy as sa
import structlog
from sqlalchemy.dialects import sqlite

from eventbus.errors import BusError, MalformedMessage
from eventbus.events import Event
from eventbus.logging import redact
from eventbus.publisher import Publisher, PublishError, declare_exchange, is_amqp
from eventbus.store import EventStore
from eventbus.subscriptions import Context, Handler, Service, virtual_patterns
from eventbus.tables import bindings as B
from eventbus.tables import processed as P
from eventbus.wire import Message, decode

log = structlog.get_logger("eventbus.worker")

# A handler thread collects a batch while messages keep coming (each within _GAP seconds of the
# last), for at most _LINGER seconds: big batches under load, ~1 ms added when idle.
_LINGER = 0.010
_GAP = 0.001

_PROPERTIES = (
    "message_id",
    "type",
    "timestamp",
    "correlation_id",
    "content_type",
    "content_encoding",
    "delivery_mode",
)


@dataclasses.dataclass
class _Job:
    generation: int
    handler: Handler
    message: _Delivery
    outcome: str = ""  # ack | retry | dead | requeue
    reason: str = ""
    exception: BaseException | None = None
    event: Event | None = None
    finished: bool = False  # handed to the connection's thread


class Worker:
    """Runs one service's handlers against the broker and the database.

    ``Worker(service, broker_url=..., database_url=...).run()`` blocks until SIGTERM/SIGINT (or
    ``stop()``); ``start()`` runs it in a thread of this process instead.
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
        self._insert_processed = _processed_insert(store.engine.dialect.name)
        self._wake_r, self._wake_w = os.pipe()  # handler threads -> the connection's thread
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)

    # -- running -----------------------------------------------------------------------------

    def run(self, *, install_signal_handlers: bool = True) -> None:
        """Consume until stopped; SIGTERM/SIGINT stop it gracefully when run in the main thread."""
        if install_signal_handlers and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda signum, _frame: self._on_signal(signum))
        threads = [
            threading.Thread(target=self._handle_loop, name=f"eventbus-handler-{i}", daemon=True)
            for i in range(self.concurrency)
        ]
        for t in threads:
            t.start()
        failures = 0
        self._log.info(
            "worker.started",
            broker=redact(self.broker_url),
            queues=[h.queue for h in self.service.handlers.values()],
            prefetch=self.prefetch,
            concurrency=self.concurrency,
        )
        try:
            while not self._stop.is_set():
                try:
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
            for _ in threads:
                self._jobs.put(None)
            for t in threads:
                t.join(timeout=60)
            self._log.info("worker.stopped", **self.counts)

    def start(self) -> Worker:
        """Run in a daemon thread of this process; ``ready`` is set once it consumes."""
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

    # -- the connection's thread -------------------------------------------------------------

    def _consume(self) -> None:
        conn = kombu.Connection(
            self.broker_url,
            heartbeat=self.heartbeat,
            transport_options={"polling_interval": 0.005},
            connect_timeout=10,
        )
        with conn:
            conn.connect()
            with self._lock:
                generation = self._generation
            channel = conn.channel()
            publisher = Publisher(conn, "")  # retries and dead letters, confirmed
            try:
                self._declare(conn, channel)
            except amqp.exceptions.PreconditionFailed as exc:
                # A queue exists with other arguments (classic vs quorum, another TTL): retrying
                # cannot fix that, a person must.
                raise BusError(
                    f"service {self.service.name}: cannot declare its queues: {exc}. "
                    "Delete the queue or use the queue type it was declared with."
                ) from exc
            channel.basic_qos(0, self.prefetch, False)
            amqp_socket = conn.connection.sock if is_amqp(conn) else None
            acks = _Acks(channel, multiple=amqp_socket is not None)
            cancels = []
            for handler in self.service.handlers.values():

                def take(delivery: _Delivery, handler: Handler = handler) -> None:
                    acks.received(delivery.delivery_tag)
                    with self._lock:
                        self._in_flight += 1
                    self._jobs.put(_Job(generation, handler, delivery))

                cancels.append(_consume_queue(channel, handler.queue, take, raw=bool(amqp_socket)))
            self.ready.set()
            self._log.info("worker.consuming", generation=generation)
            cancelled = False
            while True:
                if self._stop.is_set() and not cancelled:
                    for cancel in cancels:
                        cancel()
                    cancelled = True
                    self._log.info("worker.draining", in_flight=self._in_flight)
                self._settle(publisher, generation, acks)
                if cancelled and self._in_flight == 0:
                    return
                self._wait(conn, amqp_socket)
                conn.heartbeat_check()

    def _wait(self, conn: kombu.Connection, amqp_socket: Any) -> None:
        """Receive what the broker sends, or return early when handler threads finished work.

        On AMQP the connection's socket and a pipe the handler threads write to are watched
        together, so results are acked at once (the broker sends nothing more once ``prefetch``
        messages are unacked). Virtual transports poll.
        """
        if amqp_socket is None:
            with contextlib.suppress(TimeoutError):
                conn.drain_events(timeout=0.002 if self._in_flight else 0.05)
            return
        pending = getattr(amqp_socket, "pending", None)  # TLS: decrypted bytes already read
        if not (pending and pending()):
            ready, _, _ = select.select([amqp_socket, self._wake_r], [], [], 0.1)
            if self._wake_r in ready:
                with contextlib.suppress(BlockingIOError):
                    os.read(self._wake_r, 4096)
            if amqp_socket not in ready:
                return
        with contextlib.suppress(TimeoutError):
            conn.drain_events(timeout=0.05)

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError):  # a full pipe already wakes it
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
            queue = kombu.Queue(
                handler.queue,
                durable=True,
                auto_delete=False,
                queue_arguments=args,
                channel=channel,
            )
            queue.declare()
            bound_before = self._recorded_bindings(handler.queue)
            for pattern in sorted(bound_before - patterns):
                queue.unbind_from(exchange, routing_key=pattern)
                self._log.info("queue.unbound", queue=handler.queue, pattern=pattern)
            for pattern in sorted(patterns):
                queue.bind_to(exchange, routing_key=pattern)
            self._record_bindings(handler.queue, patterns)
            kombu.Queue(
                handler.dead_letter_queue,
                durable=True,
                auto_delete=False,
                queue_arguments=args,
                channel=channel,
            ).declare()
            if virtual:
                continue  # retries are timers in this process (no TTL on virtual transports)
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

    def _recorded_bindings(self, queue: str) -> set[str]:
        with self.store.engine.connect() as db:
            rows = db.execute(
                sa.select(B.c.pattern).where(B.c.queue == queue, B.c.exchange == self.exchange)
            )
            return {r.pattern for r in rows}

    def _record_bindings(self, queue: str, patterns: set[str]) -> None:
        with self.store.engine.begin() as db:
            db.execute(sa.delete(B).where(B.c.queue == queue, B.c.exchange == self.exchange))
            db.execute(
                sa.insert(B),
                [{"queue": queue, "exchange": self.exchange, "pattern": p} for p in patterns],
            )

    def _settle(self, publisher: Publisher, generation: int, acks: _Acks) -> None:
        """Ack, retry or dead-letter what the handler threads finished (on this thread only)."""
        while True:
            try:
                job = self._done.get_nowait()
            except queues.Empty:
                acks.flush()
                return
            try:
                if job.generation != generation:
                    continue  # its channel is gone; the broker redelivers it
                acks.settled(job.message.delivery_tag)
                if job.outcome == "ack":
                    acks.ack(job.message)
                elif job.outcome == "requeue":
                    job.message.reject(True)
                elif job.outcome == "retry":
                    self._retry(publisher, job)
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
            finally:
                with self._lock:
                    self._in_flight -= 1

    def _retry(self, publisher: Publisher, job: _Job) -> None:
        handler, message = job.handler, job.message
        headers = dict(message.headers or {})
        attempt = _attempt(headers, handler.max_attempts)
        now = dt.datetime.now(dt.UTC).isoformat(timespec="microseconds")
        exc = job.exception
        headers.setdefault("x-first-failure-at", now)
        headers.setdefault("x-original-routing-key", _routing_key(message))
        headers["x-attempts"] = attempt
        headers["x-exception"] = type(exc).__name__ if exc else "Exception"
        headers["x-exception-message"] = _truncate(str(exc) if exc else job.reason)
        bound = self._log.bind(**_context(job, attempt))
        if attempt >= handler.max_attempts:
            _publish(publisher, handler.dead_letter_queue, _republish(message, headers))
            message.ack()
            self._count("dead")
            bound.error("event.dead_lettered", reason="attempts exhausted", **_exc_fields(exc))
            return
        delay = handler.retry_delays()[attempt - 1]
        if is_amqp(publisher.connection):
            _publish(publisher, handler.retry_queue(attempt), _republish(message, headers))
        else:
            self._retry_in_process(handler.queue, _republish(message, headers), delay)
        message.ack()
        self._count("retried")
        bound.warning("event.retry_scheduled", retry_in=delay, **_exc_fields(exc))

    def _retry_in_process(self, queue: str, msg: Message, delay: float) -> None:
        def put_back() -> None:
            try:
                with kombu.Connection(self.broker_url) as conn:
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
        self._log.error(
            "message.dead_lettered",
            queue=handler.queue,
            handler=handler.name,
            message_id=_text(message.properties.get("message_id")),
            message_type=_text(message.properties.get("type")),
            reason=reason,
        )

    # -- handler threads ---------------------------------------------------------------------

    def _handle_loop(self) -> None:
        while True:
            first = self._jobs.get()
            if first is None:
                return
            batch = [first]
            # Linger a moment for the messages right behind the first: one transaction (and one
            # commit's fsync) per batch is what makes the processed records cheap.
            deadline = time.monotonic() + _LINGER
            while len(batch) < self.batch_size:
                wait = min(_GAP, deadline - time.monotonic())
                try:
                    more = self._jobs.get(timeout=wait) if wait > 0 else self._jobs.get_nowait()
                except queues.Empty:
                    break
                if more is None:
                    self._jobs.put(None)
                    break
                batch.append(more)
            with self._lock:
                current = self._generation
            live = []
            if len(batch) > len([j for j in batch if j.generation == current]):
                self._wake()
            for job in batch:
                if job.generation != current:
                    self._finish(job)  # dropped by _settle; the broker redelivers it
                elif self._stop.is_set():
                    job.outcome = "requeue"  # prefetched, not started: back to the queue
                    self._finish(job)
                else:
                    live.append(job)
            if not live:
                continue
            try:
                self._handle_batch(live)
            except Exception as exc:  # a bug of ours: never lose the messages or this thread
                self._log.exception("worker.batch_failed", error=f"{type(exc).__name__}: {exc}")
                time.sleep(1.0)
                for job in live:
                    if not job.finished:
                        job.outcome = "requeue"
                        self._finish(job)
            finally:
                self._wake()

    def _finish(self, job: _Job) -> None:
        job.finished = True
        self._done.put(job)

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counts[name] += n

    def _handle_batch(self, batch: list[_Job]) -> None:
        good: list[_Job] = []
        for job in batch:
            try:
                message = job.message
                job.event = decode(message.body, message.properties, message.headers)
            except MalformedMessage as exc:
                job.outcome, job.reason = "dead", exc.reason
                self._finish(job)
                continue
            except Exception as exc:  # whatever else a hostile message makes the decoder raise
                job.outcome = "dead"
                job.reason = f"cannot be decoded: {type(exc).__name__}: {exc}"
                self._finish(job)
                continue
            if not job.handler.accepts(job.event):
                job.outcome = "dead"
                names = ", ".join(c.__name__ for c in job.handler.event_classes)
                job.reason = f"handler {job.handler.queue} takes {names}, not {job.event.type}"
                self._finish(job)
                continue
            good.append(job)
        if good:
            self._run_safely(good)
            for job in good:
                self._finish(job)

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
        for job in jobs:
            self._run_safely([job])

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
            for job in jobs:
                assert job.event is not None
                key = (job.handler.queue, job.event.event_id)
                if key not in fresh:
                    job.outcome = "ack"
                    job.reason = "duplicate"
                    continue
                fresh.discard(key)  # the same event twice in one batch runs once
                self._run_one(db, job)
        for job in jobs:  # committed
            if job.reason == "duplicate":
                self._count("duplicate")
                self._log.info("event.duplicate_skipped", **_context(job, None))
            elif job.outcome == "ack":
                self._count("processed")

    def _run_one(self, db: Any, job: _Job) -> None:
        assert job.event is not None
        handler = job.handler
        attempt = _attempt(job.message.headers or {}, handler.max_attempts)
        context = _context(job, attempt)
        bound = self._log.bind(**context)
        ctx = Context(
            handler=handler.name,
            queue=handler.queue,
            attempt=attempt,
            log=bound,
            store=self.store,
            _connection=db,
        )
        started = time.perf_counter()
        try:
            with structlog.contextvars.bound_contextvars(**context):
                handler(job.event, ctx)
            if ctx._savepoint is not None and ctx._savepoint.is_active:
                ctx._savepoint.commit()
        except Exception as exc:
            if ctx._savepoint is not None and ctx._savepoint.is_active:
                ctx._savepoint.rollback()
            db.execute(
                sa.delete(P).where(P.c.handler == handler.queue, P.c.event_id == job.event.event_id)
            )
            job.outcome, job.exception = "retry", exc
            job.reason = "".join(traceback.format_exception_only(exc)).strip()
            bound.warning("event.failed", error=redact(job.reason))
            return
        job.outcome = "ack"
        bound.debug("event.handled", ms=round((time.perf_counter() - started) * 1000, 2))


class _Acks:
    """Acks on one channel; on AMQP sent as one ``multiple`` ack where delivery order allows."""

    def __init__(self, channel: Any, *, multiple: bool) -> None:
        self.channel = channel
        self.multiple = multiple
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


# One fixed statement for any batch size (compiled and prepared once): the event ids and
# positions travel as two arrays.
_PG_INSERT_PROCESSED = sa.text(
    "INSERT INTO eventbus_processed (handler, event_id, position, processed_at) "
    "SELECT :handler, e.event_id, e.position, :now "
    "FROM unnest(CAST(:event_ids AS uuid[]), CAST(:positions AS bigint[])) "
    "AS e(event_id, position) "
    "ON CONFLICT DO NOTHING RETURNING event_id"
).columns(event_id=sa.Uuid)

_SQLITE_INSERT_PROCESSED = sqlite.insert(P).on_conflict_do_nothing().returning(P.c.event_id)

InsertProcessed = Callable[[Any, str, list[Event], dt.datetime], list[Any]]


def _processed_insert(dialect: str) -> InsertProcessed:
    """``insert(db, handler, events, now)``: record events as processed; returns the new ids."""
    if dialect == "postgresql":

        def insert_pg(db: Any, handler: str, events: list[Event], now: dt.datetime) -> list[Any]:
            params = {
                "handler": handler,
                "now": now,
                "event_ids": [e.event_id for e in events],
                "positions": [e.position for e in events],
            }
            return list(db.execute(_PG_INSERT_PROCESSED, params).scalars())

        return insert_pg

    def insert_sqlite(db: Any, handler: str, events: list[Event], now: dt.datetime) -> list[Any]:
        rows = [
            dict(handler=handler, event_id=e.event_id, position=e.position, processed_at=now)
            for e in events
        ]
        return list(db.execute(_SQLITE_INSERT_PROCESSED.values(rows)).scalars())

    return insert_sqlite


def _context(job: _Job, attempt: int | None) -> dict[str, Any]:
    event = job.event
    values: dict[str, Any] = {
        "queue": job.handler.queue,
        "handler": job.handler.name,
    }
    if event is not None:
        values.update(
            event_id=str(event.event_id),
            event_type=event.type,
            correlation_id=event.correlation_id,
            position=event.position,
        )
    if attempt is not None:
        values["attempt"] = attempt
    return values


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
    channel: Any, queue: str, take: Callable[[_Delivery], None], *, raw: bool
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

        consumer_tag = channel.basic_consume(queue, callback=on_amqp, no_ack=False)
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
    properties = {k: props[k] for k in _PROPERTIES if props.get(k) is not None}
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
