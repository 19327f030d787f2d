"""Events as plain AMQP messages and back, and publishing them with confirms per window.

An event travels as a persistent JSON message any AMQP client can read and write; ``decode``
turns a message back into an event or raises ``MalformedMessage`` with the reason.
``Publisher`` awaits the broker's confirms once per window: a nack, a channel error or a timeout
fails the whole window, which the caller publishes again (duplicates are dropped by event id).

Details: ``docs/wire.md``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import amqp
import kombu

from eventbus.bus import amqp as _amqp
from eventbus.bus.amqp import UNDECODABLE
from eventbus.errors import EventError, MalformedMessage, PublishError
from eventbus.events.codec import decode_event, dumps, encode_payload, loads
from eventbus.events.model import Event, event_class
from eventbus.events.personal import key_id_of, personal_values, scrub_text, unseal_payload

CONTENT_TYPE = "application/json"
_HEADER_INTS = ("schema_version", "stream_version", "position")


Message = tuple[bytes, dict[str, Any], dict[str, Any]]


# The AMQP properties of an eventbus message (see the module docstring); a retry or a dead letter
# is republished with these, the rest of the envelope travels in its headers.
PROPERTIES = (
    "message_id",
    "type",
    "timestamp",
    "correlation_id",
    "content_type",
    "content_encoding",
)


def encode(event: Event) -> Message:
    """``(body, properties, headers)`` for publishing ``event``; ``PublishError`` if it holds
    personal data (that travels sealed, from the store: append the event instead)."""
    refuse_personal(event)
    return encode_record(dumps(encode_payload(event)), event)


def encode_record(body: bytes, envelope: Any) -> Message:
    """``(body, properties, headers)`` for an event whose payload is JSON ``body`` already.

    ``envelope`` is an ``Event`` or a stored row (the relay publishes rows as stored: they were
    validated when appended): anything with the envelope's attributes (``type``,
    ``schema_version``, ``event_id``, ``occurred_at``, ``correlation_id``, ``causation_id``,
    ``stream_id``, ``stream_version``, ``position``).
    """
    event_id, occurred_at = envelope.event_id, envelope.occurred_at
    correlation_id = envelope.correlation_id
    properties: dict[str, Any] = {
        "message_id": str(event_id),
        "type": envelope.type,
        "timestamp": int(occurred_at.timestamp()),
        "correlation_id": correlation_id or str(event_id),
        "content_type": CONTENT_TYPE,
        "content_encoding": "utf-8",
        "delivery_mode": 2,
    }
    headers: dict[str, Any] = {
        "schema_version": envelope.schema_version,
        "occurred_at": occurred_at.isoformat(timespec="microseconds"),
    }
    for name in ("causation_id", "stream_id", "stream_version", "position"):
        value = getattr(envelope, name)
        if value is not None:
            headers[name] = value
    return body, properties, headers


def _text(value: Any, what: str, *context: object) -> str | None:
    """A property or header as text (bytes decoded leniently, numbers and times as ``str``).

    A table or an array (which ``str`` would render recursively) is ``MalformedMessage``: the
    reason names ``what`` after the ``context`` (type name, event id) it has.
    """
    if value is None or type(value) is str:
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8", "replace")
    if isinstance(value, str):
        return str(value)
    if isinstance(value, Mapping | list | tuple | set | frozenset):
        shown = "a table" if isinstance(value, Mapping) else "an array"
    else:
        try:
            return str(value)
        except ValueError:  # an integer of more digits than str() converts
            shown = "a number too long to show"
    reason = f"{what} is {shown}, not text"
    raise MalformedMessage(f"{' '.join(map(str, context))}: {reason}" if context else reason)


def decode(
    body: bytes | str,
    properties: Mapping[str, Any],
    headers: Mapping[str, Any],
    keys: Mapping[str, bytes] | None = None,
) -> Event:
    """The event a received message carries; ``MalformedMessage`` says why it is not one.

    ``keys`` (``KeyRing.for_bodies``) unseal personal fields; without them a sealed one is
    ``MalformedMessage``.

    ``schema_version`` may be left out by foreign publishers: it then means the current version.
    ``occurred_at`` falls back to the ``timestamp`` property.
    """
    undecodable = headers.get(UNDECODABLE)
    if undecodable:
        raise MalformedMessage(_text(undecodable, f"header {UNDECODABLE!r}") or UNDECODABLE)
    type_name = _text(properties.get("type"), "the 'type' property")
    if not type_name:
        raise MalformedMessage("no 'type' property: not an eventbus event")
    message_id = _text(properties.get("message_id"), "the 'message_id' property", type_name)
    if not message_id:
        raise MalformedMessage(f"{type_name}: no 'message_id' property (the event id)")
    try:
        event_id = uuid.UUID(message_id)
    except ValueError:
        raise MalformedMessage(
            f"{type_name}: message_id {message_id!r} is not a UUID (the event id)"
        ) from None
    content_type = _text(properties.get("content_type"), "'content_type'", type_name)
    if content_type not in (None, "", CONTENT_TYPE):
        raise MalformedMessage(
            f"{type_name}: content_type {content_type!r}, expected {CONTENT_TYPE}"
        )
    try:
        cls = event_class(type_name)
    except EventError as exc:
        raise MalformedMessage(str(exc)) from None
    try:
        payload = loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MalformedMessage(f"{type_name} {event_id}: body is not UTF-8 JSON: {exc}") from None
    except RecursionError:
        raise MalformedMessage(f"{type_name} {event_id}: body JSON is nested too deep") from None
    for name in _HEADER_INTS:
        value = headers.get(name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            raise MalformedMessage(f"{type_name} {event_id}: header {name!r} is not an integer")
        if value is not None and not -(2**63) <= value < 2**63:  # what AMQP and the store carry
            raise MalformedMessage(f"{type_name} {event_id}: header {name!r} is beyond 64 bits")
    occurred_at = _occurred_at(type_name, event_id, properties, headers)
    sealed = payload
    if cls.personal_fields and isinstance(payload, Mapping):
        if headers.get("schema_version", cls.schema_version) == cls.schema_version:
            refuse_clear(cls, event_id, payload)
        payload = _unsealed(cls, event_id, payload, keys)
    context = (type_name, event_id)
    correlation_id = _text(properties.get("correlation_id"), "'correlation_id'", *context)
    causation_id = _text(headers.get("causation_id"), "header 'causation_id'", *context)
    stream_id = _text(headers.get("stream_id"), "header 'stream_id'", *context)
    try:
        return decode_event(
            type_name,
            headers.get("schema_version", cls.schema_version),
            payload,
            event_id=event_id,
            occurred_at=occurred_at,
            correlation_id=correlation_id,
            causation_id=causation_id,
            stream_id=stream_id,
            stream_version=headers.get("stream_version"),
            position=headers.get("position"),
        )
    except EventError as exc:
        raise MalformedMessage(_scrubbed(cls, sealed, payload, str(exc))) from None
    except Exception as exc:  # an upcaster or a field's validator that raised
        reason = f"{type_name} {event_id}: decoding failed: {type(exc).__name__}: {exc}"
        raise MalformedMessage(_scrubbed(cls, sealed, payload, reason)) from None


def _scrubbed(cls: type[Event], sealed: Any, payload: Any, reason: str) -> str:
    """``reason`` without the plaintext of the values that came sealed (any field, as an old
    version names it) or sit in the class's personal fields."""
    if not cls.personal_fields or not isinstance(payload, Mapping):
        return reason
    values = [v for k, v in payload.items() if isinstance(sealed, Mapping) and sealed.get(k) != v]
    return scrub_text(cls, reason, values + personal_values(cls, payload))


def refuse_personal(event: Event) -> None:
    """``PublishError`` if ``event`` holds a personal value (never published in the clear)."""
    held = [n for n in event.personal_fields if event.payload.get(n) is not None]
    if held:
        raise PublishError(
            f"{event._label()}: personal field(s) {', '.join(held)} are published only sealed, "
            "by the relay from the event store: append the event instead"
        )


def refuse_clear(cls: type[Event], event_id: uuid.UUID, payload: Mapping[str, Any]) -> None:
    """``MalformedMessage`` naming a personal field whose value came in the clear: the relay
    publishes every non-null personal value sealed (defaults too), a foreign publisher may not."""
    clear = [
        name
        for name in cls.personal_fields
        if payload.get(name) is not None and key_id_of(payload[name]) is None
    ]
    if clear:
        raise MalformedMessage(
            f"{cls.type} {event_id}: personal field(s) {', '.join(clear)} came unsealed; they "
            "are published only sealed, by the relay from the event store"
        )


def _unsealed(
    cls: type[Event], event_id: uuid.UUID, payload: Mapping[str, Any], keys: Any
) -> Mapping[str, Any]:
    if keys is None:
        if any(key_id_of(value) for value in payload.values()):
            raise MalformedMessage(
                f"{cls.type} {event_id}: its personal fields are sealed and this reader has no "
                "key ring (decode(..., keys=store.keys.for_bodies(...)))"
            )
        return payload
    try:
        return unseal_payload(cls, event_id, payload, keys)
    except EventError as exc:
        raise MalformedMessage(str(exc)) from None


def _occurred_at(
    type_name: str, event_id: uuid.UUID, properties: Mapping[str, Any], headers: Mapping[str, Any]
) -> dt.datetime:
    header = headers.get("occurred_at")
    if isinstance(header, dt.datetime):  # an AMQP timestamp field: seconds, UTC
        return header if header.tzinfo else header.replace(tzinfo=dt.UTC)
    raw = _text(header, "header 'occurred_at'", type_name, event_id)
    if raw:
        try:
            moment = dt.datetime.fromisoformat(raw)
        except ValueError:
            raise MalformedMessage(
                f"{type_name} {event_id}: header 'occurred_at' {raw!r} is not ISO 8601"
            ) from None
        if moment.tzinfo is None:
            raise MalformedMessage(
                f"{type_name} {event_id}: header 'occurred_at' {raw!r} has no time zone"
            )
        return moment
    stamp = properties.get("timestamp")
    if isinstance(stamp, dt.datetime):
        return stamp if stamp.tzinfo else stamp.replace(tzinfo=dt.UTC)
    if isinstance(stamp, int | float) and not isinstance(stamp, bool):
        try:
            return dt.datetime.fromtimestamp(stamp, dt.UTC)
        except (ValueError, OverflowError, OSError):
            shown = stamp if abs(stamp) < 2**64 or isinstance(stamp, float) else "beyond 64 bits"
            raise MalformedMessage(
                f"{type_name} {event_id}: 'timestamp' property {shown} is not a time in seconds "
                "(and there is no 'occurred_at' header)"
            ) from None
    raise MalformedMessage(
        f"{type_name} {event_id}: neither an 'occurred_at' header nor a 'timestamp' property"
    )


# -- publishing with confirms -------------------------------------------------------------


def is_amqp(connection: kombu.Connection) -> bool:
    """True on a real AMQP broker (py-amqp transport), False on kombu's virtual transports."""
    return bool(connection.transport.driver_type == "amqp")


def declare_exchange(connection: kombu.Connection, channel: Any, name: str) -> None:
    """Declare the application's durable topic exchange (idempotent)."""
    kombu.Exchange(name, "topic", durable=True, auto_delete=False)(channel).declare()


class Publisher:
    """Publishes messages to one exchange and returns once the broker has confirmed them."""

    def __init__(
        self, connection: kombu.Connection, exchange: str, *, confirm_timeout: float = 30.0
    ) -> None:
        self.connection = connection
        self.exchange = exchange
        self.confirm_timeout = confirm_timeout
        self._amqp = is_amqp(connection)
        _amqp.install()  # a returned message's undecodable properties must not kill the channel
        self._open()

    def _open(self) -> None:
        connection, exchange = self.connection, self.exchange
        self.channel: Any = connection.channel()
        if exchange:  # "" is the default exchange: a routing key names a queue
            declare_exchange(connection, self.channel, exchange)
        self._unconfirmed: set[int] = set()
        self._nacked = 0
        self._returned: list[str] = []
        self._sent = 0
        self._next_tag = 1
        if self._amqp:
            self.channel.confirm_select()
            self.channel.events["basic_ack"].add(self._on_ack)
            self.channel.events["basic_nack"].add(self._on_nack)
            self.channel.events["basic_return"].add(self._on_return)
        else:
            self._producer = kombu.Producer(
                self.channel,
                exchange=kombu.Exchange(exchange, "topic", durable=True)
                if exchange
                else kombu.Exchange(""),
            )

    def close(self) -> None:
        """Close the channel (the connection stays the caller's)."""
        with contextlib.suppress(Exception):  # a channel on a dead connection
            self.channel.close()

    def reopen(self) -> None:
        """A new channel on the same connection (after the broker closed this one)."""
        self.close()
        self._open()

    def publish(self, messages: Sequence[tuple[str, Message]]) -> list[str]:
        """Publish ``(routing_key, message)`` pairs and wait until all are confirmed.

        Returns the message ids the broker could not route to any queue (published with
        ``mandatory``); raises ``PublishError`` when the window was not confirmed.
        """
        self.send(messages)
        return self.wait()

    def send(self, messages: Sequence[tuple[str, Message]]) -> None:
        """Publish a window without waiting for its confirms (``wait`` does); one at a time."""
        self._returned = []
        self._sent = len(messages)
        if not self._amqp:
            self._publish_virtual(messages)
            return
        basic_publish = self.channel._basic_publish  # plain publish; confirms come per window
        for routing_key, (body, properties, headers) in messages:
            msg = amqp.Message(body, application_headers=headers, **properties)
            basic_publish(msg, exchange=self.exchange, routing_key=routing_key, mandatory=True)
            self._unconfirmed.add(self._next_tag)
            self._next_tag += 1

    def wait(self) -> list[str]:
        """Wait for the confirms of the window ``send`` published; returns the unroutable ids."""
        deadline = time.monotonic() + self.confirm_timeout
        while self._unconfirmed:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise PublishError(
                    f"{len(self._unconfirmed)} of {self._sent} messages not confirmed "
                    f"within {self.confirm_timeout}s"
                )
            try:
                self.connection.drain_events(timeout=min(remaining, 1.0))
            except TimeoutError:
                continue
        if self._nacked:
            nacked, self._nacked = self._nacked, 0
            raise PublishError(f"the broker nacked {nacked} of {self._sent} messages")
        return self._returned

    def _publish_virtual(self, messages: Sequence[tuple[str, Message]]) -> None:
        for routing_key, (body, properties, headers) in messages:
            if self.exchange and not self.channel.typeof(self.exchange).lookup(
                self.channel.get_table(self.exchange), self.exchange, routing_key, None
            ):
                self._returned.append(properties["message_id"])
                continue
            if "expiration" in properties:  # kombu's publish takes seconds (AMQP: ms text)
                properties = {**properties, "expiration": int(properties["expiration"]) / 1000}
            self._producer.publish(
                body, routing_key=routing_key, headers=headers, retry=False, **properties
            )

    def _settle(self, tag: int, multiple: bool) -> None:
        if multiple:
            self._unconfirmed = {t for t in self._unconfirmed if t > tag}
        else:
            self._unconfirmed.discard(tag)

    def _on_ack(self, tag: int, multiple: bool) -> None:
        self._settle(tag, multiple)

    def _on_nack(self, tag: int, multiple: bool) -> None:
        before = len(self._unconfirmed)
        self._settle(tag, multiple)
        self._nacked += max(1, before - len(self._unconfirmed))

    def _on_return(self, _exc: Exception, _exchange: str, _key: str, message: Any) -> None:
        self._returned.append(str(message.properties.get("message_id")))


def refusal(exc: BaseException) -> str | None:
    """The broker's reason when ``exc`` is its refusal of a published message for good.

    RabbitMQ closes the channel with 406 PRECONDITION_FAILED on ``basic.publish`` for a message
    it will never take (larger than its ``max_message_size``, say); None for anything else.
    """
    if isinstance(exc, amqp.exceptions.PreconditionFailed) and exc.method_sig == (60, 40):
        return str(exc.reply_text or exc)
    return None
