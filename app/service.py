"""Use cases behind the routes: create (validate paths, record, enqueue), cancel, delete.

Jobs are enqueued by task *name* (``restorelcc.run_job``), so the API never imports the worker code.
In the embedded setup there is no broker: the local worker polls the job store for queued jobs.
"""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass
from typing import Any, Protocol

from pydantic import ValidationError

from app.config import Settings
from app.errors import ApiError, not_found
from app.paths import PathRefused, check_spec_files, check_spec_paths
from app.plan import submit_plan
from app.schemas import JobSpec, JobStatus
from app.store.artifacts import ArtifactStore, job_prefix
from app.store.jobs import CancelResult, IdempotencyConflict, JobNotFinished, JobStore
from app.store.models import Job

log = logging.getLogger("restorelcc.api")

TASK_NAME = "restorelcc.run_job"
_JOB_ID = re.compile(r"^[A-Za-z0-9_-]{1,36}$")  # the store's ids (uuid4 hex) fit this; a NUL would break PostgreSQL


def is_job_id(value: str) -> bool:
    """Whether ``value`` could name a job: anything else is not found without asking the store."""
    return bool(_JOB_ID.match(value))


class Enqueuer(Protocol):
    def enqueue(self, job_id: str) -> None: ...

    def check(self) -> None:
        """Raise when the broker is unreachable (readiness)."""


class LocalEnqueuer:
    """Embedded setup: nothing to send; the local worker polls the job store."""

    def __init__(self) -> None:
        self.wakeup = threading.Event()

    def enqueue(self, job_id: str) -> None:
        self.wakeup.set()

    def check(self) -> None:
        return None


class CeleryEnqueuer:
    """Sends ``restorelcc.run_job(job_id)`` to the configured queue."""

    def __init__(self, redis_url: str, queue: str):
        from celery import Celery

        self.redis_url = redis_url
        self.queue = queue
        self.celery = Celery("restorelcc-api", broker=redis_url)
        self.celery.conf.update(
            broker_connection_timeout=5,
            broker_connection_retry_on_startup=True,
            task_ignore_result=True,
            broker_transport_options={"socket_timeout": 5, "socket_connect_timeout": 5},
        )

    def enqueue(self, job_id: str) -> None:
        self.celery.send_task(
            TASK_NAME, args=[job_id], queue=self.queue, retry=True,
            retry_policy={"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 2},
        )

    def check(self) -> None:
        import redis

        redis.Redis.from_url(self.redis_url, socket_connect_timeout=2, socket_timeout=2).ping()


def make_enqueuer(settings: Settings) -> Enqueuer:
    return LocalEnqueuer() if settings.embedded else CeleryEnqueuer(settings.redis_url or "", settings.queue)


@dataclass
class Created:
    job: Job
    created: bool


class JobService:
    def __init__(self, settings: Settings, jobs: JobStore, artifacts: ArtifactStore, enqueuer: Enqueuer):
        self.settings = settings
        self.jobs = jobs
        self.artifacts = artifacts
        self.enqueuer = enqueuer

    def create(self, tenant: str, spec: JobSpec, idempotency_key: str | None = None,
               retry_of: str | None = None) -> Created:
        try:
            local = check_spec_paths(spec, self.settings)
            check_spec_files(spec, local)
        except PathRefused as e:
            raise ApiError(422, e.code, e.message, e.field) from e
        body: dict[str, Any] = spec.model_dump(mode="json")
        try:
            job, created = self.jobs.create(tenant, body, idempotency_key, retry_of,
                                            plan=submit_plan(spec, local.get("model.id")))
        except IdempotencyConflict as e:
            raise ApiError(
                409, "idempotency_conflict",
                f"Idempotency-Key was already used for job {e.job_id} with a different body", "Idempotency-Key",
            ) from e
        if created:
            try:
                self.enqueuer.enqueue(job.id)
            except Exception as e:  # broker down: the job cannot run; say so instead of leaving it queued
                log.exception("enqueue failed for %s", job.id)
                self.jobs.finish(job.id, JobStatus.failed, ("enqueue_failed", f"could not enqueue the job: {e}"),
                                 allowed=(JobStatus.queued.value,))
                self.jobs.release_idempotency(job.id)  # a retry with the same key must get a new job
                raise ApiError(503, "broker_unavailable", "the job queue is unavailable; try again later") from e
        return Created(job, created)

    def get(self, tenant: str, job_id: str) -> Job:
        job = self.jobs.get(job_id, tenant) if is_job_id(job_id) else None
        if job is None:
            raise not_found()
        return job

    def retry(self, tenant: str, job_id: str, idempotency_key: str | None = None) -> Created:
        """A new job with the spec of a failed or cancelled one, linked to it (``retry_of``); its worker resumes from
        the checkpoints the failed job kept (worker.service.tasks.job_checkpoints), else it runs from the start.
        The spec is validated and its paths checked again, as at submit."""
        job = self.get(tenant, job_id)
        if job.status not in (JobStatus.failed.value, JobStatus.cancelled.value):
            raise ApiError(409, "job_not_retryable", f"job is {job.status}; only a failed or cancelled job can be "
                                                     "retried")
        try:
            spec = JobSpec.model_validate(job.spec)
        except ValidationError as e:  # stored under an older contract that no longer holds
            raise ApiError(409, "job_not_retryable", f"the job's spec is no longer valid: {e.errors()[0]['msg']}"
                           ) from e
        return self.create(tenant, spec, idempotency_key, retry_of=job.id)

    def cancel(self, tenant: str, job_id: str) -> CancelResult:
        res = self.jobs.request_cancel(job_id, tenant) if is_job_id(job_id) else None
        if res is None:
            raise not_found()
        return res

    def delete(self, tenant: str, job_id: str) -> None:
        self.get(tenant, job_id)
        try:
            deleted = self.jobs.delete(job_id, tenant)
        except JobNotFinished as e:
            raise ApiError(409, "job_not_finished", f"job is {e}; cancel it and wait until it has finished") from e
        if not deleted:
            raise not_found()
        self.artifacts.delete_prefix(job_prefix(job_id))
