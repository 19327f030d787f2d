"""How an event becomes a row of ``eventbus_events``: the row's values, and PostgreSQL's
one-statement append (the stream's version read and the row inserted together); and back:
``event_of(row)``."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import sqlalchemy as sa

from eventbus.events.codec import decode_event, loads
from eventbus.events.fingerprint import decode_fingerprinted, fingerprint
from eventbus.events.model import Event
from eventbus.store.keys import unseal
from eventbus.store.tables import events as T

_CURRENT = f"(SELECT coalesce(max(stream_version), 0) FROM {T.name} WHERE stream_id = :stream_id)"
INSERT_ONE = (
    sa.text(
        f"""
        INSERT INTO {T.name} (event_id, stream_id, stream_version, type, schema_version,
                              occurred_at, correlation_id, causation_id, payload, routing_key,
                              headers, schema_fingerprint)
        SELECT :event_id, :stream_id, {_CURRENT} + 1, :type, :schema_version,
               :occurred_at, :correlation_id, :causation_id, :payload, :routing_key, :headers,
               :schema_fingerprint
        WHERE CAST(:expected AS INTEGER) IS NULL OR {_CURRENT} = :expected
        RETURNING stream_version
        """
    )
    .bindparams(
        *(
            sa.bindparam(c.name, type_=c.type)
            for c in T.columns
            if c.name not in ("id", "position", "stream_version")
        )
    )
    .bindparams(sa.bindparam("expected", type_=sa.Integer))
)


def row_of(
    event: Event, payload: Any, stream_id: str, version: int, position: int | None
) -> dict[str, Any]:
    return {
        "position": position,
        "event_id": event.event_id,
        "stream_id": stream_id,
        "stream_version": version,
        "type": event.type,
        "schema_version": event.schema_version,
        "occurred_at": event.occurred_at,
        "correlation_id": event.correlation_id,
        "causation_id": event.causation_id,
        "payload": payload,
        "routing_key": None if event.routing_key == event.type else event.routing_key,
        "schema_fingerprint": fingerprint(type(event)),
    }


# Rows are read by index (plain tuples on PostgreSQL, Rows of select(events) on SQLite).
COLUMNS = list(T.columns.keys())
POSITION, EVENT_ID, STREAM = (COLUMNS.index(c) for c in ("position", "event_id", "stream_id"))
TYPE, KEY = COLUMNS.index("type"), COLUMNS.index("routing_key")
FINGERPRINT = COLUMNS.index("schema_fingerprint")


def event_of(row: Any, keys: dict[str, bytes]) -> Event:
    """The event of a row of select(events) (or the store's _PG_PAGE: payload as JSON text),
    read by index (faster than by name): validated unless it has its class's fingerprint."""
    (
        _,
        position,
        event_id,
        stream_id,
        version,
        type_name,
        schema_version,
        occurred_at,
        correlation_id,
        causation_id,
        payload,
    ) = row[:11]
    payload = unseal(type_name, event_id, loads(payload) if type(payload) is str else payload, keys)
    stored = row[FINGERPRINT]
    if stored is not None:  # appended under a schema: is it this class's current one?
        event = decode_fingerprinted(
            type_name,
            schema_version,
            stored,
            payload,
            event_id,
            occurred_at,
            correlation_id,
            causation_id,
            (stream_id, version, position),
        )
        if event is not None:
            return event
    return decode_event(
        type_name,
        schema_version,
        payload,
        event_id=event_id if type(event_id) is uuid.UUID else uuid.UUID(event_id),
        occurred_at=occurred_at
        if isinstance(occurred_at, dt.datetime)
        else dt.datetime.fromisoformat(occurred_at),
        correlation_id=correlation_id,
        causation_id=causation_id,
        stream_id=stream_id,
        stream_version=version,
        position=position,
    )
