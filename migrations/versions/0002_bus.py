"""The bus: stored routing keys, the relay's checkpoint, handlers' processed events, queue bindings.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

import sqlalchemy as sa
from alembic import op

from eventbus.store.tables import UTCDateTime

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("eventbus_events") as batch:
        batch.add_column(sa.Column("routing_key", sa.String(length=255), nullable=True))
    op.create_table(
        "eventbus_relay_checkpoints",
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("position", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_eventbus_relay_checkpoints"),
    )
    op.create_table(
        "eventbus_processed",
        sa.Column("handler", sa.String(length=255), nullable=False),
        sa.Column("event_id", sa.Uuid(), nullable=False),
        sa.Column("position", sa.BigInteger(), nullable=True),
        sa.Column("processed_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("handler", "event_id", name="pk_eventbus_processed"),
    )
    op.create_table(
        "eventbus_bindings",
        sa.Column("queue", sa.String(length=255), nullable=False),
        sa.Column("exchange", sa.String(length=255), nullable=False),
        sa.Column("pattern", sa.String(length=255), nullable=False),
        sa.PrimaryKeyConstraint("queue", "exchange", "pattern", name="pk_eventbus_bindings"),
    )


def downgrade() -> None:
    op.drop_table("eventbus_bindings")
    op.drop_table("eventbus_processed")
    op.drop_table("eventbus_relay_checkpoints")
    with op.batch_alter_table("eventbus_events") as batch:
        batch.drop_column("routing_key")
