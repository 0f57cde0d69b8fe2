"""The service's :class:`~worker.reporting.Reporter`: writes stage, progress, metrics and events to the job
store (progress writes throttled) and answers ``cancel_requested`` from the job's status.

A database that fails for a while never fails the job from here: a write that fails is kept and written again with
the next one, and ``cancel_requested`` answers what it last knew until the outage has lasted ``db_outage_s``, then
raises :class:`TransientError` (the job is put back to resume later)."""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import Any

from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError, SQLAlchemyError

from app.schemas import JobStatus, Stage
from app.store.jobs import ACTIVE, JobStore
from app.store.models import Job
from worker.errors import TransientError
from worker.service import preemption

log = logging.getLogger("restorelcc.worker")


def is_store_outage(exc: BaseException) -> bool:
    """The job store (database) unreachable or its connection lost: may pass when tried again. A database error
    that is not about the connection (a constraint, a bad statement) is a bug, not an outage."""
    return isinstance(exc, OperationalError | InterfaceError) or (
        isinstance(exc, DBAPIError) and bool(exc.connection_invalidated))


PENDING_EVENTS_MAX = 200  # events kept for a database that is down; older ones beyond this are dropped


def jsonable(obj: Any) -> Any:
    """JSON-safe copy: NaN/inf → None, tuples → lists, unknown objects → str (PostgreSQL's json rejects NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, bool | int | str) or obj is None:
        return obj
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set):
        return [jsonable(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        try:
            return jsonable(obj.item())
        except (TypeError, ValueError):
            pass
    return str(obj)


class StoreReporter:
    """Progress is written at most every ``progress_interval_s`` (the last value is kept and flushed);
    a ``progress`` event is logged each time progress advances by ``event_step``. ``cancel_requested``
    reads the status at most every ``cancel_poll_s`` and is also true past ``deadline`` (a soft time limit
    checked at every checkpoint)."""

    def __init__(
        self,
        jobs: JobStore,
        job_id: str,
        progress_interval_s: float = 0.5,
        cancel_poll_s: float = 1.0,
        event_step: float = 0.05,
        deadline: float | None = None,
        attempt: int | None = None,
        db_outage_s: float = 120.0,
    ):
        self.jobs = jobs
        self.job_id = job_id
        self.attempt = attempt  # the run this reporter writes for; writes stop counting once another run owns it
        self.superseded = False
        self.preempted = False  # stopped because this worker is being stopped (worker.service.preemption)
        self.progress_interval_s = progress_interval_s
        self.cancel_poll_s = cancel_poll_s
        self.event_step = event_step
        self.deadline = deadline
        self.current_stage: Stage | None = None
        self.metrics_seen: dict[str, Any] = {}
        self.timed_out = False
        self._fraction = 0.0
        self._message = ""
        self._written_at = 0.0
        self._pending = False
        self._event_fraction = -1.0
        self._cancel_checked_at = 0.0
        self._cancel = False
        self._lock = threading.Lock()
        self.db_outage_s = db_outage_s
        self._db_down_since: float | None = None  # first failed cancellation poll of the current outage
        self._stage_pending = False
        self._metrics_pending: dict[str, Any] = {}
        self._events_pending: list[tuple[str, dict[str, Any], str | None]] = []
        self._plan_pending: dict[str, Any] | None = None

    def _drop_pending(self) -> None:
        self._stage_pending, self._metrics_pending, self._events_pending, self._plan_pending = False, {}, [], None

    def _retry_pending(self) -> bool:
        """Write what earlier writes could not (the database was down). True when nothing is left. Nothing is
        written for a run another one took over (its events would land in the new run's log), and a write the
        database refuses for another reason than its connection is dropped, not retried for ever."""
        if self.superseded:
            self._drop_pending()
            return True
        try:
            if self._stage_pending and self.current_stage is not None:
                self.jobs.set_stage(self.job_id, self.current_stage.value, attempt=self.attempt)
                self._stage_pending = False
            if self._metrics_pending:
                metrics, stage = self._metrics_pending, self.current_stage.value if self.current_stage else None
                self.jobs.merge_metrics(self.job_id, metrics, stage, attempt=self.attempt)
                self._metrics_pending = {}
            if self._plan_pending is not None:
                self.jobs.set_plan(self.job_id, self._plan_pending)
                self._plan_pending = None
            while self._events_pending:
                kind, data, stage = self._events_pending[0]
                self.jobs.add_event(self.job_id, kind, data, stage)
                self._events_pending.pop(0)
        except SQLAlchemyError as exc:
            if not is_store_outage(exc):
                log.warning("job %s: the job store refused a write; dropped", self.job_id, exc_info=True)
                self._drop_pending()
                return True
            # a database hiccup must not fail a long job: the next write catches up
            log.warning("job %s: job store write failed; will retry with the next one", self.job_id, exc_info=True)
            return False
        return True

    def stage(self, stage: Stage) -> None:
        self.current_stage = Stage(stage)
        self.flush()
        self._stage_pending = True
        self._retry_pending()

    def progress(self, fraction: float, message: str = "") -> None:
        with self._lock:
            self._fraction = max(self._fraction, min(1.0, max(0.0, float(fraction))))
            self._message = message
            now = time.monotonic()
            due = now - self._written_at >= self.progress_interval_s or self._fraction >= 1.0
            if not due:
                self._pending = True
                return
            self._write(now)

    def _write(self, now: float) -> None:
        event = self._fraction - self._event_fraction >= self.event_step
        if event:
            self._event_fraction = self._fraction
        stage = self.current_stage.value if self.current_stage else None
        try:
            self.jobs.set_progress(self.job_id, self._fraction, self._message, event=event, stage=stage,
                                   attempt=self.attempt)
        except SQLAlchemyError:  # a database hiccup must not fail a long job: the next write catches up
            log.warning("progress write failed; will retry", exc_info=True)
            self._pending = True
            return
        self._written_at = now
        self._pending = False

    def flush(self) -> bool:
        """Write the last throttled progress value, if any, and whatever earlier writes could not. True when
        everything is written."""
        with self._lock:
            if self._pending:
                self._write(time.monotonic())
            return self._retry_pending() and not self._pending

    def metrics(self, metrics: dict[str, Any]) -> None:
        clean = jsonable(metrics)
        self.metrics_seen.update(clean)
        self._metrics_pending.update(clean)
        self._retry_pending()

    def event(self, kind: str, data: dict[str, Any]) -> None:
        if kind == "plan":  # the plan this worker checked replaces the one made at submit
            self._plan_pending = jsonable(data)
        self._events_pending.append((kind, jsonable(data), self.current_stage.value if self.current_stage else None))
        del self._events_pending[:-PENDING_EVENTS_MAX]
        self._retry_pending()

    def cancel_requested(self, force: bool = False) -> bool:
        if self._cancel:
            return True
        if preemption.requested():  # this worker is being stopped: give the job back at this checkpoint
            self.preempted = self._cancel = True
            return True
        if self.deadline is not None and time.monotonic() > self.deadline:
            self.timed_out = True
            self._cancel = True
            return True
        now = time.monotonic()
        if not force and now - self._cancel_checked_at < self.cancel_poll_s:
            return False
        self._cancel_checked_at = now
        try:
            job = self.jobs.get(self.job_id)
        except SQLAlchemyError as exc:
            # A short outage: go on with the last answer (not cancelled, or we would have returned above) and ask
            # again at the next poll; a long one puts the job back to resume once the database is back.
            if self._db_down_since is None:
                self._db_down_since = now
            if now - self._db_down_since >= self.db_outage_s:
                raise TransientError(f"the job store has been unreachable for over {self.db_outage_s:g} s: "
                                     f"{exc}") from exc
            log.warning("job %s: could not read the job store to check for a cancel; asking again at the next "
                        "poll", self.job_id, exc_info=True)
            return False
        self._db_down_since = None
        # Cancelling, or no longer ours at all (deleted, ended by the lost-worker sweep, or taken over by
        # another worker after this one looked lost): stop.
        self._note_owner(job)
        self._cancel = job is None or job.status != JobStatus.running.value or self.superseded
        return self._cancel

    def user_cancelled(self) -> bool:
        """Whether the job was cancelled, or is no longer this run's, read now. Unlike :meth:`cancel_requested`, not
        the deadline or a preemption: a result that is uploaded is still handed off. A database that cannot be read
        answers False (the fenced finish decides)."""
        try:
            job = self.jobs.get(self.job_id)
        except SQLAlchemyError:
            log.warning("job %s: could not read the job store before the hand-off", self.job_id, exc_info=True)
            return False
        self._note_owner(job)
        return job is None or job.status != JobStatus.running.value or self.superseded

    def check_superseded(self) -> bool:
        """True if another run has taken the job over (read now, not throttled). A database that cannot be read is
        a TransientError: a checkpoint is not written without knowing this run still owns the job, and the job is
        put back to resume later rather than failed."""
        try:
            job = self.jobs.get(self.job_id)
        except SQLAlchemyError as exc:
            raise TransientError(f"could not read the job store to confirm this run owns the job: {exc}") from exc
        self._note_owner(job)
        return self.superseded

    def may_write(self) -> bool:
        """Whether this run still owns the job (read now): no later run took it over, and it is still active (not
        requeued by the lost-worker sweep, which keeps its attempt number, nor finished)."""
        try:
            job = self.jobs.get(self.job_id)
        except SQLAlchemyError as exc:
            raise TransientError(f"could not read the job store to confirm this run owns the job: {exc}") from exc
        self._note_owner(job)
        return job is not None and not self.superseded and job.status in ACTIVE

    def _note_owner(self, job: Job | None) -> None:
        self.superseded = job is not None and self.attempt is not None and job.attempts != self.attempt
