"""Stored specs: each job's ``restoration`` keeps only its method's own settings.

Until this revision one flat restoration section carried every method's settings (a RestoreLCC job stored
lora_r, a LoRA job stored heads); the spec now takes only the chosen method's, and the worker re-validates a
stored spec before it runs it. The field lists are those of this revision, fixed here on purpose: a later
change to a method's settings gets a migration of its own.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29
"""

import hashlib
import json
from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_TRAINING = {"method", "train_samples", "epochs", "max_steps", "lr", "lr_schedule", "warmup_steps", "weight_decay",
             "batch_size", "grad_accum", "group_by_length", "max_seq_len"}
_HEADS = _TRAINING | {"heads", "head_selection", "probe_samples", "negatives"}
_ADAPTER = _TRAINING | {"lora_r", "lora_alpha", "lora_targets"}
OWN_SETTINGS: dict[str, set[str]] = {
    "restorelcc": _HEADS | {"directions"}, "bias": _HEADS, "lora": _ADAPTER, "dora": _ADAPTER, "none": {"method"},
}

jobs = sa.table("jobs", sa.column("seq", sa.Integer), sa.column("id", sa.String), sa.column("spec", sa.JSON))
idempotency = sa.table("idempotency", sa.column("job_id", sa.String), sa.column("request_hash", sa.String))


def request_hash(spec: Any) -> str:
    """The idempotency hash of a stored spec (as app.store.jobs computes it at this revision)."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def own_settings(spec: Any) -> Any:
    """``spec`` with its restoration section cut down to the method's settings (unchanged when unknown)."""
    if not isinstance(spec, dict) or not isinstance(spec.get("restoration"), dict):
        return spec
    r = spec["restoration"]
    keep = OWN_SETTINGS.get(r.get("method", "restorelcc"))
    if keep is None:
        return spec
    return {**spec, "restoration": {k: v for k, v in r.items() if k in keep}}


def upgrade() -> None:
    conn = op.get_bind()
    for seq, job_id, spec in conn.execute(sa.select(jobs.c.seq, jobs.c.id, jobs.c.spec)).all():
        new = own_settings(spec)
        if new != spec:  # a retried request with the same Idempotency-Key must still find its job
            conn.execute(jobs.update().where(jobs.c.seq == seq).values(spec=new))
            conn.execute(idempotency.update().where(idempotency.c.job_id == job_id)
                         .values(request_hash=request_hash(new)))


def downgrade() -> None:
    """Nothing to undo: the flat section of revision 0001 accepts every method's subset (the rest defaulted)."""
