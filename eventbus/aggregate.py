"""Aggregates: state rebuilt from a stream, changes saved with optimistic concurrency."""

from __future__ import annotations

from typing import ClassVar, Self

from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from eventbus.events import Event
from eventbus.store import EventStore


class Aggregate:
    """Optional base for a consistency boundary whose state is a fold over its events.

    Subclasses implement ``apply(event)`` (change state, no side effects) and call
    ``record(event)`` in their command methods. ``save`` appends what was recorded with
    ``expected_version`` = the version loaded, so a concurrent change raises ``ConcurrencyError``.
    """

    stream_prefix: ClassVar[str] = ""

    def __init__(self, aggregate_id: str) -> None:
        self.id = aggregate_id
        self.version = 0
        self.pending: list[Event] = []

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

    @classmethod
    def load(cls, store: EventStore, aggregate_id: str) -> Self:
        """Rebuild the aggregate from its whole stream (version 0 if it has none)."""
        aggregate = cls(aggregate_id)
        for event in store.read_stream(aggregate.stream_id):
            aggregate.apply(event)
            aggregate.version = event.stream_version or aggregate.version
        return aggregate

    def save(
        self, store: EventStore, *, connection: Connection | Session | None = None
    ) -> list[Event]:
        """Append the recorded events, expecting the stream still at the loaded version."""
        stored = store.append(
            self.stream_id, self.pending, expected_version=self.version, connection=connection
        )
        self.version += len(stored)
        self.pending = []
        return stored
