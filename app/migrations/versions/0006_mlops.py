"""MLOps integration: jobs carry their worker queue, priority, whether a tenant quota holds them back and where
their result was handed off to; webhook deliveries are an outbox written with the status change they announce.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain ADD COLUMN (no batch copy): on SQLite a copied jobs table would cascade-delete the rows that refer to it.
    op.add_column("jobs", sa.Column("queue", sa.String(64), nullable=True))
    op.add_column("jobs", sa.Column("priority", sa.Integer(), nullable=False, server_default="5"))
    op.add_column("jobs", sa.Column("held", sa.Boolean(), nullable=False, server_default=sa.false()))
    op.add_column("jobs", sa.Column("output", sa.JSON(), nullable=True))
    op.create_index("ix_jobs_tenant_status", "jobs", ["tenant", "status"])
    op.create_table(
        "deliveries",
        sa.Column("seq", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("id", sa.String(36), nullable=False, unique=True),
        sa.Column("job_id", sa.String(36), sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("tenant", sa.String(128), nullable=False),
        sa.Column("event", sa.String(32), nullable=False),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.JSON(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("claimed_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("claim", sa.String(36), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("ix_deliveries_job_seq", "deliveries", ["job_id", "seq"])
    op.create_index("ix_deliveries_state_due", "deliveries", ["state", "next_attempt_at"])


def downgrade() -> None:
    op.drop_index("ix_deliveries_state_due", "deliveries")
    op.drop_index("ix_deliveries_job_seq", "deliveries")
    op.drop_table("deliveries")
    op.drop_index("ix_jobs_tenant_status", "jobs")
    for name in ("output", "held", "priority", "queue"):  # plain DROP COLUMN: no copy of jobs (see upgrade)
        op.drop_column("jobs", name)
