"""LoRA and DoRA as restoration methods: a peft adapter trained on the pruned model, merged with the pruning mask
re-applied; the unmerged adapter is exported too (adapter/)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from app.methods import AdapterConfig
from worker.model.data import Batch
from worker.restore.adapters.peft import AdapterBaseline, check_targets, merge_adapter, save_adapter, train_adapter
from worker.restore.method import Job, Preflight, Progress, RestoreMethod, TrainStats, logits
from worker.restore.train import TrainControl


class Adapter(RestoreMethod):
    config: AdapterConfig

    def __init__(self, config: AdapterConfig, seed: int):
        super().__init__(config, seed)
        self.baseline: AdapterBaseline | None = None

    def preflight(self, pre: Preflight) -> None:
        """A target naming no module is refused before any weight loads (the model's structure, without weights)."""
        from worker.model.placement import meta_model

        check_targets(self.config.lora_targets, meta_model(pre.model_config).named_modules())

    def train(self, job: Job, batches: Any, control: TrainControl) -> TrainStats:
        self.baseline, stats = train_adapter(job.model, batches, self.config, seed=self.seed, **control.options())
        return stats

    def merge(self, job: Job, check: Batch, progress: Progress) -> None:
        assert self.baseline is not None
        before = logits(job.model, check)
        job.model, info = merge_adapter(job.model, self.baseline, job.zero_masks)
        self.report.update(info)
        after = logits(job.model, check)
        self.report["merge_remask_max_abs_logit_change"] = float((before - after).abs().max())

    def export(self, job: Job, out_dir: Path) -> None:
        assert self.baseline is not None
        save_adapter(self.baseline, out_dir / "adapter")
        if job.spec.output.format == "adapter":
            job.report.setdefault("output", {})["primary"] = "adapter/"
