"""Delivery headers on events (priority, expiry, trace context); subject keys; detours.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

from eventbus.store.tables import Payload, UTCDateTime

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("eventbus_events") as batch:
        batch.add_column(sa.Column("headers", Payload, nullable=True))
    # -- subject keys (crypto-shredding) ------------------------------------------------------
    op.create_table(
        "eventbus_subject_keys",
        sa.Column("subject", sa.String(255), nullable=False),
        sa.Column("key_id", sa.String(32), nullable=False),
        sa.Column("key", sa.LargeBinary, nullable=False),
        sa.Column("wrapped_by", sa.String(32), nullable=True),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.PrimaryKeyConstraint("subject", name="pk_eventbus_subject_keys"),
        sa.UniqueConstraint("key_id", name="uq_eventbus_subject_keys_key_id"),
    )
    # -- detours ----------------------------------------------------------------------------------
    op.create_table(
        "eventbus_detours",
        sa.Column("queue", sa.String(255), nullable=False),
        sa.Column("step", sa.String(255), nullable=False),
        sa.Column("since", UTCDateTime, nullable=False),
        sa.PrimaryKeyConstraint("queue", name="pk_eventbus_detours"),
    )


def downgrade() -> None:
    # -- detours ----------------------------------------------------------------------------------
    op.drop_table("eventbus_detours")

    # -- subject keys (crypto-shredding) ------------------------------------------------------
    op.drop_table("eventbus_subject_keys")

    with op.batch_alter_table("eventbus_events") as batch:
        batch.drop_column("headers")
