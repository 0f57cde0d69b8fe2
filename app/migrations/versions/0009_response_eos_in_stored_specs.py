"""Stored specs of training methods name response_eos: false.

Training now puts the tokenizer's EOS after each response by default (``restoration.response_eos``). The worker
validates a stored spec again before it runs it (and a retry resubmits it), so a job stored before the setting existed
would have trained with it. Every stored spec of a training method that names none gets ``false``: how it was
submitted. The idempotency hashes stay as they are (the hash leaves out ``response_eos`` at its default,
app.store.jobs.ADDED_DEFAULTS), so the same request repeated finds its job. The method list is that of this revision,
fixed here on purpose.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-01
"""

from typing import Any

from alembic import op

from app.store.spec_rewrite import rewrite_specs, with_training_setting

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

TRAINING_METHODS = ("restorelcc", "bias", "lora", "dora")


def with_response_eos(spec: Any) -> Any:
    """``spec`` with ``restoration.response_eos`` false where its method trains and it names none (else unchanged)."""
    return with_training_setting(spec, "response_eos", False, TRAINING_METHODS)


def without_response_eos(spec: Any) -> Any:
    r = spec.get("restoration") if isinstance(spec, dict) else None
    if not isinstance(r, dict) or "response_eos" not in r:
        return spec
    return {**spec, "restoration": {k: v for k, v in r.items() if k != "response_eos"}}


def upgrade() -> None:
    rewrite_specs(op.get_bind(), with_response_eos)


def downgrade() -> None:
    """Revision 0008's specs have no response_eos (its worker would refuse it); jobs then train without the EOS."""
    rewrite_specs(op.get_bind(), without_response_eos)
