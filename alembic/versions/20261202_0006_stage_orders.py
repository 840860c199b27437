"""stage orders: the mailbox between the scheduler and each site's session

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02 05:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "stage_orders",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("run_id", sa.String(length=64), nullable=False),
        sa.Column("site", sa.String(length=253), nullable=False),
        sa.Column("host", sa.String(length=253), nullable=False),
        sa.Column("stage", sa.String(length=32), nullable=False),
        sa.Column("claims", sa.Text(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("session", sa.String(length=64), nullable=True),
        sa.Column("result", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], name=op.f("fk_stage_orders_run_id_runs")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_stage_orders")),
    )
    op.create_index(op.f("ix_stage_orders_run_id"), "stage_orders", ["run_id", "site", "state"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_stage_orders_run_id"), table_name="stage_orders")
    op.drop_table("stage_orders")
