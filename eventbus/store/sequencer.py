"""Positions: the gap-free global order, and the reads of stored rows as they are (the outbox).

On PostgreSQL, ``append`` commits rows without a position; ``sequence`` numbers the committed
ones in commit order, so no reader ever sees a position appear below one it has passed (why and
how: ``docs/architecture.md``, "The global order"). The relay, the metrics and the dashboard
read the events table only through here and ``EventStore``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
import structlog
from sqlalchemy.engine import Connection, Engine

from eventbus.store.tables import events as T

log = structlog.get_logger("eventbus.store")

SEQUENCER_LOCK = 0x6576656E74627573  # "eventbus": one sequencer at a time
_BATCH = 100_000  # rows numbered per run at most

_SEQUENCE = sa.text(
    f"""
    WITH head AS (SELECT coalesce(max(position), 0) AS h FROM {T.name}),
    pending AS (
        SELECT id, row_number() OVER (ORDER BY id) AS rn
        FROM {T.name} WHERE position IS NULL ORDER BY id LIMIT :limit
    )
    UPDATE {T.name} AS e SET position = head.h + pending.rn
    FROM pending, head WHERE e.id = pending.id
    """
)


def sequence(engine: Engine) -> int:
    """Number the committed rows that have no position yet (PostgreSQL); returns how many.

    Under a transaction-scoped advisory lock, each unnumbered visible row gets ``head + n`` in
    insertion order; only committed rows are visible, so positions follow commits. SQLite
    numbers rows as they are appended (one writer at a time): nothing to do there.
    """
    if engine.dialect.name == "sqlite":
        return 0
    with engine.begin() as conn:
        return _sequence(conn)


def _sequence(conn: Connection) -> int:
    """``sequence`` in ``conn``'s transaction (the lock is held until it ends)."""
    conn.execute(sa.select(sa.func.pg_advisory_xact_lock(SEQUENCER_LOCK)))
    count = int(conn.execute(_SEQUENCE, {"limit": _BATCH}).rowcount)
    if count:
        log.debug("sequenced", count=count)
    return count


def reader(engine: Engine) -> Connection:
    """A connection for reads: on SQLite it does not take the write lock."""
    conn = engine.connect()
    if engine.dialect.name == "sqlite":
        conn = conn.execution_options(sqlite_begin="DEFERRED")
    return conn


def numbered_head(conn: Connection) -> int:
    """The largest position given so far (0 for an empty store)."""
    return int(conn.execute(sa.select(sa.func.coalesce(sa.func.max(T.c.position), 0))).scalar_one())


def head_with_waiting(conn: Connection) -> int:
    """The position the last committed event has, or will have once numbered.

    Counts the committed rows still waiting for a position, so that a stopped relay (which
    numbers them) shows as lag instead of hiding it.
    """
    numbered = sa.select(sa.func.coalesce(sa.func.max(T.c.position), 0)).scalar_subquery()
    waiting = (
        sa.select(sa.func.count()).select_from(T).where(T.c.position.is_(None)).scalar_subquery()
    )
    return int(conn.execute(sa.select(numbered + waiting)).scalar_one())


class Outbox:
    """The relay's reads: stored rows after a position, as stored, in position order.

    Each row has the envelope's columns and ``body``, the payload's JSON text: what was validated
    when appended is published without decoding it again.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        dialect = engine.dialect.name
        body = sa.func.json(T.c.payload) if dialect == "sqlite" else sa.cast(T.c.payload, sa.Text)
        columns = [c for c in T.columns if c.name not in ("id", "payload")]
        self._query = sa.select(*columns, body.label("body")).order_by(T.c.position)

    def sequence(self) -> int:
        """Number what committed since (``sequence``); returns how many rows got a position."""
        return sequence(self.engine)

    def sequence_and_read(self, after: int, limit: int) -> tuple[int, Sequence[Any]]:
        """``sequence``, then ``read``, in one transaction committed before it returns: the
        relay at the head numbers and reads with two round trips fewer. (count, rows)."""
        if self.engine.dialect.name == "sqlite":
            return 0, self.read(after, limit)
        with self.engine.begin() as conn:
            count = _sequence(conn)
            rows = conn.execute(self._query.where(T.c.position > after).limit(limit)).all()
        return count, rows

    def read(self, after: int, limit: int) -> Sequence[Any]:
        """Up to ``limit`` rows after position ``after``."""
        with reader(self.engine) as conn:
            return conn.execute(self._query.where(T.c.position > after).limit(limit)).all()

    def at(self, positions: Sequence[int]) -> dict[int, Any]:
        """The rows at ``positions`` (those that exist), by position."""
        with reader(self.engine) as conn:
            rows = conn.execute(self._query.where(T.c.position.in_(list(positions)))).all()
        return {int(r.position): r for r in rows}

    def head(self) -> int:
        """``head_with_waiting``: where the last committed event is or will be."""
        with reader(self.engine) as conn:
            return head_with_waiting(conn)


def latest(conn: Connection, limit: int) -> Sequence[Any]:
    """The last ``limit`` numbered rows, newest first, payload as stored (for display)."""
    query = (
        sa.select(*(c for c in T.columns if c.name != "id"))
        .where(T.c.position.is_not(None))
        .order_by(T.c.position.desc())
        .limit(limit)
    )
    return conn.execute(query).all()
