"""The job store repository: the single source of truth for job state.

Every state change is one conditional UPDATE (``... WHERE status IN (...)``), so transitions are atomic
across processes: queued→running only if still queued; cancel turns queued into cancelled and running into
cancelling; a finished job never changes again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, delete, func, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.schemas import JobStatus
from app.store.db import session_factory
from app.store.models import HASH_VERSION, MAX_SEQ, Artifact, Delivery, Event, IdempotencyKey, Job, utcnow
from app.tenancy import Quota
from app.webhooks.payload import event_payload

log = logging.getLogger("restorelcc.store")

ACTIVE = (JobStatus.running.value, JobStatus.cancelling.value)
FINISHED = tuple(s.value for s in JobStatus if s.finished)


class IdempotencyConflict(Exception):
    """The idempotency key was already used with a different request body."""

    def __init__(self, job_id: str):
        super().__init__(job_id)
        self.job_id = job_id


class JobNotFinished(Exception):
    """Only a finished job can be deleted."""


class QuotaExceeded(Exception):
    """A tenant's limit refuses the job: ``limit`` names it, ``retry_after`` says when to try again (seconds)."""

    def __init__(self, limit: str, value: int, retry_after: int, message: str):
        super().__init__(message)
        self.limit, self.value, self.retry_after, self.message = limit, value, retry_after, message


@dataclass(frozen=True)
class Dispatch:
    """A queued job to send to the broker: where, and how urgently."""

    id: str
    queue: str | None
    priority: int


WAITING = (JobStatus.queued.value, JobStatus.running.value, JobStatus.cancelling.value)


@dataclass(frozen=True)
class CancelResult:
    status: JobStatus
    changed: bool


# Spec fields added since idempotency keys were first stored, with their defaults: left out of the hash while they
# hold them, so a request repeated after an upgrade still matches the hash stored before it.
ADDED_DEFAULTS: dict[tuple[str, ...], Any] = {
    ("notify",): None, ("resources",): {"queue": None, "priority": 5}, ("output", "destination"): None,
    ("restoration", "objective"): "sft", ("restoration", "distill_tokens"): "response",
    ("restoration", "distill_top_k"): 64, ("restoration", "sft_weight"): 0.0, ("model", "split"): "auto",
    ("restoration", "max_grad_norm"): None, ("restoration", "response_eos"): True,
}


# Defaults changed since version-1 keys were stored, with the value a request that left the field out got before
# the change: compared with a version-1 key, such a request is hashed as if it still got it, so repeated after the
# upgrade it finds the job it created before. (Naming the earlier value hashes the same: one request before.)
CHANGED_DEFAULTS: dict[tuple[str, ...], Any] = {
    ("restoration", "objective"): "sft", ("restoration", "sft_weight"): 0.0,  # RestoreLCC's objective
}


def _own_parent(view: dict[str, Any], parents: list[str]) -> dict[str, Any] | None:
    """The dict at ``parents`` in ``view``, copied along the way so that changing it leaves the spec alone; None
    where the path is not there."""
    parent = view
    for key in parents:
        child = parent.get(key)
        if not isinstance(child, dict):
            return None
        parent[key] = parent = dict(child)
    return parent


def hash_view(spec: dict[str, Any], left_out: frozenset[tuple[str, ...]] = frozenset()) -> dict[str, Any]:
    """The spec as its idempotency hash sees it: the CHANGED_DEFAULTS fields in ``left_out`` (those the request did
    not name) at their earlier defaults, and ADDED_DEFAULTS' fields left out while they hold their defaults."""
    view = dict(spec)
    for path in left_out & CHANGED_DEFAULTS.keys():
        *parents, name = path
        parent = _own_parent(view, parents)
        if parent is not None and name in parent:  # a field of the spec's own method ('none' has no objective)
            parent[name] = CHANGED_DEFAULTS[path]
    for path, default in ADDED_DEFAULTS.items():
        *parents, name = path
        parent = _own_parent(view, parents)
        if parent is not None and name in parent and parent[name] == default:
            del parent[name]
    return view


def request_hash(spec: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def request_digests(spec: dict[str, Any], left_out: frozenset[tuple[str, ...]], retry_of: str | None = None
                    ) -> dict[int, str]:
    """A request's hash in each HASH_VERSION: the current one of the spec as it resolves now, version 1 with the
    CHANGED_DEFAULTS fields it left out at their earlier defaults. A later version keeps every earlier one's digest
    here: a key is compared in its own version."""
    def digest(view: dict[str, Any]) -> str:
        return request_hash(view if retry_of is None else {"retry_of": retry_of, "spec": view})

    return {HASH_VERSION: digest(hash_view(spec)), 1: digest(hash_view(spec, left_out))}


def new_job_id() -> str:
    return uuid.uuid4().hex


def _due(now: datetime) -> Any:
    """A queued job may run now: it has no back-off, or its back-off has passed."""
    return Job.run_after.is_(None) | (Job.run_after <= now)


class JobStore:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._sessions = session_factory(engine)

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self._sessions() as s, s.begin():
            yield s

    def dispose(self) -> None:
        """Close the engine's pooled connections."""
        self.engine.dispose()

    # Creation and reading -----------------------------------------------------------------------------
    def create(
        self, tenant: str, spec: dict[str, Any], idempotency_key: str | None = None, retry_of: str | None = None,
        plan: dict[str, Any] | None = None, queue: str | None = None, priority: int = 5, quota: Quota | None = None,
        retry_after_s: int = 30, left_out: frozenset[tuple[str, ...]] = frozenset(),
    ) -> tuple[Job, bool]:
        """Record a queued job (``retry_of``: the job it retries). With an idempotency key, the first request wins
        and later ones get its job (``created`` False); a different body under the same key raises
        :class:`IdempotencyConflict`. The tenant's ``quota`` is checked in the same transaction (under a per-tenant
        lock): over max_queued or creates_per_minute → :class:`QuotaExceeded`; with a max_running limit the job is
        recorded held back, for :meth:`admit` to release. ``left_out``: the spec's CHANGED_DEFAULTS fields its request
        did not name (compared with a key stored before they changed, :func:`request_digests`)."""
        digests = request_digests(spec, left_out, retry_of)
        if idempotency_key is not None:
            existing = self._by_idempotency(tenant, idempotency_key, digests)
            if existing is not None:
                return existing, False
        now = utcnow()
        job = Job(
            id=new_job_id(), tenant=tenant, status=JobStatus.queued.value, progress=0.0, progress_message="queued",
            spec=spec, metrics={}, attempts=0, retries=0, created_at=now, updated_at=now, retry_of=retry_of,
            plan=plan, queue=queue, priority=priority, held=bool(quota and quota.max_running is not None),
        )
        try:
            with self.session() as s:
                if quota is not None:
                    self._lock_tenant(s, tenant)
                    if idempotency_key is not None:  # a concurrent twin may have created it: answer with it
                        twin = self._by_idempotency_in(s, tenant, idempotency_key, digests)
                        if twin is not None:
                            return twin, False
                    self._check_quota(s, tenant, quota, now, retry_after_s)
                s.add(job)
                s.flush()
                if idempotency_key is not None:
                    s.add(IdempotencyKey(tenant=tenant, key=idempotency_key, request_hash=digests[HASH_VERSION],
                                         hash_version=HASH_VERSION, job_id=job.id))
                data: dict[str, Any] = {"status": "queued"} if retry_of is None else {"status": "queued",
                                                                                      "retry_of": retry_of}
                self._status_event(s, job.id, data)
        except IntegrityError:
            if idempotency_key is None:
                raise
            existing = self._by_idempotency(tenant, idempotency_key, digests)
            if existing is None:
                raise
            return existing, False
        return job, True

    @staticmethod
    def _lock_tenant(s: Session, tenant: str) -> None:
        """Serialise quota decisions of one tenant until the transaction ends (SQLite: BEGIN IMMEDIATE already
        serialises every writer)."""
        if s.get_bind().dialect.name == "postgresql":
            key = int(hashlib.sha256(f"restorelcc-tenant:{tenant}".encode()).hexdigest()[:15], 16)
            s.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": key})

    def _check_quota(self, s: Session, tenant: str, quota: Quota, now: datetime, retry_after_s: int) -> None:
        if quota.max_queued is not None:
            queued = s.scalar(select(func.count()).select_from(Job).where(
                Job.tenant == tenant, Job.status == JobStatus.queued.value)) or 0
            if queued >= quota.max_queued:
                raise QuotaExceeded("max_queued", quota.max_queued, retry_after_s,
                                    f"tenant {tenant} has {queued} queued jobs; its limit max_queued is "
                                    f"{quota.max_queued}")
        if quota.creates_per_minute is not None:
            window = now - timedelta(seconds=60)
            recent = list(s.scalars(select(Job.created_at).where(Job.tenant == tenant, Job.created_at > window)
                                    .order_by(Job.created_at).limit(quota.creates_per_minute)))
            if len(recent) >= quota.creates_per_minute:
                wait = max(1, int((recent[0] - window).total_seconds()) + 1)
                raise QuotaExceeded("creates_per_minute", quota.creates_per_minute, wait,
                                    f"tenant {tenant} created {len(recent)} jobs in the last minute; its limit "
                                    f"creates_per_minute is {quota.creates_per_minute}")

    def admit(self, tenant: str, max_running: int | None) -> list[Dispatch]:
        """Release the tenant's held jobs (highest priority, then oldest first) while fewer than ``max_running`` of
        its jobs are with the workers (queued and released, running or cancelling). Returns the jobs to send."""
        with self.session() as s:
            self._lock_tenant(s, tenant)
            held = (select(Job.id, Job.queue, Job.priority)
                    .where(Job.tenant == tenant, Job.status == JobStatus.queued.value, Job.held.is_(True))
                    .order_by(Job.priority.desc(), Job.seq))
            if max_running is None:
                rows = list(s.execute(held).all())
            else:
                busy = s.scalar(select(func.count()).select_from(Job).where(
                    Job.tenant == tenant, Job.status.in_(WAITING), Job.held.is_(False))) or 0
                rows = list(s.execute(held.limit(max_running - busy)).all()) if busy < max_running else []
            released = []
            for job_id, queue, priority in rows:
                if s.execute(update(Job).where(Job.id == job_id, Job.status == JobStatus.queued.value,
                                               Job.held.is_(True)).values(held=False, updated_at=utcnow())).rowcount:
                    s.add(Event(job_id=job_id, kind="released", data={"reason": "a running slot of the tenant's "
                                                                                "quota is free"}))
                    released.append(Dispatch(job_id, queue, priority))
            return released

    def held_tenants(self) -> list[str]:
        """Tenants with jobs held back by a running quota."""
        with self.session() as s:
            return list(s.scalars(select(Job.tenant).where(
                Job.status == JobStatus.queued.value, Job.held.is_(True)).distinct()))

    def dispatch_of(self, job_id: str) -> Dispatch | None:
        with self.session() as s:
            row = s.execute(select(Job.queue, Job.priority).where(Job.id == job_id)).first()
            return Dispatch(job_id, row.queue, row.priority) if row else None

    def release_idempotency(self, job_id: str) -> int:
        """Free the idempotency keys that point at ``job_id`` (a job that never reached the queue), so a
        retry with the same key creates a new job instead of replaying the failure. Returns keys freed."""
        with self.session() as s:
            return s.execute(delete(IdempotencyKey).where(IdempotencyKey.job_id == job_id)).rowcount or 0

    def _by_idempotency(self, tenant: str, key: str, digests: dict[int, str]) -> Job | None:
        with self.session() as s:
            return self._by_idempotency_in(s, tenant, key, digests)

    @staticmethod
    def _by_idempotency_in(s: Session, tenant: str, key: str, digests: dict[int, str]) -> Job | None:
        """The job recorded under ``key``, when the request matches it in the key's own hash version."""
        row = s.execute(
            select(IdempotencyKey, Job)
            .join(Job, Job.id == IdempotencyKey.job_id)
            .where(IdempotencyKey.tenant == tenant, IdempotencyKey.key == key)
        ).first()
        if row is None:
            return None
        idem, job = row
        if idem.request_hash != digests.get(idem.hash_version):
            raise IdempotencyConflict(job.id)
        return job

    def get(self, job_id: str, tenant: str | None = None) -> Job | None:
        q = select(Job).where(Job.id == job_id)
        if tenant is not None:
            q = q.where(Job.tenant == tenant)
        with self.session() as s:
            return s.scalars(q).first()

    def list(
        self, tenant: str, limit: int = 50, after: str | None = None, status: str | None = None
    ) -> tuple[list[Job], str | None]:
        """The tenant's jobs, newest first; ``after`` is the ``next_cursor`` the previous page returned (KeyError
        when it is none)."""
        with self.session() as s:
            q = select(Job).where(Job.tenant == tenant)
            if after is not None:
                q = q.where(Job.seq < self._cursor_seq(s, tenant, after))
            if status is not None:
                q = q.where(Job.status == status)
            rows = list(s.scalars(q.order_by(Job.seq.desc()).limit(limit + 1)))
        more = len(rows) > limit
        rows = rows[:limit]
        return rows, (f"{rows[-1].id}.{rows[-1].seq}" if more and rows else None)

    @staticmethod
    def _cursor_seq(s: Session, tenant: str, cursor: str) -> int:
        """The position a page cursor stands for. A cursor carries its job's seq (``<id>.<seq>``), so it still
        holds when that job has been deleted meanwhile; a bare job id (the cursor before 2026-12-01) is looked up."""
        job_id, dot, seq = cursor.partition(".")
        if dot:
            if not (seq.isascii() and seq.isdigit()) or not 0 < int(seq) <= MAX_SEQ:
                raise KeyError(cursor)
            return int(seq)
        found = s.scalar(select(Job.seq).where(Job.id == job_id, Job.tenant == tenant))
        if found is None:
            raise KeyError(cursor)
        return found

    def checkpoint_bytes(self) -> int:
        """Bytes held by every job's checkpoints (``/metrics``)."""
        with self.session() as s:
            return int(s.scalar(select(func.coalesce(func.sum(Job.checkpoint_bytes), 0))) or 0)

    def set_plan(self, job_id: str, plan: dict[str, Any]) -> None:
        with self.session() as s:
            s.execute(update(Job).where(Job.id == job_id).values(plan=plan))

    def set_output(self, job_id: str, output: dict[str, Any], attempt: int | None = None) -> bool:
        """Record where the job's result was handed off to (only while run ``attempt`` owns the active job)."""
        with self.session() as s:
            return self._update(s, job_id, ACTIVE, attempt, output=output)

    def set_checkpoint_bytes(self, job_id: str, size: int) -> None:
        with self.session() as s:
            s.execute(update(Job).where(Job.id == job_id).values(checkpoint_bytes=int(size)))

    def expired_checkpoints(self, finished_before: datetime) -> list[str]:
        """Finished jobs that still hold checkpoints and finished before ``finished_before`` (housekeeping)."""
        with self.session() as s:
            return list(s.scalars(select(Job.id).where(
                Job.status.in_(FINISHED), Job.checkpoint_bytes > 0, Job.finished_at < finished_before)))

    def counts_by_status(self) -> dict[str, int]:
        with self.session() as s:
            return dict(s.execute(select(Job.status, func.count()).group_by(Job.status)).all())

    # Webhook outbox ---------------------------------------------------------------------------------
    def _status_event(self, s: Session, job_id: str, data: dict[str, Any]) -> None:
        """A status change: the event log entry and, for a job with ``notify.url``, its webhook delivery — both in
        the transaction of the change, so no change goes unannounced and none is announced that did not happen."""
        s.add(Event(job_id=job_id, kind="status", data=data))
        self._announce(s, job_id, "job.status", data)

    def _announce(self, s: Session, job_id: str, event: str, data: dict[str, Any]) -> None:
        job = s.scalars(select(Job).where(Job.id == job_id).execution_options(populate_existing=True)).first()
        notify = (job.spec or {}).get("notify") if job is not None else None
        if not isinstance(notify, dict) or not notify.get("url"):
            return
        if event == "job.stage" and not notify.get("stages"):
            return
        artifacts = (list(s.scalars(select(Artifact).where(Artifact.job_id == job_id).order_by(Artifact.name)))
                     if job.status == JobStatus.succeeded.value else [])
        delivery_id = uuid.uuid4().hex
        now = utcnow()
        s.add(Delivery(id=delivery_id, job_id=job_id, tenant=job.tenant, event=event, url=notify["url"],
                       payload=event_payload(delivery_id, event, job, artifacts, data, now), state="pending",
                       attempts=[], next_attempt_at=now, created_at=now))

    def deliveries(self, job_id: str) -> list[Delivery]:
        with self.session() as s:
            return list(s.scalars(select(Delivery).where(Delivery.job_id == job_id).order_by(Delivery.seq)))

    def due_deliveries(self, limit: int = 32) -> list[Delivery]:
        """Per job, its oldest pending delivery if it is due and nobody holds it: events of one job go out in
        order, each only after the one before it was delivered or given up."""
        now = utcnow()
        older = Delivery.__table__.alias("older")
        with self.session() as s:
            return list(s.scalars(
                select(Delivery)
                .where(Delivery.state == "pending", Delivery.next_attempt_at <= now)
                .where((Delivery.claimed_until.is_(None)) | (Delivery.claimed_until < now))
                .where(~select(older.c.seq).where(older.c.job_id == Delivery.job_id, older.c.state == "pending",
                                                  older.c.seq < Delivery.seq).exists())
                .order_by(Delivery.seq).limit(limit)))

    def claim_delivery(self, delivery_id: str, hold_s: float) -> tuple[str, int] | None:
        """Hold a due, pending delivery for ``hold_s`` (one sender at a time, across API processes). Returns the
        claim (for :meth:`record_attempt`) and the attempts made so far, or None when it is not due or held."""
        now = utcnow()
        claim = uuid.uuid4().hex
        with self.session() as s:
            taken = s.execute(update(Delivery).where(
                Delivery.id == delivery_id, Delivery.state == "pending", Delivery.next_attempt_at <= now,
                (Delivery.claimed_until.is_(None)) | (Delivery.claimed_until < now),
            ).values(claimed_until=now + timedelta(seconds=hold_s), claim=claim)).rowcount == 1
            if not taken:
                return None
            return claim, len(s.scalar(select(Delivery.attempts).where(Delivery.id == delivery_id)) or [])

    def record_attempt(self, delivery_id: str, claim: str, attempt: dict[str, Any], state: str,
                       next_attempt_at: datetime | None = None, keep: int = 50) -> bool:
        """Append an attempt (the newest ``keep`` are kept) and move the delivery on: delivered, failed (given up),
        or pending until ``next_attempt_at``. Only the sender holding ``claim`` may, and only while the delivery is
        pending (a late answer to a claim that expired and was taken by another sender is dropped)."""
        with self.session() as s:
            d = s.scalars(select(Delivery).where(Delivery.id == delivery_id, Delivery.claim == claim,
                                                 Delivery.state == "pending").with_for_update()).first()
            if d is None:
                return False
            d.attempts = [*d.attempts, attempt][-keep:]
            d.state = state
            d.claimed_until = None
            d.claim = None
            if state == "pending" and next_attempt_at is not None:
                d.next_attempt_at = next_attempt_at
            else:
                d.finished_at = utcnow()
            return True

    def delivery_counts(self) -> dict[str, int]:
        with self.session() as s:
            return dict(s.execute(select(Delivery.state, func.count()).group_by(Delivery.state)).all())

    # Transitions ------------------------------------------------------------------------------------
    def _update(self, s: Session, job_id: str, allowed: tuple[str, ...], attempt: int | None = None,
                stale_before: datetime | None = None, **values: Any) -> bool:
        """Update a job in one of the ``allowed`` states; with ``attempt``, only while that run still owns it
        (a job taken over by another worker has a higher ``attempts``: the old run's writes are refused); with
        ``stale_before``, only while its last heartbeat is older than that (its worker has not come back)."""
        values.setdefault("updated_at", utcnow())
        q = update(Job).where(Job.id == job_id, Job.status.in_(allowed))
        if attempt is not None:
            q = q.where(Job.attempts == attempt)
        if stale_before is not None:
            q = q.where(Job.heartbeat_at < stale_before)
        return s.execute(q.values(**values)).rowcount == 1

    def claim(self, job_id: str, worker: str) -> bool:
        """queued → running (only if still queued and due)."""
        now = utcnow()
        with self.session() as s:
            res = s.execute(
                update(Job)
                .where(Job.id == job_id, Job.status == JobStatus.queued.value)
                .where(_due(now))
                .values(
                    status=JobStatus.running.value, attempts=Job.attempts + 1, worker=worker, started_at=now,
                    heartbeat_at=now, updated_at=now, run_after=None, progress_message="started",
                )
            )
            ok = res.rowcount == 1
            if ok:
                self._status_event(s, job_id, {"status": "running", "worker": worker})
            return ok

    def take_over(self, job_id: str, worker: str, stale_before: datetime) -> bool:
        """running (worker lost: heartbeat older than ``stale_before``) → running again (from its newest checkpoint)."""
        now = utcnow()
        with self.session() as s:
            res = s.execute(
                update(Job)
                .where(Job.id == job_id, Job.status == JobStatus.running.value)
                .where((Job.heartbeat_at.is_(None)) | (Job.heartbeat_at < stale_before))
                .values(
                    attempts=Job.attempts + 1, worker=worker, started_at=now, heartbeat_at=now, updated_at=now,
                    stage=None, progress=0.0, progress_message="restarted after a lost worker", metrics={},
                )
            )
            ok = res.rowcount == 1
            if ok:
                self._status_event(s, job_id, {"status": "running", "worker": worker, "restarted": True})
            return ok

    def request_cancel(self, job_id: str, tenant: str | None = None) -> CancelResult | None:
        """queued → cancelled at once; running → cancelling; anything else unchanged. None if no such job."""
        now = utcnow()
        with self.session() as s:
            q = select(Job.status).where(Job.id == job_id)
            if tenant is not None:
                q = q.where(Job.tenant == tenant)
            # Locked, so no worker's hand-back (running → queued) can fall between the two changes below: without
            # the lock both could miss on PostgreSQL and the cancel be lost.
            if s.scalar(q.with_for_update()) is None:
                return None
            if self._update(s, job_id, (JobStatus.queued.value,), status=JobStatus.cancelled.value,
                            finished_at=now, progress_message="cancelled"):
                self._status_event(s, job_id, {"status": "cancelled"})
                return CancelResult(JobStatus.cancelled, True)
            if self._update(s, job_id, (JobStatus.running.value,), status=JobStatus.cancelling.value,
                            progress_message="cancelling"):
                self._status_event(s, job_id, {"status": "cancelling"})
                return CancelResult(JobStatus.cancelling, True)
            return CancelResult(JobStatus(s.scalar(select(Job.status).where(Job.id == job_id))), False)

    def finish(
        self,
        job_id: str,
        status: JobStatus,
        error: tuple[str, str] | None = None,
        metrics: dict[str, Any] | None = None,
        allowed: tuple[str, ...] = ACTIVE,
        attempt: int | None = None,
        stale_before: datetime | None = None,
    ) -> bool:
        """An active job ends ``status`` (succeeded / failed / cancelled); a finished one stays as it is.
        With ``attempt``, only if that run still owns the job; with ``stale_before``, only if its heartbeat is
        older than that."""
        now = utcnow()
        values: dict[str, Any] = {"status": status.value, "finished_at": now, "heartbeat_at": now}
        if error is not None:
            values["error_code"], values["error_message"] = error
        if metrics is not None:
            values["metrics"] = metrics
        if status is JobStatus.succeeded:
            values["progress"] = 1.0
        values["progress_message"] = status.value
        with self.session() as s:
            ok = self._update(s, job_id, allowed, attempt, stale_before, **values)
            if ok:
                data: dict[str, Any] = {"status": status.value}
                if error is not None:
                    data["error"] = {"code": error[0], "message": error[1]}
                self._status_event(s, job_id, data)
            return ok

    def requeue(self, job_id: str, run_after: datetime, reason: str, attempt: int | None = None) -> bool:
        """running → queued (a transient failure; retried after ``run_after``). The run hands the job back, as
        :meth:`release` does: it counts as one of ``retries``, not of the runs a lost worker uses up."""
        with self.session() as s:
            ok = self._update(
                s, job_id, (JobStatus.running.value,), attempt, status=JobStatus.queued.value, run_after=run_after,
                retries=Job.retries + 1, attempts=Job.attempts - 1, stage=None, progress=0.0,
                progress_message=f"retrying: {reason}",
            )
            if ok:
                s.add(Event(job_id=job_id, kind="retry", data={"reason": reason, "run_after": run_after.isoformat()}))
                self._announce(s, job_id, "job.status", {"status": "queued", "reason": reason,
                                                         "run_after": run_after.isoformat()})
            return ok

    def release(self, job_id: str, attempt: int, reason: str) -> bool:
        """running → queued, handing the run back (its worker is being stopped): it does not count as one of the
        job's runs. Only while run ``attempt`` owns the job; its later writes are refused (the job is not active)."""
        with self.session() as s:
            ok = self._update(
                s, job_id, (JobStatus.running.value,), attempt, status=JobStatus.queued.value, run_after=None,
                attempts=Job.attempts - 1, stage=None, progress=0.0, metrics={},
                progress_message=f"{reason}; queued to run again",
            )
            if ok:
                self._status_event(s, job_id, {"status": "queued", "reason": reason})
            return ok

    def recover_lost(self, stale_before: datetime, max_attempts: int, time_limit_s: float | None = None
                     ) -> tuple[list[str], list[str]]:
        """Active jobs with a heartbeat older than ``stale_before`` lost their worker. A running job that has runs
        left goes back to ``queued`` to run again (the caller sends it to the broker); one that has had
        ``max_attempts`` runs → failed (``worker_lost``); one whose lost run had lasted ``time_limit_s`` (it was
        killed by the hard time limit, and would only hit it again) → failed (``time_limit``); cancelling →
        cancelled. Each change is made only while the heartbeat is still stale and the run is the one seen, so a
        worker that comes back, or a redelivered task that took the job over meanwhile, keeps it. Returns
        (requeued, ended)."""
        with self.session() as s:
            lost = list(s.execute(
                select(Job.id, Job.status, Job.attempts, Job.stage, Job.started_at, Job.heartbeat_at)
                .where(Job.status.in_(ACTIVE), Job.heartbeat_at < stale_before)
            ).all())
        requeued: list[str] = []
        ended: list[str] = []
        for job_id, status, attempts, stage, started_at, heartbeat_at in lost:
            fence = {"attempt": attempts, "stale_before": stale_before}
            if status == JobStatus.cancelling.value:
                if self.finish(job_id, JobStatus.cancelled, allowed=(status,), **fence):
                    ended.append(job_id)
                continue
            ran_s = (heartbeat_at - started_at).total_seconds() if started_at is not None else 0.0
            if time_limit_s is not None and ran_s >= time_limit_s:
                error = ("time_limit", f"the job ran past its hard time limit ({ran_s:.0f} s without a result); "
                                       "it is not run again")
            elif attempts < max_attempts:
                if self._requeue_lost(job_id, stale_before, attempts):
                    requeued.append(job_id)
                continue
            else:
                where = f", the last time during {stage}" if stage else ""
                error = ("worker_lost", f"worker lost {attempts} time{'s' if attempts != 1 else ''} while running "
                                        f"this job{where} (the limit is {max_attempts} runs); no heartbeat since "
                                        f"{stale_before.isoformat()}")
            if self.finish(job_id, JobStatus.failed, error, allowed=(status,), **fence):
                ended.append(job_id)
        return requeued, ended

    def _requeue_lost(self, job_id: str, stale_before: datetime, attempts: int) -> bool:
        """running with a stale heartbeat → queued, to be run again (from its newest checkpoint)."""
        with self.session() as s:
            ok = self._update(s, job_id, (JobStatus.running.value,), attempts, stale_before,
                              status=JobStatus.queued.value, run_after=None, stage=None, progress=0.0, metrics={},
                              progress_message="worker lost; queued to run again")
            if ok:
                self._status_event(s, job_id, {"status": "queued", "reason": "worker lost", "runs": attempts})
            return ok

    def next_queued(self, queues: list[str] | None = None) -> str | None:
        """The queued job to run next (embedded worker): due, not held back by a quota, highest priority first,
        then the oldest; with ``queues``, only jobs sent to one of them (None stands for the default queue)."""
        now = utcnow()
        with self.session() as s:
            q = (select(Job.id)
                 .where(Job.status == JobStatus.queued.value, Job.held.is_(False))
                 .where(_due(now)))
            if queues is not None:
                q = q.where(Job.queue.in_(queues) | Job.queue.is_(None))
            return s.scalar(q.order_by(Job.priority.desc(), Job.seq).limit(1))

    def queued_before(self, cutoff: datetime) -> list[str]:
        """Queued, due jobs last changed before ``cutoff``, oldest first (candidates for a lost message)."""
        now = utcnow()
        with self.session() as s:
            return list(s.scalars(
                select(Job.id)
                .where(Job.status == JobStatus.queued.value, Job.held.is_(False), Job.updated_at < cutoff)
                .where(_due(now))
                .order_by(Job.seq)
            ))

    def note_requeue(self, job_id: str, reason: str) -> bool:
        """Record that a still-queued job is being sent to the broker again (False if no longer queued)."""
        with self.session() as s:
            ok = self._update(s, job_id, (JobStatus.queued.value,))
            if ok:
                s.add(Event(job_id=job_id, kind="requeued", data={"reason": reason}))
            return ok

    # Worker updates (only while active) -------------------------------------------------------------
    def heartbeat(self, job_id: str, attempt: int | None = None) -> bool:
        with self.session() as s:
            return self._update(s, job_id, ACTIVE, attempt, heartbeat_at=utcnow())

    def set_stage(self, job_id: str, stage: str, attempt: int | None = None) -> bool:
        with self.session() as s:
            ok = self._update(s, job_id, ACTIVE, attempt, stage=stage, heartbeat_at=utcnow())
            if ok:
                s.add(Event(job_id=job_id, kind="stage", stage=stage, data={"stage": stage}))
                self._announce(s, job_id, "job.stage", {"stage": stage})
            return ok

    def set_progress(self, job_id: str, fraction: float, message: str, event: bool = False,
                     stage: str | None = None, attempt: int | None = None) -> bool:
        with self.session() as s:
            ok = self._update(s, job_id, ACTIVE, attempt, progress=fraction, progress_message=message[:1000],
                              heartbeat_at=utcnow())
            if ok and event:
                s.add(Event(job_id=job_id, kind="progress", stage=stage,
                            data={"fraction": fraction, "message": message[:1000]}))
            return ok

    def merge_metrics(self, job_id: str, metrics: dict[str, Any], stage: str | None = None,
                      attempt: int | None = None) -> bool:
        with self.session() as s:
            current = s.scalar(select(Job.metrics).where(Job.id == job_id, Job.status.in_(ACTIVE)))
            if current is None:
                return False
            merged = {**current, **metrics}
            ok = self._update(s, job_id, ACTIVE, attempt, metrics=merged, heartbeat_at=utcnow())
            if ok:
                s.add(Event(job_id=job_id, kind="metrics", stage=stage, data=metrics))
            return ok

    def add_event(self, job_id: str, kind: str, data: dict[str, Any], stage: str | None = None) -> None:
        """An event of the job's log. The job's row is locked first, as every other writer of its events locks it
        by updating it: one job's events then commit in the order of their seq, so a reader that has seen seq n
        never finds an earlier one appear later (PostgreSQL takes seq at insert, not at commit)."""
        with self.session() as s:
            s.execute(select(Job.id).where(Job.id == job_id).with_for_update())
            s.add(Event(job_id=job_id, kind=kind[:32], stage=stage, data=data))

    def events(self, job_id: str, after: int | None = None, limit: int = 1000) -> list[Event]:
        q = select(Event).where(Event.job_id == job_id)
        if after is not None:
            q = q.where(Event.seq > after)
        q = q.order_by(Event.seq).limit(limit)
        with self.session() as s:
            return list(s.scalars(q))

    # Artifacts ---------------------------------------------------------------------------------------
    def _owns(self, s: Session, job_id: str, attempt: int | None) -> bool:
        """Whether run ``attempt`` still owns the job: it is active and no later run took it over. Locks the
        row, so the answer holds until the caller's transaction ends (None: no fence)."""
        if attempt is None:
            return True
        row = s.execute(select(Job.attempts, Job.status).where(Job.id == job_id).with_for_update()).first()
        return row is not None and row.attempts == attempt and row.status in ACTIVE

    def add_artifact(self, job_id: str, name: str, size: int, sha256: str, key: str, attempt: int | None = None
                     ) -> bool:
        """Record an uploaded file; with ``attempt``, only while that run owns the active job (False
        otherwise: a finished job's artifacts never change)."""
        with self.session() as s:
            if not self._owns(s, job_id, attempt):
                return False
            s.execute(delete(Artifact).where(Artifact.job_id == job_id, Artifact.name == name))
            s.add(Artifact(job_id=job_id, name=name, size=size, sha256=sha256, key=key))
            return True

    def clear_artifacts(self, job_id: str, attempt: int | None = None) -> bool:
        """Forget a job's recorded artifacts; with ``attempt``, only while that run owns the active job (False
        otherwise, and nothing is touched)."""
        with self.session() as s:
            if not self._owns(s, job_id, attempt):
                return False
            s.execute(delete(Artifact).where(Artifact.job_id == job_id))
            return True

    def artifacts(self, job_id: str) -> list[Artifact]:
        with self.session() as s:
            return list(s.scalars(select(Artifact).where(Artifact.job_id == job_id).order_by(Artifact.name)))

    def artifact(self, job_id: str, name: str) -> Artifact | None:
        with self.session() as s:
            return s.scalars(select(Artifact).where(Artifact.job_id == job_id, Artifact.name == name)).first()

    # Deletion ----------------------------------------------------------------------------------------
    def delete(self, job_id: str, tenant: str | None = None) -> bool:
        """Delete a finished job with its events, artifacts and idempotency keys. False if no such job;
        :class:`JobNotFinished` if it is still queued or active."""
        with self.session() as s:
            q = select(Job).where(Job.id == job_id)
            if tenant is not None:
                q = q.where(Job.tenant == tenant)
            job = s.scalars(q.with_for_update()).first()
            if job is None:
                return False
            if job.status not in FINISHED:
                raise JobNotFinished(job.status)
            pending = s.scalar(select(func.count()).where(Delivery.job_id == job_id, Delivery.state == "pending"))
            if pending:  # said, not silent: the job's webhook receiver never gets these events
                log.warning("job %s deleted with %d webhook event(s) not delivered yet; they are given up",
                            job_id, pending)
            for model in (Event, Artifact, IdempotencyKey, Delivery):
                s.execute(delete(model).where(model.job_id == job_id))
            s.execute(delete(Job).where(Job.id == job_id))
            return True


def stale_cutoff(seconds: float) -> datetime:
    return utcnow() - timedelta(seconds=seconds)
