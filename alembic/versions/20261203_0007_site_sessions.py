"""site sessions heard from in the ledger

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03 14:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "site_sessions",
        sa.Column("session", sa.String(length=64), nullable=False),
        sa.Column("run_id", sa.String(length=64), nullable=False),
        sa.Column("site", sa.String(length=253), nullable=False),
        sa.Column("worker", sa.String(length=253), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("heard_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("retired_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], name=op.f("fk_site_sessions_run_id_runs")),
        sa.PrimaryKeyConstraint("session", name=op.f("pk_site_sessions")),
    )
    op.create_index(op.f("ix_site_sessions_run_id"), "site_sessions", ["run_id"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_site_sessions_run_id"), table_name="site_sessions")
    op.drop_table("site_sessions")
