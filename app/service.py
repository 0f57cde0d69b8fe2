"""Use cases behind the routes: create (validate paths, record, enqueue), cancel, delete.

Jobs are enqueued by task *name* (``restorelcc.run_job``), so the API never imports the worker code.
In the embedded setup there is no broker: the local worker polls the job store for queued jobs.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

from pydantic import ValidationError

from app.config import Settings
from app.context import config_context, context_problem
from app.errors import STORE_RETRY_AFTER_S, ApiError, not_found
from app.paths import PathRefused, check_spec_files, check_spec_paths
from app.plan import read_local_model, submit_plan
from app.schemas import JobSpec, JobStatus
from app.store.artifacts import ArtifactNotFound, ArtifactStore, is_storage_failure, job_prefix
from app.store.jobs import (
    CHANGED_DEFAULTS,
    FINISHED,
    CancelResult,
    IdempotencyConflict,
    JobNotFinished,
    JobStore,
    QuotaExceeded,
)
from app.store.models import Job
from app.tenancy import Quota, TenantPolicy, choose_queue, worker_queues
from app.webhooks.urls import UrlRefused, check_url

log = logging.getLogger("restorelcc.api")

TASK_NAME = "restorelcc.run_job"
_JOB_ID = re.compile(r"^[A-Za-z0-9_-]{1,36}$")  # the store's ids (uuid4 hex) fit this; a NUL would break PostgreSQL


def is_job_id(value: str) -> bool:
    """Whether ``value`` could name a job: anything else is not found without asking the store."""
    return bool(_JOB_ID.match(value))


class Enqueuer(Protocol):
    def enqueue(self, job_id: str, queue: str | None = None, priority: int = 5) -> None: ...

    def check(self) -> None:
        """Raise when the broker is unreachable (readiness)."""


class LocalEnqueuer:
    """Embedded setup: nothing to send; the local worker polls the job store."""

    def __init__(self) -> None:
        self.wakeup = threading.Event()

    def enqueue(self, job_id: str, queue: str | None = None, priority: int = 5) -> None:
        self.wakeup.set()

    def check(self) -> None:
        return None


def broker_priority(priority: int) -> int:
    """A job's priority (0-9, higher first) as the Redis transport's message priority (0 is served first)."""
    return 9 - max(0, min(9, priority))


def celery_priority_options() -> dict[str, Any]:
    """Transport options that give every priority 0-9 a list of its own (the default merges them into four)."""
    return {"queue_order_strategy": "priority", "priority_steps": list(range(10))}


class CeleryEnqueuer:
    """Sends ``restorelcc.run_job(job_id)`` to the job's queue (default: the configured one) with its priority."""

    def __init__(self, redis_url: str, queue: str):
        from celery import Celery

        self.redis_url = redis_url
        self.queue = queue
        self.celery = Celery("restorelcc-api", broker=redis_url)
        self.celery.conf.update(
            broker_connection_timeout=5,
            broker_connection_retry_on_startup=True,
            task_ignore_result=True,
            broker_transport_options={"socket_timeout": 5, "socket_connect_timeout": 5, **celery_priority_options()},
        )

    def enqueue(self, job_id: str, queue: str | None = None, priority: int = 5) -> None:
        self.celery.send_task(
            TASK_NAME, args=[job_id], queue=queue or self.queue, priority=broker_priority(priority), retry=True,
            retry_policy={"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 2},
        )

    def check(self) -> None:
        import redis

        redis.Redis.from_url(self.redis_url, socket_connect_timeout=2, socket_timeout=2).ping()


def make_enqueuer(settings: Settings) -> Enqueuer:
    return LocalEnqueuer() if settings.embedded else CeleryEnqueuer(settings.redis_url or "", settings.queue)


@contextmanager
def artifact_store_errors() -> Iterator[None]:
    """The artifact store's failures as answers: an object that is gone is 404 ``artifact_not_found``; a failing
    store (:func:`is_storage_failure`: unreachable, throttling, a missing bucket) is 503
    ``artifact_store_unavailable`` with ``Retry-After``, as it may pass. Anything else is a bug and stays a 500."""
    try:
        yield
    except ArtifactNotFound as e:
        raise not_found("artifact") from e
    except Exception as e:
        if not is_storage_failure(e):
            raise
        log.warning("artifact store unavailable: %r", e)
        raise ApiError(503, "artifact_store_unavailable", "the artifact store is unavailable; try again later",
                       headers={"Retry-After": str(STORE_RETRY_AFTER_S)}) from e


@dataclass
class Created:
    job: Job
    created: bool


def dispatch_held(jobs: JobStore, policy: TenantPolicy, enqueuer: Enqueuer, tenants: list[str] | None = None
                  ) -> list[str]:
    """Send the held jobs whose tenants now have a free running slot (all tenants with held jobs by default).
    A send that fails is left to the lost-message sweep, which sends queued jobs without a broker message again."""
    sent = []
    for tenant in jobs.held_tenants() if tenants is None else tenants:
        for d in jobs.admit(tenant, policy.quota(tenant).max_running):
            try:
                enqueuer.enqueue(d.id, d.queue, d.priority)
                sent.append(d.id)
            except Exception:
                log.warning("could not send released job %s; the lost-message sweep will", d.id, exc_info=True)
    return sent


class JobService:
    def __init__(self, settings: Settings, jobs: JobStore, artifacts: ArtifactStore, enqueuer: Enqueuer,
                 policy: TenantPolicy | None = None):
        self.settings = settings
        self.jobs = jobs
        self.artifacts = artifacts
        self.enqueuer = enqueuer
        self.policy = policy or TenantPolicy(settings)

    def _check_integrations(self, tenant: str, spec: JobSpec) -> None:
        """The spec's webhook, hand-off destination and queue, against what the operator allows this tenant."""
        if spec.notify is not None:
            try:
                check_url(spec.notify.url, self.settings.webhook_allowed_hosts)
            except UrlRefused as e:
                raise ApiError(422, "webhook_not_allowed", f"notify.url: {e}", "notify.url") from e
            if self.policy.webhook_secret(tenant) is None:
                raise ApiError(422, "webhook_not_allowed", f"notify.url: no webhook secret is configured for tenant "
                                                           f"{tenant} (RESTORELCC_WEBHOOK_SECRETS)", "notify.url")
        dest = spec.output.destination
        if dest is not None and not self.policy.destination_allowed(tenant, dest):
            allowed = ", ".join(self.policy.destinations(tenant)) or "none"
            raise ApiError(422, "destination_not_allowed", f"output.destination: {dest} is not under a destination "
                                                           f"allowed for tenant {tenant} (allowed: {allowed})",
                           "output.destination")
        queue = spec.resources.queue
        if queue is not None and queue not in worker_queues(self.settings):
            known = ", ".join(sorted(worker_queues(self.settings)))
            raise ApiError(422, "unknown_queue", f"resources.queue: no queue {queue!r} (queues: {known})",
                           "resources.queue")

    def _queue(self, spec: JobSpec, plan: dict[str, Any] | None) -> str:
        if spec.resources.queue is not None:
            return spec.resources.queue
        peak = ((plan or {}).get("devices", {}).get("cuda") or {}).get("peak", {}).get("device_bytes")
        return choose_queue(worker_queues(self.settings), peak, self.settings.queue)

    def create(self, tenant: str, spec: JobSpec, idempotency_key: str | None = None,
               retry_of: str | None = None) -> Created:
        try:
            local = check_spec_paths(spec, self.settings)
            check_spec_files(spec, local)
        except PathRefused as e:
            raise ApiError(422, e.code, e.message, e.field) from e
        model = read_local_model(local["model.id"], spec.model.gguf_file) if local.get("model.id") else None
        too_long = context_problem(spec, config_context(model.config)) if model is not None else None
        if too_long is not None:
            raise ApiError(422, "invalid_spec", too_long[1], too_long[0])
        self._check_integrations(tenant, spec)
        body: dict[str, Any] = spec.model_dump(mode="json")
        plan = submit_plan(spec, model)
        quota = self.policy.quota(tenant)
        try:
            job, created = self.jobs.create(
                tenant, body, idempotency_key, retry_of, plan=plan, queue=self._queue(spec, plan),
                priority=spec.resources.priority, quota=quota if quota != Quota() else None,
                retry_after_s=self.settings.quota_retry_after_s, left_out=spec.left_out(CHANGED_DEFAULTS))
        except IdempotencyConflict as e:
            raise ApiError(
                409, "idempotency_conflict",
                f"Idempotency-Key was already used for job {e.job_id} with a different body", "Idempotency-Key",
            ) from e
        except QuotaExceeded as e:
            raise ApiError(429, "quota_exceeded", e.message, headers={"Retry-After": str(e.retry_after)}) from e
        if created:
            if job.held:
                dispatch_held(self.jobs, self.policy, self.enqueuer, [tenant])
                job = self.jobs.get(job.id) or job
            else:
                job = self._enqueue_new(job)
        return Created(job, created)

    def _enqueue_new(self, job: Job) -> Job:
        """Send a new job to the broker; returns the job as it now is. If the send raises, the job is failed and
        its Idempotency-Key freed (503), unless a worker has claimed it meanwhile: the message did arrive (the
        connection broke after the broker took it), so the job runs and the create succeeded."""
        try:
            self.enqueuer.enqueue(job.id, job.queue, job.priority)
            return job
        except Exception as e:  # broker down: the job cannot run; say so instead of leaving it queued
            if not self.jobs.finish(job.id, JobStatus.failed, ("enqueue_failed", f"could not enqueue the job: {e}"),
                                    allowed=(JobStatus.queued.value,)):
                log.warning("enqueue of %s raised, but a worker has the job already: %r", job.id, e)
                return self.jobs.get(job.id) or job
            log.exception("enqueue failed for %s", job.id)
            self.jobs.release_idempotency(job.id)  # a retry with the same key must get a new job
            raise ApiError(503, "broker_unavailable", "the job queue is unavailable; try again later") from e

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
        if res.changed and res.status is JobStatus.cancelled:  # a released queued job frees a running slot
            dispatch_held(self.jobs, self.policy, self.enqueuer, [tenant])
        return res

    def delete(self, tenant: str, job_id: str) -> None:
        """Delete a finished job: its stored files first, then its rows. A store failure (503) leaves the job
        recorded, so a later DELETE finishes the cleanup instead of leaving files that nothing points at. A finished
        job never becomes active again, so no run records files for it meanwhile (a lost run's late upload is deleted
        by that run: worker.service.tasks._upload)."""
        job = self.get(tenant, job_id)
        if job.status not in FINISHED:
            raise _not_finished(job.status)
        with artifact_store_errors():
            self.artifacts.delete_prefix(job_prefix(job_id))
        try:
            deleted = self.jobs.delete(job_id, tenant)
        except JobNotFinished as e:
            raise _not_finished(str(e)) from e
        if not deleted:  # a concurrent DELETE got there first
            raise not_found()


def _not_finished(status: str) -> ApiError:
    return ApiError(409, "job_not_finished", f"job is {status}; cancel it and wait until it has finished")
