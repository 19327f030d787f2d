"""The appends the store commits by itself, straight through the driver (``EventStore.append``).

PostgreSQL: one statement in autocommit, its own transaction: it reads the stream's version and
inserts the rows (one round trip). SQLite: ``BEGIN IMMEDIATE``, the version and head read, the
rows, ``COMMIT``. The SQL is built once per column set; SQLAlchemy's statement machinery cost more
CPU per append than the database did. Errors come out as SQLAlchemy's (a dropped connection is
invalidated); appends in the caller's transaction and retries take the Core path.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import threading
import uuid
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from eventbus.events.codec import dumps
from eventbus.events.model import Event
from eventbus.store.rows import row_of
from eventbus.store.tables import UTCDateTime
from eventbus.store.tables import events as T

Process = Callable[[Any], Any] | None


class DriverWriter:
    """Appends events (``rows.row_of``, JSON columns as JSON text) as the next versions of one
    stream, in a transaction of their own."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.dialect = engine.dialect
        self.postgres = self.dialect.name == "postgresql"
        self._plans: dict[tuple[str, ...], _Plan] = {}
        # SQLite file databases: each appending thread keeps a connection of its own, out of
        # the pool (taking one from the pool and giving it back cost a sixth of an append).
        own = self.dialect.name == "sqlite" and isinstance(engine.pool, sa.pool.QueuePool)
        self._local = threading.local() if own else None
        self._held: weakref.WeakSet[_Held] = weakref.WeakSet()

    def close(self) -> None:
        """Close the connections the appending threads of this process keep (SQLite)."""
        for held in list(self._held):
            if held.pid == os.getpid():
                held.close()

    def append(
        self,
        stream_id: str,
        batch: list[Event],
        encoded: list[tuple[dict[str, Any], bytes]],
        headers: list[dict[str, Any] | None],
        expected: int | None,
    ) -> list[Event] | None:
        """``batch`` as stored (``encoded``: each payload and its JSON); None when the stream is
        not at ``expected`` (nothing written). Raises ``sa.exc.IntegrityError`` on a unique
        violation (a concurrent writer took the version, or an event id is stored already)."""
        rows = []
        for event, (_, text), header in zip(batch, encoded, headers, strict=True):
            row = row_of(event, text.decode(), stream_id, 0, None)
            del row["position"], row["stream_version"]
            row["headers"] = None if header is None else dumps(header).decode()
            rows.append(row)
        columns = tuple(rows[0])
        plan = self._plans.get(columns)
        if plan is None:
            plan = self._plans[columns] = _Plan(self.dialect, columns)
        values = [plan.values(row) for row in rows]
        with self._driver() as driver:
            if self.postgres:
                places = _append_postgres(driver, plan, stream_id, values, expected)
            else:
                places = _append_sqlite(driver, plan, stream_id, values, expected)
        if places is None:
            return None
        return [e.stored(stream_id, *place) for e, place in zip(batch, places, strict=True)]

    @contextlib.contextmanager
    def _driver(self) -> Iterator[Any]:
        """A driver connection (this thread's own or a pooled one), errors wrapped as
        SQLAlchemy wraps them; a dropped connection is closed or invalidated."""
        held, pooled = None, None
        if self._local is not None:
            held = getattr(self._local, "held", None)
            if held is None or held.pid != os.getpid():  # none yet, or the parent's (a fork)
                pooled = self.engine.raw_connection()  # made with the engine's connect hooks
                held = self._local.held = _Held(pooled.driver_connection)
                self._held.add(held)
                pooled.detach()  # out of the pool: the pool makes another when it needs one
                pooled = None
            driver = held.driver
        else:
            pooled = self.engine.raw_connection()
            driver = pooled.driver_connection
        dbapi_error = self.dialect.loaded_dbapi.Error
        try:
            yield driver
        except dbapi_error as exc:
            lost = self.dialect.is_disconnect(exc, driver, None)
            if lost and held is not None:
                self._local.held = None  # type: ignore[union-attr]
                held.close()
            elif lost and pooled is not None:
                pooled.invalidate(exc)
            raise sa.exc.DBAPIError.instance(
                None, None, exc, dbapi_error, connection_invalidated=lost, dialect=self.dialect
            ) from exc
        finally:
            if pooled is not None:
                pooled.close()


class _Held:
    """A thread's own driver connection (SQLite), closed when the thread's storage drops it or
    the store closes."""

    __slots__ = ("__weakref__", "close", "driver", "pid")

    def __init__(self, driver: Any) -> None:
        self.driver, self.pid = driver, os.getpid()
        self.close = weakref.finalize(self, _close_quietly, driver)


def _close_quietly(driver: Any) -> None:
    with contextlib.suppress(Exception):  # another thread's connection, or closed already
        driver.close()


def _append_postgres(
    driver: Any, plan: _Plan, stream_id: str, values: list[list[Any]], expected: int | None
) -> list[tuple[int, int | None]] | None:
    if len(values) == 1:
        sql, params = plan.one, [*values[0], stream_id, expected, expected]
    else:
        arrays = [list(c) for i, c in enumerate(zip(*values, strict=True)) if i != plan.stream_at]
        sql, params = plan.many, [stream_id, stream_id, *arrays, expected, expected]
    driver.autocommit = True  # the statement is its transaction: no BEGIN and COMMIT trips
    try:
        with driver.cursor() as cursor:
            cursor.execute(sql, params)
            stored = cursor.fetchall()
    finally:
        driver.autocommit = False  # as the pool hands it out
    if not stored:
        return None
    return [(version, None) for (version,) in sorted(stored)]  # event k has version current + k


def _append_sqlite(
    driver: Any, plan: _Plan, stream_id: str, values: list[list[Any]], expected: int | None
) -> list[tuple[int, int | None]] | None:
    cursor = driver.cursor()
    try:
        try:
            cursor.execute("BEGIN IMMEDIATE")  # one writer at a time: the reads below stay true
            current, head = cursor.execute(plan.heads, (stream_id,)).fetchone()
            if expected is not None and current != expected:
                cursor.execute("ROLLBACK")
                return None
            places = [(current + k, head + k) for k in range(1, len(values) + 1)]
            cursor.executemany(
                plan.insert, [[*v, *place] for v, place in zip(values, places, strict=True)]
            )
            cursor.execute("COMMIT")
        except BaseException:
            if driver.in_transaction:
                cursor.execute("ROLLBACK")
            raise
        return places
    finally:
        cursor.close()


class _Plan:
    """The SQL and per-column value conversions for one set of columns."""

    def __init__(self, dialect: sa.Dialect, columns: tuple[str, ...]) -> None:
        self.columns = columns
        json = {c for c in columns if isinstance(T.c[c].type, sa.JSON)}  # given as JSON text
        processors = [None if c in json else _processor(T.c[c].type, dialect) for c in columns]
        self._convert = [(i, p) for i, p in enumerate(processors) if p is not None]
        names = ", ".join(columns)
        if dialect.name == "postgresql":
            self._postgres(dialect, columns, json, names)
        else:
            marks = ", ".join("?" for _ in range(len(columns) + 2))
            self.insert = (
                f"INSERT INTO {T.name} ({names}, stream_version, position) VALUES ({marks})"
            )
            self.heads = (
                f"SELECT (SELECT coalesce(max(stream_version), 0) FROM {T.name} "
                f"WHERE stream_id = ?), (SELECT coalesce(max(position), 0) FROM {T.name})"
            )

    def _postgres(
        self, dialect: sa.Dialect, columns: tuple[str, ...], json: set[str], names: str
    ) -> None:
        def sql_type(c: str) -> str:
            kind = T.c[c].type
            if c in json or isinstance(kind, sa.String):
                return "text"  # never varchar(n): a cast to it would cut a longer value short
            return str(kind.compile(dialect=dialect))

        def cast(c: str, value: str) -> str:
            return f"{value}::jsonb" if c in json else value

        current = (
            f"(SELECT coalesce(max(stream_version), 0) AS v FROM {T.name} "
            "WHERE stream_id = %s) AS current"
        )
        check = "WHERE %s::integer IS NULL OR current.v = %s::integer"
        one = ", ".join(cast(c, f"%s::{sql_type(c)}") for c in columns)
        self.one = (
            f"INSERT INTO {T.name} ({names}, stream_version) SELECT {one}, current.v + 1 "
            f"FROM {current} {check} RETURNING stream_version"
        )
        # Many rows: the stream id once, every other column as an array, unnested in order (the
        # ids, hence the positions, follow the stream versions).
        arrays = [c for c in columns if c != "stream_id"]
        self.stream_at = columns.index("stream_id")
        unnest = ", ".join(f"%b::{sql_type(c)}[]" for c in arrays)  # binary: no escaping
        picked = ", ".join("%s" if c == "stream_id" else cast(c, f"e.{c}") for c in columns)
        self.many = (
            f"INSERT INTO {T.name} ({names}, stream_version) SELECT {picked}, current.v + e.n "
            f"FROM {current}, unnest({unnest}) WITH ORDINALITY AS e({', '.join(arrays)}, n) "
            f"{check} ORDER BY e.n RETURNING stream_version"
        )

    def values(self, row: dict[str, Any]) -> list[Any]:
        values = list(row.values())
        for i, process in self._convert:
            if values[i] is not None:
                values[i] = process(values[i])
        return values


def _processor(kind: Any, dialect: sa.Dialect) -> Process:
    """SQLAlchemy's bind processor for a column type, or a quicker one giving the same value."""
    sqlite = dialect.name == "sqlite"
    if isinstance(kind, UTCDateTime):
        if sqlite:  # UTCDateTime (naive UTC), then SQLite's DATETIME text (tests/test_append_path)
            return lambda value: _utc(value).replace(tzinfo=None).isoformat(" ", "microseconds")
        return _utc
    if isinstance(kind, sa.Uuid) and sqlite and kind.as_uuid:
        return _hex
    return kind.dialect_impl(dialect).bind_processor(dialect)  # type: ignore[no-any-return]


def _utc(value: dt.datetime) -> dt.datetime:
    return value if value.tzinfo is dt.UTC else value.astimezone(dt.UTC)


def _hex(value: uuid.UUID) -> str:
    return value.hex
