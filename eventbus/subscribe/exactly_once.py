"""One event through one handler inside the caller's transaction, and the bookkeeping that makes
its effect happen once: the step live delivery (the worker), catch-up and replay share.

The handler runs in a savepoint: an exception rolls back what it wrote and is returned, not
raised (a lost connection is raised: the database went away, the transaction with it).
Processed records say which events are new to a handler, checkpoints (read under a row lock) a
subscriber's place in the global order, failure records what it gave up on. Details: docs/replay.md
"""

from __future__ import annotations

import contextvars
import datetime as dt
import threading
from collections.abc import Callable, Sequence
from typing import Any

import sqlalchemy as sa
import structlog
from sqlalchemy.dialects import sqlite
from sqlalchemy.engine import Connection

import eventbus.tracing as tracing
from eventbus.events import personal
from eventbus.events.model import Event
from eventbus.events.personal import scrub_text
from eventbus.logging import redact
from eventbus.store.store import EventStore, Undecodable
from eventbus.store.tables import checkpoints as CP
from eventbus.store.tables import failures as F
from eventbus.store.tables import insert as dialect_insert
from eventbus.store.tables import processed as P
from eventbus.subscribe.subscriptions import Context, Handler


def log_context(handler: Handler, event: Event | None, attempt: int | None) -> dict[str, Any]:
    """The fields every log line about ``event`` in ``handler`` carries."""
    values: dict[str, Any] = {"queue": handler.queue, "handler": handler.name}
    if event is not None:
        values.update(
            event_id=str(event.event_id),
            event_type=event.type,
            correlation_id=event.correlation_id,
            causation_id=event.causation_id,
            position=event.position,
        )
    if attempt is not None:
        values["attempt"] = attempt
    return values


def invoke(
    handler: Handler,
    event: Event,
    db: Connection,
    *,
    store: EventStore,
    attempt: int,
    log: Any,
    replaying: bool = False,
    dry_run: bool = False,
) -> BaseException | None:
    """Run ``handler`` on ``event`` in ``db``'s transaction; the exception it raised, or None.

    What the handler wrote through ``ctx.connection`` is rolled back if it raised. If ``db``'s
    connection was lost meanwhile, that is raised instead (see ``connection_lost``). With
    OpenTelemetry, the run is a span (``eventbus.tracing.handling``).
    """
    with tracing.handling(handler, event, attempt, replaying=replaying) as span:
        error = _invoke(handler, event, db, store, attempt, log, replaying, dry_run)
        span.failed(error, None if error is None else scrub_text(event, describe(error)))
        return error


def _invoke(
    handler: Handler,
    event: Event,
    db: Connection,
    store: EventStore,
    attempt: int,
    log: Any,
    replaying: bool,
    dry_run: bool,
) -> BaseException | None:
    values = log_values(handler, event, attempt)
    ctx = Context(
        handler=handler.name,
        queue=handler.queue,
        attempt=attempt,
        store=store,
        _connection=db,
        event=event,
        replaying=replaying,
        dry_run=dry_run,
        _log_source=log,
        _log_fields=(_FIELDS, values),
    )
    try:
        # The same context variables as structlog.contextvars.bind_contextvars(**fields) sets,
        # set directly in a copy of the context the handler runs in: no bind/reset per key and
        # event (costly on a replay's and a worker's per-event path), nothing left behind.
        contextvars.copy_context().run(_run_bound, values, handler, event, ctx)
        if ctx._savepoint is not None and ctx._savepoint.is_active:
            ctx._savepoint.commit()
    except Exception as exc:
        lost = connection_lost(db, exc)
        if lost is exc:
            raise
        if lost is not None:  # the database went away under the handler: not its failure
            raise lost from exc
        if ctx._savepoint is not None and ctx._savepoint.is_active:
            ctx._savepoint.rollback()
        personal.scrub_exception(event, exc)  # its text, wherever it goes, quotes no personal data
        ctx.log.warning("event.failed", error=redact(describe(exc)))
        return exc
    return None


def log_values(handler: Handler, event: Event, attempt: int) -> tuple[Any, ...]:
    """The values of the log fields ``_FIELDS`` while ``handler`` runs ``event``, in order."""
    return (
        handler.queue,
        handler.name,
        str(event.event_id),
        event.type,
        event.correlation_id,
        event.causation_id,
        event.position,
        attempt,
    )


def _run_bound(values: tuple[Any, ...], handler: Handler, event: Event, ctx: Context) -> None:
    """Bind the log fields (``_FIELDS``) in the current context, then run the handler."""
    for var, value in zip(_context_variables(), values, strict=True):
        var.set(value)
    handler(event, ctx)


class ConnectionLost(sa.exc.OperationalError):
    """A transaction's connection was lost; ``orig`` is what was raised once it was gone (a
    ``PendingRollbackError``, say, from a handler that caught the disconnect and went on)."""


def connection_lost(db: Connection, exc: BaseException) -> sa.exc.DBAPIError | None:
    """What to raise for ``exc`` if ``db``'s connection was lost under it; None if it was not.

    A lost connection is the database going away, not an error of the handler or of its
    statements: the whole transaction is gone, and the caller waits for the database and runs
    it again (a ``DBAPIError`` whose ``connection_invalidated`` is true).
    """
    if not db.invalidated:
        return None
    if isinstance(exc, sa.exc.DBAPIError) and exc.connection_invalidated:
        return exc
    return ConnectionLost(None, None, exc, connection_invalidated=True)


# The fields invoke binds for the handler's run, in the order of its ``values``.
_FIELDS = (
    "queue",
    "handler",
    "event_id",
    "event_type",
    "correlation_id",
    "causation_id",
    "position",
    "attempt",
)
_variables: list[contextvars.ContextVar[Any]] = []
_variables_lock = threading.Lock()


def _context_variables() -> list[contextvars.ContextVar[Any]]:
    """structlog's context variables for ``_FIELDS``, found once through its public API (the
    tokens ``bind_contextvars`` returns name their variable)."""
    if not _variables:
        with _variables_lock:
            if not _variables:
                tokens = structlog.contextvars.bind_contextvars(**dict.fromkeys(_FIELDS))
                structlog.contextvars.reset_contextvars(**tokens)
                _variables[:] = [tokens[key].var for key in _FIELDS]
    return _variables


def describe(exc: BaseException) -> str:
    """``ExceptionClass: message``, on one line."""
    return f"{type(exc).__name__}: {exc}".strip().replace("\n", " ")


# -- processed records ------------------------------------------------------------------------

# One fixed statement for any batch size (compiled and prepared once): the event ids and
# positions travel as two arrays.
_PG_INSERT_PROCESSED = sa.text(
    "INSERT INTO eventbus_processed (handler, event_id, position, processed_at) "
    "SELECT :handler, e.event_id, e.position, :now "
    "FROM unnest(CAST(:event_ids AS uuid[]), CAST(:positions AS bigint[])) "
    "AS e(event_id, position) "
    "ON CONFLICT DO NOTHING RETURNING event_id"
).columns(event_id=sa.Uuid)

_SQLITE_INSERT_PROCESSED = sqlite.insert(P).on_conflict_do_nothing().returning(P.c.event_id)

RecordProcessed = Callable[[Connection, str, Sequence[Event], dt.datetime], list[Any]]


def _lock_order(event: Event) -> tuple[bool, int, Any]:
    """Position order, then event id: two workers recording overlapping batches (a partition
    moving between them) lock the same rows in the same order, so neither deadlocks and the
    one that waits gets the rest of the stream after the other's part, not interleaved."""
    return (event.position is None, event.position or 0, event.event_id)


def processed_recorder(dialect: str) -> RecordProcessed:
    """``record(db, queue, events, now)``: record events as processed; returns the new ids.

    On PostgreSQL a concurrent transaction recording the same event makes this wait for it,
    then skip the event if it committed.
    """
    if dialect == "postgresql":

        def insert_pg(
            db: Connection, handler: str, events: Sequence[Event], now: dt.datetime
        ) -> list[Any]:
            ordered = sorted(events, key=_lock_order)  # one lock order: no deadlocks
            params = {
                "handler": handler,
                "now": now,
                "event_ids": [e.event_id for e in ordered],
                "positions": [e.position for e in ordered],
            }
            return list(db.execute(_PG_INSERT_PROCESSED, params).scalars())

        return insert_pg

    def insert_sqlite(
        db: Connection, handler: str, events: Sequence[Event], now: dt.datetime
    ) -> list[Any]:
        rows = [
            dict(handler=handler, event_id=e.event_id, position=e.position, processed_at=now)
            for e in sorted(events, key=_lock_order)
        ]
        return list(db.execute(_SQLITE_INSERT_PROCESSED.values(rows)).scalars())

    return insert_sqlite


def forget_processed(db: Connection, queue: str, events: Sequence[Event]) -> None:
    """Remove processed records (the handler failed on them: they may run again)."""
    if events:
        db.execute(
            sa.delete(P).where(P.c.handler == queue, P.c.event_id.in_([e.event_id for e in events]))
        )


# -- checkpoints ------------------------------------------------------------------------------


def lock_checkpoint(db: Connection, subscriber: str) -> tuple[int, bool] | None:
    """``(position, caught_up)`` of ``subscriber``, row-locked until the transaction ends.

    None when it has none yet. On SQLite the write transaction itself is the lock
    (``BEGIN IMMEDIATE``).
    """
    query = sa.select(CP.c.position, CP.c.caught_up).where(CP.c.subscriber == subscriber)
    if db.dialect.name == "postgresql":
        query = query.with_for_update()
    row = db.execute(query).first()
    return None if row is None else (int(row.position), bool(row.caught_up))


def read_checkpoint(db: Connection, subscriber: str) -> tuple[int, bool] | None:
    """``(position, caught_up)`` of ``subscriber`` without locking it; None if it has none."""
    row = db.execute(
        sa.select(CP.c.position, CP.c.caught_up).where(CP.c.subscriber == subscriber)
    ).first()
    return None if row is None else (int(row.position), bool(row.caught_up))


def save_checkpoint(db: Connection, subscriber: str, position: int, caught_up: bool) -> None:
    """Set ``subscriber``'s checkpoint (an upsert)."""
    values = _checkpoint_row(subscriber, position, caught_up)
    db.execute(
        dialect_insert(db.dialect.name, CP)
        .values(values)
        .on_conflict_do_update(
            index_elements=[CP.c.subscriber],
            set_={k: v for k, v in values.items() if k != "subscriber"},
        )
    )


def ensure_checkpoint(db: Connection, subscriber: str, position: int, caught_up: bool) -> None:
    """Create ``subscriber``'s checkpoint if it has none (a no-op otherwise)."""
    values = _checkpoint_row(subscriber, position, caught_up)
    insert = dialect_insert(db.dialect.name, CP)
    db.execute(insert.values(values).on_conflict_do_nothing(index_elements=[CP.c.subscriber]))


def _checkpoint_row(subscriber: str, position: int, caught_up: bool) -> dict[str, Any]:
    return {
        "subscriber": subscriber,
        "position": position,
        "caught_up": caught_up,
        "updated_at": dt.datetime.now(dt.UTC),
    }


def record_failure(db: Connection, subscriber: str, event: Event | Undecodable, error: str) -> None:
    """Remember that ``subscriber`` gave up on ``event`` (the latest error wins)."""
    values = {
        "subscriber": subscriber,
        "event_id": event.event_id,
        "position": event.position,
        "event_type": event.type,
        "error": (scrub_text(event, error) if isinstance(event, Event) else error)[:4000],
        "failed_at": dt.datetime.now(dt.UTC),
    }
    db.execute(
        dialect_insert(db.dialect.name, F)
        .values(values)
        .on_conflict_do_update(
            index_elements=[F.c.subscriber, F.c.event_id],
            set_={"error": values["error"], "failed_at": values["failed_at"]},
        )
    )
