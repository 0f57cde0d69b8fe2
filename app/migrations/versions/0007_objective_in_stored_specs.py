"""Stored specs name their restoration objective.

RestoreLCC's default objective changed from 'sft' to the one the selection in docs/objective.md chose. The worker
validates a stored spec again before it runs it, so a RestoreLCC job stored before the objective setting existed
would have run with the new default instead of the one it was submitted under. Every stored spec of a training
method that names no objective gets 'sft', the only objective there was. The idempotency hashes stay as they are: the
hash leaves out an objective of 'sft' (app.store.jobs.ADDED_DEFAULTS); they become hash version 1, compared with
a request as the release before the change would have resolved it, while keys stored from now on (version 2) are
compared with the request as it resolves now. The method list is that of this revision, fixed here on purpose.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30
"""

from typing import Any

import sqlalchemy as sa
from alembic import op

from app.store.spec_rewrite import rewrite_specs, with_training_setting

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

TRAINING_METHODS = ("restorelcc", "bias", "lora", "dora")


def with_objective(spec: Any) -> Any:
    """``spec`` with ``restoration.objective`` 'sft' where its method trains and it names none (else unchanged)."""
    return with_training_setting(spec, "objective", "sft", TRAINING_METHODS)


def upgrade() -> None:
    # Plain ADD COLUMN (no batch copy), as in 0006
    op.add_column("idempotency", sa.Column("hash_version", sa.Integer(), nullable=False, server_default="1"))
    rewrite_specs(op.get_bind(), with_objective)


def downgrade() -> None:
    """The hash version goes (upgrading again marks every key version 1, a request that left the objective out
    then compared as sft); revision 0006's specs accept an objective of 'sft'."""
    op.drop_column("idempotency", "hash_version")  # plain DROP COLUMN, as in 0006
