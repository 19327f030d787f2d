"""Request/reply: a command or query to one responder, and its answer, over the broker.

Requests and replies are ``Event`` subclasses (JSON, never pickle). No queue for the request:
``NoResponder`` at once; no reply in time: ``RequestTimeout``; a failure in the responder:
``RemoteError``. A reply is confirmed before the request is acked, so a request may run more
than once (the caller keeps the first reply): making commands idempotent is the responder's job.

Details and an example: ``docs/rpc.md``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import os
import queue as queues
import re
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, Self, TypeVar

import amqp
import amqp.exceptions
import kombu
import structlog

from eventbus.bus.runtime import Delivery, Runtime, consume, text, truncate
from eventbus.bus.wire import (
    CONTENT_TYPE,
    Message,
    Publisher,
    decode,
    encode,
    is_amqp,
    refuse_personal,
)
from eventbus.errors import (
    BusError,
    HandlerDefinitionError,
    MalformedMessage,
)
from eventbus.events.codec import dumps
from eventbus.events.model import Event
from eventbus.logging import redact
from eventbus.subscribe.subscriptions import resolved, wants_context

__all__ = ["RequestContext", "ResponderRunner", "Responders"]

log = structlog.get_logger("eventbus.rpc")

DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"
ERROR_TYPE = "eventbus.error"  # the ``type`` of an error reply
RESPONDER_HEADER = "x-responder"  # on every reply: which function answered
_NAME = re.compile(r"^[A-Za-z0-9_-]+$")

F = TypeVar("F", bound=Callable[..., Any])


@dataclasses.dataclass(frozen=True)
class RequestContext:
    """What an answering function may use besides its request."""

    responder: str  # "<responders>.<function>", as error replies and log lines name it
    correlation_id: str  # the caller's; the reply carries it back
    redelivered: bool  # a responder may have taken this request before (and died)
    log: Any  # a structlog logger bound to the request type, correlation id and responder


@dataclasses.dataclass(frozen=True)
class _Answer:
    responder: str
    request_class: type[Event]
    function: Callable[..., Any]
    wants_context: bool

    @property
    def queue(self) -> str:
        return self.request_class.type

    def __call__(self, request: Event, ctx: RequestContext) -> Any:
        return resolved(
            self.function(request, ctx) if self.wants_context else self.function(request)
        )


class Responders:
    """A named group of functions that answer requests; run together by ``eventbus respond``.

    Each function answers one request type and returns the reply (an ``Event``). Its queue is
    the request's type name, so every process running it competes for the same requests.
    """

    def __init__(self, name: str) -> None:
        if not isinstance(name, str) or not _NAME.match(name):
            raise HandlerDefinitionError(
                f"responders name {name!r} must be letters, digits, '_' or '-'"
            )
        self.name = name
        self.handlers: dict[str, _Answer] = {}  # request type -> its answer

    def __repr__(self) -> str:
        return f"Responders({self.name!r}, requests={sorted(self.handlers)})"

    def answers(self, request_class: type[Event]) -> Callable[[F], F]:
        """Register the decorated function as the answer to ``request_class``.

        It takes the request, or the request and a ``RequestContext``, and returns the reply
        event (it may be ``async def``). An exception it raises is sent back as an error reply.
        """
        if not (isinstance(request_class, type) and issubclass(request_class, Event)):
            raise HandlerDefinitionError(
                f"{self.name}: answers() takes an Event class, not {request_class!r}"
            )
        if not request_class.type:
            raise HandlerDefinitionError(f"{self.name}: {request_class.__name__} is abstract")

        def register(function: F) -> F:
            taken = self.handlers.get(request_class.type)
            if taken is not None:
                raise HandlerDefinitionError(
                    f"{self.name}: {request_class.type!r} is already answered by {taken.responder}"
                )
            self.handlers[request_class.type] = _Answer(
                responder=f"{self.name}.{function.__name__}",
                request_class=request_class,
                function=function,
                wants_context=_wants_context(self.name, function),
            )
            return function

        return register

    def run(self, broker_url: str, *, concurrency: int = 1, heartbeat: int = 30) -> None:
        """Answer requests until SIGTERM/SIGINT (in the main thread) or an unrecoverable error."""
        ResponderRunner(self, broker_url, concurrency=concurrency, heartbeat=heartbeat).run()

    def start(
        self, broker_url: str, *, concurrency: int = 1, heartbeat: int = 30
    ) -> ResponderRunner:
        """Answer requests in a daemon thread of this process, once it consumes (``.stop()`` it)."""
        runner = ResponderRunner(self, broker_url, concurrency=concurrency, heartbeat=heartbeat)
        return runner.start()


def _wants_context(name: str, function: Callable[..., Any]) -> bool:
    return wants_context(
        function,
        f"{name}.{getattr(function, '__name__', function)} must take the request "
        "(and optionally a RequestContext) as arguments",
    )


# -- responding ------------------------------------------------------------------------------


@dataclasses.dataclass
class _Job:
    generation: int
    answer: _Answer
    delivery: Delivery
    reply_to: str | None = None
    correlation_id: str | None = None  # the caller's, copied onto the reply
    reply: Message | None = None
    requeue: bool = False  # stopping: not started, back to the queue


class ResponderRunner(Runtime):
    """Consumes the request queues of one ``Responders`` group and sends the replies.

    Built on the connection runtime (``eventbus.bus.runtime``): one thread owns the broker
    connection (declares the queues, receives requests, publishes replies, acks, keeps
    heartbeats flowing); ``concurrency`` handler threads run the answering functions. Each
    queue's prefetch is ``concurrency``, so requests wait in the broker, where an idle competing
    responder can take them, rather than here. Requests in flight on a lost connection are
    redelivered by the broker.
    """

    kind = "responder"

    def __init__(
        self,
        responders: Responders,
        broker_url: str,
        *,
        concurrency: int = 1,
        heartbeat: int = 30,
        max_backoff: float = 10.0,
    ) -> None:
        if not responders.handlers:
            raise ValueError(f"responders {responders.name!r} answer no requests")
        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        super().__init__(
            responders.name,
            broker_url,
            heartbeat=heartbeat,
            max_backoff=max_backoff,
            log=log.bind(responders=responders.name, pid=os.getpid()),
        )
        self.responders = responders
        self.concurrency = concurrency
        self.counts = {"answered": 0, "failed": 0}  # failed: error replies sent
        self._jobs: queues.Queue[_Job | None] = queues.Queue()
        self._done: queues.Queue[_Job] = queues.Queue()

    def start(self, *, timeout: float = 30.0) -> Self:
        """Run in a daemon thread of this process; return once it consumes its queues.

        Raises ``BusError`` if it gave up (the cause is chained) or does not consume within
        ``timeout`` seconds (it is stopped then), so that calls made next find its queues.
        """
        super().start()
        thread = self._thread
        assert thread is not None
        deadline = time.monotonic() + timeout
        while not self.ready.wait(0.02):
            if not thread.is_alive():
                raise BusError(
                    f"responders {self.responders.name} could not start: {self.error}"
                ) from self.error
            if time.monotonic() > deadline:
                self.stop()
                raise BusError(
                    f"responders {self.responders.name}: not consuming from "
                    f"{redact(self.broker_url)} after {timeout}s"
                )
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stop taking requests, answer and ack the ones in flight, disconnect."""
        super().stop(timeout)

    # -- the runtime's hooks -----------------------------------------------------------------

    def _threads(self) -> list[threading.Thread]:
        return [
            threading.Thread(target=self._handle_loop, name=f"eventbus-responder-{i}", daemon=True)
            for i in range(self.concurrency)
        ]

    def _end_threads(self) -> None:
        for _ in range(self.concurrency):
            self._jobs.put(None)

    def _describe(self) -> dict[str, Any]:
        return {"queues": sorted(self.responders.handlers), "concurrency": self.concurrency}

    def _summary(self) -> dict[str, Any]:
        return dict(self.counts)

    def _serve(self) -> None:
        with self._connect() as conn:
            generation = self._current_generation()
            channel = conn.channel()
            for answer in self.responders.handlers.values():
                try:
                    kombu.Queue(
                        answer.queue, durable=True, auto_delete=False, channel=channel
                    ).declare()
                except amqp.exceptions.PreconditionFailed as exc:
                    raise BusError(
                        f"responders {self.responders.name}: cannot declare queue "
                        f"{answer.queue!r}: {exc}. A queue of that name exists with other "
                        "arguments (an event handler's queue?); delete or rename it."
                    ) from exc
            channel.basic_qos(0, self.concurrency, False)
            publisher = Publisher(conn, "")  # replies, confirmed
            sock = conn.connection.sock if is_amqp(conn) else None
            cancels = [
                consume(channel, answer.queue, self._taker(generation, answer), raw=bool(sock))
                for answer in self.responders.handlers.values()
            ]
            self._consuming(generation=generation)

            def stop_taking() -> None:
                for cancel in cancels:
                    cancel()

            self._drain(
                conn,
                sock,
                stop_taking=stop_taking,
                settle=lambda: self._settle(publisher, generation),
            )

    def _taker(self, generation: int, answer: _Answer) -> Callable[[Delivery], None]:
        def take(delivery: Delivery) -> None:
            with self._lock:
                self._in_flight += 1
            self._jobs.put(_Job(generation, answer, delivery))

        return take

    def _settle(self, publisher: Publisher, generation: int) -> None:
        """Publish the finished replies (one confirm window), then ack their requests."""
        jobs: list[_Job] = []
        with contextlib.suppress(queues.Empty):
            while True:
                jobs.append(self._done.get_nowait())
        if not jobs:
            return
        try:
            live = [j for j in jobs if j.generation == generation]  # others: redelivered
            replies: list[tuple[str, Message]] = []
            for job in live:
                if job.requeue:
                    continue
                if job.reply is None or not job.reply_to:
                    self._log.warning(
                        "reply.nowhere",
                        responder=job.answer.responder,
                        request_type=job.answer.queue,
                        reason="the request has no reply_to property",
                    )
                elif not is_amqp(publisher.connection) and not _virtual_queue_exists(
                    publisher.channel, job.reply_to
                ):
                    self._undeliverable(job, "the caller's reply queue is gone")
                else:
                    replies.append((job.reply_to, job.reply))
            returned = set(publisher.publish(replies)) if replies else set()
            for job in live:
                if job.requeue:
                    job.delivery.reject(True)
                    continue
                # RabbitMQ returns every mandatory reply to a direct reply-to address, delivered
                # or not (it reaches no queue): a return means something only for reply queues.
                if (
                    job.reply is not None
                    and job.reply[1]["message_id"] in returned
                    and not (job.reply_to or "").startswith(DIRECT_REPLY_TO)
                ):
                    self._undeliverable(job, "the caller's reply queue is gone")
                job.delivery.ack()
        finally:
            with self._lock:
                self._in_flight -= len(jobs)

    def _undeliverable(self, job: _Job, reason: str) -> None:
        assert job.reply is not None
        self._log.info(
            "reply.undeliverable",
            responder=job.answer.responder,
            request_type=job.answer.queue,
            correlation_id=job.reply[1].get("correlation_id"),
            reason=reason,
        )

    def _handle_loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            if job.generation == self._current_generation():
                if self._stop.is_set():
                    job.requeue = True
                else:
                    try:
                        self._answer(job)
                    except Exception as exc:  # a bug of ours: answer with it, keep the thread
                        self._log.exception("responder.bug", error=f"{type(exc).__name__}: {exc}")
                        job.reply = _error_reply(job, type(exc).__name__, str(exc))
            self._done.put(job)
            self._wake()

    def _answer(self, job: _Job) -> None:
        """Decode, run the function, and leave the reply (or error reply) on the job."""
        delivery, answer = job.delivery, job.answer
        props = delivery.properties
        job.reply_to = text(props.get("reply_to"))
        correlation_id = text(props.get("correlation_id")) or text(props.get("message_id"))
        job.correlation_id = correlation_id
        context = {
            "request_type": answer.queue,
            "correlation_id": correlation_id,
            "responder": answer.responder,
        }
        bound = self._log.bind(**context, redelivered=delivery.redelivered)
        started = time.perf_counter()
        try:
            request = decode(delivery.body, props, _with_time(props, delivery.headers))
            if not isinstance(request, answer.request_class):
                raise MalformedMessage(
                    f"{answer.responder} answers {answer.queue}, not {request.type}"
                )
        except MalformedMessage as exc:
            bound.warning("request.invalid", reason=exc.reason)
            job.reply = _error_reply(job, "MalformedMessage", exc.reason)
            self._count("failed")
            return
        except Exception as exc:  # whatever else a hostile message makes the decoder raise
            bound.warning("request.invalid", reason=f"{type(exc).__name__}: {exc}")
            job.reply = _error_reply(job, "MalformedMessage", str(exc))
            self._count("failed")
            return
        correlation_id = job.correlation_id = correlation_id or str(request.event_id)
        ctx = RequestContext(answer.responder, correlation_id, delivery.redelivered, bound)
        try:
            with structlog.contextvars.bound_contextvars(**context):
                result = answer(request, ctx)
            if not isinstance(result, Event):
                raise TypeError(
                    f"{answer.responder} returned {type(result).__name__}, not an Event (the reply)"
                )
            refuse_personal(result)  # a reply carrying personal data would travel in the clear
        except Exception as exc:
            bound.error("request.failed", error=redact(f"{type(exc).__name__}: {exc}"))
            job.reply = _error_reply(job, type(exc).__name__, str(exc))
            self._count("failed")
            return
        body, properties, headers = encode(result.caused_by(request))
        properties.update(correlation_id=correlation_id, delivery_mode=1)
        headers[RESPONDER_HEADER] = answer.responder
        job.reply = body, properties, headers
        self._count("answered")
        bound.debug(
            "request.answered",
            reply_type=result.type,
            ms=round((time.perf_counter() - started) * 1000, 2),
        )

    def _count(self, name: str) -> None:
        with self._lock:
            self.counts[name] += 1


def _error_reply(job: _Job, error_type: str, message: str) -> Message:
    """An error reply: type ``eventbus.error``, body ``{"error": class, "message": text}``."""
    properties: dict[str, Any] = {
        "message_id": str(uuid.uuid4()),
        "type": ERROR_TYPE,
        "timestamp": int(time.time()),
        "content_type": CONTENT_TYPE,
        "content_encoding": "utf-8",
        "delivery_mode": 1,
    }
    if job.correlation_id:
        properties["correlation_id"] = job.correlation_id
    body = dumps({"error": error_type, "message": truncate(message, 2000)})
    return body, properties, {RESPONDER_HEADER: job.answer.responder}


def _with_time(properties: dict[str, Any], headers: dict[str, Any]) -> dict[str, Any]:
    """A request's time may be left out (it is not stored): it then means now."""
    if headers.get("occurred_at") is None and properties.get("timestamp") is None:
        now = dt.datetime.now(dt.UTC).isoformat(timespec="microseconds")
        return {**headers, "occurred_at": now}
    return headers


def _virtual_queue_exists(channel: Any, name: str) -> bool:
    # kombu's virtual transports create a queue on publish; the caller's may be gone.
    try:
        return bool(channel._has_queue(name))
    except Exception:
        return True
