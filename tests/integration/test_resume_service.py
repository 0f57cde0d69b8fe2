"""Resumable jobs in the distributed setup (Celery worker, Redis, PostgreSQL, local artifact store): a worker
killed with -9 mid-training, or stopped with SIGTERM, and a new worker: the job resumes from its newest checkpoint
and exports the same model bytes as a job that was never interrupted; checkpoints go once the job succeeds."""

from __future__ import annotations

import json
import os
import signal

import pytest

from app.store.artifacts import LocalStore, checkpoint_prefix
from tests.conftest import wait_until
from tests.integration.test_service_celery import running_service
from worker.run.resume import POINT_STAGE

pytestmark = pytest.mark.postgres
STEPS = 300


@pytest.fixture(scope="module")
def service(tmp_path_factory, tiny_assets):
    with running_service(tmp_path_factory.mktemp("resume"), tiny_assets,
                         RESTORELCC_CHECKPOINT_EVERY_STEPS="10") as service:
        yield service


def _spec(tiny_assets) -> dict:
    spec = tiny_assets.spec(restore=True, slow=True)  # slow: each evaluation takes seconds, time to kill in it
    spec["restoration"].update(max_steps=STEPS, batch_size=2)
    return spec


def _files(service, job_id: str) -> dict[str, str]:
    return {a.name: a.sha256 for a in service.jobs.artifacts(job_id)}


def _checkpoint(service, job_id: str) -> dict | None:
    path = service.data_dir / "artifacts" / checkpoint_prefix(job_id) / "checkpoint.json"
    return json.loads(path.read_text()) if path.is_file() else None


@pytest.fixture(scope="module")
def reference(service, tiny_assets) -> dict[str, str]:
    job = service.client.create(_spec(tiny_assets))
    done = service.wait_status(job.id, {"succeeded", "failed", "cancelled"}, timeout=240)
    assert done.status.value == "succeeded", done.error
    assert LocalStore(service.data_dir / "artifacts").list_prefix(checkpoint_prefix(job.id)) == []  # gone
    assert service.jobs.get(job.id).checkpoint_bytes == 0
    return _files(service, job.id)


def _in_stage(service, job_id: str, stage: str, point: str, step: int = 0):
    def ready():
        job = service.jobs.get(job_id)
        ck = _checkpoint(service, job_id)
        return job.stage == stage and ck is not None and ck["point"] == point and (ck["meta"]["step"] or 0) >= step
    return ready


def _resumed(service, job_id: str) -> list[dict]:
    return [e.data for e in service.client.events(job_id) if e.kind == "resumed"]


@pytest.mark.parametrize("stage, point, step", [
    ("pruning", "pruned", 0),  # evaluating the pruned model: its weights are checkpointed
    ("training", "training", 20),
    ("evaluating", "training", STEPS),  # the last checkpoint: training's end
])
def test_a_killed_worker_resumes_on_the_next_worker(service, tiny_assets, reference, stage, point, step):
    job = service.client.create(_spec(tiny_assets))
    wait_until(_in_stage(service, job.id, stage, point, step), timeout=240,
               what=lambda: service.jobs.get(job.id).progress_message)
    assert service.jobs.get(job.id).checkpoint_bytes > 0
    os.killpg(service.worker.pid, signal.SIGKILL)  # the main process and its pool children
    service.worker.wait(timeout=30)
    saved = _checkpoint(service, job.id)
    service.worker = service.start_worker()
    done = service.wait_status(job.id, {"succeeded", "failed", "cancelled"}, timeout=240)
    assert done.status.value == "succeeded", done.error
    assert _resumed(service, job.id) == [{"checkpoint": saved["point"], "stage": POINT_STAGE[saved["point"]].value,
                                          "step": saved["meta"]["step"], "attempt": 2}]
    if stage == "training":
        assert 20 <= saved["meta"]["step"] < STEPS
    files = _files(service, job.id)
    assert files["model/model.safetensors"] == reference["model/model.safetensors"]
    assert _checkpoint(service, job.id) is None and service.jobs.get(job.id).checkpoint_bytes == 0


def test_a_stopped_worker_checkpoints_and_the_next_worker_resumes(service, tiny_assets, reference, tmp_path):
    """SIGTERM: the job stops at its next step with a checkpoint of that step, goes back to the queue (not
    failed, not counted as a run), the worker exits; the next worker resumes from that step."""
    job = service.client.create(_spec(tiny_assets))
    wait_until(_in_stage(service, job.id, "training", "training", 20), timeout=240,
               what=lambda: service.jobs.get(job.id).progress_message)
    os.kill(service.worker.pid, signal.SIGTERM)
    assert service.worker.wait(timeout=60) == 0
    stopped = service.jobs.get(job.id)
    saved = _checkpoint(service, job.id)
    assert (stopped.status, stopped.attempts) == ("queued", 0)
    assert saved["point"] == "training" and 20 <= saved["meta"]["step"] < STEPS
    service.worker = service.start_worker()
    done = service.wait_status(job.id, {"succeeded", "failed", "cancelled"}, timeout=240)
    assert done.status.value == "succeeded", done.error
    assert _resumed(service, job.id) == [{"checkpoint": "training", "stage": "training",
                                          "step": saved["meta"]["step"], "attempt": 2}]
    assert _files(service, job.id)["model/model.safetensors"] == reference["model/model.safetensors"]
    service.client.download(job.id, "report.json", tmp_path / "report.json")
    report = json.loads((tmp_path / "report.json").read_text())
    assert [(a["attempt"], a["resumed_from"]) for a in report["attempts"]] == [
        (1, None), (2, {"checkpoint": "training", "stage": "training", "step": saved["meta"]["step"]})]
