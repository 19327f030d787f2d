"""Schema fingerprints on events: read back under the same schema, not validated again.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("eventbus_events") as batch:
        batch.add_column(sa.Column("schema_fingerprint", sa.BigInteger, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("eventbus_events") as batch:
        batch.drop_column("schema_fingerprint")
