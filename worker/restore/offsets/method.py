"""What RestoreLCC and its bias ablation share: per-head constants on chosen heads, trained through o_proj hooks,
folded into o_proj biases (checked against a float64 reference) and saved as restoration.safetensors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from app.methods import HeadConfig
from worker.errors import SpecError
from worker.model.arch import ArchInfo, DecoderAdapter
from worker.model.data import Batch
from worker.model.load import transformers_config
from worker.restore.method import Job, Preflight, Progress, RestoreMethod, TrainStats, logits
from worker.restore.offsets import merge as merging
from worker.restore.offsets.heads import HeadOffsets, inject
from worker.restore.offsets.merge import (
    MergeCheckError,
    capture_o_proj_inputs,
    check_merge,
    check_mergeable,
    logit_differences,
    merge_reference,
    save_restoration,
    token_rel_tolerance,
)
from worker.restore.offsets.selection import choose_heads
from worker.restore.offsets.train import train_offsets
from worker.restore.train import TrainControl


class OffsetMethod(RestoreMethod):
    """Subclasses say how the offsets are made (:meth:`make_offsets`) and, if they probe, give head scores."""

    config: HeadConfig

    def __init__(self, config: HeadConfig, seed: int):
        super().__init__(config, seed)
        self.heads: list[tuple[int, int]] = []
        self.scores: torch.Tensor | None = None  # (L, H) probe accuracy, saved with the offsets
        self.offsets: HeadOffsets | None = None

    def preflight(self, pre: Preflight) -> None:
        check_mergeable(transformers_config(pre.model_config))  # exportable once merged (UnsupportedModelError)
        heads, info = self.config.heads, pre.info
        if self.config.head_selection != "all" and heads >= 1 and heads > info.total_heads:
            raise SpecError(f"restoration.heads {heads:g} exceeds the model's {info.total_heads} attention heads "
                            f"({info.num_layers} layers × {info.num_heads})", field="restoration.heads")

    def choose(self, info: ArchInfo, scores: torch.Tensor | None = None, tiebreak: torch.Tensor | None = None) -> None:
        """Choose the heads (worker.restore.offsets.selection.choose_heads) and record them in the report."""
        c = self.config
        self.heads = choose_heads(info.num_layers, info.num_heads, c.heads, c.head_selection, self.seed, scores,
                                  tiebreak)
        self.scores = scores if c.head_selection == "probe" else None
        rep = self.report
        rep["head_selection"] = c.head_selection
        rep["chosen_heads"] = [list(h) for h in self.heads]
        if self.scores is not None:
            rep["head_scores"] = [[round(float(x), 4) for x in row] for row in self.scores]
            rep["chosen_scores"] = [round(float(self.scores[lyr, h]), 4) for lyr, h in self.heads]

    def make_offsets(self, info: ArchInfo) -> HeadOffsets:
        raise NotImplementedError

    def train(self, job: Job, batches: Any, control: TrainControl) -> TrainStats:
        r = self.config
        self.offsets = self.make_offsets(job.adapter.info)
        stats = train_offsets(
            job.model, job.adapter, self.offsets, batches,
            lr=r.lr, schedule=r.lr_schedule, warmup_steps=r.warmup_steps,
            weight_decay=r.weight_decay, epochs=r.epochs, max_steps=r.max_steps,
            grad_accum=r.grad_accum, seed=self.seed, **control.options(),
        )
        if self.offsets.directions is not None:  # β's length per head (head_dim: all)
            d = self.offsets.directions
            # fewer probe pairs than directions leave zero directions (their β multiply nothing): say how many
            real = int((d.abs().amax(dim=-1) > 0).sum(dim=-1).min())
            stats["report"] = {"directions_per_head": int(d.shape[1]), "nonzero_directions_per_head_min": real}
        return stats

    def merge(self, job: Job, check: Batch, progress: Progress) -> None:
        """Fold the offsets into o_proj biases, then check the merged model twice: every o_proj against a float64
        reference taken before the merge (exact up to the bias's one rounding, in every dtype; names the layer),
        and the logits against the hooked model's, per token relative to that token's logit scale."""
        assert self.offsets is not None
        with capture_o_proj_inputs(job.adapter) as inputs, inject(job.adapter, self.offsets):
            hooked = logits(job.model, check)
        scope = getattr(job, "scope", None)  # a streamed model's layers come into memory one at a time
        reference = merge_reference(job.adapter, self.offsets, inputs, layer_scope=scope)
        self.report["model_type"] = job.adapter.info.model_type  # before a Mistral/Qwen2 model becomes Llama
        job.model = merging.merge_into_o_proj(job.model, job.adapter, self.offsets, layer_scope=scope)
        job.adapter = DecoderAdapter(job.model)
        merged = logits(job.model, check)
        max_abs, token_rel = logit_differences(hooked, merged, check.attention_mask)
        tol = token_rel_tolerance(next(job.model.parameters()).dtype, job.adapter.info.num_layers)
        checks = job.report.setdefault("checks", {})
        checks.update(merged_vs_hooked_max_abs_diff=max_abs, merged_vs_hooked_max_token_rel_diff=token_rel,
                      merged_vs_hooked_token_rel_tolerance=tol)
        result = check_merge(job.adapter, reference, layer_scope=scope)  # raises MergeCheckError naming the layer
        checks.update(merge_bias_max_rel_err=result.bias_max_rel_err,
                      merge_o_proj_max_rel_err=result.output_max_rel_err, merge_rel_tolerance=result.tolerance)
        if not token_rel <= tol:
            raise MergeCheckError(f"internal check failed: merged logits differ from hooked ones by {token_rel:.3g} "
                                  f"of a token's largest logit (allowed {tol:.3g}; max abs difference {max_abs:.3g})")

    def export(self, job: Job, out_dir: Path) -> None:
        assert self.offsets is not None
        save_restoration(
            out_dir / "restoration.safetensors", self.offsets, self.scores,
            {"model_type": self.report.get("model_type", job.adapter.info.model_type), "method": self.config.method,
             "seed": self.seed},
        )
