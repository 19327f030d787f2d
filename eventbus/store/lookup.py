"""Positions of appended events by event id, once they have them (``positions``).

SQLite gives positions at append; PostgreSQL at sequencing, after commit (``sequencer``): this
numbers what is waiting and reads the positions back, for tools that print them
(``eventbus append``).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from eventbus.store import sequencer
from eventbus.store.tables import events as T

_CHUNK = 1000


def positions(
    engine: Engine, event_ids: Sequence[uuid.UUID], *, timeout: float = 30.0
) -> dict[uuid.UUID, int | None]:
    """Each committed event's position (None for one still without a position at ``timeout``,
    when another sequencer holds the lock that long)."""
    found: dict[uuid.UUID, int | None] = dict.fromkeys(event_ids)
    deadline = time.monotonic() + timeout
    while True:
        missing = [i for i, p in found.items() if p is None]
        if not missing:
            return found
        sequencer.sequence(engine)
        with sequencer.reader(engine) as conn:
            for start in range(0, len(missing), _CHUNK):
                chunk = missing[start : start + _CHUNK]
                rows = conn.execute(
                    sa.select(T.c.event_id, T.c.position).where(T.c.event_id.in_(chunk))
                )
                for event_id, position in rows:
                    found[_uuid(event_id)] = position
        if all(p is not None for p in found.values()) or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def _uuid(value: object) -> uuid.UUID:
    return value if isinstance(value, uuid.UUID) else uuid.UUID(str(value))
