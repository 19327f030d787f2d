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


def downgrade() -> None:
    # -- detours ----------------------------------------------------------------------------------

    # -- subject keys (crypto-shredding) ------------------------------------------------------

    with op.batch_alter_table("eventbus_events") as batch:
        batch.drop_column("headers")
