"""The events table: the store and the outbox.

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from eventbus.store.tables import UTCDateTime

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "eventbus_events",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("position", sa.BigInteger(), nullable=True),
        sa.Column("event_id", sa.Uuid(), nullable=False),
        sa.Column("stream_id", sa.String(length=255), nullable=False),
        sa.Column("stream_version", sa.Integer(), nullable=False),
        sa.Column("type", sa.String(length=255), nullable=False),
        sa.Column("schema_version", sa.Integer(), nullable=False),
        sa.Column("occurred_at", UTCDateTime(), nullable=False),
        sa.Column("correlation_id", sa.String(length=255), nullable=True),
        sa.Column("causation_id", sa.String(length=255), nullable=True),
        sa.Column(
            "payload",
            sa.JSON().with_variant(postgresql.JSONB(), "postgresql"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("id", name="pk_eventbus_events"),
        sa.UniqueConstraint("event_id", name="uq_eventbus_events_event_id"),
        sa.UniqueConstraint("position", name="uq_eventbus_events_position"),
        sa.UniqueConstraint(
            "stream_id", "stream_version", name="uq_eventbus_events_stream_id_stream_version"
        ),
    )
    op.create_index(
        "ix_eventbus_events_unpositioned",
        "eventbus_events",
        ["id"],
        unique=False,
        postgresql_where=sa.text("position IS NULL"),
        sqlite_where=sa.text("position IS NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_eventbus_events_unpositioned", table_name="eventbus_events")
    op.drop_table("eventbus_events")
