"""The embedded default end to end: `restorelcc serve` with no Redis, no DATABASE_URL and no S3 runs the API
and a local worker (SQLite + local artifacts); `restorelcc submit --wait --download` drives it."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.client import Client
from app.schemas import JobStatus
from tests.conftest import check_downloaded_model, free_port, stop_group, wait_until

ROOT = Path(__file__).parents[2]


@contextlib.contextmanager
def serving(data_dir: Path, cwd: Path, **settings: str) -> Iterator[dict[str, Any]]:
    """`restorelcc serve` in the embedded default (no Redis, no DATABASE_URL), started in ``cwd`` (its allowed root)
    with the timers shortened for tests and ``settings`` (environment variables) on top; ready when it yields
    ``{"url", "env", "data_dir", "log"}``."""
    port = free_port()
    env = {k: v for k, v in os.environ.items()
           if k not in ("REDIS_URL", "DATABASE_URL") and not k.startswith("RESTORELCC_")}
    env.update({
        "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT),
        "RESTORELCC_DATA_DIR": str(data_dir), "RESTORELCC_STALE_AFTER_S": "5", "RESTORELCC_HEARTBEAT_S": "0.2",
        "RESTORELCC_SWEEP_INTERVAL_S": "0.5", "RESTORELCC_POLL_INTERVAL_S": "0.2", **settings,
    })
    log = data_dir / "serve.log"
    with open(log, "w") as log_f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "serve", "--port", str(port)],
            env=env, cwd=cwd, stdout=log_f, stderr=subprocess.STDOUT, start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        assert proc.poll() is None, log.read_text()
        try:
            return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_until(ready, timeout=60, what=lambda: log.read_text()[-2000:])
        yield {"url": url, "env": env, "data_dir": data_dir, "log": log}
    finally:
        stop_group(proc)


@pytest.fixture(scope="module")
def embedded(tmp_path_factory, tiny_assets):
    # Run from the assets directory: the embedded default accepts paths under the current directory.
    with serving(tmp_path_factory.mktemp("embedded"), tiny_assets.root) as service:
        yield service


def test_first_start_creates_a_local_key_and_requires_it(embedded):
    key_file = embedded["data_dir"] / "local.key"
    key = key_file.read_text().strip()
    assert key in embedded["log"].read_text()  # printed once, on first start
    assert httpx.get(f"{embedded['url']}/v1/jobs").status_code == 401
    r = httpx.get(f"{embedded['url']}/v1/jobs", headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 200


def test_submit_wait_download_through_the_embedded_default(embedded, tiny_assets, tmp_path):
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(tiny_assets.spec()))
    out = tmp_path / "result"
    proc = subprocess.run(
        [sys.executable, "-m", "worker.cli", "submit", str(spec_file), "--wait", "--download", str(out),
         "--url", embedded["url"], "--poll", "0.3", "--progress"],
        env=embedded["env"], cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr + embedded["log"].read_text()[-3000:]
    job_id = proc.stdout.splitlines()[0].strip()
    final = json.loads(proc.stdout.split("\n", 1)[1])
    assert final["status"] == "succeeded" and final["id"] == job_id
    assert "exporting" in proc.stderr or "succeeded" in proc.stderr  # the progress line was shown
    report = json.loads((out / "report.json").read_text())
    check_downloaded_model(out / "model", report)

    key = (embedded["data_dir"] / "local.key").read_text().strip()
    with Client(embedded["url"], api_key=key) as c:
        stages = [e.data["stage"] for e in c.events(job_id) if e.kind == "stage"]
        assert stages == ["loading", "pruning", "evaluating", "exporting"]
        assert {a.name for a in c.artifacts(job_id)} >= {"report.json", "model/model.safetensors"}
    status = subprocess.run(
        [sys.executable, "-m", "worker.cli", "status", job_id, "--url", embedded["url"]],
        env=embedded["env"], cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert status.returncode == 0 and json.loads(status.stdout)["status"] == "succeeded"
    assert (embedded["data_dir"] / "artifacts" / "jobs" / job_id / "attempt-1" / "report.json").is_file()
    assert (embedded["data_dir"] / "jobs.db").is_file()


def test_a_job_left_running_by_a_dead_worker_runs_again_or_ends_worker_lost(embedded, tiny_assets):
    """Recovery policy: a running job whose heartbeat is older than twice stale_after_s lost its worker. The
    worker's sweep queues it to run again while it has runs left (fewer than max_attempts, 3), and the local worker
    runs it to the end; a job that has had its runs is failed worker_lost. The local worker is killed first:
    `serve` restarts it."""
    import re

    from app.schemas import JobSpec
    from app.store.db import make_engine

    pids = [int(p) for p in re.findall(r"Embedded worker started \(pid (\d+)\)", embedded["log"].read_text())]
    os.kill(pids[-1], signal.SIGKILL)
    from app.store.jobs import JobStore
    from app.store.models import Job, utcnow

    engine = make_engine(f"sqlite:///{embedded['data_dir'] / 'jobs.db'}")
    store = JobStore(engine)
    old = utcnow() - timedelta(minutes=5)
    spec = JobSpec.model_validate(tiny_assets.spec()).model_dump(mode="json")
    ghosts = {"ghost0000000000000000000000000001": 3, "ghost0000000000000000000000000002": 2}  # id → runs so far
    with store.session() as s:
        for job_id, runs in ghosts.items():
            s.add(Job(id=job_id, tenant="local", status="running", stage="training", progress=0.4,
                      progress_message="", spec=spec, metrics={}, attempts=runs, retries=0, worker="gone:1",
                      heartbeat_at=old, created_at=old, started_at=old, updated_at=old))
    try:
        deadline = time.monotonic() + 120
        while not all(JobStatus(store.get(j).status).finished for j in ghosts):
            assert time.monotonic() < deadline, [store.get(j).status for j in ghosts]
            time.sleep(0.2)
        spent, again = (store.get(j) for j in ghosts)
        assert spent.status == "failed" and spent.error_code == "worker_lost"
        assert again.status == "succeeded" and again.attempts == 3
        requeue = [e.data for e in store.events(again.id) if e.data.get("reason") == "worker lost"]
        assert requeue == [{"status": "queued", "reason": "worker lost", "runs": 2}]
        restarted = re.findall(r"Embedded worker started \(pid (\d+)\)", embedded["log"].read_text())
        assert len(restarted) == len(pids) + 1
    finally:
        engine.dispose()


def test_serve_refuses_open_auth_on_a_public_interface(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "worker.cli", "serve", "--dev-open", "--host", "0.0.0.0",
         "--data-dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
        env={k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL")},
    )
    assert proc.returncode != 0 and "127.0.0.1" in proc.stderr


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def _gone(pid: int, timeout: float) -> bool:
    """The process has exited (a zombie waiting to be reaped counts as exited)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state in "ZX":
            return True
        time.sleep(0.2)
    return False


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_stopping_serve_leaves_no_orphan_worker(tmp_path, tiny_assets, sig):
    """The local worker goes away with `serve`, whether it is stopped politely or killed."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("REDIS_URL", "DATABASE_URL") and not k.startswith("RESTORELCC_")}
    env.update({"PYTHONPATH": str(ROOT), "RESTORELCC_DATA_DIR": str(tmp_path / "d")})
    log = tmp_path / "serve.log"
    with open(log, "w") as log_f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "serve", "--port", str(free_port())],
            env=env, cwd=tiny_assets.root, stdout=log_f, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        # The worker logs this once it holds its slot, with its signal handlers and parent watch in place.
        wait_until(lambda: "embedded worker polling" in log.read_text(), 60, log.read_text, alive=proc)
        workers = _children(proc.pid)
        assert workers, log.read_text()
        os.kill(proc.pid, sig)
        proc.wait(timeout=30)
        assert all(_gone(w, 20) for w in workers), f"worker(s) {workers} outlived serve ({sig.name})"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def test_one_local_worker_per_data_directory(tmp_path, tiny_assets):
    """While a worker holds the data directory's slot (an orphan finishing its job after its service was killed),
    a second local worker waits instead of running a job beside it, and runs it once the slot is free."""
    import fcntl

    from worker.service.embedded import WORKER_LOCK

    engine, store, job, env = local_worker_setup(tmp_path, tiny_assets, tiny_assets.spec())
    log = tmp_path / "worker.log"
    with open(tmp_path / "state" / WORKER_LOCK, "w") as held, open(log, "w") as log_f:
        fcntl.flock(held, fcntl.LOCK_EX)  # the orphan's slot
        proc = subprocess.Popen([sys.executable, "-m", "worker.service.embedded"], env=env, cwd=ROOT,
                                stdout=log_f, stderr=subprocess.STDOUT)
        try:
            wait_until(lambda: "another local worker holds" in log.read_text(), 60, log.read_text, alive=proc)
            assert store.get(job.id).status == "queued"  # it waits; the job is not run beside the orphan's
            fcntl.flock(held, fcntl.LOCK_UN)
            wait_until(lambda: store.get(job.id).status == "succeeded", 180, lambda: log.read_text()[-3000:],
                       alive=proc)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
            engine.dispose()


def test_a_stopped_local_worker_gives_its_job_back(tmp_path, tiny_assets):
    """SIGTERM to the local worker: its job stops at the next checkpoint and goes back to the queue, not counted
    as a run, and the worker exits; the next local worker runs it to the end."""
    engine, store, job, env = local_worker_setup(tmp_path, tiny_assets, tiny_assets.spec(slow=True))

    def start(log: Path) -> subprocess.Popen:
        with open(log, "w") as log_f:
            return subprocess.Popen([sys.executable, "-m", "worker.service.embedded"], env=env, cwd=ROOT,
                                    stdout=log_f, stderr=subprocess.STDOUT)

    first = start(tmp_path / "first.log")
    try:  # running, past the claim
        wait_until(lambda: store.get(job.id).stage, 120, (tmp_path / "first.log").read_text, alive=first)
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=60) == 0
    finally:
        if first.poll() is None:
            first.kill()
    stopped = store.get(job.id)
    assert (stopped.status, stopped.attempts) == ("queued", 0), (tmp_path / "first.log").read_text()[-3000:]
    assert [e.data for e in store.events(job.id) if e.data.get("reason")] == [
        {"status": "queued", "reason": "preempted"}]
    second = start(tmp_path / "second.log")
    try:
        wait_until(lambda: store.get(job.id).status == "succeeded", 180, (tmp_path / "second.log").read_text,
                   alive=second)
        assert store.get(job.id).attempts == 1
    finally:
        second.terminate()
        second.wait(timeout=60)
        engine.dispose()


def local_worker_setup(tmp_path: Path, tiny_assets, spec: dict) -> tuple[Any, Any, Any, dict[str, str]]:
    """A data directory with a job store holding one queued job, and the environment of a local worker for it:
    (engine, store, job, env)."""
    from app.schemas import JobSpec
    from app.store.db import make_engine, upgrade
    from app.store.jobs import JobStore

    data_dir = tmp_path / "state"
    data_dir.mkdir()
    engine = make_engine(f"sqlite:///{data_dir / 'jobs.db'}")
    upgrade(engine)
    store = JobStore(engine)
    job, _ = store.create("local", JobSpec.model_validate(spec).model_dump(mode="json"))
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL")
           and not k.startswith("RESTORELCC_")}
    env.update({"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT),
                "RESTORELCC_DATA_DIR": str(data_dir), "RESTORELCC_POLL_INTERVAL_S": "0.1",
                "RESTORELCC_MODEL_ROOTS": str(tiny_assets.root / "models"),
                "RESTORELCC_DATA_ROOTS": str(tiny_assets.root / "data")})
    return engine, store, job, env
