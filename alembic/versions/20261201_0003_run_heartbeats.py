"""run heartbeats and processes; pool claims by run

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 16:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("process", sa.String(length=253), nullable=True))
    op.create_index(op.f("ix_pool_claims_run_id"), "pool_claims", ["run_id", "released_at"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_pool_claims_run_id"), table_name="pool_claims")
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("process")
        batch.drop_column("heartbeat_at")
