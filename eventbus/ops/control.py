"""Steering subscribers from outside their processes: pause and resume, and how far each got.

A paused handler's workers stop consuming its queue (messages wait there) without stopping the
process; they look at ``eventbus_paused`` every second or so. ``positions`` says how far each
subscriber got in the global order, for lag: a projection's (or replayed handler's) checkpoint,
else the highest position a handler processed.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from eventbus.store.tables import checkpoints as CP
from eventbus.store.tables import paused as PA
from eventbus.store.tables import processed as P


@dataclass(frozen=True)
class Pause:
    """Why and since when a handler's queue is paused."""

    queue: str
    reason: str | None
    paused_at: dt.datetime


def pause(engine: Engine, queue: str, reason: str | None = None) -> bool:
    """Pause consumption of ``queue``; False if it was paused already (the reason is kept)."""
    with engine.begin() as conn:
        if conn.execute(sa.select(PA.c.queue).where(PA.c.queue == queue)).first():
            return False
        conn.execute(sa.insert(PA).values(queue=queue, reason=reason, paused_at=_now()))
        return True


def resume(engine: Engine, queue: str) -> bool:
    """Resume consumption of ``queue``; False if it was not paused."""
    with engine.begin() as conn:
        return bool(conn.execute(sa.delete(PA).where(PA.c.queue == queue)).rowcount)


def paused(conn: Connection) -> dict[str, Pause]:
    """Every paused queue."""
    rows = conn.execute(sa.select(PA)).all()
    return {r.queue: Pause(r.queue, r.reason, r.paused_at) for r in rows}


def positions(conn: Connection, queues: Iterable[str]) -> dict[str, int | None]:
    """How far each subscriber got: its checkpoint, else its highest processed position.

    None for a subscriber that has processed nothing yet.
    """
    names = list(queues)
    found: dict[str, int | None] = dict.fromkeys(names)
    for row in conn.execute(
        sa.select(CP.c.subscriber, CP.c.position).where(CP.c.subscriber.in_(names))
    ):
        found[row.subscriber] = int(row.position)
    for name in names:
        last = conn.execute(
            sa.select(sa.func.max(P.c.position)).where(P.c.handler == name)
        ).scalar_one_or_none()
        if last is not None:
            current = found[name]
            found[name] = int(last) if current is None else max(current, int(last))
    return found


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)
