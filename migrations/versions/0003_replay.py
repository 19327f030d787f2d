"""Replay and projections: subscriber checkpoints, recorded failures, aggregate snapshots.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

from eventbus.store.tables import UTCDateTime

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "eventbus_checkpoints",
        sa.Column("subscriber", sa.String(length=255), nullable=False),
        sa.Column("position", sa.BigInteger(), nullable=False),
        sa.Column("caught_up", sa.Boolean(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("subscriber", name="pk_eventbus_checkpoints"),
    )
    op.create_table(
        "eventbus_failures",
        sa.Column("subscriber", sa.String(length=255), nullable=False),
        sa.Column("event_id", sa.Uuid(), nullable=False),
        sa.Column("position", sa.BigInteger(), nullable=True),
        sa.Column("event_type", sa.String(length=255), nullable=False),
        sa.Column("error", sa.Text(), nullable=False),
        sa.Column("failed_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("subscriber", "event_id", name="pk_eventbus_failures"),
    )
    op.create_table(
        "eventbus_snapshots",
        sa.Column("stream_id", sa.String(length=255), nullable=False),
        sa.Column("stream_version", sa.Integer(), nullable=False),
        sa.Column("state_version", sa.Integer(), nullable=False),
        sa.Column("state", sa.JSON().with_variant(JSONB(), "postgresql"), nullable=False),
        sa.Column("taken_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("stream_id", name="pk_eventbus_snapshots"),
    )


def downgrade() -> None:
    op.drop_table("eventbus_snapshots")
    op.drop_table("eventbus_failures")
    op.drop_table("eventbus_checkpoints")
