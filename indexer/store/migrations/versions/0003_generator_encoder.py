"""generators.encoder: the latent encoder trained for a generator (path, SHA-256, training report)

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
    with op.batch_alter_table("generators") as batch:
        batch.add_column(sa.Column("encoder", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("generators") as batch:
        batch.drop_column("encoder")
