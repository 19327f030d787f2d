"""Events as plain AMQP messages, and back.

An event travels as a message any AMQP client can read and write (documented in the README):

- body: the payload as UTF-8 JSON;
- properties: ``message_id`` = event id, ``type`` = event type, ``timestamp`` = occurred_at
  (whole seconds, as AMQP allows), ``correlation_id``, ``content_type`` ``application/json``,
  ``content_encoding`` ``utf-8``, ``delivery_mode`` 2 (persistent);
- headers: ``schema_version``, ``occurred_at`` (ISO 8601, microseconds, UTC), ``causation_id``,
  ``stream_id``, ``stream_version``, ``position`` (those the event has).

``decode`` turns a received message back into an event, or raises ``MalformedMessage`` with the
reason (not JSON, unknown type, invalid fields, unsupported version, missing envelope).
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Mapping
from typing import Any

from eventbus._amqp import UNDECODABLE
from eventbus.errors import EventError, MalformedMessage
from eventbus.events import Event, decode_event, dumps, encode_payload, event_class, loads

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
    """``(body, properties, headers)`` for publishing ``event``."""
    return encode_record(
        dumps(encode_payload(event)),
        type_name=event.type,
        schema_version=event.schema_version,
        event_id=event.event_id,
        occurred_at=event.occurred_at,
        correlation_id=event.correlation_id,
        causation_id=event.causation_id,
        stream_id=event.stream_id,
        stream_version=event.stream_version,
        position=event.position,
    )


def encode_record(
    body: bytes,
    *,
    type_name: str,
    schema_version: int,
    event_id: uuid.UUID,
    occurred_at: dt.datetime,
    correlation_id: str | None,
    causation_id: str | None,
    stream_id: str | None,
    stream_version: int | None,
    position: int | None,
) -> Message:
    """``(body, properties, headers)`` for a stored event whose payload is JSON already.

    The relay publishes stored rows this way: they were validated when appended.
    """
    properties: dict[str, Any] = {
        "message_id": str(event_id),
        "type": type_name,
        "timestamp": int(occurred_at.timestamp()),
        "correlation_id": correlation_id or str(event_id),
        "content_type": CONTENT_TYPE,
        "content_encoding": "utf-8",
        "delivery_mode": 2,
    }
    headers: dict[str, Any] = {
        "schema_version": schema_version,
        "occurred_at": occurred_at.isoformat(timespec="microseconds"),
    }
    for name, value in (
        ("causation_id", causation_id),
        ("stream_id", stream_id),
        ("stream_version", stream_version),
        ("position", position),
    ):
        if value is not None:
            headers[name] = value
    return body, properties, headers


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", "replace")
    return str(value)


def decode(body: bytes | str, properties: Mapping[str, Any], headers: Mapping[str, Any]) -> Event:
    """The event a received message carries; ``MalformedMessage`` says why it is not one.

    ``schema_version`` may be left out by foreign publishers: it then means the current version.
    ``occurred_at`` falls back to the ``timestamp`` property.
    """
    undecodable = headers.get(UNDECODABLE)
    if undecodable:
        raise MalformedMessage(str(undecodable))
    type_name = _text(properties.get("type"))
    if not type_name:
        raise MalformedMessage("no 'type' property: not an eventbus event")
    message_id = _text(properties.get("message_id"))
    if not message_id:
        raise MalformedMessage(f"{type_name}: no 'message_id' property (the event id)")
    try:
        event_id = uuid.UUID(message_id)
    except ValueError:
        raise MalformedMessage(
            f"{type_name}: message_id {message_id!r} is not a UUID (the event id)"
        ) from None
    content_type = _text(properties.get("content_type"))
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
    occurred_at = _occurred_at(type_name, event_id, properties, headers)
    try:
        return decode_event(
            type_name,
            headers.get("schema_version", cls.schema_version),
            payload,
            event_id=event_id,
            occurred_at=occurred_at,
            correlation_id=_text(properties.get("correlation_id")),
            causation_id=_text(headers.get("causation_id")),
            stream_id=_text(headers.get("stream_id")),
            stream_version=headers.get("stream_version"),
            position=headers.get("position"),
        )
    except EventError as exc:
        raise MalformedMessage(str(exc)) from None
    except Exception as exc:  # an upcaster or a field's validator that raised
        raise MalformedMessage(
            f"{type_name} {event_id}: decoding failed: {type(exc).__name__}: {exc}"
        ) from None


def _occurred_at(
    type_name: str, event_id: uuid.UUID, properties: Mapping[str, Any], headers: Mapping[str, Any]
) -> dt.datetime:
    header = headers.get("occurred_at")
    if isinstance(header, dt.datetime):  # an AMQP timestamp field: seconds, UTC
        return header if header.tzinfo else header.replace(tzinfo=dt.UTC)
    raw = _text(header)
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
            raise MalformedMessage(
                f"{type_name} {event_id}: 'timestamp' property {stamp} is not a time in seconds "
                "(and there is no 'occurred_at' header)"
            ) from None
    raise MalformedMessage(
        f"{type_name} {event_id}: neither an 'occurred_at' header nor a 'timestamp' property"
    )
