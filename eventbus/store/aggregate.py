"""Aggregates: state rebuilt from a stream, changes saved with optimistic concurrency.

With ``snapshot_every = N`` an aggregate's state is also saved as a JSON snapshot each time its
stream passes a multiple of N events; ``load`` then starts from the latest snapshot and applies
only the events after it. A snapshot is a cache: the stream stays the truth. Bump
``snapshot_version`` when the state's shape changes and older snapshots are ignored.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any, ClassVar, Self

import sqlalchemy as sa
import structlog
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from eventbus.errors import StoreError
from eventbus.events.model import Event
from eventbus.store.store import EventStore
from eventbus.store.tables import insert as dialect_insert
from eventbus.store.tables import snapshots as S

_OWN = ("id", "version", "pending")
log = structlog.get_logger("eventbus.aggregate")


class Aggregate:
    """Optional base for a consistency boundary whose state is a fold over its events.

    Subclasses implement ``apply(event)`` (change state, no side effects) and call
    ``record(event)`` in their command methods. ``save`` appends what was recorded with
    ``expected_version`` = the version loaded, so a concurrent change raises ``ConcurrencyError``.
    Snapshots: set ``snapshot_every``; override ``snapshot``/``restore`` when the state is not
    plain JSON (the defaults take the instance's attributes as they are).
    """

    stream_prefix: ClassVar[str] = ""
    snapshot_every: ClassVar[int | None] = None
    snapshot_version: ClassVar[int] = 1

    def __init__(self, aggregate_id: str) -> None:
        self.id = aggregate_id
        self.version = 0
        self.pending: list[Event] = []

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        every = cls.snapshot_every
        if every is not None and (not isinstance(every, int) or every < 1):
            raise TypeError(f"{cls.__name__}.snapshot_every must be an int >= 1 or None")

    @property
    def stream_id(self) -> str:
        """``<prefix>-<id>``; the prefix defaults to the class name in lower case."""
        return f"{self.stream_prefix or type(self).__name__.lower()}-{self.id}"

    def apply(self, event: Event) -> None:
        """Change the state for one event; override it."""
        raise NotImplementedError(f"{type(self).__name__}.apply must handle {event.type}")

    def record(self, event: Event) -> None:
        """Apply a new event now and keep it for ``save``."""
        self.apply(event)
        self.pending.append(event)

    def snapshot(self) -> dict[str, Any]:
        """The state to snapshot, as JSON values (default: the instance's own attributes)."""
        return {k: v for k, v in vars(self).items() if k not in _OWN}

    def restore(self, state: dict[str, Any]) -> None:
        """Set the state from a snapshot (default: the attributes ``snapshot`` took)."""
        vars(self).update(state)

    @classmethod
    def load(cls, store: EventStore, aggregate_id: str, *, use_snapshot: bool = True) -> Self:
        """Rebuild the aggregate: its latest snapshot (if any) plus the events after it."""
        aggregate = cls(aggregate_id)
        if cls.snapshot_every and use_snapshot:
            with store.reader() as conn:
                row = conn.execute(
                    sa.select(S.c.stream_version, S.c.state).where(
                        S.c.stream_id == aggregate.stream_id,
                        S.c.state_version == cls.snapshot_version,
                    )
                ).first()
            if row is not None:
                aggregate.restore(dict(row.state))
                aggregate.version = int(row.stream_version)
        for event in store.read_stream(aggregate.stream_id, from_version=aggregate.version + 1):
            aggregate.apply(event)
            aggregate.version = event.stream_version or aggregate.version
        return aggregate

    def save(
        self, store: EventStore, *, connection: Connection | Session | None = None
    ) -> list[Event]:
        """Append the recorded events, expecting the stream still at the loaded version.

        With ``snapshot_every``, a snapshot is written when the stream passes a multiple of it
        (in ``connection``'s transaction when given, else right after the append commits).
        """
        every = self.snapshot_every
        after = self.version + len(self.pending)
        state = None
        if every and after // every > self.version // every:
            state = self.snapshot()
            try:  # before appending: a state that cannot be snapshotted saves nothing
                json.dumps(state)
            except (TypeError, ValueError) as exc:
                raise StoreError(
                    f"{type(self).__name__} {self.id}: nothing saved: its state at version "
                    f"{after} cannot be snapshotted: {exc}. Override snapshot()/restore() to "
                    "give JSON values"
                ) from exc
        stored = store.append(
            self.stream_id, self.pending, expected_version=self.version, connection=connection
        )
        self.version += len(stored)
        self.pending = []
        if state is not None:
            self._save_snapshot(store, connection, state)
        return stored

    def _save_snapshot(
        self, store: EventStore, connection: Connection | Session | None, state: dict[str, Any]
    ) -> None:
        values = {
            "stream_id": self.stream_id,
            "stream_version": self.version,
            "state_version": self.snapshot_version,
            "state": state,
            "taken_at": dt.datetime.now(dt.UTC),
        }
        insert = dialect_insert(store.engine.dialect.name, S)
        newer = sa.or_(
            S.c.stream_version < insert.excluded.stream_version,
            S.c.state_version != insert.excluded.state_version,
        )
        statement = insert.values(values).on_conflict_do_update(
            index_elements=[S.c.stream_id],
            set_={k: getattr(insert.excluded, k) for k in values if k != "stream_id"},
            where=newer,
        )
        try:
            if connection is None:
                with store.engine.begin() as conn:
                    conn.execute(statement)
                return
            conn = connection.connection() if isinstance(connection, Session) else connection
            with conn.begin_nested():
                conn.execute(statement)
        except sa.exc.DBAPIError as exc:
            # The events are saved; a snapshot is only a cache, and the next one replaces it.
            log.warning(
                "snapshot.not_saved",
                stream_id=self.stream_id,
                stream_version=self.version,
                error=f"{type(exc).__name__}: {exc.orig}",
            )
