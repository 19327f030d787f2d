"""The store's tables, defined once with SQLAlchemy Core; alembic migrations are made from this.

``events`` is both the event store and the outbox: a row exists once its transaction committed.
``position`` is the gap-free global order. It is assigned after commit (see ``store.py``), so it
is NULL for a short while on PostgreSQL; ``id`` only records insertion order.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.dialects.postgresql import JSONB

metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "pk": "pk_%(table_name)s",
    }
)


_ZERO = dt.timedelta(0)


class UTCDateTime(sa.TypeDecorator[dt.datetime]):
    """An aware UTC datetime on every backend (SQLite keeps no time zone of its own)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: sa.Dialect) -> Any:
        if value is None:
            return None
        value = value.astimezone(dt.UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: sa.Dialect) -> dt.datetime | None:
        if value is None:
            return None
        moment: dt.datetime = value
        if moment.tzinfo is dt.UTC:
            return moment
        if moment.tzinfo is None or moment.utcoffset() == _ZERO:
            return moment.replace(tzinfo=dt.UTC)
        return moment.astimezone(dt.UTC)


def insert(dialect: str, table: sa.Table) -> postgresql.Insert | sqlite.Insert:
    """An INSERT into ``table`` that takes ``on_conflict_do_nothing/do_update`` on the two
    databases eventbus runs on (``dialect``: ``connection.dialect.name``)."""
    return postgresql.insert(table) if dialect == "postgresql" else sqlite.insert(table)


# SQLite only autoincrements an INTEGER PRIMARY KEY (the rowid), not a BIGINT one.
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Payload = sa.JSON().with_variant(JSONB(), "postgresql")
# None is SQL NULL here (not the JSON null), so "no headers" reads as IS NULL.
Headers = sa.JSON(none_as_null=True).with_variant(JSONB(none_as_null=True), "postgresql")

events = sa.Table(
    "eventbus_events",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("position", sa.BigInteger, nullable=True),
    sa.Column("event_id", sa.Uuid, nullable=False),
    sa.Column("stream_id", sa.String(255), nullable=False),
    sa.Column("stream_version", sa.Integer, nullable=False),
    sa.Column("type", sa.String(255), nullable=False),
    sa.Column("schema_version", sa.Integer, nullable=False),
    sa.Column("occurred_at", UTCDateTime, nullable=False),
    sa.Column("correlation_id", sa.String(255), nullable=True),
    sa.Column("causation_id", sa.String(255), nullable=True),
    sa.Column("payload", Payload, nullable=False),
    # The routing key the class declared when appended (NULL: the type). Stored so that the
    # relay publishes without importing the application's event classes.
    sa.Column("routing_key", sa.String(255), nullable=True),
    # Delivery properties decided at append, for the relay to publish with (NULL: none):
    # {"priority": int, "expires_at": ISO 8601 str, "traceparent": str, "tracestate": str}.
    sa.Column("headers", Headers, nullable=True),
    # The schema fingerprint of the class the event was validated with when appended
    # (events/fingerprint.py): read back under the same one, it is not validated again.
    # NULL (a row written otherwise, or a class without one): validated in full.
    sa.Column("schema_fingerprint", sa.BigInteger, nullable=True),
    sa.UniqueConstraint("event_id"),
    sa.UniqueConstraint("stream_id", "stream_version"),
    sa.UniqueConstraint("position"),
    # The sequencer's work list: rows still waiting for a position.
    sa.Index(
        "ix_eventbus_events_unpositioned",
        "id",
        postgresql_where=sa.text("position IS NULL"),
        sqlite_where=sa.text("position IS NULL"),
    ),
    implicit_returning=False,  # append needs no generated id back: one round trip less
)

# The relay's checkpoint: the last position the broker confirmed, per relay name.
relay_checkpoints = sa.Table(
    "eventbus_relay_checkpoints",
    metadata,
    sa.Column("name", sa.String(255), primary_key=True),
    sa.Column("position", sa.BigInteger, nullable=False),
    sa.Column("updated_at", UTCDateTime, nullable=False),
)

# Each handler's record of what it processed: written in the handler's own transaction, so a
# redelivered or re-published event has no second effect.
processed = sa.Table(
    "eventbus_processed",
    metadata,
    sa.Column("handler", sa.String(255), primary_key=True),
    sa.Column("event_id", sa.Uuid, primary_key=True),
    sa.Column("position", sa.BigInteger, nullable=True),
    sa.Column("processed_at", UTCDateTime, nullable=False),
    # How far a handler got (its lag): the highest position it processed.
    sa.Index("ix_eventbus_processed_handler_position", "handler", "position"),
)

# The patterns each queue was bound with at its last start, so that a pattern removed from the
# code is unbound on the next start (AMQP itself cannot list a queue's bindings).
bindings = sa.Table(
    "eventbus_bindings",
    metadata,
    sa.Column("queue", sa.String(255), primary_key=True),
    sa.Column("exchange", sa.String(255), primary_key=True),
    sa.Column("pattern", sa.String(255), primary_key=True),
)

# Each subscriber's place in the global order (subscriber = its queue name). A projection's
# checkpoint is the last position it applied, written in the same transaction as its read model.
# A handler's is how far replay/catch-up has fed it the store (live delivery dedupes by event id);
# ``caught_up`` is false while a catch-up is unfinished, so a restart resumes it.
checkpoints = sa.Table(
    "eventbus_checkpoints",
    metadata,
    sa.Column("subscriber", sa.String(255), primary_key=True),
    sa.Column("position", sa.BigInteger, nullable=False),
    sa.Column("caught_up", sa.Boolean, nullable=False),
    sa.Column("updated_at", UTCDateTime, nullable=False),
)

# Events a subscriber gave up on (a projection's live retries exhausted, ``replay --skip-failed``).
failures = sa.Table(
    "eventbus_failures",
    metadata,
    sa.Column("subscriber", sa.String(255), primary_key=True),
    sa.Column("event_id", sa.Uuid, primary_key=True),
    sa.Column("position", sa.BigInteger, nullable=True),
    sa.Column("event_type", sa.String(255), nullable=False),
    sa.Column("error", sa.Text, nullable=False),
    sa.Column("failed_at", UTCDateTime, nullable=False),
)

# The latest snapshot of an aggregate's state per stream (``Aggregate`` with ``snapshot_every``).
snapshots = sa.Table(
    "eventbus_snapshots",
    metadata,
    sa.Column("stream_id", sa.String(255), primary_key=True),
    sa.Column("stream_version", sa.Integer, nullable=False),
    sa.Column("state_version", sa.Integer, nullable=False),
    sa.Column("state", Payload, nullable=False),
    sa.Column("taken_at", UTCDateTime, nullable=False),
)

# Handlers whose consumption is paused (``eventbus pause QUEUE``): a row means paused. Workers
# look at it every second or so and cancel or resume their consumer on that queue.
paused = sa.Table(
    "eventbus_paused",
    metadata,
    sa.Column("queue", sa.String(255), primary_key=True),
    sa.Column("reason", sa.Text, nullable=True),
    sa.Column("paused_at", UTCDateTime, nullable=False),
)

# Events a relay passed over because the broker refuses them for good (too large, say): the
# relay goes on with the next ones; ``eventbus parked retry`` publishes them once fixed.
parked = sa.Table(
    "eventbus_parked",
    metadata,
    sa.Column("relay", sa.String(255), primary_key=True),
    sa.Column("position", sa.BigInteger, primary_key=True),
    sa.Column("exchange", sa.String(255), nullable=False),
    sa.Column("event_id", sa.Uuid, nullable=False),
    sa.Column("event_type", sa.String(255), nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("parked_at", UTCDateTime, nullable=False),
)

# Detours (``eventbus detour QUEUE STEP``): while a row names a queue, its workers pass each of
# its messages through the named step (registered in code) before the handler, in-process.
detours = sa.Table(
    "eventbus_detours",
    metadata,
    sa.Column("queue", sa.String(255), primary_key=True),
    sa.Column("step", sa.String(255), nullable=False),
    sa.Column("since", UTCDateTime, nullable=False),
)

# Each subject's data key (crypto-shredding, ``store.keys``): deleting the row forgets the
# subject. ``key_id`` is named in every value sealed with the key; ``wrapped_by`` is the
# fingerprint of the master key that wraps ``key`` (NULL: stored unwrapped).
subject_keys = sa.Table(
    "eventbus_subject_keys",
    metadata,
    sa.Column("subject", sa.String(255), primary_key=True),
    sa.Column("key_id", sa.String(32), nullable=False),
    sa.Column("key", sa.LargeBinary, nullable=False),
    sa.Column("wrapped_by", sa.String(32), nullable=True),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.UniqueConstraint("key_id"),
)
