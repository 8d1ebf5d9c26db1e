"""messages.owner: the gateway streaming an answer, so a restart recovers only its own

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("messages") as batch:
        batch.add_column(sa.Column("owner", sa.String(128), nullable=True))
        batch.create_index("ix_messages_owner", ["owner"])


def downgrade() -> None:
    with op.batch_alter_table("messages") as batch:
        batch.drop_index("ix_messages_owner")
        batch.drop_column("owner")
