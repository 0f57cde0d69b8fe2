"""A restoration method added from outside worker/restore: its config, its implementation and one ``register``
call — the API's spec validation and the runner take it with no change anywhere else."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import pytest
import torch
from pydantic import Field, ValidationError
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from app.methods import RestorationMethod, TrainingConfig, restoration_methods
from app.schemas import JobSpec, Stage
from tests.tiny import instruction_rows, save_tiny, text_rows, write_jsonl
from worker.reporting import ConsoleReporter
from worker.restore.method import Job, RestoreMethod
from worker.restore.registry import register, unregister
from worker.restore.train import TrainControl, train_parameters
from worker.run.pipeline import planned_stages, run_pipeline

NAME = "logit-scale"


class LogitScaleConfig(TrainingConfig):
    method: Literal["logit-scale"] = NAME
    init: float = Field(1.0, gt=0, description="The scale's starting value.")


class LogitScale(RestoreMethod):
    """One learned scalar on the logits (trained through a hook on lm_head), folded into lm_head's weight."""

    config: LogitScaleConfig

    def train(self, job: Job, batches: Any, control: TrainControl) -> dict[str, Any]:
        self.scale = torch.nn.Parameter(torch.tensor(self.config.init))
        head = job.model.get_output_embeddings()
        hook = head.register_forward_hook(lambda _m, _a, out: out * self.scale)
        try:
            for p in job.model.parameters():
                p.requires_grad_(False)
            return train_parameters(job.model, [self.scale], batches, lr=self.config.lr,
                                    max_steps=self.config.max_steps, seed=self.seed, **control.options())
        finally:
            hook.remove()

    def merge(self, job: Job, check: Any, progress: Any) -> None:
        with torch.no_grad():
            job.model.get_output_embeddings().weight.mul_(self.scale)

    def export(self, job: Job, out_dir: Path) -> None:
        save_file({"scale": self.scale.detach().reshape(1)}, str(out_dir / "scale.safetensors"))


@pytest.fixture
def logit_scale():
    register(RestorationMethod(NAME, LogitScaleConfig, "a learned logit scale", default_lr=0.05), LogitScale)
    yield
    unregister(NAME)
    assert NAME not in restoration_methods()


def _spec(tmp_path: Path, **restoration: Any) -> dict[str, Any]:
    model = save_tiny("llama", tmp_path / "model")
    train = write_jsonl(tmp_path / "train.jsonl", instruction_rows(16))
    text = write_jsonl(tmp_path / "text.jsonl", text_rows(6))
    return {"model": {"id": str(model)}, "pruning": {"method": "magnitude", "sparsity": 0.5},
            "restoration": {"method": NAME, "max_steps": 3, "batch_size": 4, "max_seq_len": 64, **restoration},
            "data": {"train": str(train)}, "evaluation": {"perplexity": [str(text)], "limit": 6, "dense": False}}


def test_a_registered_method_validates_and_runs_through_the_runner(tmp_path, logit_scale):
    spec = JobSpec.model_validate(_spec(tmp_path, init=0.9, max_grad_norm=1e-6))
    assert spec.restoration.lr == 0.05  # the catalogue's default rate
    assert planned_stages(spec) == [Stage.loading, Stage.pruning, Stage.training, Stage.merging,
                                    Stage.evaluating, Stage.exporting]
    with pytest.raises(ValidationError, match="not a setting of restoration.method 'logit-scale'"):
        JobSpec.model_validate(_spec(tmp_path, heads=0.5))  # another method's setting

    out = tmp_path / "out"
    report = run_pipeline(spec, out, ConsoleReporter(quiet=True))

    assert report["restoration"]["method"] == NAME
    assert report["restoration"]["trainable_params"] == 1 and report["restoration"]["steps"] == 3
    assert report["restoration"]["clipped_steps"] == 3  # the shared settings reach a registered method too
    assert report["checks"]["zeros_identical"] is True
    scale = float(load_file(str(out / "scale.safetensors"))["scale"])
    assert scale != pytest.approx(0.9, abs=1e-6)  # it trained
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "model").lm_head.weight
    restored = AutoModelForCausalLM.from_pretrained(out / "model").lm_head.weight
    assert torch.allclose(restored, pruned * scale, rtol=1e-6, atol=0)  # lm_head is not pruned: only scaled
    assert json.loads((out / "report.json").read_text())["spec"]["restoration"]["init"] == 0.9


def test_an_unregistered_method_is_refused_by_name(tmp_path):
    with pytest.raises(ValidationError, match="'logit-scale' is not a restoration method"):
        JobSpec.model_validate(_spec(tmp_path))
