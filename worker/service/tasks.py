"""``run_job(job_id)``: the one task, shared by the Celery worker and the embedded local worker.

Thin and idempotent: it reloads the job record and decides from its status.
- finished (or deleted) → nothing to do;
- queued → claimed atomically (queued→running), then run;
- running on arrival (a redelivery after a worker crash) → taken over once its heartbeat is stale, and run again
  from its newest checkpoint (worker.run.resume); while another live worker keeps the heartbeat fresh, nothing is
  done; after ``max_attempts`` runs the job is failed with ``worker_lost``.
Checkpoints live in the artifact store under the job's ``checkpoints/`` prefix: deleted when the job succeeds or is
cancelled, kept ``checkpoint_keep_s`` after a failure so that a retry (a new job, ``retry_of``) resumes from them.
Deterministic failures (JobFailure, out of memory) end the job ``failed`` and are never retried; a
TransientError, a job store (database) that cannot be reached, or the worker's own disk failing (full, I/O error)
puts it back to ``queued`` with a back-off, at most ``transient_retries`` times.
Each run works in its own scratch folder, ``work_dir/<job id>/<attempt>-<pid>-<token>``, and removes only that.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from sqlalchemy.exc import SQLAlchemyError

from app.config import Settings, get_settings
from app.fields import FieldError
from app.paths import PathRefused, check_spec_paths
from app.schemas import JobSpec, JobStatus
from app.service import Enqueuer, dispatch_held, is_job_id
from app.store.artifacts import (
    ArtifactStore,
    attempt_prefix,
    checkpoint_prefix,
    is_storage_failure,
    job_key,
    job_prefix,
    make_store,
)
from app.store.db import make_engine
from app.store.jobs import ACTIVE, JobStore, stale_cutoff
from app.store.models import Job, utcnow
from app.tenancy import TenantPolicy
from worker.errors import Cancelled, JobFailure, OutOfMemoryFailure, TransientError, is_out_of_memory
from worker.run.checkpoints import CheckpointStore, io_failure
from worker.service import preemption
from worker.service.results import result_files
from worker.service.store_reporter import StoreReporter, is_store_outage, jsonable

log = logging.getLogger("restorelcc.worker")
# Waits between tries of the final, idempotent ``finish(succeeded)`` (and ``set_output``) while the job store is
# unreachable: about a minute in all, then the job goes the transient way.
STORE_RETRY_DELAYS_S: tuple[float, ...] = (0.5, 1, 2, 4, 8, 16, 30)


class Outcome(StrEnum):
    noop = "noop"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"
    retry = "retry"
    preempted = "preempted"  # given back to the queue: the caller sends it to the broker again


@dataclass(frozen=True)
class Result:
    outcome: Outcome
    retry_in: float | None = None


@dataclass
class WorkerContext:
    settings: Settings
    jobs: JobStore
    artifacts: ArtifactStore
    name: str
    pid: int


_ctx: WorkerContext | None = None
_ctx_lock = threading.Lock()


def make_context(settings: Settings | None = None) -> WorkerContext:
    settings = settings or get_settings()
    return WorkerContext(
        settings=settings,
        jobs=JobStore(make_engine(settings.db_url)),
        artifacts=make_store(settings),
        name=f"{socket.gethostname()}:{os.getpid()}",
        pid=os.getpid(),
    )


def get_context() -> WorkerContext:
    """This process's context (rebuilt after a fork: connections are never shared between processes)."""
    global _ctx
    with _ctx_lock:
        if _ctx is None or _ctx.pid != os.getpid():
            if _ctx is not None:
                _ctx.jobs.engine.dispose(close=False)  # the parent's connections: leave them to the parent
            _ctx = make_context()
        return _ctx


def set_context(ctx: WorkerContext | None) -> None:
    global _ctx
    with _ctx_lock:
        _ctx = ctx


# The task ------------------------------------------------------------------------------------------------
def run_job(job_id: str, ctx: WorkerContext | None = None) -> Result:
    ctx = ctx or get_context()
    job = ctx.jobs.get(job_id)
    if job is None or JobStatus(job.status).finished:
        return Result(Outcome.noop)
    status = JobStatus(job.status)
    if status is JobStatus.queued:
        if not ctx.jobs.claim(job_id, ctx.name):
            again = ctx.jobs.get(job_id)
            if again is not None and again.status == JobStatus.queued.value and again.run_after is not None:
                return Result(Outcome.retry, max(0.0, (again.run_after - utcnow()).total_seconds()))
            return Result(Outcome.noop)
    elif status is JobStatus.cancelling:
        # Its worker was asked to stop; if that worker is gone, finish the cancellation here.
        if _heartbeat_stale(job, ctx.settings) and ctx.jobs.finish(
                job_id, JobStatus.cancelled, allowed=(JobStatus.cancelling.value,), **_fence(ctx, job)):
            _clean_up_cancelled(ctx, job_id)
            return Result(Outcome.cancelled)
        return Result(Outcome.noop)
    elif (killed := _hit_hard_limit(job, ctx.settings)) or job.attempts >= ctx.settings.max_attempts:
        # No runs left, or the last one was killed by the hard time limit (its message came back: Celery rejects
        # it) and would only hit it again: once its worker is surely gone, end it rather than run it again.
        error = (("time_limit", f"the job ran past its hard time limit of {ctx.settings.hard_time_limit_s:g} s")
                 if killed else
                 ("worker_lost", f"worker lost {job.attempts} times while running this job"
                                 f"{f', the last time during {job.stage}' if job.stage else ''}; giving up"))
        if _wait_stale(ctx, job) and ctx.jobs.finish(job_id, JobStatus.failed, error,
                                                     allowed=(JobStatus.running.value,), **_fence(ctx, job)):
            _clean_up_ended(ctx, job_id)
            return Result(Outcome.failed)
        return Result(Outcome.noop)
    elif not _take_over(ctx, job):
        return Result(Outcome.noop)

    job = ctx.jobs.get(job_id)
    if job is None:
        return Result(Outcome.noop)
    if job.attempts > ctx.settings.max_attempts:
        # allowed=(running,) inside _fail: a user's cancel meanwhile wins over worker_lost.
        return _fail(ctx, job_id, "worker_lost", f"worker lost {job.attempts - 1} times while running this job; "
                                                 f"giving up", attempt=job.attempts)
    return _execute(ctx, job)


def _clean_up_cancelled(ctx: WorkerContext, job_id: str) -> None:
    """A job cancelled without its run (its worker is gone): what that run uploaded and its checkpoints go, as
    on a normal cancel. Best effort: the job is cancelled either way."""
    try:
        _discard_artifacts(ctx, job_id)
    except Exception:
        log.warning("job %s: could not discard partial artifacts", job_id, exc_info=True)
    _drop_checkpoints(ctx, job_id)


def _clean_up_ended(ctx: WorkerContext, job_id: str) -> None:
    """A job the sweep ended without its run: a cancelled one is cleaned up as on a normal cancel; a failed one
    loses what a partial upload recorded (no run finished it), but keeps its checkpoints for a retry."""
    job = ctx.jobs.get(job_id)
    if job is None:
        return
    if job.status == JobStatus.cancelled.value:
        _clean_up_cancelled(ctx, job_id)
        return
    try:
        ctx.jobs.clear_artifacts(job_id)  # unfenced: the job is finished, no run may record files for it
        for k in range(1, job.attempts + 1):
            ctx.artifacts.delete_prefix(attempt_prefix(job_id, k))
    except Exception:
        log.warning("job %s: could not discard partial artifacts", job_id, exc_info=True)


def _fence(ctx: WorkerContext, job: Job) -> dict[str, Any]:
    """Write only while the run seen in ``job`` still owns it and its heartbeat is stale (its worker has not come back
    between the check and the write)."""
    return {"attempt": job.attempts, "stale_before": stale_cutoff(ctx.settings.stale_after_s)}


def _hit_hard_limit(job: Job, settings: Settings) -> bool:
    """Whether the run that lost this job had been running for (about) the hard time limit when it died."""
    if job.started_at is None or job.heartbeat_at is None:
        return False
    return (job.heartbeat_at - job.started_at).total_seconds() >= settings.hard_limit_run_s


def _heartbeat_stale(job: Job, settings: Settings) -> bool:
    return job.heartbeat_at is None or job.heartbeat_at < stale_cutoff(settings.stale_after_s)


def _take_over(ctx: WorkerContext, job: Job) -> bool:
    """A redelivered job found ``running``: wait for its heartbeat to go stale (its worker is gone) and take
    it over; give up at once if the heartbeat moves (a live worker has it)."""
    if _wait_stale(ctx, job, lambda: ctx.jobs.take_over(job.id, ctx.name, stale_cutoff(ctx.settings.stale_after_s))):
        log.warning("job %s: worker lost; running it again from its newest checkpoint", job.id)
        return True
    return False


def _wait_stale(ctx: WorkerContext, job: Job, act: Callable[[], bool] | None = None) -> bool:
    """Wait until the running job's heartbeat is ``stale_after_s`` old, then ``act()`` (True when it is stale,
    without ``act``); False at once if the heartbeat moves or the job leaves ``running``, or after the wait."""
    s = ctx.settings
    first_beat = job.heartbeat_at
    deadline = time.monotonic() + s.stale_after_s + 2 * s.heartbeat_s
    while True:
        current = ctx.jobs.get(job.id)  # one read a round
        if current is None or current.status != JobStatus.running.value or current.heartbeat_at != first_beat:
            return False
        if _heartbeat_stale(current, s) and (act() if act is not None else True):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(min(s.heartbeat_s, 1.0))


class _Heartbeat:
    """Keeps ``heartbeat_at`` fresh while the pipeline runs, even through long silent steps."""

    def __init__(self, jobs: JobStore, job_id: str, interval: float, attempt: int | None = None,
                 grace_s: float = 30.0):
        self._stop = threading.Event()
        self.grace_s = grace_s
        self._thread = threading.Thread(target=self._run, args=(jobs, job_id, interval, attempt), daemon=True,
                                        name=f"heartbeat-{job_id[:8]}")

    def _run(self, jobs: JobStore, job_id: str, interval: float, attempt: int | None) -> None:
        while not self._stop.wait(min(interval, 1.0) if preemption.requested() else interval):
            if preemption.overdue(self.grace_s) and attempt is not None:
                self._hand_back(jobs, job_id, attempt)
            try:
                jobs.heartbeat(job_id, attempt)
            except Exception:  # a database hiccup must not kill the job; the next beat may succeed
                log.warning("heartbeat failed for %s", job_id, exc_info=True)

    def _hand_back(self, jobs: JobStore, job_id: str, attempt: int) -> None:
        """The worker is being stopped and the job found no safe point within the grace period: give it back to the
        queue (it resumes from its newest checkpoint) and exit now, before the machine goes."""
        try:
            jobs.release(job_id, attempt, f"preempted; no checkpoint within the {self.grace_s:g} s grace period")
        finally:
            log.warning("job %s: grace period over; handed back, exiting", job_id)
            logging.shutdown()
            os._exit(0)

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def _execute(ctx: WorkerContext, job: Job) -> Result:
    s = ctx.settings
    jobs = ctx.jobs
    job_id = job.id
    attempt = job.attempts  # this run's fence: every write below is refused once another run owns the job
    try:
        spec = JobSpec.model_validate(job.spec)
        check_spec_paths(spec, s)  # again here: the filesystem may have changed since the job was accepted
    except ValidationError as e:
        return _fail(ctx, job_id, "invalid_spec", str(e)[:2000], _error_field(e), attempt)
    except PathRefused as e:
        return _fail(ctx, job_id, getattr(e, "code", "path_not_allowed"), e.message, e.field, attempt)
    except Exception as e:  # a bug in the checks: fail the job here rather than leave it running
        return _internal_error(ctx, job_id, e, attempt)

    # Scratch of this run only (result/: what is uploaded; checkpoint/: checkpoint files in transit). Another run of
    # the same job on this host (one that took it over from this one, or the one this one took it over from) has
    # its own folder: neither ever deletes the other's files.
    run_dir = s.work_path / job_id / run_folder_name(attempt)
    out_dir = run_dir / "result"
    _make_dir(out_dir)
    reporter = StoreReporter(
        jobs, job_id, progress_interval_s=s.progress_interval_s, cancel_poll_s=s.cancel_poll_s,
        deadline=time.monotonic() + s.soft_time_limit_s, attempt=attempt, db_outage_s=s.stale_after_s,
    )
    checkpoints = job_checkpoints(ctx, job, spec, run_dir / "checkpoint", reporter)
    uploaded = False  # every result file uploaded and recorded: a failure after this keeps the artifacts
    try:
        with _Heartbeat(jobs, job_id, s.heartbeat_s, attempt, s.preempt_grace_s):
            try:
                if reporter.cancel_requested(force=True):
                    raise Cancelled("cancelled before start")
                from worker.run.pipeline import run_pipeline  # torch is imported here, never earlier
                from worker.run.resume import CheckpointPolicy, Resumer

                policy = CheckpointPolicy(every_steps=s.checkpoint_every_steps, every_s=s.checkpoint_every_s,
                                          every_layers=s.checkpoint_every_layers)
                report = run_pipeline(spec, out_dir, reporter, Resumer(checkpoints, policy))
                reporter.flush()
                if reporter.cancel_requested(force=True):
                    raise Cancelled("cancelled after the last stage")
                _upload(ctx, job_id, out_dir, attempt)
                uploaded = True
                # The hand-off cannot be undone (a reader trusts a destination with a manifest): a cancel that came
                # during the upload wins here; once the manifest is written, completion wins.
                if spec.output.destination and reporter.user_cancelled():
                    raise Cancelled("cancelled before the hand-off")
                handed_off = _hand_off(ctx, job, spec, out_dir, attempt)
                metrics = dict(reporter.metrics_seen)
                if isinstance(report, dict) and isinstance(report.get("metrics"), dict):
                    metrics.update(report["metrics"])
                metrics = jsonable(metrics)
                reporter.flush()  # events and metrics an outage held back, before the job ends
                if _finish_succeeded(ctx, job_id, metrics, attempt,
                                     ACTIVE if handed_off else (JobStatus.running.value,)):
                    _drop_checkpoints(ctx, job_id)
                    return Result(Outcome.succeeded)
                raise Cancelled("cancelled while uploading")
            except Cancelled:
                reporter.flush()
                if reporter.check_superseded():
                    # Another worker took the job over while this one looked lost: its run owns the job and
                    # its artifacts now, so leave both alone.
                    log.warning("job %s: taken over by another worker; this run (attempt %d) stops", job_id,
                                attempt)
                    return Result(Outcome.noop)
                if reporter.preempted:
                    try:
                        _discard_artifacts(ctx, job_id, attempt)
                    except Exception:  # the store down at shutdown must not keep the job from being handed back
                        log.warning("job %s: could not discard partial artifacts", job_id, exc_info=True)
                    if jobs.release(job_id, attempt, "preempted"):
                        log.warning("job %s: this worker is stopping; job queued to run again", job_id)
                        return Result(Outcome.preempted)
                if reporter.timed_out:
                    # allowed=(running,) inside _fail: a user's cancel meanwhile ends the job cancelled.
                    return _fail(ctx, job_id, "time_limit", f"the job ran past its time limit of "
                                                            f"{s.soft_time_limit_s} s", attempt=attempt)
                try:
                    _discard_artifacts(ctx, job_id, attempt)
                except Exception:
                    log.warning("job %s: could not discard partial artifacts", job_id, exc_info=True)
                if jobs.finish(job_id, JobStatus.cancelled, attempt=attempt):
                    _drop_checkpoints(ctx, job_id)
                    return Result(Outcome.cancelled)
                return Result(Outcome.noop)
            except JobFailure as e:
                return _fail(ctx, job_id, e.code, e.message, e.field, attempt, keep_artifacts=uploaded)
            except TransientError as e:
                return _transient(ctx, job, e, keep_artifacts=uploaded)
            except Exception as e:
                if type(e).__name__ == "SoftTimeLimitExceeded":
                    return _fail(ctx, job_id, "time_limit", f"the job ran past its time limit of "
                                                            f"{s.soft_time_limit_s} s", attempt=attempt,
                                 keep_artifacts=uploaded)
                if is_out_of_memory(e):
                    oom = OutOfMemoryFailure(f"out of memory: {e}"[:2000])
                    return _fail(ctx, job_id, oom.code, oom.message, attempt=attempt, keep_artifacts=uploaded)
                if is_store_outage(e):
                    log.warning("job %s: the job store is unreachable", job_id, exc_info=True)
                    return _transient(ctx, job, TransientError(f"job store unreachable: {e}"[:2000]),
                                      keep_artifacts=uploaded)
                if io_failure(e):  # the worker's disk (full, I/O error) or a store: may pass on another try
                    log.warning("job %s: disk or storage failure", job_id, exc_info=True)
                    return _transient(ctx, job, TransientError(f"disk or storage failure: {e}"[:2000]),
                                      keep_artifacts=uploaded)
                return _internal_error(ctx, job_id, e, attempt, keep_artifacts=uploaded)
    finally:
        if not s.keep_work_dirs:
            shutil.rmtree(run_dir, ignore_errors=True)
            with contextlib.suppress(OSError):
                run_dir.parent.rmdir()  # the job's folder, once no run of it uses this host's disk


def run_folder_name(attempt: int) -> str:
    """A run's scratch folder under work_dir/<job id>: its attempt, its process and a token (the same process may
    run the same attempt number again after a transient retry or a preemption)."""
    return f"{attempt}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _run_attempt(folder: Path) -> int | None:
    """The attempt of a run folder named by :func:`run_folder_name` (None: not one)."""
    parts = folder.name.split("-")
    if len(parts) == 3 and parts[0].isdigit() and parts[1].isdigit():
        return int(parts[0])
    return None


def _make_dir(path: Path, tries: int = 3) -> None:
    """mkdir -p that survives the sweep removing an empty job folder between the steps of the mkdir."""
    for k in range(tries):
        try:
            path.mkdir(parents=True, exist_ok=True)
            return
        except FileNotFoundError:
            if k == tries - 1:
                raise


def _with_store_retry(what: str, job_id: str, write: Callable[[], bool]) -> bool:
    """``write()`` (an idempotent, fenced job-store write), tried again with back-off while the database is
    unreachable; raises the last error once :data:`STORE_RETRY_DELAYS_S` are used up."""
    for delay in (*STORE_RETRY_DELAYS_S, None):
        try:
            return write()
        except SQLAlchemyError as e:
            if delay is None or not is_store_outage(e):
                raise
            log.warning("job %s: %s failed (job store unreachable); trying again in %g s", job_id, what, delay,
                        exc_info=True)
            time.sleep(delay)
    raise AssertionError("unreachable")


def _finish_succeeded(ctx: WorkerContext, job_id: str, metrics: dict[str, Any], attempt: int,
                      allowed: tuple[str, ...]) -> bool:
    """End the job succeeded, retrying while the job store is unreachable: the result is uploaded, and a lost
    connection must not turn it into a failure. True also when an earlier try did commit (its answer was lost)."""
    def write() -> bool:
        if ctx.jobs.finish(job_id, JobStatus.succeeded, metrics=metrics, allowed=allowed, attempt=attempt):
            return True
        job = ctx.jobs.get(job_id)
        return job is not None and job.status == JobStatus.succeeded.value and job.attempts == attempt

    return _with_store_retry("finishing the job", job_id, write)


def job_checkpoints(ctx: WorkerContext, job: Job, spec: JobSpec, scratch: Path, reporter: StoreReporter
                    ) -> CheckpointStore:
    """The job's checkpoints in the artifact store; a retry also looks at the checkpoints of the job it retries.
    Written only while this run owns the job (not taken over, and still active); their size is recorded on the
    job."""
    from worker.run.checkpoints import spec_fingerprint

    return CheckpointStore(
        ctx.artifacts, checkpoint_prefix(job.id), spec_fingerprint(spec.model_dump(mode="json")), scratch,
        sources=(checkpoint_prefix(job.retry_of),) if job.retry_of else (),
        may_write=reporter.may_write,
        on_usage=lambda size: ctx.jobs.set_checkpoint_bytes(job.id, size),
    )


def _drop_checkpoints(ctx: WorkerContext, job_id: str) -> None:
    """A finished job no longer resumes: its checkpoints go (a failure to delete leaves them to housekeeping)."""
    try:
        ctx.artifacts.delete_prefix(checkpoint_prefix(job_id))
        ctx.jobs.set_checkpoint_bytes(job_id, 0)
    except Exception:
        log.warning("job %s: could not delete its checkpoints", job_id, exc_info=True)


def _error_field(e: ValidationError) -> str | None:
    """The spec field of a validation error's first problem ("model.id"), if it names one."""
    errors = e.errors()
    if errors and isinstance(named := errors[0].get("ctx", {}).get("error"), FieldError):
        return named.field  # a rule that names its field itself (evaluation.limits.<key>)
    loc = errors[0].get("loc", ()) if errors else ()
    return ".".join(str(x) for x in loc) or None


def _internal_error(ctx: WorkerContext, job_id: str, e: Exception, attempt: int | None,
                    keep_artifacts: bool = False) -> Result:
    """A bug, not a bad input: the job fails ``internal_error`` with its traceback in the event log."""
    log.exception("job %s failed unexpectedly", job_id)
    ctx.jobs.add_event(job_id, "traceback", {"traceback": traceback.format_exc()[-8000:]})
    return _fail(ctx, job_id, "internal_error", f"{type(e).__name__}: {e}"[:2000], attempt=attempt,
                 keep_artifacts=keep_artifacts)


def _storable(text: str) -> str:
    """``text`` as the job store can hold it: a message quoting user input may carry a NUL or an unpaired
    surrogate (a file name that is not UTF-8), which PostgreSQL refuses; they are written as escapes."""
    return text.replace("\x00", "\\x00").encode("utf-8", "backslashreplace").decode("utf-8")


def _fail(ctx: WorkerContext, job_id: str, code: str, message: str, field: str | None = None,
          attempt: int | None = None, keep_artifacts: bool = False) -> Result:
    """End the job failed (cancelled if a cancel came meanwhile). Artifacts a partial upload recorded are
    discarded first, unless ``keep_artifacts`` (every file was uploaded: a failed hand-off keeps the result)."""
    message, field = _storable(message), field and _storable(field)
    if not keep_artifacts and attempt is not None:
        try:
            _discard_artifacts(ctx, job_id, attempt)
        except Exception:  # best effort: the job fails either way
            log.warning("job %s: could not discard partial artifacts", job_id, exc_info=True)
    if field:
        ctx.jobs.add_event(job_id, "error", {"code": code, "message": message, "field": field})
    if ctx.jobs.finish(job_id, JobStatus.failed, (code, message), allowed=(JobStatus.running.value,),
                       attempt=attempt):
        return Result(Outcome.failed)
    # Asked to cancel meanwhile: honour that rather than report the failure, and clean up as a cancel does.
    if ctx.jobs.finish(job_id, JobStatus.cancelled, allowed=(JobStatus.cancelling.value,), attempt=attempt):
        _clean_up_cancelled(ctx, job_id)
        return Result(Outcome.cancelled)
    return Result(Outcome.noop)  # taken over by another run, or already finished


def _transient(ctx: WorkerContext, job: Job, e: Exception, keep_artifacts: bool = False) -> Result:
    s = ctx.settings
    if job.retries >= s.transient_retries:
        return _fail(ctx, job.id, "transient_error", f"gave up after {job.retries} retries: {e}"[:2000],
                     attempt=job.attempts, keep_artifacts=keep_artifacts)
    if not keep_artifacts:  # a queued job lists no partial upload (a cancel while queued would keep it for good)
        try:
            _discard_artifacts(ctx, job.id, job.attempts)
        except Exception:
            log.warning("job %s: could not discard partial artifacts", job.id, exc_info=True)
    delay = s.retry_backoff_s * (2 ** job.retries)
    from datetime import timedelta

    try:  # the job store may be what failed: retried like the final finish, so the run is not lost to it
        requeued = _with_store_retry("requeueing the job", job.id, lambda: ctx.jobs.requeue(
            job.id, utcnow() + timedelta(seconds=delay), str(e)[:500], attempt=job.attempts))
    except SQLAlchemyError:
        log.warning("job %s: could not requeue it (job store unreachable); the lost-job sweep will", job.id,
                    exc_info=True)
        return Result(Outcome.noop)
    if requeued:
        return Result(Outcome.retry, delay)
    return _fail(ctx, job.id, "transient_error", str(e)[:2000], attempt=job.attempts, keep_artifacts=keep_artifacts)


def _discard_artifacts(ctx: WorkerContext, job_id: str, attempt: int | None = None) -> bool:
    """Forget the job's artifacts and delete their files. With ``attempt``, only while that run owns the
    job (False otherwise), and only the files of runs 1..attempt: a later run's files are never touched."""
    if not ctx.jobs.clear_artifacts(job_id, attempt=attempt):
        return False
    if attempt is None:
        ctx.artifacts.delete_prefix(job_prefix(job_id))
    else:
        for k in range(1, attempt + 1):
            ctx.artifacts.delete_prefix(attempt_prefix(job_id, k))
    return True


def _upload(ctx: WorkerContext, job_id: str, out_dir: Path, attempt: int | None = None, tries: int = 3) -> None:
    """Upload every result file and record it (name, size, sha256 computed while uploading); stops with
    :class:`Cancelled` if another run takes the job over meanwhile."""
    try:
        owned = _discard_artifacts(ctx, job_id, attempt)  # leftovers of this or an earlier attempt
    except Exception as e:
        raise TransientError(f"artifact store unavailable for upload: {e}") from e
    if not owned:
        raise Cancelled("taken over by another worker before uploading")
    files = result_files(out_dir)
    done = 0
    for name, path in files:
        for k in range(tries):
            try:
                stored = ctx.artifacts.put_file(job_key(job_id, name, attempt), path)
                break
            except Exception as e:
                if not is_storage_failure(e):  # a bug: another try would not help
                    raise
                if k == tries - 1:
                    raise TransientError(f"artifact upload failed for {name}: {e}") from e
                time.sleep(2 ** k)
        if not ctx.jobs.add_artifact(job_id, name, stored.size, stored.sha256, stored.key, attempt=attempt):
            _drop_unrecorded(ctx, job_id, stored.key, attempt)
            raise Cancelled("taken over by another worker while uploading")
        done += stored.size
    ctx.jobs.add_event(job_id, "artifacts", {"count": len(files), "bytes": done})


def _hand_off(ctx: WorkerContext, job: Job, spec: JobSpec, out_dir: Path, attempt: int | None) -> bool:
    """Copy the result to ``output.destination`` when the spec names one (only under the tenant's allowed prefixes:
    the tenancy settings may have changed since the job was accepted), and record where it went. True when a
    complete copy (its manifest written) is there."""
    destination = spec.output.destination
    if not destination:
        return False
    from worker.service.handoff import DestinationNotAllowed, hand_off

    if not TenantPolicy(ctx.settings).destination_allowed(job.tenant, destination):
        raise DestinationNotAllowed(f"output.destination {destination} is not among the destinations allowed for "
                                    f"tenant {job.tenant}", field="output.destination")
    result = hand_off(ctx.settings, out_dir, destination, job.id)
    if not _with_store_retry("recording the hand-off", job.id,
                             lambda: ctx.jobs.set_output(job.id, result, attempt=attempt)):
        raise Cancelled("taken over by another worker while handing off")
    try:
        ctx.jobs.add_event(job.id, "handoff", result)
    except SQLAlchemyError:  # the output is recorded; the event is a nicety
        log.warning("job %s: could not record the hand-off event", job.id, exc_info=True)
    return True


def _drop_unrecorded(ctx: WorkerContext, job_id: str, key: str, attempt: int | None) -> None:
    """Delete what this run wrote after it lost the job (taken over, failed by the sweep, or deleted), so no
    file outlives its record. Only this attempt's folder: no other run ever writes there."""
    try:
        ctx.artifacts.delete_prefix(attempt_prefix(job_id, attempt) if attempt is not None else key)
    except Exception:  # best effort: the run is being cancelled either way
        log.warning("could not delete unrecorded artifacts of job %s attempt %s", job_id, attempt, exc_info=True)


def release_held(job_id: str, enqueuer: Enqueuer, ctx: WorkerContext | None = None) -> list[str]:
    """After a run: send the held jobs of the job's tenant that its quota now lets run (a finished job frees a
    running slot). Never raises: the sweep releases them too."""
    ctx = ctx or get_context()
    try:
        job = ctx.jobs.get(job_id)
        if job is None:
            return []
        return dispatch_held(ctx.jobs, TenantPolicy(ctx.settings), enqueuer, [job.tenant])
    except Exception:
        log.warning("could not release held jobs after %s", job_id, exc_info=True)
        return []


def sweep(ctx: WorkerContext | None = None, send: Callable[[str], None] | None = None,
          enqueuer: Enqueuer | None = None) -> list[str]:
    """Recovery: jobs active with no heartbeat for twice ``stale_after_s`` lost their worker. One with runs left
    (fewer than ``max_attempts``) goes back to ``queued`` and, with ``send``, to the broker: it runs again even
    when other jobs wait ahead of its redelivered message; one whose lost run lasted the hard time limit is failed
    ``time_limit``, the others ``worker_lost`` (cancelling ones → cancelled). Twice, so that a redelivered task
    (which takes a job over once it is ``stale_after_s`` stale) gets the first chance to re-run it. Returns the ids
    changed."""
    ctx = ctx or get_context()
    if enqueuer is not None:
        try:  # held jobs whose tenant has a free slot (or no running limit any more)
            dispatch_held(ctx.jobs, TenantPolicy(ctx.settings), enqueuer)
        except Exception:  # a quota file the worker cannot read must not stop the recovery below
            log.warning("could not release held jobs", exc_info=True)
    requeued, ended = ctx.jobs.recover_lost(stale_cutoff(2 * ctx.settings.stale_after_s), ctx.settings.max_attempts,
                                            ctx.settings.hard_limit_run_s)
    for job_id in requeued:
        log.warning("job %s: worker lost (stale heartbeat); queued to run again", job_id)
        if send is not None:
            send(job_id)
    for job_id in ended:
        log.warning("job %s: worker lost (stale heartbeat); ended: no runs left, the hard time limit, or cancelling",
                    job_id)
        _clean_up_ended(ctx, job_id)
    # Housekeeping after the recovery, each step on its own: one failing must not stop the others (or recovery).
    for name, step in (("scratch clean-up", clean_scratch), ("checkpoint expiry", expire_checkpoints)):
        try:
            step(ctx)
        except Exception:
            log.warning("%s failed", name, exc_info=True)
    return requeued + ended


def expire_checkpoints(ctx: WorkerContext) -> list[str]:
    """Delete the checkpoints of jobs that finished more than ``checkpoint_keep_s`` ago (failed ones keep theirs that
    long for a retry to resume from). Returns the job ids."""
    from datetime import timedelta

    expired = ctx.jobs.expired_checkpoints(utcnow() - timedelta(seconds=ctx.settings.checkpoint_keep_s))
    for job_id in expired:
        _drop_checkpoints(ctx, job_id)
    return expired


def clean_scratch(ctx: WorkerContext) -> list[str]:
    """Remove the scratch folders (work_dir/<job id>/<run>) that killed or superseded runs left behind, once they
    were not touched for ``stale_after_s`` (a run starting now has just made its folder): every run folder of a
    job that is not active (finished, deleted, or queued to run again), and of an active job those of runs other
    than its current one. Folders of an older layout (work_dir/<job id>/result) go only with an inactive job.
    Returns the job ids cleaned."""
    root = ctx.settings.work_path
    if ctx.settings.keep_work_dirs or not root.is_dir():
        return []
    cleaned = []
    before = time.time() - ctx.settings.stale_after_s
    for folder in root.iterdir():
        if not (is_job_id(folder.name) and folder.is_dir()):
            continue
        try:
            folder_old = folder.stat().st_mtime <= before
            runs = list(folder.iterdir())
        except FileNotFoundError:  # its last run removed it just now
            continue
        job = ctx.jobs.get(folder.name)
        active = job is not None and job.status in ACTIVE
        removed = False
        for run in runs:
            try:
                if run.stat().st_mtime > before:
                    continue
            except FileNotFoundError:  # the run ended and removed its folder meanwhile
                continue
            run_attempt = _run_attempt(run)
            if active and (run_attempt is None or run_attempt == job.attempts):
                continue  # the current run's (or, in the older layout, possibly in use)
            shutil.rmtree(run, ignore_errors=True)
            removed = True
        if folder_old or removed:
            with contextlib.suppress(OSError):
                folder.rmdir()  # empty now: no run of this job on this host
        if removed:
            cleaned.append(folder.name)
    if cleaned:
        log.info("removed left-over scratch folders of %d jobs", len(cleaned))
    return cleaned


def describe(result: Result) -> dict[str, Any]:
    return {"outcome": result.outcome.value, "retry_in": result.retry_in}
