"""API keys are never deleted and their ids never repeat: a counter of issued key ids, a trigger refusing DELETE

Revision ID: 0004_hardening
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004_hardening"
down_revision = "0003"
branch_labels = None
depends_on = None

MESSAGE = "API keys are revoked, never deleted (their id stays theirs in the audit log)"


def upgrade() -> None:
    op.create_table(
        "api_key_ids",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("last_issued", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.execute("INSERT INTO api_key_ids (id, last_issued) SELECT 1, COALESCE(MAX(id), 0) FROM api_keys")
    if op.get_bind().dialect.name == "sqlite":
        op.execute(
            "CREATE TRIGGER api_keys_never_deleted BEFORE DELETE ON api_keys "
            f"BEGIN SELECT RAISE(ABORT, '{MESSAGE}'); END"
        )
    else:
        op.execute(
            "CREATE FUNCTION api_keys_never_deleted() RETURNS trigger LANGUAGE plpgsql AS "
            f"$$ BEGIN RAISE EXCEPTION '{MESSAGE}'; END $$"
        )
        op.execute(
            "CREATE TRIGGER api_keys_never_deleted BEFORE DELETE ON api_keys "
            "FOR EACH ROW EXECUTE FUNCTION api_keys_never_deleted()"
        )


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        op.execute("DROP TRIGGER IF EXISTS api_keys_never_deleted")
    else:
        op.execute("DROP TRIGGER IF EXISTS api_keys_never_deleted ON api_keys")
        op.execute("DROP FUNCTION IF EXISTS api_keys_never_deleted()")
    op.drop_table("api_key_ids")
