"""Stored specs lose the fields the worker never used.

The API now refuses three settings that the worker had silently ignored: ``model.revision`` with a local
``model.id``, ``output.format: adapter`` with a restoration method that exports no adapter, and an
``evaluation.limits`` key that is the stem of no evaluation file. The worker validates a stored spec again before it
runs it (and a retry validates it at submit), so a job stored with one of them would now fail ``invalid_spec``
instead of running as it ran before. Each is removed from stored specs, which changes nothing the job does. The
rules are those of this revision, fixed here on purpose.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01
"""

from pathlib import PurePosixPath
from typing import Any

from alembic import op

from app.store.spec_rewrite import rewrite_specs

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

ADAPTER_METHODS = ("lora", "dora")
EVAL_LISTS = ("perplexity", "response_perplexity", "tasks")


def _local(model_id: str) -> bool:
    ref = model_id.strip()
    return ref.startswith(("/", ".", "~")) or ref.lower().endswith(".gguf")


def without_unused(spec: Any) -> Any:
    """``spec`` without the settings its worker ignored (else unchanged)."""
    if not isinstance(spec, dict):
        return spec
    out = dict(spec)
    model = out.get("model")
    if isinstance(model, dict) and model.get("revision") is not None and isinstance(model.get("id"), str) \
            and _local(model["id"]):
        out["model"] = {k: v for k, v in model.items() if k != "revision"}
    output, restoration = out.get("output"), out.get("restoration")
    method = restoration.get("method", "restorelcc") if isinstance(restoration, dict) else "restorelcc"
    if isinstance(output, dict) and output.get("format") == "adapter" and method not in ADAPTER_METHODS:
        out["output"] = {**output, "format": "merged"}
    evaluation = out.get("evaluation")
    if isinstance(evaluation, dict) and isinstance(evaluation.get("limits"), dict):
        stems = {PurePosixPath(p).stem for k in EVAL_LISTS for p in evaluation.get(k) or [] if isinstance(p, str)}
        limits = {k: v for k, v in evaluation["limits"].items() if k in stems}
        if limits != evaluation["limits"]:
            out["evaluation"] = {**evaluation, "limits": limits}
    return out


def upgrade() -> None:
    rewrite_specs(op.get_bind(), without_unused)


def downgrade() -> None:
    """Nothing to put back: the removed settings had no effect."""
