"""Parked events: stored events a relay passed over because the broker refuses them for good.

The relay records each one with the broker's reason and goes on with the events after it; the
store keeps the event itself. ``eventbus parked list`` shows them, ``eventbus parked retry``
publishes them again once the cause is fixed (``run.parking``).
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from eventbus.store.sequencer import reader
from eventbus.store.tables import insert
from eventbus.store.tables import parked as P


@dataclass(frozen=True)
class Parked:
    """One parked event: which relay passed it over, where it is in the store, and why."""

    relay: str
    position: int
    exchange: str
    event_id: uuid.UUID
    event_type: str
    reason: str
    attempts: int
    parked_at: dt.datetime


def park(
    engine: Engine,
    relay: str,
    exchange: str,
    position: int,
    event_id: uuid.UUID,
    event_type: str,
    reason: str,
) -> None:
    """Record that ``relay`` passed over the event at ``position`` (again: one attempt more)."""
    now = dt.datetime.now(dt.UTC)
    with engine.begin() as conn:
        statement = insert(conn.dialect.name, P).values(
            relay=relay,
            position=position,
            exchange=exchange,
            event_id=event_id,
            event_type=event_type,
            reason=reason,
            attempts=1,
            parked_at=now,
        )
        conn.execute(
            statement.on_conflict_do_update(
                index_elements=[P.c.relay, P.c.position],
                set_={"reason": reason, "attempts": P.c.attempts + 1, "parked_at": now},
            )
        )


def parked(
    engine: Engine, relay: str | None = None, positions: Sequence[int] | None = None
) -> list[Parked]:
    """The parked events (of ``relay``; at ``positions``), in position order."""
    query = sa.select(P).order_by(P.c.position, P.c.relay)
    if relay is not None:
        query = query.where(P.c.relay == relay)
    if positions is not None:
        query = query.where(P.c.position.in_(list(positions)))
    with reader(engine) as conn:
        return [Parked(**row._mapping) for row in conn.execute(query)]


def count(engine: Engine) -> dict[str, int]:
    """How many events each relay has parked (relays with none are left out)."""
    query = sa.select(P.c.relay, sa.func.count()).group_by(P.c.relay)
    with reader(engine) as conn:
        return {relay: int(n) for relay, n in conn.execute(query)}


def unpark(engine: Engine, relay: str, position: int) -> None:
    """Forget a parked event (it was published since)."""
    with engine.begin() as conn:
        conn.execute(sa.delete(P).where(P.c.relay == relay, P.c.position == position))
