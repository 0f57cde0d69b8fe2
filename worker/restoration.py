"""Glue between the runner and the restoration methods (worker/restore/): one function per stage.

The runner calls ``begin`` while the dense model is in memory (loading stage), then ``probe`` (pruned
activations), ``extract`` (lost directions, head scores and choice), ``train`` and ``merge`` in their
stages, and ``export`` when writing results. Per-run state lives in :class:`RestoreState`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from app.schemas import JobSpec
from worker.errors import DataError, SpecError
from worker.reporting import checkpoint


@dataclass
class RestoreState:
    method: str
    probe_inputs: Any = None
    dense: Any = None  # DenseCaptures
    negatives_backend: str | None = None
    pruned: torch.Tensor | None = None
    components: Any = None  # LostComponents
    probe_result: Any = None  # ProbeResult
    heads: list[tuple[int, int]] = field(default_factory=list)
    offsets: Any = None  # HeadOffsets
    baseline: Any = None  # LoRA/DoRA state (worker.restore.baselines)
    report: dict[str, Any] = field(default_factory=dict)


def _uses_offsets(spec: JobSpec) -> bool:
    return spec.restoration.method in ("restorelcc", "bias")


def _needs_activations(spec: JobSpec) -> bool:
    r = spec.restoration
    return r.method == "restorelcc" or (r.method == "bias" and r.head_selection == "probe")


def begin(spec: JobSpec, model, tokenizer, adapter, progress) -> RestoreState | None:
    """Capture what the method needs from the dense model; returns the method's state."""
    method = spec.restoration.method
    if method == "none":
        return None
    from worker.restore.merge import check_mergeable

    if _uses_offsets(spec):
        try:
            check_mergeable(model.config)
        except ValueError as exc:
            raise SpecError(str(exc), field="restoration.method") from exc
    top, head_dim = spec.restoration.directions, adapter.info.head_dim
    if method == "restorelcc" and top is not None and top >= 1 and top > head_dim:
        raise SpecError(f"restoration.directions {top:g} exceeds the model's head_dim {head_dim}",
                        field="restoration.directions")
    state = RestoreState(method=method)
    if not _needs_activations(spec):
        return state

    from worker.model.data import read_instructions
    from worker.restore.pairs import choose_negatives
    from worker.restore.restorelcc import build_probe_inputs, capture_dense

    r = spec.restoration
    assert spec.data.train is not None
    pairs = read_instructions(spec.data.train, limit=r.probe_samples)
    negatives = None
    if r.head_selection == "probe":
        progress(0.0, f"choosing contrastive negatives for {len(pairs)} probe pairs")
        negatives, state.negatives_backend = choose_negatives([resp for _, resp in pairs], r.negatives)
    state.probe_inputs = build_probe_inputs(tokenizer, pairs, r.max_seq_len, r.batch_size, negatives)
    state.dense = capture_dense(model, adapter, state.probe_inputs, _batch_progress(progress, 0.1, 1.0, "dense"))
    state.report.update(probe_samples=len(pairs), negatives_backend=state.negatives_backend)
    return state


def _batch_progress(progress, start: float, end: float, label: str):
    def report(done: int, total: int) -> None:
        frac = done / total if total else 0.0
        progress(start + (end - start) * frac, f"{label} activations: batch {done}/{total}")

    return report


def probe(state, progress, reporter) -> None:
    """Pruned-model activations at the probe prompts' last tokens."""
    from worker.restore.restorelcc import capture_pruned

    rs: RestoreState = state.restoration
    rs.pruned = capture_pruned(
        state.model, state.adapter, rs.probe_inputs, _batch_progress(progress, 0.0, 1.0, "pruned")
    )


def extract(state, progress, reporter) -> None:
    """Lost directions (one batched SVD), contrastive head scores and the chosen heads."""
    from worker.restore.restorelcc import choose_heads, extract_components, score_heads

    spec, rs = state.spec, state.restoration
    r = spec.restoration
    progress(0.0, "extracting lost directions")
    rs.components = extract_components(rs.dense, rs.pruned)
    checkpoint(reporter)
    if r.head_selection == "probe":
        progress(0.3, "probing heads")
        rs.probe_result = score_heads(rs.dense, rs.pruned, rs.components, seed=spec.seed)
    rs.heads = choose_heads(rs.probe_result, state.adapter.info, r.heads, r.head_selection, spec.seed)
    _record_heads(state)
    rs.dense = rs.pruned = rs.probe_inputs = None  # no longer needed


def _record_heads(state) -> None:
    rs: RestoreState = state.restoration
    rep = rs.report
    rep["head_selection"] = state.spec.restoration.head_selection
    rep["chosen_heads"] = [list(h) for h in rs.heads]
    if rs.probe_result is not None:
        acc = rs.probe_result.accuracy
        rep["head_scores"] = [[round(float(x), 4) for x in row] for row in acc]
        rep["chosen_scores"] = [round(float(acc[lyr, h]), 4) for lyr, h in rs.heads]


def train(state, progress, reporter) -> None:
    spec, rs = state.spec, state.restoration
    r = spec.restoration
    batches = _train_batches(state)
    if rs.method in ("lora", "dora"):
        from worker.restore.baselines import train_adapter

        rs.baseline, stats = train_adapter(
            state.model, batches, r, seed=spec.seed,
            progress=_step_progress(progress), should_stop=reporter.cancel_requested,
        )
    else:
        from worker.restore.restorelcc import choose_heads, make_offsets
        from worker.restore.train import train_offsets

        if not rs.heads:  # bias on random or all heads: no probing stage ran
            rs.heads = choose_heads(None, state.adapter.info, r.heads, r.head_selection, spec.seed)
            _record_heads(state)
        components = rs.components if rs.method == "restorelcc" else None
        rs.offsets = make_offsets(rs.heads, state.adapter.info, components, seed=spec.seed,
                                  directions=r.directions if components is not None else None)
        rs.components = None
        stats = train_offsets(
            state.model, state.adapter, rs.offsets, batches,
            lr=r.lr, schedule=r.lr_schedule, warmup_steps=r.warmup_steps,
            weight_decay=r.weight_decay, epochs=r.epochs, max_steps=r.max_steps,
            grad_accum=r.grad_accum, seed=spec.seed,
            progress=_step_progress(progress), should_stop=reporter.cancel_requested,
        )
    rs.report.update(
        method=rs.method,
        trainable_params=stats["trainable_params"],
        loss_curve=[round(float(x), 5) for x in stats["loss_curve"]],
        steps=stats["steps"],
        train_tokens=stats["tokens"],
        train_seconds=round(stats["seconds"], 3),
    )
    if rs.offsets is not None and rs.offsets.directions is not None:  # β's length per head (head_dim: all)
        rs.report["directions_per_head"] = int(rs.offsets.directions.shape[1])
    reporter.metrics({"trainable_params": stats["trainable_params"], "train_steps": stats["steps"]})


def _step_progress(progress):
    def report(step: int, total: int, loss: float) -> None:
        frac = step / total if total else 0.0
        progress(frac, f"step {step}/{total or '?'} · loss {loss:.4f}")

    return report


def _train_batches(state):
    """Epoch → shuffled, right-padded batches of (prompt, response) with the prompt masked."""
    from worker.model.data import encode_pair, ensure_pad_token, pad_batch, read_instructions, shuffled_batches

    spec = state.spec
    r = spec.restoration
    pairs = read_instructions(spec.data.train, limit=r.train_samples)
    pad = ensure_pad_token(state.tokenizer)
    encoded = [encode_pair(state.tokenizer, p, resp, r.max_seq_len) for p, resp in pairs]
    encoded = [e for e in encoded if any(x != -100 for x in e[1][1:])]
    if not encoded:
        raise DataError(f"data.train: no sample has response tokens within max_seq_len {r.max_seq_len}",
                        field="data.train")

    lengths = [len(e[0]) for e in encoded]

    def epoch_batches(epoch: int):
        gen = torch.Generator().manual_seed(spec.seed * 1000 + epoch)
        for idx in shuffled_batches(lengths, r.batch_size, gen, r.group_by_length):
            chunk = [encoded[j] for j in idx]
            yield pad_batch([c[0] for c in chunk], pad, labels=[c[1] for c in chunk])

    return _EpochSource(epoch_batches, len(encoded), r.batch_size)


class _EpochSource:
    """Callable epoch → batches, that also knows how many batches an epoch has."""

    def __init__(self, fn, n: int, batch_size: int):
        self.fn, self.n, self.batch_size = fn, n, batch_size

    def __call__(self, epoch: int):
        return self.fn(epoch)

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)


def merge(state, progress, reporter) -> None:
    """Fold the restoration into the weights; check merged logits against the unmerged model's."""
    rs: RestoreState = state.restoration
    check = _check_batch(state)
    if rs.method in ("lora", "dora"):
        from worker.restore.baselines import merge_adapter

        before = _logits(state.model, check)
        state.model, info = merge_adapter(state.model, rs.baseline, state.zero_masks)
        rs.report.update(info)
        after = _logits(state.model, check)
        rs.report["merge_remask_max_abs_logit_change"] = float((before - after).abs().max())
    else:
        _merge_offsets(state, check)
    progress(1.0, "merged")


def _merge_offsets(state, check) -> None:
    """Fold the head offsets into o_proj biases, then check the merged model twice: every o_proj against a float64
    reference taken before the merge (exact up to the bias's one rounding, in every dtype; names the layer), and
    the logits against the hooked model's, per token relative to that token's logit scale."""
    from worker.model.arch import DecoderAdapter
    from worker.restore.heads import inject
    from worker.restore.merge import (
        MergeCheckError,
        capture_o_proj_inputs,
        check_merge,
        logit_differences,
        merge_into_o_proj,
        merge_reference,
        token_rel_tolerance,
    )

    rs: RestoreState = state.restoration
    with capture_o_proj_inputs(state.adapter) as inputs, inject(state.adapter, rs.offsets):
        hooked = _logits(state.model, check)
    reference = merge_reference(state.adapter, rs.offsets, inputs)
    rs.report["model_type"] = state.adapter.info.model_type  # before a Mistral/Qwen2 model becomes Llama
    state.model = merge_into_o_proj(state.model, state.adapter, rs.offsets)
    state.adapter = DecoderAdapter(state.model)
    merged = _logits(state.model, check)
    max_abs, token_rel = logit_differences(hooked, merged, check.attention_mask)
    tol = token_rel_tolerance(next(state.model.parameters()).dtype)
    checks = state.report.setdefault("checks", {})
    checks.update(merged_vs_hooked_max_abs_diff=max_abs, merged_vs_hooked_max_token_rel_diff=token_rel,
                  merged_vs_hooked_token_rel_tolerance=tol)
    result = check_merge(state.adapter, reference)  # raises MergeCheckError naming the layer
    checks.update(merge_bias_max_rel_err=result.bias_max_rel_err, merge_o_proj_max_rel_err=result.output_max_rel_err,
                  merge_rel_tolerance=result.tolerance)
    if not token_rel <= tol:
        raise MergeCheckError(f"internal check failed: merged logits differ from hooked ones by {token_rel:.3g} of a "
                         f"token's largest logit (allowed {tol:.3g}; max abs difference {max_abs:.3g})")


def _check_batch(state):
    from worker.model.data import encode_text, ensure_pad_token, pad_batch, read_instructions

    pairs = read_instructions(state.spec.data.train, limit=2)
    pad = ensure_pad_token(state.tokenizer)
    return pad_batch([encode_text(state.tokenizer, p + r, 64) for p, r in pairs], pad)


@torch.no_grad()
def _logits(model, batch) -> torch.Tensor:
    device = next(model.parameters()).device
    out = model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device))
    return out.logits.float().cpu()


def export(state, out_dir: Path) -> None:
    """Write the method's own artifacts and its part of the report."""
    rs: RestoreState | None = state.restoration
    if rs is None:
        return
    if rs.offsets is not None:
        from worker.restore.merge import save_restoration

        scores = rs.probe_result.accuracy if rs.probe_result is not None else None
        save_restoration(
            out_dir / "restoration.safetensors", rs.offsets, scores,
            {"model_type": rs.report.get("model_type", state.adapter.info.model_type), "method": rs.method,
             "seed": state.spec.seed},
        )
    if rs.baseline is not None:
        from worker.restore.baselines import save_adapter

        save_adapter(rs.baseline, out_dir / "adapter")
        if state.spec.output.format == "adapter":
            state.report.setdefault("output", {})["primary"] = "adapter/"
    state.report["restoration"] = rs.report
