"""Read-model helpers shared by the replay and projection tests (a test module imported by
another would be imported twice, under two names, and define its event types twice)."""

from __future__ import annotations

import sqlalchemy as sa

from eventbus import EventStore
from eventbus.events.model import Event
from eventbus.store.tables import checkpoints
from eventbus.subscribe.subscriptions import Context
from tests.events_fixtures import ImageUploaded, UserLoggedIn


def record(table: sa.Table, event: Event, ctx: Context) -> None:
    ctx.connection.execute(
        sa.insert(table).values(
            event_id=str(event.event_id),
            stream_id=event.stream_id,
            stream_version=event.stream_version,
            position=event.position,
        )
    )


def rows(store: EventStore, table: sa.Table) -> list[sa.Row]:
    with store.reader() as conn:
        return list(conn.execute(sa.select(table).order_by(table.c.id)))


def checkpoint_of(store: EventStore, queue: str) -> int | None:
    with store.reader() as conn:
        value = conn.execute(
            sa.select(checkpoints.c.position).where(checkpoints.c.subscriber == queue)
        ).scalar_one_or_none()
    return None if value is None else int(value)


def fill(store: EventStore, streams: int = 3, per_stream: int = 10) -> list[Event]:
    """Logins in ``streams`` streams interleaved with image events no projection here takes."""
    stored: list[Event] = []
    for i in range(per_stream):
        for s in range(streams):
            stored += store.append(f"user-{s}", [UserLoggedIn(user_id=f"{s}-{i}")])
            store.append(f"img-{s}", [ImageUploaded(user_id=str(s), size=i)])
    return positioned(store, stored)


def positioned(store: EventStore, events: list[Event]) -> list[Event]:
    """The events as read back from the store (with positions on PostgreSQL too)."""
    ids = {e.event_id for e in events}
    return [e for e in store.read_all() if e.event_id in ids]
