"""Calling: ``RequestClient.call(request)`` sends a request to its responder, waits for the reply.

Requests go to the default exchange with the request's type name as routing key, ``mandatory`` (no
queue: ``NoResponder`` at once) and expiring with the caller's timeout. Replies come back through
RabbitMQ's direct reply-to (a private queue per client on ``memory://``). See ``docs/rpc.md``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import select
import threading
import time
import uuid
from types import TracebackType
from typing import Any

import amqp
import kombu
import structlog

from eventbus.bus.runtime import as_bytes, broker_errors, connect, text
from eventbus.bus.wire import Message, decode, encode, is_amqp, refuse_personal
from eventbus.errors import MalformedMessage, NoResponder, RemoteError, RequestError, RequestTimeout
from eventbus.events.codec import loads
from eventbus.events.model import Event
from eventbus.logging import redact
from eventbus.rpc.responders import (
    DIRECT_REPLY_TO,
    ERROR_TYPE,
    RESPONDER_HEADER,
    _virtual_queue_exists,
)

__all__ = ["RequestClient"]

log = structlog.get_logger("eventbus.rpc")


@dataclasses.dataclass
class _Call:
    correlation_id: str
    tag: int | None = None  # the publish's delivery tag (publisher confirms)
    routed: bool = False
    returned: bool = False
    nacked: bool = False
    reply: Message | None = None


class _Line:
    """One thread's connection to the broker: a channel that publishes requests and receives
    their replies, and the call it waits for."""

    def __init__(self, broker_url: str, connect_timeout: float) -> None:
        # No heartbeats: between calls nobody would send them and the broker would drop an idle
        # client; a dead connection is noticed before the next call (``poll``) or by its timeout.
        self.conn = connect(
            broker_url,
            heartbeat=0,
            connect_timeout=connect_timeout,
            transport_options={"polling_interval": 0.005},
        )
        self.amqp = is_amqp(self.conn)
        self.channel: Any = self.conn.channel()
        self.current: _Call | None = None
        self._next_tag = 1
        if self.amqp:
            self.reply_to = DIRECT_REPLY_TO
            self.channel.confirm_select()
            self.channel.events["basic_ack"].add(self._on_ack)
            self.channel.events["basic_nack"].add(self._on_nack)
            self.channel.events["basic_return"].add(self._on_return)
            # Direct reply-to: consume (no-ack) before publishing; replies come to this channel.
            self.channel.basic_consume(DIRECT_REPLY_TO, callback=self._on_amqp_reply, no_ack=True)
        else:
            self.reply_to = f"eventbus.reply.{uuid.uuid4().hex}"
            queue = kombu.Queue(
                self.reply_to,
                channel=self.channel,
                durable=False,
                exclusive=True,
                auto_delete=True,
            )
            queue.declare()
            self._consumer = kombu.Consumer(
                self.channel, queues=[queue], on_message=self._on_kombu_reply, no_ack=True
            )
            self._consumer.consume()
            self._producer = kombu.Producer(self.channel, exchange=kombu.Exchange(""))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            if not self.amqp:
                # kombu's virtual queue_delete removes only bound queues: drop it directly.
                self._consumer.cancel()
                self.channel._delete(self.reply_to)
        with contextlib.suppress(Exception):
            self.conn.close()

    def poll(self) -> None:
        """Take what arrived since the last call (late replies, a closed connection)."""
        if self.amqp:
            sock = self.conn.connection.sock
            if sock is None:
                raise ConnectionError("the connection is closed")
            while select.select([sock], [], [], 0)[0]:
                self.conn.drain_events(timeout=0.1)
            return
        with contextlib.suppress(TimeoutError):
            for _ in range(1000):
                self.conn.drain_events(timeout=0)

    def send(self, request: Event, timeout: float) -> _Call:
        body, properties, headers = encode(request)
        call = _Call(correlation_id=str(request.event_id))
        properties.update(
            correlation_id=call.correlation_id, reply_to=self.reply_to, delivery_mode=1
        )
        self.current = call
        if self.amqp:
            # Expires in the queue when nobody waits for the answer any more.
            properties["expiration"] = str(max(1, round(timeout * 1000)))
            msg = amqp.Message(body, application_headers=headers, **properties)
            self.channel._basic_publish(msg, exchange="", routing_key=request.type, mandatory=True)
            call.tag = self._next_tag
            self._next_tag += 1
        elif not _virtual_queue_exists(self.channel, request.type):
            call.returned = True  # as RabbitMQ returns a mandatory message no queue takes
        else:
            self._producer.publish(
                body, routing_key=request.type, headers=headers, retry=False, **properties
            )
            call.routed = True
        return call

    def wait(self, call: _Call, deadline: float) -> None:
        while call.reply is None and not call.returned and not call.nacked:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            with contextlib.suppress(TimeoutError):
                self.conn.drain_events(timeout=min(remaining, 1.0))

    def consumers(self, queue: str) -> int | None:
        """How many consumers ``queue`` has now (RabbitMQ), None if unknown."""
        if not self.amqp:
            return None
        channel = None
        try:
            channel = self.conn.channel()
            return int(channel.queue_declare(queue=queue, passive=True).consumer_count)
        except Exception:
            return None
        finally:
            if channel is not None:
                with contextlib.suppress(Exception):
                    channel.close()

    def _on_amqp_reply(self, msg: Any) -> None:
        props = msg.properties
        self._received((as_bytes(msg.body), props, props.get("application_headers") or {}))

    def _on_kombu_reply(self, message: Any) -> None:
        props = dict(message.properties or {})
        props["content_type"] = message.content_type or props.get("content_type")
        self._received((as_bytes(message.body), props, message.headers or {}))

    def _received(self, reply: Message) -> None:
        _body, props, headers = reply
        correlation_id = text(props.get("correlation_id"))
        call = self.current
        if call is not None and call.reply is None and correlation_id == call.correlation_id:
            call.reply = reply
            return
        log.info(
            "reply.dropped",
            correlation_id=correlation_id,
            reply_type=text(props.get("type")),
            responder=text(headers.get(RESPONDER_HEADER)),
            reason="no call waits for it (its caller timed out, or it is a duplicate)",
        )

    def _covers(self, tag: int, multiple: bool) -> _Call | None:
        call = self.current
        if call is None or call.tag is None:
            return None
        return call if call.tag == tag or (multiple and call.tag <= tag) else None

    def _on_ack(self, tag: int, multiple: bool) -> None:
        call = self._covers(tag, multiple)
        if call is not None and not call.returned:
            call.routed = True

    def _on_nack(self, tag: int, multiple: bool) -> None:
        call = self._covers(tag, multiple)
        if call is not None:
            call.nacked = True

    def _on_return(self, _exc: Exception, _exchange: str, _key: str, message: Any) -> None:
        call = self.current
        if call is not None and text(message.properties.get("correlation_id")) == (
            call.correlation_id
        ):
            call.returned = True


class RequestClient:
    """Sends requests and waits for their replies: ``client.call(GetInvoice(...), timeout=5.0)``.

    Safe to share between threads: each thread gets its own connection, opened at its first call
    and kept for the next ones (``close()`` closes them all; call it when no call is running).
    A thread's calls run one at a time. On a virtual transport (``memory://``) the responders
    must run in the same process.
    """

    def __init__(self, broker_url: str, *, connect_timeout: float = 10.0) -> None:
        self.broker_url = broker_url
        self.connect_timeout = connect_timeout
        self._local = threading.local()
        self._lines: list[_Line] = []
        self._lock = threading.Lock()

    def __enter__(self) -> RequestClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the connections of every thread."""
        with self._lock:
            lines, self._lines = self._lines, []
        for line in lines:
            line.close()
        self._local = threading.local()

    def call(self, request: Event, *, timeout: float = 5.0) -> Event:
        """Send ``request`` to its responder and return the reply event.

        Raises ``NoResponder`` at once when no queue exists for the request's type,
        ``RequestTimeout`` when no reply came within ``timeout`` seconds (the request may still
        be processed), ``RemoteError`` when the responder failed or found the request invalid,
        ``RequestError`` when the connection was lost during the call. Calling again with the
        same request object sends the same request id (``event_id``), which lets an idempotent
        responder answer a retry without acting twice.
        """
        if not isinstance(request, Event):
            raise TypeError(f"a request is an Event, not {type(request).__name__}")
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, not {timeout!r}")
        refuse_personal(request)  # PublishError: personal data would travel in the clear
        type_name = request.type
        correlation_id = str(request.event_id)
        bound = log.bind(request_type=type_name, correlation_id=correlation_id)
        started = time.monotonic()
        line = self._line(type_name)
        try:
            call = line.send(request, timeout)
            line.wait(call, started + timeout)
        except broker_errors() as exc:
            self._drop(line)
            bound.warning("request.connection_lost", error=redact(f"{type(exc).__name__}: {exc}"))
            raise RequestError(
                type_name,
                f"{type_name!r}: the connection to the broker was lost during the call "
                f"({type(exc).__name__}: {exc}); the request may or may not have been processed",
            ) from exc
        finally:
            line.current = None
        if call.returned:
            bound.warning("request.no_responder")
            raise NoResponder(type_name)
        if call.nacked:
            bound.warning("request.nacked")
            raise RequestError(type_name, f"{type_name!r}: the broker refused (nacked) it")
        if call.reply is None:
            consumers = line.consumers(type_name) if call.routed else None
            bound.warning(
                "request.timed_out", timeout=timeout, routed=call.routed, consumers=consumers
            )
            raise RequestTimeout(type_name, timeout, routed=call.routed, consumers=consumers)
        return _reply(type_name, call.reply, bound, started)

    def _line(self, type_name: str) -> _Line:
        line: _Line | None = getattr(self._local, "line", None)
        if line is not None:
            try:
                line.poll()
                return line
            except broker_errors() as exc:
                log.info("request.reconnecting", error=redact(f"{type(exc).__name__}: {exc}"))
                self._drop(line)
        try:
            line = _Line(self.broker_url, self.connect_timeout)
        except broker_errors() as exc:
            raise RequestError(
                type_name,
                f"{type_name!r} was not sent: cannot connect to the broker at "
                f"{redact(self.broker_url)}: {type(exc).__name__}: {exc}",
            ) from exc
        self._local.line = line
        with self._lock:
            self._lines.append(line)
        return line

    def _drop(self, line: _Line) -> None:
        line.close()
        self._local.line = None
        with self._lock, contextlib.suppress(ValueError):
            self._lines.remove(line)


def _reply(type_name: str, reply: Message, bound: Any, started: float) -> Event:
    """The reply event, or the ``RemoteError`` an error reply stands for."""
    body, props, headers = reply
    responder = text(headers.get(RESPONDER_HEADER)) or "(unnamed)"
    bound = bound.bind(responder=responder)
    if text(props.get("type")) == ERROR_TYPE:
        try:
            data = loads(body)
            error_type, message = str(data["error"]), str(data.get("message", ""))
        except Exception:
            error_type, message = "Error", body.decode("utf-8", "replace")
        bound.info("request.failed_remotely", error=f"{error_type}: {message}")
        raise RemoteError(type_name, responder, error_type, message)
    try:
        event = decode(body, props, headers)
    except MalformedMessage as exc:
        bound.warning("reply.invalid", reason=exc.reason)
        raise RequestError(
            type_name, f"{type_name!r}: the reply from {responder} is invalid: {exc.reason}"
        ) from None
    bound.debug(
        "request.answered",
        reply_type=event.type,
        ms=round((time.monotonic() - started) * 1000, 2),
    )
    return event
