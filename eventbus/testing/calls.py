"""``call``: one event through one handler or projection, now, in a transaction of its own.

The worker's own step (``subscribe.exactly_once.invoke``) runs it: the processed record (a
projection: its checkpoint), the savepoint and ``ctx.append`` are the real ones, so what commits
is what a worker would commit. No broker, no threads, no retries: ``attempt`` says which it is.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field

import sqlalchemy as sa
import structlog
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from eventbus.events.model import Event
from eventbus.store.store import EventStore
from eventbus.subscribe.exactly_once import (
    ensure_checkpoint,
    invoke,
    lock_checkpoint,
    processed_recorder,
    save_checkpoint,
)
from eventbus.subscribe.subscriptions import Handler, HandlerFunction, Service

log = structlog.get_logger("eventbus.testing")


@dataclass(frozen=True)
class Call:
    """What one ``call`` did.

    ``committed``: the handler returned and its transaction committed. ``appended``: the events
    it appended in that transaction, as stored (empty unless committed). ``exception``: what
    the handler raised (its effects were rolled back). ``duplicate``: the handler had processed
    this event already (a projection: its checkpoint is at or past the event), so it did not
    run, as a worker skips a redelivery.
    """

    queue: str
    event: Event
    committed: bool
    appended: list[Event] = field(default_factory=list)
    exception: BaseException | None = None
    duplicate: bool = False


def call(
    target: Service | Handler,
    event: Event,
    *,
    store: EventStore,
    handler: str | HandlerFunction | None = None,
    attempt: int = 1,
) -> Call:
    """Run ``event`` through a handler synchronously, as a worker would, and say what happened.

    ``target``: a ``Handler``, a ``Projection``, or a ``Service`` (``handler`` names which of
    its handlers, by name or function, unless it has one). The handler must subscribe to the
    event's type. ``attempt`` is what ``ctx.attempt`` says. Exceptions of the handler are in
    the result, not raised; a lost database connection is raised.
    """
    chosen = _handler(target, handler)
    if not chosen.subscribes(event.type, event.routing_key) or not chosen.accepts(event):
        takes = ", ".join(chosen.patterns)
        raise ValueError(
            f"{chosen.queue} does not subscribe to {event.type} (it takes {takes}); "
            "a worker would never give it this event"
        )
    with store.engine.connect() as db:
        recording = _RecordingStore(store, db)
        transaction = db.begin()
        try:
            if not _fresh(db, chosen, event):
                transaction.rollback()
                return Call(chosen.queue, event, committed=False, duplicate=True)
            error = invoke(chosen, event, db, store=recording, attempt=attempt, log=log)
            if error is not None:
                transaction.rollback()
                return Call(chosen.queue, event, committed=False, exception=error)
            if chosen.ordered and event.position is not None:
                found = lock_checkpoint(db, chosen.queue)
                save_checkpoint(db, chosen.queue, event.position, bool(found and found[1]))
            try:
                transaction.commit()
            except sa.exc.DBAPIError as exc:  # an effect refused at commit: nothing happened
                return Call(chosen.queue, event, committed=False, exception=exc)
        finally:
            if transaction.is_active:
                transaction.rollback()
    return Call(chosen.queue, event, committed=True, appended=recording.appended)


def _handler(target: Service | Handler, handler: str | HandlerFunction | None) -> Handler:
    """The handler ``target`` and ``handler`` name (``ValueError`` naming the choices)."""
    if isinstance(target, Handler):
        if handler is not None:
            raise ValueError("pass a Handler alone, or a Service and handler=")
        return target
    if not isinstance(target, Service):
        raise TypeError(f"call() takes a Service, Projection or Handler, not {target!r}")
    found = dict(target.handlers)
    if handler is None:
        if len(found) == 1:
            return next(iter(found.values()))
        raise ValueError(
            f"service {target.name} has {len(found)} handlers ({', '.join(sorted(found)) or '-'})"
            "; say which with handler="
        )
    if not isinstance(handler, str):
        named = [name for name, h in found.items() if h.function is handler]
        if not named:
            raise ValueError(f"{handler!r} is not a handler of service {target.name}")
        handler = named[0]
    if handler not in found:
        raise ValueError(
            f"service {target.name} has no handler {handler!r} "
            f"(it has {', '.join(sorted(found)) or 'none'})"
        )
    return found[handler]


def _fresh(db: Connection, handler: Handler, event: Event) -> bool:
    """Record ``event`` as processed by ``handler`` (a projection: lock its checkpoint);
    False when it was already."""
    if handler.ordered:
        if event.position is None:  # not stored: nothing to compare with the checkpoint
            return True
        ensure_checkpoint(db, handler.queue, 0, False)
        found = lock_checkpoint(db, handler.queue)
        return found is None or event.position > found[0]
    record = processed_recorder(db.dialect.name)
    return bool(record(db, handler.queue, [event], dt.datetime.now(dt.UTC)))


class _RecordingStore(EventStore):
    """The caller's store, remembering what is appended in the call's transaction."""

    def __init__(self, store: EventStore, db: Connection) -> None:
        super().__init__(
            store.engine, page_size=store.page_size, max_event_bytes=store.max_event_bytes
        )
        self.appended: list[Event] = []
        self._db = db

    def append(
        self,
        stream_id: str,
        events: Sequence[Event],
        *,
        expected_version: int | None = None,
        connection: Connection | Session | None = None,
        priority: int | None = None,
    ) -> list[Event]:
        stored = super().append(
            stream_id,
            events,
            expected_version=expected_version,
            connection=connection,
            priority=priority,
        )
        if connection is self._db:
            self.appended.extend(stored)
        return stored
