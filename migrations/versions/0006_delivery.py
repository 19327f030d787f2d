"""Delivery headers on events (priority, expiry, trace context); subject keys; detours.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

from eventbus.store.tables import Payload

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("eventbus_events") as batch:
        batch.add_column(sa.Column("headers", Payload, nullable=True))
    # -- subject keys (crypto-shredding) ------------------------------------------------------

    # -- detours ----------------------------------------------------------------------------------
    from eventbus.store.tables import UTCDateTime

    op.create_table(
        "eventbus_detours",
        sa.Column("queue", sa.String(255), primary_key=True),
        sa.Column("step", sa.String(255), nullable=False),
        sa.Column("since", UTCDateTime, nullable=False),
    )


def downgrade() -> None:
    # -- detours ----------------------------------------------------------------------------------
    op.drop_table("eventbus_detours")

    # -- subject keys (crypto-shredding) ------------------------------------------------------

    with op.batch_alter_table("eventbus_events") as batch:
        batch.drop_column("headers")
