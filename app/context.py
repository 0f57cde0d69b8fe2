"""The sequence lengths a spec asks for, against the model's context (``max_position_embeddings``): past it a rotary
model raises nothing and computes activations it was never trained on. One rule for the API (the config.json or GGUF
header it reads at submit) and the worker (the config it checks before loading weights)."""

from __future__ import annotations

from typing import Any

from app.methods import PRUNING_METHODS
from app.schemas import JobSpec


def config_context(config: dict[str, Any]) -> int | None:
    """``max_position_embeddings`` of a config.json (its text config's, for a multimodal one), or None."""
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    context = text.get("max_position_embeddings", config.get("max_position_embeddings"))
    return context if isinstance(context, int) and not isinstance(context, bool) and context > 0 else None


def sequence_lengths(spec: JobSpec) -> dict[str, int]:
    """Field → tokens, for the sequence lengths this job will run."""
    lengths: dict[str, int] = {}
    if getattr(spec.restoration, "max_seq_len", None) is not None:
        lengths["restoration.max_seq_len"] = spec.restoration.max_seq_len  # type: ignore[attr-defined]
    if PRUNING_METHODS[spec.pruning.method].needs_calibration:
        lengths["pruning.seq_len"] = spec.pruning.seq_len
    ev = spec.evaluation
    if ev.perplexity or ev.response_perplexity or ev.tasks:
        lengths["evaluation.max_seq_len"] = ev.max_seq_len
    return lengths


def context_problem(spec: JobSpec, context: int | None) -> tuple[str, str] | None:
    """(field, message) for the first length past ``context``, or None (also when the context is unknown)."""
    if context is None:
        return None
    for field, length in sequence_lengths(spec).items():
        if length > context:
            return field, (f"{field} {length} exceeds the model's context of {context} tokens "
                           "(max_position_embeddings; in a GGUF, context_length)")
    return None
