"""Steering subscribers from outside their processes: pause and resume, and how far each got.

A paused handler's workers stop consuming its queue (messages wait there) without stopping the
process; they look at ``eventbus_paused`` every second or so. A worker paused by SIGUSR1 marks its
queues there too (reason ``SIGUSR1 (pid N on HOST)``), for ``eventbus status`` only: workers obey
no such mark, and an operator's pause replaces it. ``positions`` says how far each subscriber got
in the global order, for lag (a checkpoint, else the highest position a handler processed).
"""

from __future__ import annotations

import datetime as dt
import os
import socket
from collections.abc import Iterable, Mapping
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


SIGNAL = "SIGUSR1"


def pause(engine: Engine, queue: str, reason: str | None = None) -> bool:
    """Pause consumption of ``queue``; False if it was paused already (the reason is kept).

    A SIGUSR1 mark is no pause of the queue's workers: this pause replaces it.
    """
    with engine.begin() as conn:
        found = conn.execute(sa.select(PA.c.reason).where(PA.c.queue == queue)).first()
        if found is not None and not is_signal_mark(found.reason):
            return False
        if found is not None:
            conn.execute(sa.delete(PA).where(PA.c.queue == queue))
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


def is_signal_mark(reason: str | None) -> bool:
    """Whether a paused row's ``reason`` is the mark of worker processes paused by SIGUSR1."""
    return bool(reason) and str(reason).startswith(f"{SIGNAL} (") and str(reason).endswith(")")


def signal_holder() -> str:
    """This process, as a SIGUSR1 mark names it: ``pid N on HOST``."""
    return f"pid {os.getpid()} on {socket.gethostname()}"


def marks_to_change(
    found: Mapping[str, Pause], queues: Iterable[str], holder: str, paused: bool
) -> list[str]:
    """The ``queues`` whose SIGUSR1 mark must change for ``holder`` to be marked (``paused``) or
    not, given the paused rows ``found``; also those naming processes of this host that are gone.
    A queue an operator paused is left alone."""
    changes = []
    for queue in queues:
        row = found.get(queue)
        if row is not None and not is_signal_mark(row.reason):
            continue
        holders = _holders(row.reason if row is not None else None)
        if (holder in holders) != paused or _alive(holders) != holders:
            changes.append(queue)
    return changes


def mark_signal_pause(engine: Engine, queues: Iterable[str], holder: str, paused: bool) -> None:
    """Add ``holder`` to (``paused``) or remove it from the SIGUSR1 marks of ``queues``; a mark
    that names no process left is deleted. Rows an operator wrote are left alone."""
    for queue in queues:
        for attempt in range(3):  # another worker may insert the row meanwhile
            try:
                _mark(engine, queue, holder, paused)
                break
            except sa.exc.IntegrityError:
                if attempt == 2:
                    raise


def _mark(engine: Engine, queue: str, holder: str, paused: bool) -> None:
    with engine.begin() as conn:
        query = sa.select(PA.c.reason).where(PA.c.queue == queue).with_for_update()
        row = conn.execute(query).first()
        if row is not None and not is_signal_mark(row.reason):
            return
        holders = _alive(_holders(row.reason if row is not None else None))
        holders = holders | {holder} if paused else holders - {holder}
        reason = f"{SIGNAL} ({', '.join(sorted(holders))})"
        if not holders:
            conn.execute(sa.delete(PA).where(PA.c.queue == queue))
        elif row is None:
            conn.execute(sa.insert(PA).values(queue=queue, reason=reason, paused_at=_now()))
        elif reason != row.reason:
            conn.execute(sa.update(PA).where(PA.c.queue == queue).values(reason=reason))


def _holders(reason: str | None) -> set[str]:
    if reason is None or not is_signal_mark(reason):
        return set()
    return {h for h in reason[len(SIGNAL) + 2 : -1].split(", ") if h}


def _alive(holders: set[str]) -> set[str]:
    """``holders`` without the processes of this host that no longer run."""
    here = f" on {socket.gethostname()}"
    kept = set()
    for holder in holders:
        pid = holder.removeprefix("pid ").removesuffix(here)
        if holder.endswith(here) and pid.isdigit() and not _running(int(pid)):
            continue
        kept.add(holder)
    return kept


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
