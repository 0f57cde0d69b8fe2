"""A job whose plan splits the model over two devices runs every stage on the model transformers loads by the
split's device map, and exports the whole-model job's model byte for byte.

This machine has no GPU, so the two devices are CPU stand-ins: the worker's device discovery is the one thing
replaced (``plan_memory`` returns the split plan a two-GPU worker would make), and the loaded model gets the
accelerate hooks a split over two GPUs gets (transformers attaches none when every device is the same). What this
checks is the split path itself — the placement, the device map transformers loads by, every stage on a model whose
modules run behind those hooks — not the copies between GPUs, which need a machine with several.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from accelerate import dispatch_model

from app.plan import Shapes, make_plan
from app.schemas import JobSpec
from tests.tiny import save_tiny
from worker.model import load as load_module
from worker.reporting import NullReporter
from worker.run import pipeline
from worker.run.device import DeviceBudget

GiB = 2**30


def spec_for(tiny_assets, kind: str, objective: str, root: Path) -> JobSpec:
    model = str(tiny_assets.model) if kind == "llama" else str(save_tiny(kind, root / kind))
    spec = tiny_assets.spec(model=model, restore=True)
    spec["pruning"] = {"method": "wanda", "calibration_samples": 8, "seq_len": 32}
    spec["restoration"] |= {"negatives": "tfidf", "objective": objective}
    return JobSpec.model_validate(spec)


def split_over_two_stand_ins(monkeypatch, seen: list[dict]) -> None:
    def plan_memory(spec, checked, reporter):
        config = json.loads((Path(checked.source.path) / "config.json").read_text())
        plan = make_plan(spec, Shapes.from_config(config), "cuda", devices=2)
        return pipeline.MemoryChoice("cpu", DeviceBudget("cpu", "2 CPU stand-ins", 64 * GiB, 64 * GiB,
                                                         ("cpu", "cpu")), plan)

    real_load = load_module.load_model

    def load_model(*args, **kwargs):  # what the pipeline asks transformers for, with the hooks two GPUs would get
        seen.append(kwargs.get("device_map") or {})
        model, tokenizer = real_load(*args, **kwargs)
        return dispatch_model(model, device_map=kwargs["device_map"], force_hooks=True), tokenizer

    monkeypatch.setattr(pipeline, "plan_memory", plan_memory)
    monkeypatch.setattr(load_module, "load_model", load_model)


@pytest.mark.parametrize(("kind", "objective"), [("llama", "distill"), ("mistral", "sft")])
def test_a_split_job_exports_the_whole_jobs_model_byte_for_byte(tmp_path, tiny_assets, monkeypatch, kind,
                                                                  objective):
    # mistral is merged as Llama: a new model that must keep the split's device map and hooks
    spec = spec_for(tiny_assets, kind, objective, tiny_assets.model.parents[1])
    whole = pipeline.run_pipeline(spec, tmp_path / "whole", NullReporter())
    seen: list[dict] = []
    split_over_two_stand_ins(monkeypatch, seen)
    split = pipeline.run_pipeline(spec, tmp_path / "split", NullReporter())
    assert split["plan"]["mode"] == "split" and split["environment"]["devices"] == ["cpu", "cpu"]
    layers = split["plan"]["layer_devices"]
    assert seen and all(m[f"model.layers.{i}"] == "cpu" for m in seen for i in range(len(layers)))  # by the map
    a, b = (tmp_path / d / "model" / "model.safetensors" for d in ("whole", "split"))
    assert a.read_bytes() == b.read_bytes()
    assert whole["metrics"] == split["metrics"] and whole["sparsity"] == split["sparsity"]
    assert split["checks"]["zeros_identical"] is True
