"""The real demo model (SmolLM2-135M-Instruct) through the pipeline: slow tier (`scripts/test.sh -m slow`).

The exported directory must reload with plain transformers and give exactly the numbers the report holds.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.tiny import instruction_rows, text_rows, write_jsonl

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, str]:
    """Small generated sets: these tests check that the export reloads exactly, which any rows show, and a
    machine without the reference data runs the same test."""
    d = tmp_path_factory.mktemp("data")
    return {"train": str(write_jsonl(d / "train.jsonl", instruction_rows(64))),
            "text": str(write_jsonl(d / "text.jsonl", text_rows(40)))}


def _run(tmp_path: Path, data: dict[str, str], restoration: dict) -> tuple[dict, Path]:
    from app.schemas import JobSpec
    from worker.assets.models import demo_model_dir
    from worker.reporting import NullReporter
    from worker.run.pipeline import run_pipeline

    spec = JobSpec.model_validate({
        "model": {"id": str(demo_model_dir()), "dtype": "float32"},
        "pruning": {"method": "wanda", "sparsity": 0.5, "calibration_samples": 8, "seq_len": 128},
        "restoration": restoration,
        "data": {"train": data["train"]},
        "evaluation": {"perplexity": [data["text"]], "limit": 24, "max_seq_len": 128, "dense": False},
    })
    out = tmp_path / "out"
    return run_pipeline(spec, out, NullReporter()), out


def _ppl_of_export(out: Path, text_path: str) -> float:
    from worker.model.data import read_texts
    from worker.model.load import load_model, resolve_source
    from worker.run.evaluate import perplexity

    model = AutoModelForCausalLM.from_pretrained(out / "model").eval()  # plain transformers
    _, tok = load_model(resolve_source(str(out / "model")), "float32")
    with torch.no_grad():
        return perplexity(model, tok, read_texts(text_path, limit=24), batch_size=8, max_len=128)["ppl"]


def test_pruned_smollm2_reloads_with_the_reported_numbers(tmp_path, data):
    report, out = _run(tmp_path, data, {"method": "none"})
    assert abs(report["sparsity"]["overall"] - 0.5) < 1e-3
    name = Path(data["text"]).stem
    assert _ppl_of_export(out, data["text"]) == pytest.approx(report["metrics"]["pruned"][name]["ppl"], rel=1e-6)


def test_restored_smollm2_reloads_merged_and_exact(tmp_path, data):
    report, out = _run(tmp_path, data, {
        "method": "restorelcc", "heads": 0.1, "probe_samples": 32, "max_steps": 3, "batch_size": 4,
        "max_seq_len": 128,
    })
    assert report["checks"]["zeros_identical"] is True
    assert report["checks"]["merged_vs_hooked_max_abs_diff"] <= 1e-4
    # The default directions (0.66 of head_dim 64: 42) for β plus a 64-wide α, on each of 27 heads.
    assert report["restoration"]["trainable_params"] == 27 * (42 + 64)
    name = Path(data["text"]).stem
    assert _ppl_of_export(out, data["text"]) == pytest.approx(report["metrics"]["restored"][name]["ppl"], rel=1e-6)
