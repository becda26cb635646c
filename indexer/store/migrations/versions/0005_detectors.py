"""detectors (search.detector: trained detectors, their files and SHA-256s) and detector_features (cached
features of the detector's normalised views)

Revision ID: 0005_detectors
Revises: 0004_hardening
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005_detectors"
down_revision = "0004_hardening"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "detectors",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("method", sa.String(length=32), nullable=False),
        sa.Column("embedder_key", sa.String(length=64), nullable=False),
        sa.Column("config_path", sa.Text(), nullable=False),
        sa.Column("config_sha256", sa.String(length=64), nullable=False),
        sa.Column("weights_path", sa.Text(), nullable=False),
        sa.Column("weights_sha256", sa.String(length=64), nullable=False),
        sa.Column("summary", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
    )
    op.create_table(
        "detector_features",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("image_id", sa.Integer(), nullable=False),
        sa.Column("feature_key", sa.String(length=64), nullable=False),
        sa.Column("vector", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(["image_id"], ["images.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("image_id", "feature_key", name="uq_detector_feature"),
    )
    op.create_index("ix_detector_features_image_id", "detector_features", ["image_id"])
    op.create_index("ix_detector_features_feature_key", "detector_features", ["feature_key"])


def downgrade() -> None:
    op.drop_index("ix_detector_features_feature_key", table_name="detector_features")
    op.drop_index("ix_detector_features_image_id", table_name="detector_features")
    op.drop_table("detector_features")
    op.drop_table("detectors")
