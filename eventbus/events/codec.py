"""The JSON codec of events: payload out (``encode_payload``), event back in (``decode_event``).

Decoding upcasts an older ``schema_version`` through the class's upcasters, then validates, so
code only sees the current shape; it raises ``UnknownEventType``, ``UnsupportedVersion`` or
``EventValidationError``. JSON only, never pickle: ``dumps``/``loads`` (orjson, and the standard
library for what orjson refuses).
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Mapping
from typing import Any

import orjson

from eventbus.errors import EventValidationError, UnsupportedVersion
from eventbus.events import forgotten as _forgotten  # noqa: F401 (registers subject.forgotten)
from eventbus.events.model import Event, _envelope, _fill, _load, dump_payload, event_class
from eventbus.events.personal import has_forgotten, load_forgetting, scrub

__all__ = ["decode_event", "dumps", "encode_payload", "loads", "upcast"]


def encode_payload(event: Event) -> dict[str, Any]:
    """The event's payload as JSON-compatible values (what the store and the wire carry)."""
    return dump_payload(type(event), event.__dict__)


def decode_event(
    type_name: str,
    schema_version: int,
    payload: Mapping[str, Any],
    *,
    event_id: uuid.UUID | str,
    occurred_at: dt.datetime,
    correlation_id: str | None = None,
    causation_id: str | None = None,
    stream_id: str | None = None,
    stream_version: int | None = None,
    position: int | None = None,
) -> Event:
    """Rebuild an event from its stored or received form: upcast, then validate.

    Raises ``UnknownEventType``, ``UnsupportedVersion`` or ``EventValidationError``.
    """
    cls = event_class(type_name)
    plain = not (cls.personal_fields and has_forgotten(payload))
    if (
        type(payload) is dict
        and schema_version == cls.schema_version
        and not cls._naive_ok
        and plain
    ):
        event = _decode_plain(cls, payload, event_id, occurred_at, correlation_id, causation_id)
        if event is not None:
            event.__dict__.update(
                stream_id=stream_id, stream_version=stream_version, position=position
            )
            return event
    if not isinstance(payload, Mapping):
        raise EventValidationError(cls._label(), {"_schema": ["Payload is not a JSON object."]})
    data = upcast(cls, schema_version, payload)
    errors: dict[str, Any] = {}
    if cls.personal_fields and has_forgotten(data):
        values = load_forgetting(cls, data, errors)
    else:
        values = _load(cls, data, errors)
    envelope = _envelope(event_id, occurred_at, correlation_id, causation_id, errors)
    if errors:
        raise EventValidationError(cls._label(), scrub(cls, data, errors))
    envelope.update(stream_id=stream_id, stream_version=stream_version, position=position)
    event = object.__new__(cls)
    _fill(event, values, envelope)
    return event


def _decode_plain(
    cls: type[Event],
    payload: dict[str, Any],
    event_id: uuid.UUID | str,
    occurred_at: dt.datetime,
    correlation_id: str | None,
    causation_id: str | None,
) -> Event | None:
    """The common case of ``decode_event`` without its general checks, or None: the current
    version, a payload the fast loader takes, an envelope of the exact stored types."""
    if (
        cls._fast_load is None
        or type(event_id) is not uuid.UUID
        or type(occurred_at) is not dt.datetime
        or not _plain_id(correlation_id)
        or not _plain_id(causation_id)
    ):
        return None
    if occurred_at.tzinfo is not dt.UTC:
        if occurred_at.utcoffset() != _ZERO:  # None (naive) or another zone: the general path
            return None
        occurred_at = occurred_at.replace(tzinfo=dt.UTC)  # e.g. psycopg's ZoneInfo("Etc/UTC")
    values = cls._fast_load(payload)
    if values is None:
        return None
    event = object.__new__(cls)
    event.__dict__.update(
        values,
        event_id=event_id,
        occurred_at=occurred_at,
        correlation_id=correlation_id or str(event_id),
        causation_id=causation_id,
    )
    return event


_ZERO = dt.timedelta(0)


def _plain_id(value: str | None) -> bool:
    return value is None or (type(value) is str and 0 < len(value) <= 255)


def upcast(cls: type[Event], schema_version: object, payload: Mapping[str, Any]) -> dict[str, Any]:
    """Bring a payload of ``schema_version`` to the current version of ``cls``."""
    if not isinstance(schema_version, int) or isinstance(schema_version, bool):
        raise UnsupportedVersion(cls._label(), schema_version, "it is not an integer")
    if schema_version > cls.schema_version:
        raise UnsupportedVersion(
            cls._label(),
            schema_version,
            f"newer than this code's version {cls.schema_version}; deploy the newer event class",
        )
    if schema_version < 1:
        raise UnsupportedVersion(cls._label(), schema_version, "versions start at 1")
    data = dict(payload)
    for version in range(schema_version, cls.schema_version):
        step = cls._upcasters.get(version)
        if step is None:
            raise UnsupportedVersion(
                cls._label(),
                schema_version,
                f"no upcaster registered from version {version} to {version + 1}",
            )
        data = step(data)
    return data


def dumps(payload: Mapping[str, Any]) -> bytes:
    """Compact UTF-8 JSON."""
    try:
        return orjson.dumps(payload)
    except TypeError:  # what orjson refuses but JSON allows (integers beyond 64 bits)
        return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


def loads(data: bytes | str) -> Any:
    """Parse JSON: orjson, and the standard library for what orjson refuses.

    orjson is strict (no NaN, integers within 64 bits, nesting within 1,024 levels); whatever
    it refuses is parsed again by ``json``, which accepts or rejects it as before.
    """
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data)
