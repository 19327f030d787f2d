"""How an event becomes a row of ``eventbus_events``: the row's values, and PostgreSQL's
one-statement append (the stream's version read and the row inserted together)."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from eventbus.events.model import Event
from eventbus.store.tables import events as T

_CURRENT = f"(SELECT coalesce(max(stream_version), 0) FROM {T.name} WHERE stream_id = :stream_id)"
INSERT_ONE = (
    sa.text(
        f"""
        INSERT INTO {T.name} (event_id, stream_id, stream_version, type, schema_version,
                              occurred_at, correlation_id, causation_id, payload, routing_key,
                              headers)
        SELECT :event_id, :stream_id, {_CURRENT} + 1, :type, :schema_version,
               :occurred_at, :correlation_id, :causation_id, :payload, :routing_key, :headers
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
    }
