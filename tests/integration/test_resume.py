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
from tests.integration.test_cli_run import ENV, make_spec, write_job_data
from tests.tiny import save_tiny, text_rows, write_jsonl
from worker.run import failpoints

ROOT = Path(__file__).parents[2]


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> dict:
    d = write_job_data(tmp_path_factory.mktemp("resume"))
    write_jsonl(d / "long.jsonl", text_rows(300))  # evaluated second: a kill after the first set leaves it undone
    spec = make_spec(str(save_tiny("llama", d / "model")), d, restoration={
        "method": "restorelcc", "heads": 0.25, "probe_samples": 24, "max_steps": 120, "batch_size": 4,
        "max_seq_len": 64})
    spec["pruning"] = {"method": "sparsegpt", "sparsity": 0.5, "calibration_samples": 16, "seq_len": 32}
    spec["evaluation"].update(limit=None, perplexity=[str(d / "text.jsonl"), str(d / "long.jsonl")])
    path = d / "spec.json"
    path.write_text(json.dumps(spec))
    return {"spec": path, "root": d}


RUNS: list[Run] = []


@pytest.fixture(autouse=True)
def _no_run_outlives_its_test():
    """A run left behind by a failed test (stopped at its failpoint, or still running) is killed."""
    yield
    while RUNS:
        run = RUNS.pop()
        if run.proc.poll() is None:
            os.killpg(run.proc.pid, signal.SIGKILL)
            run.proc.wait(timeout=30)


class Run:
    """`restorelcc run` in its own process group, its stderr collected as it comes."""

    def __init__(self, spec: Path, out: Path, checkpoints: Path, stop_at: str | None = None,
                 env: dict[str, str] | None = None):
        RUNS.append(self)
        self.checkpoints = checkpoints
        env = {**ENV, **(env or {})} if stop_at is None else {**ENV, **(env or {}), failpoints.ENV: stop_at}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "run", str(spec), "--out", str(out), "--checkpoints",
             str(checkpoints), "--checkpoint-every", "10", "--checkpoint-every-layers", "1"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT, start_new_session=True)
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

    def stopped(self) -> bool:
        """Whether the run stopped itself at its failpoint (state T); fails at once if it ended instead."""
        if self.proc.poll() is not None:
            raise AssertionError(f"the run ended before its failpoint:\n{self.text()[-2000:]}")
        stat = Path(f"/proc/{self.proc.pid}/stat").read_text()
        return stat[stat.rindex(")") + 2] == "T"

    def kill_at_failpoint(self) -> None:
        """Wait for the run to reach its failpoint, then kill -9 its process group."""
        wait_until(self.stopped, timeout=240, what=lambda: self.text()[-1500:])
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        self._reader.join(timeout=5)

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


@pytest.mark.parametrize("stage, stop_at, point, resumed_stage, partial", [
    # killed inside SparseGPT, its first layer done: that layer and the second layer's inputs are kept
    ("pruning", "checkpoint:pruning:1", "pruning", "pruning", None),
    # killed while the pruned model is evaluated, one set done: the pruned weights and that set are kept
    ("pruning", "evaluated:pruned:1", "pruned", "pruning", "pruned"),
    ("training", "checkpoint:training:30", "training", "training", None),
    # the last checkpoint before evaluating is training's end; the sets already evaluated are noted in it
    ("evaluating", "evaluated:restored:1", "training", "training", "restored"),
])
def test_killed_runs_resume_to_the_same_bytes(job, reference, tmp_path, stage, stop_at, point, resumed_stage,
                                              partial):
    first = Run(job["spec"], tmp_path / "out", tmp_path / "checkpoints", stop_at=stop_at)
    first.kill_at_failpoint()
    saved = first.manifest()
    assert saved is not None and saved["point"] == point
    assert f"── {stage}" in first.text() and not (tmp_path / "out" / "report.json").exists()
    second = Run(job["spec"], tmp_path / "out", tmp_path / "checkpoints")
    second.finish()
    step = f", step {saved['meta']['step']}" if saved["meta"].get("step") is not None else ""
    assert f"resuming from the checkpoint taken at {saved['point']} ({resumed_stage}{step})" in second.text(), \
        second.text()[:3000]
    if stage == "training":
        assert saved["meta"]["step"] == 30  # resumed mid-training, not from its start or end
    if point == "pruning":  # one layer in the checkpoint, and the next layer's calibration inputs
        assert saved["meta"]["step"] == 1 and {"layer-0000", "calibration"} <= set(saved["parts"])
        assert "layer-0001" not in saved["parts"]
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

    first = Run(path, run_dir / "out", run_dir / "checkpoints", stop_at="checkpoint:training:30")
    first.kill_at_failpoint()
    saved = first.manifest()
    second = Run(path, run_dir / "out", run_dir / "checkpoints")
    second.finish()
    assert saved["point"] == "training" and saved["meta"]["step"] == 30 and "step 30" in second.text()
    assert _sha(run_dir / "out" / "model" / "model.safetensors") == _sha(ref_dir / "out" / "model" /
                                                                          "model.safetensors")
    report = json.loads((run_dir / "out" / "report.json").read_text())
    assert report["metrics"] == ref_report["metrics"]
    assert report["restoration"]["loss_curve"] == ref_report["restoration"]["loss_curve"]
    assert report["restoration"]["grad_norm_curve"] == ref_report["restoration"]["grad_norm_curve"]


def test_a_calibration_file_changed_since_the_pruning_checkpoint_fails_the_resume(job, tmp_path):
    """The saved calibration inputs came from the calibration tokens: a resumed run whose calibration file no longer
    gives those tokens fails invalid_data naming the field, instead of pruning on from inputs of other text."""
    spec = json.loads(job["spec"].read_text())
    train = tmp_path / "train.jsonl"
    train.write_text(Path(spec["data"]["train"]).read_text())
    spec["data"]["train"] = str(train)
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    first = Run(path, tmp_path / "out", tmp_path / "checkpoints", stop_at="checkpoint:pruning:1")
    first.kill_at_failpoint()
    assert first.manifest()["point"] == "pruning"
    rows = train.read_text().splitlines()
    train.write_text("\n".join(reversed(rows)) + "\n")  # the same rows, another calibration stream
    second = Run(path, tmp_path / "out", tmp_path / "checkpoints")
    second.proc.wait(timeout=240)
    second._reader.join(timeout=5)
    assert second.proc.returncode == 2, second.text()[-2000:]
    assert "error [invalid_data] (data.train)" in second.text() and "pruning checkpoint" in second.text()


def test_a_training_file_changed_since_a_training_checkpoint_fails_the_resume(job, tmp_path):
    """The probe inputs and the position in the training data a training checkpoint holds came from data.train: a
    resumed run whose file has other content fails invalid_data naming the field instead of training on misaligned;
    the report of a run names the digest of every file it read."""
    spec = json.loads(job["spec"].read_text())
    train = tmp_path / "train.jsonl"
    train.write_text(Path(spec["data"]["train"]).read_text())
    spec["data"]["train"] = str(train)
    spec["pruning"] = {"method": "magnitude", "sparsity": 0.5}  # no calibration digest: only the data check can tell
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    first = Run(path, tmp_path / "out", tmp_path / "checkpoints", stop_at="checkpoint:training:10")
    first.kill_at_failpoint()
    saved = first.manifest()
    assert saved["point"] == "training"
    rows = train.read_text().splitlines()
    train.write_text("\n".join(rows[1:] + rows[:1]) + "\n")  # as many rows, as many bytes, another order
    second = Run(path, tmp_path / "out", tmp_path / "checkpoints")
    second.proc.wait(timeout=240)
    second._reader.join(timeout=5)
    assert second.proc.returncode == 2, second.text()[-2000:]
    assert "error [invalid_data] (data.train)" in second.text() and "training checkpoint" in second.text()
    train.write_text("\n".join(rows) + "\n")  # the file as it was: the run goes on from its checkpoint
    third = Run(path, tmp_path / "out", tmp_path / "checkpoints")
    third.finish()
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    digest = hashlib.sha256(train.read_bytes()).hexdigest()
    assert report["data"]["data.train"] == {"path": str(train), "sha256": digest, "bytes": train.stat().st_size}
    assert report["attempts"][-1]["resumed_from"]["checkpoint"] == "training"


def test_a_resumed_hub_model_is_read_at_the_commit_its_checkpoints_came_from(job, tmp_path):
    """A hub branch that moves while a job is down (a push to main between preemption and retry) does not mix two
    versions: the resumed run reads the model at the commit the first one did, or, when that commit is no longer
    there, fails model_not_found naming model.id and how to start over; the report and the model card name it."""
    first_sha, second_sha = "a" * 40, "b" * 40
    cache = tmp_path / "hub"
    repo = cache / "models--tiny-org--tiny-llama"
    save_tiny("llama", repo / "snapshots" / first_sha, seed=0)
    save_tiny("llama", repo / "snapshots" / second_sha, seed=1)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(first_sha)
    spec = json.loads(job["spec"].read_text())
    spec["model"]["id"] = "tiny-org/tiny-llama"
    spec["pruning"] = {"method": "magnitude", "sparsity": 0.5}
    spec["restoration"]["max_steps"] = 30
    spec["evaluation"]["perplexity"] = spec["evaluation"]["perplexity"][:1]
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    env = {"HF_HUB_CACHE": str(cache)}
    Run(path, tmp_path / "ref", tmp_path / "ref-checkpoints", env=env).finish()
    reference = json.loads((tmp_path / "ref" / "report.json").read_text())
    assert reference["model"]["commits"] == {"model.id": first_sha}
    assert f"commit `{first_sha}`" in (tmp_path / "ref" / "model" / "README.md").read_text()

    first = Run(path, tmp_path / "out", tmp_path / "checkpoints", stop_at="checkpoint:training:10", env=env)
    first.kill_at_failpoint()
    assert first.manifest()["point"] == "training"
    (repo / "refs" / "main").write_text(second_sha)  # main moves on, and the first commit leaves the cache
    (repo / "snapshots" / first_sha).rename(tmp_path / "kept")
    gone = Run(path, tmp_path / "out", tmp_path / "checkpoints", env=env)
    gone.proc.wait(timeout=240)
    gone._reader.join(timeout=5)
    assert gone.proc.returncode == 2, gone.text()[-2000:]
    assert "error [model_not_found] (model.id)" in gone.text() and f"commit {first_sha}" in gone.text()
    assert "start over" in gone.text()

    (tmp_path / "kept").rename(repo / "snapshots" / first_sha)  # back in the cache; main still names the second
    resumed = Run(path, tmp_path / "out", tmp_path / "checkpoints", env=env)
    resumed.finish()
    assert "resuming from the checkpoint taken at training" in resumed.text()
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["model"]["commits"] == {"model.id": first_sha}
    assert report["model"]["source"] == reference["model"]["source"]  # as the uninterrupted run names it
    assert _sha(tmp_path / "out" / "model" / "model.safetensors") == _sha(tmp_path / "ref" / "model" /
                                                                           "model.safetensors")
    assert report["metrics"] == reference["metrics"]


def test_a_local_model_replaced_since_a_checkpoint_fails_the_resume(job, tmp_path):
    """A model directory replaced between a kill and the resume (an updated model of the same architecture) fails
    model_not_found naming model.id and how to start over, instead of lending its embeddings and norms to the
    checkpoint's pruned Linears; put back, the model resumes from its checkpoint."""
    model = save_tiny("llama", tmp_path / "model")
    spec = json.loads(job["spec"].read_text())
    spec["model"]["id"] = str(model)
    spec["pruning"] = {"method": "magnitude", "sparsity": 0.5}
    spec["restoration"]["max_steps"] = 30
    spec["evaluation"]["perplexity"] = spec["evaluation"]["perplexity"][:1]
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    first = Run(path, tmp_path / "out", tmp_path / "checkpoints", stop_at="checkpoint:pruned")
    first.kill_at_failpoint()
    saved = first.manifest()
    assert saved["point"] == "pruned" and set(saved["meta"]["report"]["model_files"]) == {"model.id"}
    model.rename(tmp_path / "kept")
    save_tiny("llama", model, seed=1)
    replaced = Run(path, tmp_path / "out", tmp_path / "checkpoints")
    replaced.proc.wait(timeout=240)
    replaced._reader.join(timeout=5)
    assert replaced.proc.returncode == 2, replaced.text()[-2000:]
    assert "error [model_not_found] (model.id)" in replaced.text() and "pruned checkpoint" in replaced.text()
    assert "start over" in replaced.text()

    for f in model.iterdir():
        f.unlink()
    model.rmdir()
    (tmp_path / "kept").rename(model)  # a rename keeps every file's modification time
    resumed = Run(path, tmp_path / "out", tmp_path / "checkpoints")
    resumed.finish()
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["attempts"][-1]["resumed_from"]["checkpoint"] == "pruned"
    assert report["model_files"] == saved["meta"]["report"]["model_files"]
