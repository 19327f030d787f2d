"""Operations: handlers paused without stopping their workers; a handler's last position.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23
"""

import sqlalchemy as sa
from alembic import op

from eventbus.store.tables import UTCDateTime

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "eventbus_paused",
        sa.Column("queue", sa.String(length=255), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("paused_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("queue", name="pk_eventbus_paused"),
    )
    op.create_index(
        "ix_eventbus_processed_handler_position", "eventbus_processed", ["handler", "position"]
    )


def downgrade() -> None:
    op.drop_index("ix_eventbus_processed_handler_position", table_name="eventbus_processed")
    op.drop_table("eventbus_paused")
