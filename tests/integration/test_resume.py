"""kill -9 of `restorelcc run --checkpoints` during pruning, training and evaluation, then the same command again:
the run resumes from the newest checkpoint, says so, and writes the same model bytes and metrics as a run that was
never interrupted."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.conftest import wait_until
from tests.integration.test_cli_run import ENV, make_spec
from tests.tiny import choice_rows, instruction_rows, save_tiny, text_rows, write_jsonl

ROOT = Path(__file__).parents[2]


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("resume")
    write_jsonl(d / "train.jsonl", instruction_rows(48))
    write_jsonl(d / "valid.jsonl", instruction_rows(60)[48:])
    write_jsonl(d / "text.jsonl", text_rows(12))
    write_jsonl(d / "long.jsonl", text_rows(300))  # evaluated second, for seconds: time to kill after the first
    write_jsonl(d / "boolq.jsonl", choice_rows(10))
    spec = make_spec(str(save_tiny("llama", d / "model")), d, restoration={
        "method": "restorelcc", "heads": 0.25, "probe_samples": 24, "max_steps": 120, "batch_size": 4,
        "max_seq_len": 64})
    spec["pruning"] = {"method": "sparsegpt", "sparsity": 0.5, "calibration_samples": 16, "seq_len": 32}
    spec["evaluation"].update(limit=None, perplexity=[str(d / "text.jsonl"), str(d / "long.jsonl")])
    path = d / "spec.json"
    path.write_text(json.dumps(spec))
    return {"spec": path, "root": d}


class Run:
    """`restorelcc run` in its own process group, its stderr collected as it comes."""

    def __init__(self, spec: Path, out: Path, checkpoints: Path):
        self.checkpoints = checkpoints
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "run", str(spec), "--out", str(out), "--checkpoints",
             str(checkpoints), "--checkpoint-every", "10"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV, cwd=ROOT, start_new_session=True)
        self.err = b""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while chunk := os.read(self.proc.stderr.fileno(), 65536):
            self.err += chunk

    def text(self) -> str:
        return self.err.decode(errors="replace")

    def manifest(self) -> dict | None:
        found = list(self.checkpoints.glob("*/checkpoint.json"))
        try:
            return json.loads(found[0].read_text()) if found else None
        except ValueError:  # being replaced
            return None

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def finish(self, timeout: float = 240) -> str:
        out = self.proc.stdout.read()  # not communicate(): it would read stderr too, away from the reader thread
        self.proc.wait(timeout=timeout)
        self._reader.join(timeout=5)
        assert self.proc.returncode == 0, self.text()[-3000:]
        return out.decode()


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _restoration(path: Path) -> tuple[dict, dict]:
    """restoration.safetensors as (metadata, tensor bytes): its metadata's order in the file is not fixed."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        return fh.metadata(), {k: fh.get_tensor(k).numpy().tobytes() for k in fh.keys()}  # noqa: SIM118


@pytest.fixture(scope="module")
def reference(job, tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("reference")
    Run(job["spec"], d / "out", d / "checkpoints").finish()
    return {"model": _sha(d / "out" / "model" / "model.safetensors"),
            "restoration": _restoration(d / "out" / "restoration.safetensors"),
            "metrics": json.loads((d / "out" / "report.json").read_text())["metrics"]}


def _in_stage(run: Run, stage: str, point: str, min_step: int = 0, partial: str | None = None):
    """Ready to kill: in ``stage``, with a checkpoint at ``point`` (at least ``min_step``; with ``partial``, holding
    a finished set of that evaluation)."""
    def ready():
        m = run.manifest()
        if run.proc.poll() is not None:
            raise AssertionError(f"the run ended before it could be killed in {stage}:\n{run.text()[-2000:]}")
        return (f"── {stage}" in run.text() and m is not None and m["point"] == point
                and (m["meta"].get("step") or 0) >= min_step
                and (partial is None or bool(m["meta"]["report"].get("partial_metrics", {}).get(partial))))
    return ready


@pytest.mark.parametrize("stage, point, resumed_stage, partial", [
    # killed while the pruned model is evaluated: the pruned weights and the sets evaluated so far are kept
    ("pruning", "pruned", "pruning", "pruned"),
    ("training", "training", "training", None),
    # the last checkpoint before evaluating is training's end; the sets already evaluated are noted in it
    ("evaluating", "training", "training", "restored"),
])
def test_killed_runs_resume_to_the_same_bytes(job, reference, tmp_path, stage, point, resumed_stage, partial):
    first = Run(job["spec"], tmp_path / "out", tmp_path / "checkpoints")
    wait_until(_in_stage(first, stage, point, min_step=20 if stage == "training" else 0, partial=partial),
               timeout=240, what=lambda: first.text()[-1500:])
    first.kill()
    saved = first.manifest()
    assert f"── {stage}" in first.text() and not (tmp_path / "out" / "report.json").exists()
    second = Run(job["spec"], tmp_path / "out", tmp_path / "checkpoints")
    second.finish()
    step = f", step {saved['meta']['step']}" if saved["meta"].get("step") is not None else ""
    assert f"resuming from the checkpoint taken at {saved['point']} ({resumed_stage}{step})" in second.text(), \
        second.text()[:3000]
    if stage == "training":
        assert 20 <= saved["meta"]["step"] < 120  # resumed mid-training, not from its start or end
    if partial is not None:  # killed part-way through that evaluation: some of its sets were finished
        assert set(saved["meta"]["report"]["partial_metrics"][partial]) < set(reference["metrics"][partial])
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert "partial_metrics" not in report
    assert _sha(tmp_path / "out" / "model" / "model.safetensors") == reference["model"]
    assert _restoration(tmp_path / "out" / "restoration.safetensors") == reference["restoration"]
    assert report["metrics"] == reference["metrics"]
    assert [a["attempt"] for a in report["attempts"]] == [1, 2]
    assert report["attempts"][1]["resumed_from"] == {"checkpoint": saved["point"], "stage": resumed_stage,
                                                     "step": saved["meta"].get("step")}


def test_a_distill_run_killed_in_training_resumes_to_the_same_bytes(job, tmp_path_factory):
    """The dense targets travel with the checkpoints: a distill run killed mid-training needs no dense model to go on,
    and ends as the uninterrupted run does."""
    spec = json.loads(job["spec"].read_text())
    spec["restoration"].update(objective="distill", distill_top_k=16, sft_weight=0.25)
    spec["evaluation"]["perplexity"] = spec["evaluation"]["perplexity"][:1]
    path = job["root"] / "distill.json"
    path.write_text(json.dumps(spec))
    ref_dir, run_dir = tmp_path_factory.mktemp("distill-ref"), tmp_path_factory.mktemp("distill-run")
    Run(path, ref_dir / "out", ref_dir / "checkpoints").finish()
    ref_report = json.loads((ref_dir / "out" / "report.json").read_text())
    targets = ref_report["dense_targets"]
    assert ref_report["restoration"]["objective"] == "distill" and targets["top_k"] == 16
    assert targets["bytes_per_token"] == pytest.approx(16 * 6 + 8, abs=1)

    first = Run(path, run_dir / "out", run_dir / "checkpoints")
    wait_until(_in_stage(first, "training", "training", min_step=20), timeout=240, what=lambda: first.text()[-1500:])
    first.kill()
    saved = first.manifest()
    second = Run(path, run_dir / "out", run_dir / "checkpoints")
    second.finish()
    assert f"step {saved['meta']['step']}" in second.text() and 20 <= saved["meta"]["step"] < 120
    assert _sha(run_dir / "out" / "model" / "model.safetensors") == _sha(ref_dir / "out" / "model" /
                                                                          "model.safetensors")
    report = json.loads((run_dir / "out" / "report.json").read_text())
    assert report["metrics"] == ref_report["metrics"]
    assert report["restoration"]["loss_curve"] == ref_report["restoration"]["loss_curve"]
