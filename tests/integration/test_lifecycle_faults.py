"""The worker's job lifecycle under faults: the job store (database) failing for a moment, the worker's disk full,
a cancel racing the hand-off, two runs of one job on one host, partial uploads, time limits and preemption.

Real job stores (SQLite and PostgreSQL), a real local artifact store and a real S3 server (moto) for hand-offs; the
pipeline is a stub (no model) whose behaviour each test sets, and a dropped database connection is simulated by
the real job store raising OperationalError once for a chosen call.
"""

from __future__ import annotations

import contextlib
import errno
import sys
import time
import types
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update
from sqlalchemy.exc import OperationalError

from app.config import Settings
from app.schemas import JobSpec, JobStatus, Stage
from app.store.artifacts import LocalStore, checkpoint_prefix, job_key
from app.store.db import make_engine, upgrade
from app.store.jobs import JobStore
from app.store.models import Job, utcnow
from worker.errors import Cancelled, TransientError
from worker.service import preemption, tasks
from worker.service.store_reporter import StoreReporter
from worker.service.tasks import Outcome, WorkerContext, make_context, run_job

Pipeline = Callable[[Any, Path, StoreReporter, Any], Any]


class FlakyJobStore(JobStore):
    """The real job store, whose next call(s) of a chosen method fail as a dropped connection does."""

    def __init__(self, engine: Any):
        super().__init__(engine)
        self.failing: dict[str, int] = {}
        self.failed: list[str] = []

    def fail_next(self, name: str, times: int = 1) -> None:
        self.failing[name] = times

    def _maybe_fail(self, name: str) -> None:
        if self.failing.get(name, 0) > 0:
            self.failing[name] -= 1
            self.failed.append(name)
            raise OperationalError("UPDATE jobs ...", {}, Exception("server closed the connection unexpectedly"))


def _flaky(name: str) -> Callable[..., Any]:
    real = getattr(JobStore, name)

    def method(self: FlakyJobStore, *args: Any, **kwargs: Any) -> Any:
        self._maybe_fail(name)
        return real(self, *args, **kwargs)

    return method


for _name in ("get", "set_stage", "merge_metrics", "add_event", "set_plan", "finish", "set_output"):
    setattr(FlakyJobStore, _name, _flaky(_name))


class StubPipeline:
    """Stands in for worker.run.pipeline / worker.run.resume: writes a small result, then does what ``fn`` says."""

    def __init__(self) -> None:
        self.fn: Pipeline = lambda spec, out, reporter, resumer: None

    def run_pipeline(self, spec: Any, out_dir: Path, reporter: StoreReporter, resumer: Any) -> dict[str, Any]:
        (out_dir / "model").mkdir(parents=True, exist_ok=True)
        (out_dir / "model" / "config.json").write_text("{}")
        (out_dir / "report.json").write_text('{"metrics": {}}')
        self.fn(spec, out_dir, reporter, resumer)
        return {"metrics": {"ppl": 1.5}}


@pytest.fixture
def pipeline(monkeypatch) -> StubPipeline:
    stub = StubPipeline()
    pipe = types.ModuleType("worker.run.pipeline")
    pipe.run_pipeline = stub.run_pipeline  # type: ignore[attr-defined]
    resume = types.ModuleType("worker.run.resume")

    class Resumer:
        def __init__(self, store: Any, policy: Any):
            self.store = store

    resume.CheckpointPolicy = lambda **_: None  # type: ignore[attr-defined]
    resume.Resumer = Resumer  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "worker.run.pipeline", pipe)
    monkeypatch.setitem(sys.modules, "worker.run.resume", resume)
    monkeypatch.setattr(tasks, "STORE_RETRY_DELAYS_S", (0.0, 0.0, 0.0), raising=False)
    return stub


@pytest.fixture
def no_preemption() -> Iterator[None]:
    preemption.clear()
    yield
    preemption.clear()


def _ctx(tmp_path: Path, db_url: str, **overrides: Any) -> WorkerContext:
    (tmp_path / "models" / "m").mkdir(parents=True, exist_ok=True)
    (tmp_path / "data").mkdir(exist_ok=True)
    s = Settings(data_dir=tmp_path / "state", model_roots=[tmp_path / "models"], data_roots=[tmp_path / "data"],
                 database_url=db_url, progress_interval_s=0, cancel_poll_s=0, **overrides)
    ctx = make_context(s)
    ctx.jobs = FlakyJobStore(make_engine(s.db_url))
    upgrade(ctx.jobs.engine)
    return ctx


def _submit(ctx: WorkerContext, tenant: str = "t", **extra: Any) -> str:
    spec = {"model": {"id": str(ctx.settings.model_roots[0] / "m")},
            "pruning": {"method": "magnitude", "sparsity": 0.5}, "restoration": {"method": "none"}, **extra}
    job, _ = ctx.jobs.create(tenant, JobSpec.model_validate(spec).model_dump(mode="json"))
    return job.id


def _make_stale(ctx: WorkerContext, job_id: str) -> None:
    with ctx.jobs.session() as s:
        s.execute(update(Job).where(Job.id == job_id).values(heartbeat_at=utcnow() - timedelta(days=1)))


# B2: the database failing for a moment while the worker reports ----------------------------------------------------
@pytest.mark.parametrize("call", ["set_stage", "merge_metrics", "add_event", "cancel_poll", "finish", "set_output"])
def test_a_database_blip_while_reporting_never_fails_the_job(tmp_path, db_url, pipeline, call, s3_endpoint):
    """One failed statement (stage, metrics, event, the cancellation poll, the final finish, recording the hand-off)
    is retried or answered from what the run knew: the job succeeds with its artifacts and what it reported."""
    ctx = _ctx(tmp_path, db_url, output_destinations="t:s3://handoff/models/", s3_endpoint_url=s3_endpoint,
               s3_access_key_id="testing", s3_secret_access_key="testing")
    from app.store.artifacts import S3Store

    S3Store("handoff", endpoint_url=s3_endpoint, access_key_id="testing", secret_access_key="testing").ensure_bucket()
    jobs: FlakyJobStore = ctx.jobs  # type: ignore[assignment]
    job_id = _submit(ctx, output={"destination": "s3://handoff/models/"})

    def fn(spec, out, reporter, resumer):
        if call == "cancel_poll":
            jobs.fail_next("get")
            assert reporter.cancel_requested(force=True) is False  # the last known answer
        elif call in ("set_stage", "merge_metrics", "add_event"):
            jobs.fail_next(call)
        reporter.stage(Stage.loading)
        reporter.metrics({"dense_ppl": 2.0})
        reporter.event("note", {"n": 1})
        if call in ("finish", "set_output"):
            jobs.fail_next(call)

    pipeline.fn = fn
    assert run_job(job_id, ctx).outcome is Outcome.succeeded
    assert jobs.failed == [{"cancel_poll": "get"}.get(call, call)]  # the fault did strike
    job = ctx.jobs.get(job_id)
    assert (job.status, job.error_code, job.stage) == ("succeeded", None, "loading")
    assert job.metrics["dense_ppl"] == 2.0 and job.output["destination"].endswith(f"/{job_id}/")
    assert {a.name for a in ctx.jobs.artifacts(job_id)} == {"model/config.json", "report.json"}
    assert "note" in [e.kind for e in ctx.jobs.events(job_id)]


def test_a_database_error_escaping_the_pipeline_is_transient(tmp_path, db_url, pipeline):
    """A lost connection the pipeline did not catch puts the job back (retry), then fails it transient_error."""
    ctx = _ctx(tmp_path, db_url, transient_retries=1, retry_backoff_s=60)
    job_id = _submit(ctx)

    def fn(spec, out, reporter, resumer):
        raise OperationalError("SELECT ...", {}, Exception("could not connect to server"))

    pipeline.fn = fn
    assert run_job(job_id, ctx).outcome is Outcome.retry
    assert ctx.jobs.get(job_id).status == "queued"
    with ctx.jobs.session() as s:
        s.execute(update(Job).where(Job.id == job_id).values(run_after=utcnow()))
    assert run_job(job_id, ctx).outcome is Outcome.failed
    job = ctx.jobs.get(job_id)
    assert job.error_code == "transient_error" and "job store unreachable" in job.error_message


def test_the_reporter_keeps_writes_and_answers_cancel_polls_through_an_outage(tmp_path, db_url):
    ctx = _ctx(tmp_path, db_url)
    jobs: FlakyJobStore = ctx.jobs  # type: ignore[assignment]
    job_id = _submit(ctx)
    assert jobs.claim(job_id, "w")
    reporter = StoreReporter(jobs, job_id, cancel_poll_s=0, attempt=1, db_outage_s=3600)
    jobs.fail_next("set_stage")
    jobs.fail_next("merge_metrics")
    reporter.stage(Stage.pruning)
    assert ctx.jobs.get(job_id).stage is None  # held back ...
    reporter.metrics({"a": 1})  # (writes the stage, but not itself)
    assert ctx.jobs.get(job_id).stage == "pruning" and "a" not in (ctx.jobs.get(job_id).metrics or {})
    jobs.fail_next("add_event")
    reporter.event("plan", {"gpu": 1})
    assert reporter.flush()  # ... and written with the next write
    job = ctx.jobs.get(job_id)
    assert job.stage == "pruning" and job.metrics["a"] == 1 and job.plan == {"gpu": 1}
    assert [e.data for e in ctx.jobs.events(job_id) if e.kind == "plan"] == [{"gpu": 1}]
    jobs.fail_next("get")
    assert reporter.cancel_requested() is False  # a short outage: the last answer
    ctx.jobs.request_cancel(job_id)
    assert reporter.cancel_requested() is True
    # An outage longer than db_outage_s puts the job back (TransientError) rather than running blind.
    blind = StoreReporter(jobs, job_id, cancel_poll_s=0, attempt=1, db_outage_s=0)
    jobs.fail_next("get")
    with pytest.raises(TransientError):
        blind.cancel_requested()


# B6: the worker's disk ------------------------------------------------------------------------------------------
def test_a_full_worker_disk_is_transient_not_internal_error(tmp_path, db_url, pipeline):
    ctx = _ctx(tmp_path, db_url, transient_retries=0)
    job_id = _submit(ctx)

    def fn(spec, out, reporter, resumer):
        raise OSError(errno.ENOSPC, "No space left on device", str(out / "model" / "model.safetensors"))

    pipeline.fn = fn
    assert run_job(job_id, ctx).outcome is Outcome.failed
    job = ctx.jobs.get(job_id)
    assert job.error_code == "transient_error" and "No space left" in job.error_message
    ctx2 = _ctx(tmp_path / "again", db_url, transient_retries=2)
    job_id = _submit(ctx2)
    assert run_job(job_id, ctx2).outcome is Outcome.retry and ctx2.jobs.get(job_id).status == "queued"


# B3: a cancel racing the hand-off -------------------------------------------------------------------------------
def _handoff_ctx(tmp_path: Path, db_url: str, endpoint: str) -> tuple[WorkerContext, Any]:
    from app.store.artifacts import s3_client

    ctx = _ctx(tmp_path, db_url, output_destinations="t:s3://race/models/", s3_endpoint_url=endpoint,
               s3_access_key_id="testing", s3_secret_access_key="testing")
    client = s3_client(endpoint, access_key_id="testing", secret_access_key="testing")
    with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
        client.create_bucket(Bucket="race")
    return ctx, client


def _listed(client: Any, prefix: str) -> list[str]:
    return [o["Key"] for o in client.list_objects_v2(Bucket="race", Prefix=prefix).get("Contents", [])]


def test_a_cancel_during_the_upload_wins_before_the_hand_off(tmp_path, db_url, pipeline, s3_endpoint):
    ctx, client = _handoff_ctx(tmp_path, db_url, s3_endpoint)
    job_id = _submit(ctx, output={"destination": "s3://race/models/"})
    put_file = ctx.artifacts.put_file

    def cancel_then_put(key: str, path: Path, move: bool = False):
        ctx.jobs.request_cancel(job_id)
        return put_file(key, path, move)

    ctx.artifacts.put_file = cancel_then_put  # type: ignore[method-assign]
    assert run_job(job_id, ctx).outcome is Outcome.cancelled
    job = ctx.jobs.get(job_id)
    assert job.status == "cancelled" and job.output is None and ctx.jobs.artifacts(job_id) == []
    assert _listed(client, f"models/{job_id}/") == []  # nothing handed off


def test_a_cancel_after_the_hand_off_wrote_its_manifest_loses(tmp_path, db_url, pipeline, s3_endpoint, monkeypatch):
    from worker.service import handoff

    ctx, client = _handoff_ctx(tmp_path, db_url, s3_endpoint)
    job_id = _submit(ctx, output={"destination": "s3://race/models/"})
    real = handoff.hand_off

    def hand_off_then_cancel(*args: Any, **kwargs: Any) -> dict[str, Any]:
        result = real(*args, **kwargs)
        ctx.jobs.request_cancel(job_id)  # the user cancels just after the manifest landed
        return result

    monkeypatch.setattr(handoff, "hand_off", hand_off_then_cancel)
    assert run_job(job_id, ctx).outcome is Outcome.succeeded
    job = ctx.jobs.get(job_id)
    assert job.status == "succeeded" and job.output["manifest"].endswith("manifest.json")
    assert {a.name for a in ctx.jobs.artifacts(job_id)} == {"model/config.json", "report.json"}
    assert f"models/{job_id}/manifest.json" in _listed(client, f"models/{job_id}/")


# B4: scratch per run -------------------------------------------------------------------------------------------
def test_a_superseded_run_leaves_the_new_runs_scratch_alone(tmp_path, db_url, pipeline):
    ctx = _ctx(tmp_path, db_url)
    job_id = _submit(ctx)
    job_dir = ctx.settings.work_path / job_id
    theirs = job_dir / "2-99999-abcdef01" / "checkpoint" / "part.safetensors"

    def fn(spec, out, reporter, resumer):
        # Another worker on this host took the job over (attempt 2) and downloaded its checkpoint ...
        with ctx.jobs.session() as s:
            s.execute(update(Job).where(Job.id == job_id).values(attempts=Job.attempts + 1, worker="B",
                                                                  heartbeat_at=utcnow()))
        theirs.parent.mkdir(parents=True)
        theirs.write_bytes(b"B's checkpoint")
        if reporter.cancel_requested(force=True):  # ... and this run (attempt 1) notices at its next poll
            raise Cancelled("superseded")

    pipeline.fn = fn
    assert run_job(job_id, ctx).outcome is Outcome.noop
    assert theirs.read_bytes() == b"B's checkpoint"
    assert [p.name for p in job_dir.iterdir()] == ["2-99999-abcdef01"]  # this run removed only its own


def test_the_sweep_removes_only_scratch_of_runs_that_are_not_current(tmp_path, db_url):
    import os

    ctx = _ctx(tmp_path, db_url)
    running, finished = _submit(ctx), _submit(ctx)
    assert ctx.jobs.claim(running, "here:1") and ctx.jobs.take_over(running, "here:2", utcnow())  # attempt 2
    assert ctx.jobs.claim(finished, "gone:1") and ctx.jobs.finish(finished, JobStatus.failed, ("worker_lost", "x"))
    root = ctx.settings.work_path
    old = time.time() - 2 * ctx.settings.stale_after_s
    folders = {
        "lost": root / running / "1-10-aaaaaaaa",  # the run that lost the job: goes
        "current": root / running / "2-11-bbbbbbbb",  # the job's current run: stays, however old
        "recent": root / running / "1-12-cccccccc",  # a run's just made folder: stays
        "ended": root / finished / "1-13-dddddddd",  # a finished job's: goes, and its job folder with it
    }
    for name, folder in folders.items():
        (folder / "result").mkdir(parents=True)
        if name != "recent":
            os.utime(folder, (old, old))
    os.utime(root / finished, (old, old))
    assert sorted(tasks.clean_scratch(ctx)) == sorted([running, finished])
    assert sorted(p.name for p in (root / running).iterdir()) == ["1-12-cccccccc", "2-11-bbbbbbbb"]
    assert not (root / finished).exists()


# B8: partial artifacts ------------------------------------------------------------------------------------------
class _SecondUploadRefused(LocalStore):
    """A local artifact store that refuses the second result file (a bug-like error: not retried)."""

    def __init__(self, root: Path):
        super().__init__(root)
        self.puts = 0

    def put_file(self, key: str, path: Path, move: bool = False) -> Any:
        if "/attempt-" in key:
            self.puts += 1
            if self.puts == 2:
                raise ValueError("injected: the store refused the second file")
        return super().put_file(key, path, move)


def test_a_job_failing_mid_upload_lists_no_partial_artifacts(tmp_path, db_url, pipeline):
    ctx = _ctx(tmp_path, db_url)
    ctx.artifacts = _SecondUploadRefused(ctx.settings.artifacts_path)
    job_id = _submit(ctx)
    assert run_job(job_id, ctx).outcome is Outcome.failed
    assert ctx.jobs.get(job_id).error_code == "internal_error"
    assert ctx.jobs.artifacts(job_id) == []
    assert not [p for p in (ctx.settings.artifacts_path / "jobs" / job_id).rglob("*") if p.is_file()]


def test_a_cancelling_job_whose_worker_is_gone_ends_without_artifacts_or_checkpoints(tmp_path, db_url):
    ctx = _ctx(tmp_path, db_url, heartbeat_s=0.05, stale_after_s=0.2)
    job_id = _submit(ctx)
    assert ctx.jobs.claim(job_id, "gone:1")
    src = tmp_path / "f"
    src.write_text("x")
    stored = ctx.artifacts.put_file(job_key(job_id, "model/model.safetensors", 1), src)
    assert ctx.jobs.add_artifact(job_id, "model/model.safetensors", stored.size, stored.sha256, stored.key, 1)
    ctx.artifacts.put_file(f"{checkpoint_prefix(job_id)}checkpoint.json", src)
    ctx.jobs.set_checkpoint_bytes(job_id, 1)
    ctx.jobs.request_cancel(job_id)
    _make_stale(ctx, job_id)
    assert run_job(job_id, ctx).outcome is Outcome.cancelled
    assert ctx.jobs.artifacts(job_id) == [] and ctx.jobs.get(job_id).checkpoint_bytes == 0
    assert ctx.artifacts.list_prefix(f"jobs/{job_id}/") == []


def test_jobs_the_sweep_ends_keep_no_partial_artifacts(tmp_path, db_url):
    """The sweep ends a cancelling job whose worker is gone (cancelled: artifacts and checkpoints go) and a running
    one out of runs (failed worker_lost: its partial upload goes, its checkpoints stay for a retry)."""
    ctx = _ctx(tmp_path, db_url, max_attempts=1)
    src = tmp_path / "f"
    src.write_text("x")
    ids = {}
    for name in ("cancelling", "spent"):
        ids[name] = job_id = _submit(ctx)
        assert ctx.jobs.claim(job_id, "gone:1")
        stored = ctx.artifacts.put_file(job_key(job_id, "model/model.safetensors", 1), src)
        assert ctx.jobs.add_artifact(job_id, "model/model.safetensors", stored.size, stored.sha256, stored.key, 1)
        ctx.artifacts.put_file(f"{checkpoint_prefix(job_id)}checkpoint.json", src)
        ctx.jobs.set_checkpoint_bytes(job_id, 1)
        _make_stale(ctx, job_id)
    ctx.jobs.request_cancel(ids["cancelling"])
    assert sorted(tasks.sweep(ctx)) == sorted(ids.values())
    cancelled, failed = ctx.jobs.get(ids["cancelling"]), ctx.jobs.get(ids["spent"])
    assert cancelled.status == "cancelled" and (failed.status, failed.error_code) == ("failed", "worker_lost")
    for job_id in ids.values():
        assert ctx.jobs.artifacts(job_id) == []
    assert ctx.artifacts.list_prefix(f"jobs/{ids['cancelling']}/") == []
    kept = [key for key, _ in ctx.artifacts.list_prefix(f"jobs/{ids['spent']}/")]
    assert kept == [f"{checkpoint_prefix(ids['spent'])}checkpoint.json"]


# R1, R4, N1, N2 -------------------------------------------------------------------------------------------------
def test_celerys_soft_limit_comes_after_the_jobs_own_deadline(tmp_path):
    """The job's deadline starts up to a stale wait after the task; Celery's soft limit must come after it, or its
    SoftTimeLimitExceeded pre-empts the clean time_limit at a checkpoint."""
    from worker.service.celery_app import make_celery

    s = Settings(data_dir=tmp_path, soft_time_limit_s=3600, hard_time_limit_s=4200, stale_after_s=120,
                 heartbeat_s=10)
    conf = make_celery(s).conf
    assert 3600 + 120 + 2 * 10 < conf.task_soft_time_limit < conf.task_time_limit == 4200


def test_a_run_whose_job_was_requeued_by_the_sweep_may_not_write_checkpoints(tmp_path, db_url):
    ctx = _ctx(tmp_path, db_url)
    job_id = _submit(ctx)
    assert ctx.jobs.claim(job_id, "w")
    job = ctx.jobs.get(job_id)
    reporter = StoreReporter(ctx.jobs, job_id, attempt=job.attempts)
    store = tasks.job_checkpoints(ctx, job, JobSpec.model_validate(job.spec), tmp_path / "scratch", reporter)
    assert store.may_write()
    _make_stale(ctx, job_id)
    assert ctx.jobs.recover_lost(utcnow(), max_attempts=3) == ([job_id], [])
    assert ctx.jobs.get(job_id).attempts == job.attempts  # the same attempt number: only the status tells
    assert not store.may_write()


def test_a_time_limit_does_not_override_a_users_cancel(tmp_path, db_url, pipeline):
    ctx = _ctx(tmp_path, db_url)
    job_id = _submit(ctx)

    def fn(spec, out, reporter, resumer):
        ctx.jobs.request_cancel(job_id)
        reporter.deadline = time.monotonic() - 1  # past the soft time limit too
        if reporter.cancel_requested(force=True):
            raise Cancelled("stopped")

    pipeline.fn = fn
    src = tmp_path / "checkpoint.json"
    src.write_text("x")
    ctx.artifacts.put_file(f"{checkpoint_prefix(job_id)}checkpoint.json", src)  # what the run had checkpointed
    ctx.jobs.set_checkpoint_bytes(job_id, 1)
    assert run_job(job_id, ctx).outcome is Outcome.cancelled
    assert (ctx.jobs.get(job_id).status, ctx.jobs.get(job_id).error_code) == ("cancelled", None)
    assert ctx.jobs.get(job_id).checkpoint_bytes == 0 and ctx.artifacts.list_prefix(f"jobs/{job_id}/") == []


class _DownAfterFirstUpload(_SecondUploadRefused):
    """The artifact store goes down after the first result file (transient: the job is put back)."""

    def put_file(self, key: str, path: Path, move: bool = False) -> Any:
        if "/attempt-" in key and self.puts >= 1:
            raise OSError(errno.ECONNRESET, "injected: the artifact store dropped the connection")
        return super().put_file(key, path, move)


def test_a_job_put_back_after_a_partial_upload_lists_no_artifacts(tmp_path, db_url, pipeline):
    ctx = _ctx(tmp_path, db_url)
    ctx.artifacts = _DownAfterFirstUpload(ctx.settings.artifacts_path)
    job_id = _submit(ctx)
    assert run_job(job_id, ctx).outcome is Outcome.retry
    assert ctx.jobs.get(job_id).status == "queued" and ctx.jobs.artifacts(job_id) == []


def test_the_hand_off_goes_ahead_when_only_the_deadline_passed_during_the_upload(tmp_path, db_url, pipeline):
    """Past the soft time limit after the result is uploaded, the job is not cancelled: only a user's cancel stops
    the hand-off (the same job without a destination would succeed too)."""
    ctx = _ctx(tmp_path, db_url)
    job_id = _submit(ctx)
    reporter = StoreReporter(ctx.jobs, job_id, deadline=time.monotonic() - 1)
    assert ctx.jobs.claim(job_id, "w")
    reporter.attempt = ctx.jobs.get(job_id).attempts
    assert reporter.cancel_requested(force=True) and not reporter.user_cancelled()
    ctx.jobs.request_cancel(job_id)
    assert reporter.user_cancelled()


def test_a_superseded_reporter_drops_what_it_held_back(tmp_path, db_url):
    """Events held back through an outage are not written into the log of the run that took the job over."""
    ctx = _ctx(tmp_path, db_url)
    job_id = _submit(ctx)
    assert ctx.jobs.claim(job_id, "w")
    reporter = StoreReporter(ctx.jobs, job_id, attempt=1)
    reporter._events_pending.append(("info", {"msg": "held back"}, None))
    _make_stale(ctx, job_id)
    assert ctx.jobs.take_over(job_id, "w2", utcnow())
    assert reporter.check_superseded() and reporter.flush()
    assert "info" not in [e.kind for e in ctx.jobs.events(job_id)]


class _DeletesFail(LocalStore):
    def delete_prefix(self, prefix: str) -> int:
        raise OSError(errno.EIO, "injected: the artifact store is down")


def test_a_preempted_job_is_handed_back_even_when_the_artifact_store_is_down(tmp_path, db_url, pipeline,
                                                                              no_preemption):
    ctx = _ctx(tmp_path, db_url)
    ctx.artifacts = _DeletesFail(ctx.settings.artifacts_path)
    job_id = _submit(ctx)

    def fn(spec, out, reporter, resumer):
        preemption.request()
        if reporter.cancel_requested():
            raise Cancelled("preempted")

    pipeline.fn = fn
    assert run_job(job_id, ctx).outcome is Outcome.preempted
    job = ctx.jobs.get(job_id)
    assert (job.status, job.attempts) == ("queued", 0)
