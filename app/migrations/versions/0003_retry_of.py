"""Jobs created by ``POST /v1/jobs/{id}/retry`` name the job they retry.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:  # batch: SQLite cannot add a foreign key in place
        batch.add_column(sa.Column("retry_of", sa.String(36), nullable=True))
        batch.create_index("ix_jobs_retry_of", ["retry_of"])


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_index("ix_jobs_retry_of")
        batch.drop_column("retry_of")
