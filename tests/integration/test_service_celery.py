"""The distributed setup end to end: real Redis, a real `restorelcc worker` (Celery) subprocess on a unique
queue, PostgreSQL, and the API on a real uvicorn server; jobs on a tiny random model submitted over HTTP."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from app.client import Client
from app.main import create_app
from tests.conftest import (
    KEYS,
    api_settings,
    check_downloaded_model,
    pg_schema,
    serve_in_thread,
    stop_group,
    wait_until,
)

pytestmark = pytest.mark.postgres
ROOT = Path(__file__).parents[2]
REDIS = "redis://127.0.0.1:6379/0"


class Service:
    def __init__(self, client: Client, log: Path, worker: subprocess.Popen, jobs, start_worker, data_dir: Path):
        self.client = client
        self.data_dir = data_dir
        self.jobs = jobs  # the job store, read directly where the API does not show a detail
        self.log = log
        self.worker = worker
        self.start_worker = start_worker  # () -> a new worker process (the fixture stops whichever runs last)

    def wait_status(self, job_id: str, statuses: set[str], timeout: float = 120.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.client.get(job_id)
            if job.status.value in statuses:
                return job
            assert self.worker.poll() is None, f"worker exited:\n{self.log.read_text()[-4000:]}"
            time.sleep(0.2)
        raise AssertionError(f"job {job_id} not {statuses} in {timeout}s: {job.status}\n"
                             f"{self.log.read_text()[-4000:]}")


@pytest.fixture(scope="module")
def service(tmp_path_factory, tiny_assets):
    with running_service(tmp_path_factory.mktemp("celery"), tiny_assets) as service:
        yield service


@contextmanager
def running_service(tmp: Path, tiny_assets, api: dict | None = None, queue: str | None = None,
                    **env_overrides: str) -> Iterator[Service]:
    """The API in a thread and one Celery worker process on a queue of its own; ``env_overrides`` for the worker,
    ``api`` for the API's settings. ``start_worker(*args)`` starts another worker (``--queues big`` ...)."""
    import redis

    queue = queue or f"restorelcc-test-{uuid.uuid4().hex[:10]}"
    with pg_schema() as db_url:
        settings = api_settings(tmp, db_url, redis_url=REDIS, queue=queue,
                                model_roots=[tiny_assets.root / "models"], data_roots=[tiny_assets.root / "data"],
                                **(api or {}))
        app = create_app(settings)
        env = {
            **os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "REDIS_URL": REDIS, "DATABASE_URL": db_url, "RESTORELCC_QUEUE": queue,
            "RESTORELCC_DATA_DIR": str(settings.data_dir),
            "RESTORELCC_MODEL_ROOTS": str(tiny_assets.root / "models"),
            "RESTORELCC_DATA_ROOTS": str(tiny_assets.root / "data"),
            "RESTORELCC_HEARTBEAT_S": "0.5", "RESTORELCC_STALE_AFTER_S": "3", "RESTORELCC_PROGRESS_INTERVAL_S": "0",
            "RESTORELCC_CANCEL_POLL_S": "0.2", "RESTORELCC_REQUEUE_AFTER_S": "2", "RESTORELCC_SWEEP_INTERVAL_S": "0.5",
            **env_overrides,
        }
        log = tmp / "worker.log"
        with serve_in_thread(app) as url, open(log, "w") as log_f:
            def start_worker(*args: str) -> subprocess.Popen:
                return subprocess.Popen(
                    [sys.executable, "-m", "worker.cli", "worker", "--queue", queue, "--concurrency", "1", *args],
                    env=env, cwd=ROOT, stdout=log_f, stderr=subprocess.STDOUT, start_new_session=True,
                )

            service = None
            try:
                with Client(url, api_key=KEYS["alice"], timeout=60) as client:
                    service = Service(client, log, start_worker(), app.state.services.jobs, start_worker,
                                      settings.data_dir)
                    yield service
            finally:
                if service is not None and service.worker.poll() is None:
                    stop_group(service.worker)
                r = redis.Redis.from_url(REDIS)
                for name in (queue, *settings.queues.split(",")) if settings.queues else (queue,):
                    name = name.split("=")[0]
                    r.delete(name, *r.keys(f"{name}\x06\x16*"), *r.keys(f"_kombu.binding.{name}*"))
        app.state.services.jobs.dispose()


def test_job_runs_queued_to_succeeded_with_artifacts(service, tiny_assets, tmp_path):
    import json

    c = service.client
    job = c.create(tiny_assets.spec())
    assert job.status.value == "queued"
    done = service.wait_status(job.id, {"succeeded", "failed", "cancelled"})
    assert done.status.value == "succeeded", done.error
    assert done.progress.fraction == 1.0 and done.started_at and done.finished_at
    assert done.metrics["sparsity"] == pytest.approx(0.5, abs=0.01) and "pruned" in done.metrics

    events = c.events(job.id)
    statuses = [e.data["status"] for e in events if e.kind == "status"]
    assert statuses == ["queued", "running", "succeeded"]
    stages = [e.data["stage"] for e in events if e.kind == "stage"]
    assert stages == ["loading", "pruning", "evaluating", "exporting"]
    fractions = [e.data["fraction"] for e in events if e.kind == "progress"]
    assert len(fractions) >= 4 and fractions == sorted(fractions) and fractions[-1] > 0.9

    arts = {a.name: a for a in c.artifacts(job.id)}
    assert {"report.json", "model/config.json", "model/model.safetensors"} <= set(arts)
    assert all(len(a.sha256) == 64 and a.size > 0 for a in arts.values())
    c.download_all(job.id, tmp_path / "dl")
    report = json.loads((tmp_path / "dl" / "report.json").read_text())
    check_downloaded_model(tmp_path / "dl" / "model", report)
    assert done.metrics["sparsity"] == report["sparsity"]["overall"]


def test_restorelcc_job_over_http(service, tiny_assets, tmp_path):
    import json

    c = service.client
    job = c.create(tiny_assets.spec(restore=True))
    done = service.wait_status(job.id, {"succeeded", "failed", "cancelled"}, timeout=180)
    assert done.status.value == "succeeded", done.error
    stages = [e.data["stage"] for e in c.events(job.id) if e.kind == "stage"]
    assert stages == ["loading", "pruning", "probing", "extracting", "training", "merging", "evaluating",
                      "exporting"]
    assert {"dense", "pruned", "restored"} <= set(done.metrics)
    names = {a.name for a in c.artifacts(job.id)}
    assert {"restoration.safetensors", "report.json", "model/model.safetensors"} <= names
    c.download_all(job.id, tmp_path / "dl")
    check_downloaded_model(tmp_path / "dl" / "model", json.loads((tmp_path / "dl" / "report.json").read_text()))


def test_cancel_queued_and_running_jobs(service, tiny_assets):
    c = service.client
    slow = c.create(tiny_assets.spec(slow=True))
    queued = c.create(tiny_assets.spec())
    service.wait_status(slow.id, {"running"})
    assert c.cancel(queued.id).status.value == "cancelled"  # at once, never runs

    # Cancel the running job while it evaluates the dense model (a long step between checkpoints).
    wait_until(lambda: c.get(slow.id).stage, 60, lambda: service.log.read_text()[-4000:], alive=service.worker)
    assert c.cancel(slow.id).status.value in ("cancelling", "cancelled")
    final = service.wait_status(slow.id, {"cancelled", "succeeded", "failed"}, timeout=60)
    assert final.status.value == "cancelled", final.error
    events = c.events(slow.id)
    cancel_seq = next(e.seq for e in events if e.kind == "status" and e.data["status"] == "cancelling")
    later_stages = [e.data["stage"] for e in events if e.kind == "stage" and e.seq > cancel_seq]
    assert len(later_stages) <= 1, later_stages  # stopped at the next checkpoint
    assert c.artifacts(slow.id) == []

    # One worker process takes the queue in order: once a job sent after the cancelled one has run, the worker
    # has had the cancelled job's message, and dropped it.
    after = c.create(tiny_assets.spec())
    assert service.wait_status(after.id, {"succeeded", "failed", "cancelled"}).status.value == "succeeded"
    q_events = c.events(queued.id)
    assert [e.data["status"] for e in q_events if e.kind == "status"] == ["queued", "cancelled"]
    assert c.get(queued.id).started_at is None


def test_missing_model_fails_fast_and_the_worker_goes_on(service, tiny_assets):
    c = service.client
    bad = c.create(tiny_assets.spec(model=str(tiny_assets.root / "models" / "does-not-exist")))
    good = c.create(tiny_assets.spec())
    failed = service.wait_status(bad.id, {"succeeded", "failed", "cancelled"}, timeout=60)
    assert failed.status.value == "failed"
    assert failed.error.code == "model_not_found" and "does-not-exist" in failed.error.message
    assert [e.data["stage"] for e in c.events(bad.id) if e.kind == "stage"] in ([], ["loading"])  # no work done
    assert service.wait_status(good.id, {"succeeded", "failed"}).status.value == "succeeded"


def test_a_job_whose_worker_process_dies_is_rerun(service, tiny_assets):
    """The pool process running a job is killed: the message goes back to the queue (late ack, rejected on
    worker loss); the redelivered task takes the job over once its heartbeat is stale and runs it again."""
    c = service.client
    job = c.create(tiny_assets.spec(slow=True))
    service.wait_status(job.id, {"running"})
    child_pid = int(service.jobs.get(job.id).worker.rsplit(":", 1)[1])
    assert child_pid != service.worker.pid
    os.kill(child_pid, signal.SIGKILL)
    final = service.wait_status(job.id, {"succeeded", "failed", "cancelled"}, timeout=180)
    assert final.status.value == "succeeded", final.error
    events = c.events(job.id)
    running = [e.data for e in events if e.kind == "status" and e.data["status"] == "running"]
    requeued = [e.data for e in events if e.kind == "status" and e.data.get("reason") == "worker lost"]
    # run again: taken over by the redelivered task, or queued again by the sweep and claimed
    assert len(running) == 2 and (running[1].get("restarted") is True or len(requeued) == 1)


def test_a_crashed_job_runs_again_while_other_jobs_wait(service, tiny_assets):
    """Jobs wait behind the one whose pool process dies, so its redelivered message comes round only after them:
    the sweep queues it to run again instead of failing it worker_lost, and every job succeeds."""
    c = service.client
    first = c.create(tiny_assets.spec(slow=True))
    service.wait_status(first.id, {"running"})
    waiting = [c.create(tiny_assets.spec(slow=True)) for _ in range(2)]
    os.kill(int(service.jobs.get(first.id).worker.rsplit(":", 1)[1]), signal.SIGKILL)
    for job in (first, *waiting):
        final = service.wait_status(job.id, {"succeeded", "failed", "cancelled"}, timeout=300)
        assert final.status.value == "succeeded", (job.id, final.error)
    runs = [e for e in c.events(first.id) if e.kind == "status" and e.data["status"] == "running"]
    assert len(runs) == 2


def test_a_queued_job_whose_broker_message_was_lost_is_sent_again(service, tiny_assets):
    """Recorded and queued, but its message never reached Redis (or Redis restarted without persistence):
    the worker's sweep finds no message naming it and sends it again, and it runs."""
    from app.schemas import JobSpec

    body = JobSpec.model_validate(tiny_assets.spec()).model_dump(mode="json")
    job, created = service.jobs.create("alice", body)  # recorded, never enqueued
    assert created
    done = service.wait_status(job.id, {"succeeded", "failed", "cancelled"}, timeout=120)
    assert done.status.value == "succeeded", done.error
    events = service.client.events(job.id)
    kinds = [e.kind for e in events]
    # Sent again before it ran. With this test's 2 s requeue_after_s, a message a busy or just-restarted pool
    # process took but had not claimed yet may be sent once more: harmless, only one delivery claims the job.
    assert 1 <= kinds.count("requeued") <= 2 and kinds.index("requeued") < kinds.index("stage")
    assert "lost" in next(e.data["reason"] for e in events if e.kind == "requeued")
    runs = [e for e in events if e.kind == "status" and e.data["status"] == "running"]
    assert len(runs) == 1  # and it ran once


def test_a_stopped_worker_gives_its_job_back_and_the_next_worker_runs_it(service, tiny_assets):
    """SIGTERM to the worker (a spot instance reclaimed, a pod evicted): its pool process stops the job at the next
    checkpoint and gives it back to the queue, not counted as a run, and the worker exits; the next worker runs it.
    Runs last in this module: it replaces the module's worker."""
    c = service.client
    job = c.create(tiny_assets.spec(slow=True))
    service.wait_status(job.id, {"running"})
    os.kill(service.worker.pid, signal.SIGTERM)  # the main process only, as `docker stop` does
    rc = service.worker.wait(timeout=60)
    stopped = service.jobs.get(job.id)
    events = [(e.kind, e.data) for e in c.events(job.id)]
    assert rc == 0 and (stopped.status, stopped.attempts) == ("queued", 0), (rc, stopped.error_code, events)
    # (a "requeued" event may come first: with this module's 2 s requeue_after_s, a message the busy worker held
    # but had not claimed yet is sent once more)
    assert [d for k, d in events if k == "status" and d.get("reason")] == [{"status": "queued", "reason": "preempted"}]
    service.worker = service.start_worker()
    final = service.wait_status(job.id, {"succeeded", "failed", "cancelled"}, timeout=180)
    assert final.status.value == "succeeded", final.error
    assert service.jobs.get(job.id).attempts == 1
