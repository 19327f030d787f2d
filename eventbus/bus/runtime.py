"""The connection runtime that workers and responders share, and connecting to the broker.

One thread owns the broker connection (receives, acks, retries, replies, heartbeats); handler
threads do the work and wake it through a pipe, so results are acked at once. A lost connection
is re-established with capped, jittered backoff; unacked work is redelivered by the broker.
SIGTERM/SIGINT stop consumption and let in-flight messages finish and be settled.

Details: ``docs/wire.md``; cluster URLs (``connect``): ``docs/scale-out.md``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import random
import select
import signal
import threading
import time
from collections.abc import Callable
from typing import Any, ClassVar, Self

import amqp.transport
import kombu
import kombu.exceptions

from eventbus.bus import amqp as _amqp
from eventbus.bus.faults import first_line, permanent
from eventbus.errors import NotReady, PublishError
from eventbus.logging import redact


class Backoff:
    """Capped exponential backoff with jitter, logged as ``event`` before each wait.

    ``wait`` after a failure; ``reset`` once the thing works again (connected, consuming), so
    that the next outage starts with a short wait again. An error retrying cannot cure
    (``permanent``) is tried ``give_up_after`` times in a row, then ``wait`` sets ``stop`` and
    raises ``NotReady``. In a row: each within ``within`` s of the retry before, no other failure
    in between; a ``reset`` does not break it (connected, then refused by the database: no cure).
    """

    within = 60.0  # seconds: a permanent failure later than that after the last retry is a first

    def __init__(self, log: Any, event: str, max_delay: float, give_up_after: int = 5) -> None:
        self.log = log
        self.event = event
        self.max_delay = max_delay
        self.give_up_after = give_up_after
        self.failures = self.for_good = 0  # for_good: permanent failures in a row
        self._retried_at = float("-inf")  # when the last wait ended

    def reset(self) -> None:
        self.failures = 0

    def wait(self, exc: BaseException, stop: threading.Event) -> None:
        """Log ``exc`` and wait the next delay, or until ``stop`` is set."""
        self.failures += 1
        fix = permanent(exc)
        in_a_row = time.monotonic() - self._retried_at <= self.within
        self.for_good = (self.for_good + 1 if in_a_row else 1) if fix else 0
        error = redact(f"{type(exc).__name__}: {exc}")
        fields = {"permanent": f"{self.for_good}/{self.give_up_after}", "fix": fix} if fix else {}
        if fix and self.for_good >= self.give_up_after:
            gave_up, attempt = f"{self.event.split('.')[0]}.gave_up", self.failures
            self.log.error(gave_up, error=error, attempt=attempt, **fields)
            stop.set()  # its owner is done: helper threads waiting on ``stop`` end too
            line = f"{fix} ({first_line(exc)}); gave up after {self.for_good} attempts in a row"
            raise NotReady(redact(line)) from exc
        delay = min(self.max_delay, 0.1 * 2 ** min(self.failures, 10))
        delay *= random.uniform(0.5, 1.0)
        self.log.warning(
            self.event, error=error, attempt=self.failures, retry_in=round(delay, 2), **fields
        )
        stop.wait(delay)
        self._retried_at = time.monotonic()


@functools.cache
def broker_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean the broker connection is unusable: reconnect and go on."""
    conn = kombu.Connection("amqp://")
    return (
        *conn.connection_errors,
        *conn.channel_errors,
        OSError,
        PublishError,
        kombu.exceptions.OperationalError,
    )


def text(value: Any) -> str | None:
    """An AMQP property or header as text (bytes decoded leniently), None if absent."""
    if value is None:
        return None
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def as_bytes(body: Any) -> bytes:
    return body if isinstance(body, bytes) else str(body).encode()


def int_or(value: Any, default: int) -> int:
    """``value`` if it is an integer (not a bool), else ``default`` (headers are anyone's)."""
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def truncate(message: str, limit: int = 1000) -> str:
    """``message``, cut to ``limit`` characters (headers must fit in a frame)."""
    return message if len(message) <= limit else message[: limit - 1] + "…"


def connect(url: str, *, connect_timeout: float = 10, **options: Any) -> kombu.Connection:
    """A connected ``kombu.Connection`` to ``url`` or, for ``a;b;c``, to the first node that
    accepts; ``options`` go to ``kombu.Connection`` (heartbeat, transport_options, ...).

    Raises the connection error of the last node tried (OSError, AMQP errors); each node gets
    ``connect_timeout`` seconds.
    """
    _amqp.install()  # undecodable properties become a malformed message, not a dead connection
    conn = kombu.Connection(url, connect_timeout=connect_timeout, **options)
    try:
        if len(conn.alt) > 1:
            # One attempt per node, no sleep in between: the first retry kombu makes after a
            # failure goes to the next node, and a full round is len(alt) attempts.
            conn.ensure_connection(max_retries=len(conn.alt) - 1, reraise_as_library_errors=False)
        else:
            conn.connect()
    except BaseException:
        conn.release()
        raise
    return conn


_CHUNK = 32768  # bytes per recv on AMQP: a run of frames at once, not three reads per frame


def wait_for_frames(conn: kombu.Connection, sock: Any, wake_fd: int, busy: bool) -> None:
    """Receive what the broker sent, or return as soon as another thread writes to the pipe
    ``wake_fd`` (work finished: acks to send), or after 0.1 s.

    ``sock`` is the AMQP socket (None on virtual transports, which are polled: every 2 ms while
    ``busy``, else every 50 ms). On plain TCP the socket is read in chunks into py-amqp's own
    read buffer and every whole frame there is handled before returning.
    """
    if sock is None:
        with contextlib.suppress(TimeoutError):
            conn.drain_events(timeout=0.002 if busy else 0.05)
        return
    amqp_conn = conn.connection
    transport = amqp_conn.transport
    if type(transport) is amqp.transport.TCPTransport and hasattr(transport, "_read_buffer"):
        if not _whole_frame(transport._read_buffer):
            if not _select(sock, wake_fd):
                return
            chunk = sock.recv(_CHUNK)
            if not chunk:
                raise OSError("Server unexpectedly closed connection")
            transport._read_buffer += chunk
        while _whole_frame(transport._read_buffer):
            amqp_conn.blocking_read(None)  # a blocking socket: no timeout to set and reset
        return
    pending = getattr(sock, "pending", None)  # TLS: decrypted bytes already read
    if not (pending and pending()) and not _select(sock, wake_fd):
        return
    with contextlib.suppress(TimeoutError):
        conn.drain_events(timeout=0.05)


def _select(sock: Any, wake_fd: int) -> bool:
    """Wait up to 0.1 s for the socket or the wake pipe (emptied); True if the socket is ready."""
    ready, _, _ = select.select([sock, wake_fd], [], [], 0.1)
    if wake_fd in ready:
        with contextlib.suppress(BlockingIOError):
            os.read(wake_fd, 4096)
    return sock in ready


def _whole_frame(buffer: bytes) -> bool:
    """Whether ``buffer`` starts with a whole AMQP frame: type, channel, size, payload, end."""
    return len(buffer) >= 8 and len(buffer) >= 8 + int.from_bytes(buffer[3:7], "big")


@dataclasses.dataclass(slots=True)
class Delivery:
    """A received message, from py-amqp (on RabbitMQ) or kombu (virtual transports)."""

    body: bytes
    properties: dict[str, Any]  # AMQP properties (content_type, message_id, type, ...)
    headers: dict[str, Any]
    routing_key: str
    delivery_tag: int
    ack: Callable[[], None]
    reject: Callable[..., None]  # reject(requeue=bool)
    redelivered: bool = False  # the broker delivered it before (to a consumer that died?)


def consume(
    channel: Any,
    queue: str,
    take: Callable[[Delivery], None],
    *,
    raw: bool,
    arguments: dict[str, Any] | None = None,
) -> Callable[[], None]:
    """Consume ``queue`` on ``channel``, handing each message to ``take``; returns a cancel.

    On RabbitMQ the py-amqp channel is used directly (kombu's Message adds nothing needed here,
    at a cost per message); virtual transports go through a kombu Consumer.
    """
    if raw:

        def on_amqp(msg: Any) -> None:
            props = msg.properties
            tag = msg.delivery_tag
            take(
                Delivery(
                    body=as_bytes(msg.body),
                    properties=props,
                    headers=props.get("application_headers") or {},
                    routing_key=msg.delivery_info.get("routing_key") or "",
                    delivery_tag=tag,
                    ack=lambda: channel.basic_ack(tag),
                    reject=lambda requeue: channel.basic_reject(tag, requeue),
                    redelivered=bool(msg.delivery_info.get("redelivered")),
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
            Delivery(
                body=as_bytes(message.body),
                properties=props,
                headers=message.headers or {},
                routing_key=str((message.delivery_info or {}).get("routing_key", "")),
                delivery_tag=message.delivery_tag,
                ack=message.ack,
                reject=lambda requeue: message.reject(requeue=requeue),
                redelivered=bool((message.delivery_info or {}).get("redelivered")),
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


class Acks:
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


class Runtime:
    """The lifecycle of a consumer process: what ``Worker`` and ``ResponderRunner`` share.

    ``run()`` blocks until SIGTERM/SIGINT (in the main thread) or ``stop()``; ``start()`` runs
    it in a daemon thread. A subclass says what its threads are (``_threads``, ended by
    ``_end_threads``) and what one connection's life is (``_serve``): it calls ``_consuming``
    once it consumes and ``_drain`` to receive and settle until stopped.
    """

    kind: ClassVar[str]  # "worker", "responder": the first word of the log events

    def __init__(
        self, name: str, broker_url: str, *, heartbeat: int, max_backoff: float, log: Any
    ) -> None:
        self._name = name  # the service's or responders' (thread names)
        self.broker_url = broker_url
        self.heartbeat = heartbeat
        self.max_backoff = max_backoff
        self.ready = threading.Event()  # set while consuming
        self.error: BaseException | None = None  # why run() gave up, if it did
        self._log = log
        self._stop = threading.Event()
        self._ended = threading.Event()  # run() is over: helper threads end too
        self._generation = 0  # one per connection: results for a lost one are dropped
        self._in_flight = 0
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._wake_r = self._wake_w = -1  # a pipe while running: handler threads -> connection
        self._backoff = Backoff(log, f"{self.kind}.reconnecting", max_backoff)

    @property
    def in_flight(self) -> int:
        """Messages received and not settled yet."""
        return self._in_flight

    # -- what a subclass provides ----------------------------------------------------------

    def _threads(self) -> list[threading.Thread]:
        """The threads to start for a run (handler threads, watchers)."""
        raise NotImplementedError

    def _end_threads(self) -> None:
        """Tell the handler threads to end (a sentinel in their queue)."""
        raise NotImplementedError

    def _serve(self) -> None:
        """One connection's life: connect, consume, ``_drain``; raise to reconnect."""
        raise NotImplementedError

    def _recoverable(self) -> tuple[type[BaseException], ...]:
        """Errors after which ``run`` reconnects (with backoff) instead of giving up."""
        return broker_errors()

    def _describe(self) -> dict[str, Any]:
        """Fields of the ``<kind>.started`` log line."""
        return {}

    def _summary(self) -> dict[str, Any]:
        """Fields of the ``<kind>.stopped`` log line."""
        return {}

    def _install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, _frame: self._on_signal(signum))

    # -- running ---------------------------------------------------------------------------

    def run(self, *, install_signal_handlers: bool = True) -> None:
        """Consume until stopped; SIGTERM/SIGINT stop it gracefully when run in the main thread.

        Stopping cancels consumption, lets the messages in flight finish and be settled, and
        puts those not started back in their queue.
        """
        if install_signal_handlers and threading.current_thread() is threading.main_thread():
            self._install_signal_handlers()
        self._ended.clear()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        threads = self._threads()
        for t in threads:
            t.start()
        self._log.info(f"{self.kind}.started", broker=redact(self.broker_url), **self._describe())
        self._backoff.reset()
        try:
            while not self._stop.is_set():
                try:
                    self._serve()
                except Exception as exc:
                    if not isinstance(exc, self._recoverable()) and permanent(exc) is None:
                        raise
                    self.ready.clear()
                    with self._lock:
                        self._generation += 1  # results for the lost channel are dropped
                    self._backoff.wait(exc, self._stop)
        except BaseException as exc:
            self.error = exc
            self._log.error(f"{self.kind}.failed", error=redact(f"{type(exc).__name__}: {exc}"))
            raise
        finally:
            self.ready.clear()
            self._ended.set()
            self._end_threads()
            for t in threads:
                t.join(timeout=60)
            pipe = (self._wake_r, self._wake_w)
            self._wake_r = self._wake_w = -1
            for fd in pipe:
                os.close(fd)
            self._log.info(f"{self.kind}.stopped", **self._summary())

    def start(self) -> Self:
        """Run in a daemon thread of this process; ``ready`` is set once it consumes."""
        self._stop.clear()  # a stopped runtime may be started again
        self.error = None
        self._thread = threading.Thread(
            target=self._run_in_thread, name=f"eventbus-{self.kind}-{self._name}", daemon=True
        )
        self._thread.start()
        return self

    def _run_in_thread(self) -> None:
        with contextlib.suppress(Exception):  # recorded in self.error and logged by run()
            self.run(install_signal_handlers=False)

    def stop(self, timeout: float = 60.0) -> None:
        """Stop taking messages, finish and settle the in-flight ones, disconnect."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _on_signal(self, signum: int) -> None:
        self._log.info(f"{self.kind}.stopping", signal=signal.Signals(signum).name)
        self._stop.set()

    # -- the connection's thread -----------------------------------------------------------

    def _connect(self) -> kombu.Connection:
        return connect(
            self.broker_url,
            heartbeat=self.heartbeat,
            transport_options={"polling_interval": 0.005},
        )

    def _current_generation(self) -> int:
        with self._lock:
            return self._generation

    def _consuming(self, **fields: Any) -> None:
        """Called by ``_serve`` once it consumes: ready, and the backoff starts over."""
        self.ready.set()
        self._backoff.reset()
        self._log.info(f"{self.kind}.consuming", **fields)

    def _drain(
        self,
        conn: kombu.Connection,
        sock: Any,
        *,
        stop_taking: Callable[[], None],
        settle: Callable[[], None],
        between: Callable[[], None] | None = None,
    ) -> None:
        """Receive and settle until stopped and nothing is in flight.

        ``between`` runs before each settle while not stopping (pauses, balancing).
        """
        cancelled = False
        while True:
            if self._stop.is_set() and not cancelled:
                stop_taking()
                cancelled = True
                self._log.info(f"{self.kind}.draining", in_flight=self._in_flight)
            elif not cancelled and between is not None:
                between()
            settle()
            if cancelled and self._in_flight == 0:
                return
            wait_for_frames(conn, sock, self._wake_r, bool(self._in_flight))
            conn.heartbeat_check()

    def _wake(self) -> None:
        """Make the connection's thread look at finished work now."""
        with contextlib.suppress(BlockingIOError, OSError):  # a full pipe already wakes it
            os.write(self._wake_w, b"!")
