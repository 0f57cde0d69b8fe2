"""Jobs run layer-streamed (`model.streaming`) end to end through `restorelcc run`: the exported model is the
whole-model job's byte for byte; 'auto' streams exactly when the whole model does not fit the memory budget; what
cannot be streamed is refused before any weight loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from app.plan import Shapes, make_plan
from app.schemas import JobSpec

ROOT = Path(__file__).parents[2]


def run(spec: dict, out: Path, **env: str) -> subprocess.CompletedProcess:
    out.parent.mkdir(parents=True, exist_ok=True)
    spec_file = out.with_suffix(".json")
    spec_file.write_text(json.dumps(spec))
    full = {**{k: v for k, v in os.environ.items() if not k.startswith("RESTORELCC_")}, "HF_HUB_OFFLINE": "1", **env}
    return subprocess.run([sys.executable, "-m", "worker.cli", "run", str(spec_file), "--out", str(out), "--quiet"],
                          capture_output=True, text=True, timeout=600, env=full, cwd=ROOT)


def with_streaming(spec: dict, mode: str) -> dict:
    """``spec`` with ``model.streaming`` set (and TF-IDF negatives where it probes: no embedding model to load)."""
    restoration = dict(spec["restoration"])
    if restoration["method"] == "restorelcc":
        restoration["negatives"] = "tfidf"
    return {**spec, "model": {**spec["model"], "streaming": mode}, "restoration": restoration}


def test_a_streamed_job_exports_the_whole_jobs_model_byte_for_byte(tmp_path, tiny_assets):
    spec = tiny_assets.spec(restore=True)
    spec["pruning"] = {"method": "wanda", "calibration_samples": 8, "seq_len": 32}
    whole = run(with_streaming(spec, "off"), tmp_path / "whole")
    streamed = run(with_streaming(spec, "on"), tmp_path / "streamed")
    assert whole.returncode == 0, whole.stderr
    assert streamed.returncode == 0, streamed.stderr
    a, b = tmp_path / "whole", tmp_path / "streamed"
    assert (a / "model" / "model.safetensors").read_bytes() == (b / "model" / "model.safetensors").read_bytes()
    configs = [json.loads((d / "model" / "config.json").read_text()) for d in (a, b)]
    assert configs[0] == configs[1]
    ra, rb = (json.loads((d / "report.json").read_text()) for d in (a, b))
    assert ra["plan"]["mode"] == "whole" and rb["plan"]["mode"] == "streaming"
    assert ra["metrics"] == rb["metrics"] and ra["sparsity"] == rb["sparsity"]
    assert rb["checks"]["zeros_identical"] is True
    assert sorted(p.name for p in b.iterdir()) == sorted(p.name for p in a.iterdir())  # no scratch layers left


def test_auto_streams_exactly_when_the_whole_model_does_not_fit(tmp_path, tiny_assets):
    spec = with_streaming(tiny_assets.spec(restore=True), "auto")
    config = json.loads((tiny_assets.model / "config.json").read_text())
    parsed, shapes = JobSpec.model_validate(spec), Shapes.from_config(config)
    whole = make_plan(parsed, shapes, "cpu").peak()[1]
    streamed = make_plan(parsed, shapes, "cpu", streaming=True).peak()[1]
    assert streamed < whole
    middle = str((whole + streamed) // 2)
    between = run(with_streaming(spec, "auto"), tmp_path / "auto", RESTORELCC_MAX_DEVICE_MEMORY=middle)
    assert between.returncode == 0, between.stderr
    assert json.loads((tmp_path / "auto" / "report.json").read_text())["plan"]["mode"] == "streaming"
    roomy = run(with_streaming(spec, "auto"), tmp_path / "roomy", RESTORELCC_MAX_DEVICE_MEMORY=str(whole + 2**20))
    assert json.loads((tmp_path / "roomy" / "report.json").read_text())["plan"]["mode"] == "whole", roomy.stderr
    off = run(with_streaming(spec, "off"), tmp_path / "off", RESTORELCC_MAX_DEVICE_MEMORY=middle)
    assert off.returncode == 2 and "error [insufficient_memory]" in off.stderr
    tight = run(with_streaming(spec, "auto"), tmp_path / "tight", RESTORELCC_MAX_DEVICE_MEMORY=str(streamed - 2**20))
    assert tight.returncode == 2 and "streamed one layer at a time" in tight.stderr, tight.stderr


def test_what_cannot_stream_is_refused_before_loading(tmp_path, tiny_assets):
    spec = with_streaming(tiny_assets.spec(), "on")
    spec["restoration"] = {"method": "lora", "max_steps": 2, "train_samples": 8}
    proc = run(spec, tmp_path / "lora")
    assert proc.returncode == 2
    assert "error [invalid_spec] (model.streaming)" in proc.stderr
    assert "'lora' does not run on a streamed" in proc.stderr
    assert "── " not in proc.stdout + proc.stderr  # no stage began
