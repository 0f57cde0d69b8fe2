"""A layer-streamed job checkpoints and resumes like a whole-model one: kill -9 mid-training, then the same command
again, and the exported model is an uninterrupted run's byte for byte — also when the resuming run's memory plan
chose the other mode (`model.streaming: auto` on a worker with more, or less, memory)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.plan import Shapes, make_plan
from app.schemas import JobSpec
from tests.integration.test_cli_run import make_spec, write_job_data
from tests.integration.test_resume import RUNS, Run, _no_run_outlives_its_test, _sha  # noqa: F401 (fixture)
from tests.tiny import save_tiny


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> dict:
    """A RestoreLCC job with `streaming: auto`, and the memory budgets under which its plan streams or does not."""
    d = write_job_data(tmp_path_factory.mktemp("resume-streamed"))
    spec = make_spec(str(save_tiny("llama", d / "model")), d, restoration={
        "method": "restorelcc", "heads": 0.25, "probe_samples": 24, "max_steps": 40, "batch_size": 4,
        "max_seq_len": 64, "negatives": "tfidf"})
    spec["pruning"] = {"method": "sparsegpt", "sparsity": 0.5, "calibration_samples": 16, "seq_len": 32}
    spec["model"]["streaming"] = "auto"
    path = d / "spec.json"
    path.write_text(json.dumps(spec))
    parsed = JobSpec.model_validate(spec)
    shapes = Shapes.from_config(json.loads((d / "model" / "config.json").read_text()))
    whole = make_plan(parsed, shapes, "cpu").peak()[1]
    streamed = make_plan(parsed, shapes, "cpu", streaming=True).peak()[1]
    assert streamed < whole
    budgets = {"streaming": str((whole + streamed) // 2), "whole": str(whole + 2**20)}
    ref = d / "reference"
    Run(path, ref / "out", ref / "checkpoints", env={"RESTORELCC_MAX_DEVICE_MEMORY": budgets["whole"]}).finish()
    return {"spec": path, "budgets": budgets, "model": _sha(ref / "out" / "model" / "model.safetensors"),
            "metrics": json.loads((ref / "out" / "report.json").read_text())["metrics"]}


def _mode(out: Path) -> str:
    return json.loads((out / "report.json").read_text())["plan"]["mode"]


@pytest.mark.parametrize("first, second, stop_at", [
    ("streaming", "streaming", "checkpoint:training:20"),
    # inside pruning, one of the two layers done: the layer's part and the next layer's inputs cross modes
    ("streaming", "whole", "checkpoint:pruning:1"), ("whole", "streaming", "checkpoint:pruning:1"),
])
def test_a_killed_run_resumes_to_the_same_bytes_in_either_mode(job, tmp_path, first, second, stop_at):
    out, checkpoints = tmp_path / "out", tmp_path / "checkpoints"
    killed = Run(job["spec"], out, checkpoints, stop_at=stop_at,
                 env={"RESTORELCC_MAX_DEVICE_MEMORY": job["budgets"][first]})
    killed.kill_at_failpoint()
    saved = killed.manifest()
    point, step = stop_at.split(":")[1], int(stop_at.split(":")[2])
    assert saved["point"] == point and saved["meta"]["step"] == step
    layers = sorted(p for p in saved["parts"] if p.startswith("layer-"))
    assert layers == [f"layer-{i:04d}" for i in range(1 if point == "pruning" else 2)]  # each layer once, as done
    assert "weights" not in saved["parts"]
    resumed = Run(job["spec"], out, checkpoints, env={"RESTORELCC_MAX_DEVICE_MEMORY": job["budgets"][second]})
    resumed.finish()
    assert f"resuming from the checkpoint taken at {point} ({point}, step {step})" in resumed.text(), resumed.text()
    assert _mode(out) == second
    assert _sha(out / "model" / "model.safetensors") == job["model"]
    report = json.loads((out / "report.json").read_text())
    assert report["metrics"] == job["metrics"] and report["checks"]["zeros_identical"] is True
    assert not list(checkpoints.glob("*/checkpoint.json"))  # deleted on success
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # no scratch layers left
