"""`run_job` in-process with the real pipeline on a tiny model: S3 upload, transient retry, time limit,
idempotent no-ops, error mapping."""

from __future__ import annotations

from pathlib import Path

from app.config import Settings
from app.schemas import JobSpec, JobStatus
from app.store.artifacts import S3Store, verify
from app.store.db import make_engine, upgrade
from app.store.jobs import JobStore
from app.store.models import utcnow
from worker.service.tasks import Outcome, WorkerContext, is_out_of_memory, make_context, run_job


def _ctx(tmp_path: Path, assets, **overrides) -> WorkerContext:
    s = Settings(data_dir=tmp_path / "state", model_roots=[assets.root / "models"],
                 data_roots=[assets.root / "data"], progress_interval_s=0, **overrides)
    ctx = make_context(s)
    upgrade(ctx.jobs.engine)
    return ctx


def _submit(ctx: WorkerContext, spec: dict) -> str:
    job, _ = ctx.jobs.create("t", JobSpec.model_validate(spec).model_dump(mode="json"))
    return job.id


def _s3(endpoint: str, bucket: str, create: bool = True) -> S3Store:
    store = S3Store(bucket, endpoint_url=endpoint, access_key_id="testing", secret_access_key="testing")
    if create:
        store.ensure_bucket()
    return store


def test_results_upload_to_s3_with_sha256(tmp_path, tiny_assets, s3_endpoint):
    ctx = _ctx(tmp_path, tiny_assets)
    ctx.artifacts = _s3(s3_endpoint, "results")
    job_id = _submit(ctx, tiny_assets.spec())
    assert run_job(job_id, ctx).outcome is Outcome.succeeded
    arts = ctx.jobs.artifacts(job_id)
    assert {"report.json", "model/config.json", "model/model.safetensors"} <= {a.name for a in arts}
    for a in arts:
        assert a.key == f"jobs/{job_id}/attempt-1/{a.name}" and verify(ctx.artifacts, a.key, a.sha256)
    assert not (ctx.settings.work_path / job_id).exists()  # scratch space cleaned
    # Idempotent: a redelivered message for a finished job does nothing.
    assert run_job(job_id, ctx).outcome is Outcome.noop
    assert run_job("no-such-job", ctx).outcome is Outcome.noop


def test_an_unreachable_artifact_store_is_transient_and_requeued_with_backoff(tmp_path, tiny_assets, s3_endpoint):
    """The bucket is missing: reading the job's checkpoints (first) and uploading (last) both fail; either way the
    job is queued again with a back-off, then failed ``transient_error`` once out of retries."""
    ctx = _ctx(tmp_path, tiny_assets, retry_backoff_s=120, transient_retries=1)
    ctx.artifacts = _s3(s3_endpoint, "no-such-bucket", create=False)
    job_id = _submit(ctx, tiny_assets.spec())
    res = run_job(job_id, ctx)
    assert res.outcome is Outcome.retry and res.retry_in == 120
    job = ctx.jobs.get(job_id)
    assert job.status == "queued" and job.retries == 1 and job.run_after > utcnow()
    assert [e.kind for e in ctx.jobs.events(job_id)][-1] == "retry"
    # Not due yet: a redelivery just reports how long to wait.
    again = run_job(job_id, ctx)
    assert again.outcome is Outcome.retry and 100 < again.retry_in <= 120
    # Due, and still failing: out of retries → failed, not retried again.
    with ctx.jobs.session() as s:
        from sqlalchemy import update

        from app.store.models import Job
        s.execute(update(Job).where(Job.id == job_id).values(run_after=utcnow()))
    assert run_job(job_id, ctx).outcome is Outcome.failed
    job = ctx.jobs.get(job_id)
    assert job.status == "failed" and job.error_code == "transient_error" and "artifact store" in job.error_message


def test_soft_time_limit_fails_the_job_at_a_checkpoint(tmp_path, tiny_assets):
    ctx = _ctx(tmp_path, tiny_assets, soft_time_limit_s=0.001, hard_time_limit_s=600)
    job_id = _submit(ctx, tiny_assets.spec())
    assert run_job(job_id, ctx).outcome is Outcome.failed
    job = ctx.jobs.get(job_id)
    assert job.error_code == "time_limit" and ctx.jobs.artifacts(job_id) == []


def test_invalid_stored_spec_and_refused_paths_fail_without_running(tmp_path, tiny_assets):
    ctx = _ctx(tmp_path, tiny_assets)
    job, _ = ctx.jobs.create("t", {"model": {"id": "/x"}, "pruning": {"sparsity": 7}})
    assert run_job(job.id, ctx).outcome is Outcome.failed
    assert ctx.jobs.get(job.id).error_code == "invalid_spec"
    named = tiny_assets.spec()  # a rule that names its field itself: the error event names it as the API would
    named["evaluation"]["limits"] = {"no-such-set": 5}
    job, _ = ctx.jobs.create("t", named)
    assert run_job(job.id, ctx).outcome is Outcome.failed
    assert [e.data["field"] for e in ctx.jobs.events(job.id) if e.kind == "error"] == ["evaluation.limits.no-such-set"]
    spec = tiny_assets.spec()
    spec["data"]["train"] = "/etc/passwd"  # roots changed since acceptance, or a crafted record
    job, _ = ctx.jobs.create("t", JobSpec.model_validate(spec).model_dump(mode="json"))
    assert run_job(job.id, ctx).outcome is Outcome.failed
    failed = ctx.jobs.get(job.id)
    assert failed.error_code == "path_not_allowed" and "data.train" in failed.error_message


def test_cancelled_queued_job_never_runs(tmp_path, tiny_assets):
    ctx = _ctx(tmp_path, tiny_assets)
    job_id = _submit(ctx, tiny_assets.spec())
    ctx.jobs.request_cancel(job_id)
    assert run_job(job_id, ctx).outcome is Outcome.noop
    job = ctx.jobs.get(job_id)
    assert job.status == JobStatus.cancelled.value and job.started_at is None


def test_a_run_whose_job_was_taken_over_stops_and_leaves_it_alone(tmp_path, tiny_assets):
    """A worker that looked lost (say, frozen) resumes after another took its job over: it must not run,
    finish, or touch the new run's state."""
    from worker.service.tasks import _execute

    ctx = _ctx(tmp_path, tiny_assets)
    job_id = _submit(ctx, tiny_assets.spec())
    assert ctx.jobs.claim(job_id, "frozen-worker")
    old_view = ctx.jobs.get(job_id)  # what the first run started from (attempt 1)
    assert ctx.jobs.take_over(job_id, "new-worker", utcnow())
    assert _execute(ctx, old_view).outcome is Outcome.noop
    job = ctx.jobs.get(job_id)
    assert (job.status, job.worker, job.attempts, job.stage) == ("running", "new-worker", 2, None)
    assert ctx.jobs.artifacts(job_id) == [] and not (ctx.settings.work_path / job_id).exists()
    assert "stage" not in [e.kind for e in ctx.jobs.events(job_id)]


def test_a_run_that_lost_its_job_cannot_delete_or_overwrite_the_new_runs_artifacts(tmp_path, tiny_assets):
    """Each run uploads under its own attempt. A stale run reaching its upload is refused before it deletes
    anything, and even a file it slips into the store afterwards lands beside, not over, the new run's."""
    import pytest

    from app.store.artifacts import job_key
    from worker.errors import Cancelled
    from worker.service.tasks import _upload

    ctx = _ctx(tmp_path, tiny_assets)
    job_id = _submit(ctx, tiny_assets.spec())
    assert ctx.jobs.claim(job_id, "frozen-worker")
    assert ctx.jobs.take_over(job_id, "new-worker", utcnow())
    outs = {}
    for run in ("old", "new"):
        outs[run] = tmp_path / run
        (outs[run] / "model").mkdir(parents=True)
        (outs[run] / "report.json").write_text(f"{run} report")
        (outs[run] / "model" / "config.json").write_text(f"{run} config")
    _upload(ctx, job_id, outs["new"], attempt=2)
    with pytest.raises(Cancelled):
        _upload(ctx, job_id, outs["old"], attempt=1)
    ctx.artifacts.put_file(job_key(job_id, "report.json", 1), outs["old"] / "report.json")  # a late straggler
    arts = {a.name: a for a in ctx.jobs.artifacts(job_id)}
    assert sorted(arts) == ["model/config.json", "report.json"]
    for name, a in arts.items():
        assert a.key == f"jobs/{job_id}/attempt-2/{name}" and verify(ctx.artifacts, a.key, a.sha256)
        assert b"".join(ctx.artifacts.open_range(a.key)).startswith(b"new ")
    assert not ctx.jobs.clear_artifacts(job_id, attempt=1) and len(ctx.jobs.artifacts(job_id)) == 2


def test_a_run_that_loses_its_job_while_uploading_leaves_no_files_behind(tmp_path, tiny_assets):
    """The sweep fails a frozen run's job and the user deletes it while the run is still uploading: the
    file that lands after the deletion has no record, so the run deletes it before giving up."""
    import pytest

    from app.store.artifacts import job_prefix
    from worker.errors import Cancelled
    from worker.service.tasks import _upload

    ctx = _ctx(tmp_path, tiny_assets)
    job_id = _submit(ctx, tiny_assets.spec())
    assert ctx.jobs.claim(job_id, "frozen-worker")
    out = tmp_path / "out"
    (out / "model").mkdir(parents=True)
    (out / "model" / "config.json").write_text("{}")
    (out / "report.json").write_text("{}")
    put_file = ctx.artifacts.put_file

    def lose_the_job_then_put(key: str, path: Path):
        if ctx.jobs.artifacts(job_id):  # one file recorded: the sweep and the user strike during the next put
            assert ctx.jobs.recover_lost(utcnow(), max_attempts=1) == ([], [job_id]) and ctx.jobs.delete(job_id)
            ctx.artifacts.delete_prefix(job_prefix(job_id))  # what the API's delete does
        return put_file(key, path)

    ctx.artifacts.put_file = lose_the_job_then_put
    with pytest.raises(Cancelled):
        _upload(ctx, job_id, out, attempt=1)
    assert ctx.jobs.get(job_id) is None
    assert not [p for p in ctx.settings.artifacts_path.rglob("*") if p.is_file()]  # the late file was deleted too


def test_a_run_killed_by_the_hard_time_limit_is_failed_not_rerun(tmp_path, tiny_assets):
    """Celery's hard limit kills the process, so the task comes back: the redelivery sees that the lost run
    had been going for the whole hard limit and fails the job with time_limit instead of starting over."""
    from datetime import timedelta

    from sqlalchemy import update

    from app.store.models import Job

    ctx = _ctx(tmp_path, tiny_assets, soft_time_limit_s=1800, hard_time_limit_s=3600, stale_after_s=60)
    job_id = _submit(ctx, tiny_assets.spec())
    assert ctx.jobs.claim(job_id, "killed-worker")
    beat = utcnow() - timedelta(seconds=90)  # stale: the process is gone
    with ctx.jobs.session() as s:
        s.execute(update(Job).where(Job.id == job_id).values(started_at=beat - timedelta(seconds=3600),
                                                              heartbeat_at=beat))
    assert run_job(job_id, ctx).outcome is Outcome.failed
    job = ctx.jobs.get(job_id)
    assert job.status == "failed" and job.error_code == "time_limit" and "3600" in job.error_message
    assert "stage" not in [e.kind for e in ctx.jobs.events(job_id)]  # not run again


def test_out_of_memory_is_recognised():
    class OutOfMemoryError(RuntimeError):
        pass

    assert is_out_of_memory(MemoryError())
    assert is_out_of_memory(OutOfMemoryError("CUDA out of memory"))
    assert is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))


def test_job_store_url_from_settings(tmp_path):
    s = Settings(data_dir=tmp_path, database_url="postgres://u@h/db")
    assert s.db_url == "postgresql+psycopg://u@h/db"
    assert Settings(data_dir=tmp_path).db_url == f"sqlite:///{(tmp_path / 'jobs.db').resolve()}"
    assert JobStore(make_engine(Settings(data_dir=tmp_path).db_url)).engine.dialect.name == "sqlite"


def test_more_directions_than_the_models_head_width_fail_naming_the_field(tmp_path, tiny_assets):
    """restoration.directions is checked against the model's config in the preflight: the job fails before any
    weight loads (no stage begins)."""
    ctx = _ctx(tmp_path, tiny_assets)
    spec = tiny_assets.spec(restore=True)
    spec["restoration"]["directions"] = 4096
    job, _ = ctx.jobs.create("t", JobSpec.model_validate(spec).model_dump(mode="json"))
    assert run_job(job.id, ctx).outcome is Outcome.failed
    failed = ctx.jobs.get(job.id)
    assert failed.error_code == "invalid_spec" and "restoration.directions 4096 exceeds" in failed.error_message
    stages = [e.data["stage"] for e in ctx.jobs.events(job.id) if e.kind == "stage"]
    assert stages == []


def test_a_redelivered_job_with_no_runs_left_ends_worker_lost_without_a_restart(tmp_path, tiny_assets):
    """A job that has had max_attempts runs and whose worker is gone: the redelivered task ends it worker_lost
    once the heartbeat is stale, and records no take-over ("restarted") it would not do."""
    from datetime import timedelta

    from sqlalchemy import update

    from app.store.models import Job

    ctx = _ctx(tmp_path, tiny_assets, heartbeat_s=0.05, stale_after_s=0.2, max_attempts=2)
    job_id = _submit(ctx, tiny_assets.spec())
    assert ctx.jobs.claim(job_id, "gone:1")
    with ctx.jobs.session() as s:
        s.execute(update(Job).where(Job.id == job_id).values(attempts=2, heartbeat_at=utcnow() - timedelta(1)))
    assert run_job(job_id, ctx).outcome is Outcome.failed
    job = ctx.jobs.get(job_id)
    assert (job.status, job.error_code, job.attempts) == ("failed", "worker_lost", 2)
    assert not [e for e in ctx.jobs.events(job_id) if e.data.get("restarted")]


def test_a_redelivered_job_killed_by_the_hard_time_limit_ends_time_limit_without_a_restart(tmp_path, tiny_assets):
    """Celery gives back the message of a task the hard limit killed. The redelivered task finds a run that lasted
    the limit (here one that had itself taken the job over: it started a stale wait after Celery's clock did) and
    ends the job time_limit once its heartbeat is stale, with runs left, and without taking it over first."""
    from datetime import timedelta

    from sqlalchemy import update

    from app.store.models import Job

    ctx = _ctx(tmp_path, tiny_assets, heartbeat_s=0.05, stale_after_s=0.2, soft_time_limit_s=50,
               hard_time_limit_s=60, max_attempts=3)
    job_id = _submit(ctx, tiny_assets.spec())
    assert ctx.jobs.claim(job_id, "gone:1")
    last_beat = utcnow() - timedelta(seconds=1)
    ran = timedelta(seconds=60 - 0.2 - 2 * 0.05)  # killed at 60 s by Celery's clock, started after a stale wait
    with ctx.jobs.session() as s:
        s.execute(update(Job).where(Job.id == job_id).values(started_at=last_beat - ran, heartbeat_at=last_beat))
    assert run_job(job_id, ctx).outcome is Outcome.failed
    job = ctx.jobs.get(job_id)
    assert (job.status, job.error_code, job.attempts) == ("failed", "time_limit", 1)
    assert "hard time limit of 60 s" in job.error_message
    assert not [e for e in ctx.jobs.events(job_id) if e.data.get("restarted")]


def test_the_sweep_removes_scratch_folders_runs_left_behind(tmp_path, tiny_assets):
    """A killed run leaves work_dir/<job id>/<run>; the sweep removes it (and the emptied job folder) once the job
    is not running (finished, deleted, or queued to start again from an empty folder) and keeps a running job's
    current run's folder, and one a run is starting in (made moments ago)."""
    import os
    import time

    from worker.service.tasks import sweep

    ctx = _ctx(tmp_path, tiny_assets)
    running, finished, queued = (_submit(ctx, tiny_assets.spec()) for _ in range(3))
    assert ctx.jobs.claim(running, "here:1") and ctx.jobs.claim(finished, "gone:1")
    assert ctx.jobs.finish(finished, JobStatus.failed, ("worker_lost", "gone"))
    deleted, starting = "0" * 32, _submit(ctx, tiny_assets.spec())
    old = time.time() - 2 * ctx.settings.stale_after_s
    for job_id in (running, finished, queued, deleted, starting):
        run_dir = ctx.settings.work_path / job_id / "1-100-0123abcd"  # attempt 1's
        (run_dir / "result").mkdir(parents=True)
        if job_id != starting:
            os.utime(run_dir, (old, old))
            os.utime(run_dir.parent, (old, old))
    (ctx.settings.work_path / "notes.txt").write_text("not a job's")
    sweep(ctx)
    left = sorted(p.name for p in ctx.settings.work_path.iterdir())
    assert left == sorted([running, starting, "notes.txt"])


class _UploadsFail(S3Store):
    """S3 (moto's server) where result uploads fail while ``failing`` is set; checkpoints are written as usual."""

    failing = True

    def put_file(self, key, path, move=False):
        if self.failing and "/attempt-" in key:
            raise OSError("injected: the artifact store refused the upload")
        return super().put_file(key, path, move)


def test_a_job_that_failed_after_its_checkpoints_resumes_on_retry_and_its_checkpoints_go(
        tmp_path, tiny_assets, s3_endpoint):
    """Checkpoints in S3: a run that fails after its last checkpoint (its upload refused, no retries left) keeps
    them; a retry (a new job, ``retry_of``) resumes from them and exports what an uninterrupted run exports; a
    succeeded job's checkpoints are gone, the failed one's expire after ``checkpoint_keep_s``."""
    from app.store.artifacts import checkpoint_prefix
    from worker.service.tasks import expire_checkpoints

    ctx = _ctx(tmp_path, tiny_assets, transient_retries=0, checkpoint_keep_s=3600)
    store = _UploadsFail("ckpt", endpoint_url=s3_endpoint, access_key_id="testing", secret_access_key="testing")
    store.ensure_bucket()
    ctx.artifacts = store
    spec = tiny_assets.spec(restore=True)
    first = _submit(ctx, spec)
    assert run_job(first, ctx).outcome is Outcome.failed
    failed = ctx.jobs.get(first)
    assert failed.error_code == "transient_error" and failed.checkpoint_bytes > 0
    kept = store.list_prefix(checkpoint_prefix(first))
    assert sum(size for key, size in kept if key.endswith(".safetensors")) == failed.checkpoint_bytes

    store.failing = False
    retry, _ = ctx.jobs.create("t", failed.spec, retry_of=first)
    assert run_job(retry.id, ctx).outcome is Outcome.succeeded
    resumed = [e.data for e in ctx.jobs.events(retry.id) if e.kind == "resumed"]
    assert resumed == [{"checkpoint": "evaluated", "stage": "evaluating", "step": None, "attempt": 2}]
    fresh = _submit(ctx, spec)  # the same spec, never interrupted
    assert run_job(fresh, ctx).outcome is Outcome.succeeded

    def model_sha(job_id):
        return {a.name: a.sha256 for a in ctx.jobs.artifacts(job_id)}["model/model.safetensors"]

    assert model_sha(retry.id) == model_sha(fresh)
    for done in (retry.id, fresh):
        assert store.list_prefix(checkpoint_prefix(done)) == [] and ctx.jobs.get(done).checkpoint_bytes == 0
    assert expire_checkpoints(ctx) == []  # the failed job keeps its checkpoints for checkpoint_keep_s
    ctx.settings = ctx.settings.model_copy(update={"checkpoint_keep_s": 0})
    assert expire_checkpoints(ctx) == [first]
    assert store.list_prefix(checkpoint_prefix(first)) == [] and ctx.jobs.get(first).checkpoint_bytes == 0


GRACE_SCRIPT = """
import sys, threading
from app.store.db import make_engine
from app.store.jobs import JobStore
from worker.service import preemption
from worker.service.tasks import _Heartbeat

jobs = JobStore(make_engine(sys.argv[1]))
preemption.request()  # SIGTERM arrived; the job below never reaches a safe point
with _Heartbeat(jobs, sys.argv[2], interval=0.05, attempt=1, grace_s=0.2):
    threading.Event().wait()  # a step that never ends
"""


def test_a_job_that_reaches_no_safe_point_in_the_grace_period_is_handed_back_and_the_worker_exits(
        tmp_path, tiny_assets):
    import subprocess
    import sys

    ctx = _ctx(tmp_path, tiny_assets)
    job_id = _submit(ctx, tiny_assets.spec())
    assert ctx.jobs.claim(job_id, "w")
    proc = subprocess.run([sys.executable, "-c", GRACE_SCRIPT, str(ctx.jobs.engine.url), job_id],
                          cwd=Path(__file__).parents[2], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    job = ctx.jobs.get(job_id)
    assert (job.status, job.attempts) == ("queued", 0)
    reasons = [e.data.get("reason") for e in ctx.jobs.events(job_id) if e.kind == "status"]
    assert reasons[-1] == "preempted; no checkpoint within the 0.2 s grace period"
