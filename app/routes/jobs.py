"""/v1/jobs: create, list, get, cancel, delete, events."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from app.auth import Principal
from app.deps import JobServiceDep, PrincipalDep, Services, ServicesDep
from app.errors import ApiError, error_body, error_responses, not_found
from app.schemas import (
    DeliveryAttempt,
    DeliveryPublic,
    EventPublic,
    JobError,
    JobList,
    JobPublic,
    JobSpec,
    JobStatus,
    Progress,
)
from app.service import Created, is_job_id
from app.store.models import MAX_SEQ, Delivery, Event, Job

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

_LOCATION = {"Location": {"description": "/v1/jobs/{id}", "schema": {"type": "string"}}}
_SEQ = re.compile(r"[0-9]{1,10}")  # ASCII digits only: str.isdigit also takes '²', which int() refuses
IdempotencyKey = Annotated[
    str | None, Header(alias="Idempotency-Key", min_length=1, max_length=255,
                       description="Repeat a request safely: one job per key and tenant.")
]


def to_public(job: Job) -> JobPublic:
    return JobPublic(
        id=job.id,
        status=JobStatus(job.status),
        stage=job.stage,
        progress=Progress(fraction=min(1.0, max(0.0, job.progress or 0.0)), message=job.progress_message or ""),
        spec=job.spec,
        metrics=job.metrics or {},
        error=JobError(code=job.error_code, message=job.error_message or "") if job.error_code else None,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        updated_at=job.updated_at,
        retry_of=job.retry_of,
        checkpoint_bytes=job.checkpoint_bytes or 0,
        plan=job.plan,
        queue=job.queue,
        priority=job.priority if job.priority is not None else 5,
        held=bool(job.held),
        output=job.output,
    )


def event_public(e: Event) -> EventPublic:
    return EventPublic(seq=e.seq, kind=e.kind, stage=e.stage, data=e.data or {}, created_at=e.created_at)


def _creates(*errors: int) -> dict[str, Any]:
    """A POST that records a job: 202 with the job (or the replayed one) and its Location."""
    return {"status_code": 202, "response_model": JobPublic, "responses": {
        202: {"description": "The job, queued (or the earlier one, replayed)", "headers": _LOCATION},
        **error_responses(*errors)}}


@router.post("", **_creates(400, 401, 409, 413, 415, 422, 429, 503))
def create_job(
    spec: JobSpec, principal: PrincipalDep, service: JobServiceDep, services: ServicesDep, response: Response,
    idempotency_key: IdempotencyKey = None,
) -> JobPublic:
    """Validate a job spec, record it and enqueue it. Returns 202 with the job and its `Location`."""
    return _created(service.create(principal.tenant, spec, idempotency_key), principal, services, response)


def _created(res: Created, principal: Principal, services: Services, response: Response) -> JobPublic:
    """A created (or replayed) job's answer: its `Location`, the replay header, the creation metric."""
    response.headers["Location"] = f"/v1/jobs/{res.job.id}"
    if res.created:
        services.metrics.jobs_created.labels(principal.tenant).inc()
    else:
        response.headers["Idempotent-Replayed"] = "true"
    return to_public(res.job)


@router.get("", response_model=JobList, responses=error_responses(401, 422, 503))
def list_jobs(
    principal: PrincipalDep,
    services: ServicesDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    after: Annotated[str | None, Query(max_length=64, description="next_cursor of the previous page")] = None,
    status: JobStatus | None = None,
) -> JobList:
    """The caller's jobs, newest first."""
    try:
        if after is not None and not is_job_id(after.partition(".")[0]):  # <id>.<seq>, or a bare id (older)
            raise KeyError(after)
        rows, cursor = services.jobs.list(principal.tenant, limit, after, status.value if status else None)
    except KeyError as e:
        raise ApiError(422, "invalid_cursor", "after: unknown cursor", "after") from e
    return JobList(items=[to_public(j) for j in rows], next_cursor=cursor)


async def polled_job(services: Services, tenant: str, job_id: str) -> Job:
    """The caller's job through the status-read path (:mod:`app.store.polls`), or 404."""
    job = await services.polls.job(job_id, tenant) if is_job_id(job_id) else None
    if job is None:
        raise not_found()
    return job


@router.get("/{job_id}", response_model=JobPublic, responses=error_responses(401, 404, 503))
async def get_job(job_id: str, principal: PrincipalDep, services: ServicesDep) -> JobPublic:
    return to_public(await polled_job(services, principal.tenant, job_id))


@router.post(
    "/{job_id}/cancel", response_model=JobPublic, status_code=202,
    responses={200: {"model": JobPublic, "description": "Already cancelled: nothing changed"},
               202: {"description": "Cancelled (queued job) or cancelling (running job)"},
               **error_responses(401, 404, 409, 413, 503)},
)
def cancel_job(job_id: str, principal: PrincipalDep, service: JobServiceDep, response: Response) -> JobPublic:
    """queued → cancelled at once; running → cancelling, then cancelled at the next checkpoint.
    Cancelling a cancelled job again is a no-op (200); a succeeded or failed job gives 409."""
    res = service.cancel(principal.tenant, job_id)
    if not res.changed:
        if res.status in (JobStatus.succeeded, JobStatus.failed):
            raise ApiError(409, "job_finished", f"job already {res.status.value}")
        response.status_code = 200
    return to_public(service.get(principal.tenant, job_id))


@router.post("/{job_id}/retry", **_creates(401, 404, 409, 413, 422, 429, 503))
def retry_job(
    job_id: str, principal: PrincipalDep, service: JobServiceDep, services: ServicesDep, response: Response,
    idempotency_key: IdempotencyKey = None,
) -> JobPublic:
    """Run a failed or cancelled job again: a new job with its spec and `retry_of` naming it (409 for a job that
    is queued, running or succeeded). It resumes from the checkpoints the failed job kept, else runs from the start."""
    return _created(service.retry(principal.tenant, job_id, idempotency_key), principal, services, response)


@router.delete("/{job_id}", status_code=204, responses=error_responses(401, 404, 409, 503))
def delete_job(job_id: str, principal: PrincipalDep, service: JobServiceDep) -> Response:
    """Delete a finished job, its events and its artifacts (409 while it is queued or running)."""
    service.delete(principal.tenant, job_id)
    return Response(status_code=204)


@router.get(
    "/{job_id}/events",
    response_model=list[EventPublic],
    responses={200: {"content": {"text/event-stream": {"schema": {"type": "string"}}},
                     "description": "The events (JSON), or a live Server-Sent-Events stream"},
               **error_responses(401, 404, 422, 503)},
)
async def job_events(
    job_id: str,
    request: Request,
    principal: PrincipalDep,
    services: ServicesDep,
    after: Annotated[int | None, Query(ge=0, le=MAX_SEQ, description="Only events with seq > after")] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
    last_event_id: Annotated[str | None, Header(
        alias="Last-Event-ID", description=f"The seq of the last event received (0 to {MAX_SEQ}, ASCII digits); "
                                           "takes precedence over `after`.")] = None,
) -> Response:
    """The ordered event log. With `Accept: text/event-stream`, a live stream that ends when the job ends.
    `Last-Event-ID` (what an EventSource sends when it reconnects) resumes after that seq, in either form."""
    await polled_job(services, principal.tenant, job_id)
    seen = (last_event_id or "").strip()  # empty (or blank): no event received yet
    start = last_event_seq(seen) if seen else after
    if "text/event-stream" in request.headers.get("accept", ""):
        return StreamingResponse(
            _stream(request, services, job_id, start),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    events = await services.polls.events(job_id, start, limit)
    return JSONResponse([event_public(e).model_dump(mode="json") for e in events])


def last_event_seq(value: str) -> int:
    """The seq a ``Last-Event-ID`` header names; anything else (what this service never sends as an event id) is a
    422 naming the header."""
    if not _SEQ.fullmatch(value) or int(value) > MAX_SEQ:
        raise ApiError(422, "invalid_header", f"Last-Event-ID: must be an event seq, 0 to {MAX_SEQ} in ASCII digits",
                       "Last-Event-ID")
    return int(value)


def delivery_public(d: Delivery) -> DeliveryPublic:
    return DeliveryPublic(
        id=d.id, event=d.event, state=d.state, url=d.url, created_at=d.created_at, finished_at=d.finished_at,
        next_attempt_at=d.next_attempt_at if d.state == "pending" else None, payload=d.payload,
        attempts=[DeliveryAttempt.model_validate(a) for a in d.attempts],
    )


@router.get("/{job_id}/deliveries", response_model=list[DeliveryPublic],
            responses=error_responses(401, 404, 503))
def job_deliveries(job_id: str, principal: PrincipalDep, service: JobServiceDep, services: ServicesDep
                   ) -> list[DeliveryPublic]:
    """The job's webhook events (notify.url), oldest first, each with every attempt to deliver it and the answer."""
    service.get(principal.tenant, job_id)
    return [delivery_public(d) for d in services.jobs.deliveries(job_id)]


def _sse(event: str, data: object, seq: int | None = None) -> str:
    head = f"id: {seq}\n" if seq is not None else ""
    return f"{head}event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


async def _stream(request: Request, services: ServicesDep, job_id: str, after: int | None,
                  poll_s: float = 0.5, keepalive_s: float = 15.0) -> AsyncIterator[str]:
    last = after
    idle = 0.0
    while True:
        events = await services.polls.events(job_id, last, 500)
        for e in events:
            last = e.seq
            yield _sse(e.kind, event_public(e).model_dump(mode="json"), e.seq)
        if events:
            idle = 0.0
            continue
        job = await services.polls.job(job_id)
        if job is None:
            yield _sse("error", error_body("job_not_found", "job was deleted"))
            return
        if JobStatus(job.status).finished:
            # Events written just before the final status are already drained above; one more read
            # catches any that raced with the status read.
            for e in await services.polls.events(job_id, last, 500):
                last = e.seq
                yield _sse(e.kind, event_public(e).model_dump(mode="json"), e.seq)
            yield _sse("end", {"status": job.status})
            return
        if await request.is_disconnected():
            return
        await asyncio.sleep(poll_s)
        idle += poll_s
        if idle >= keepalive_s:
            idle = 0.0
            yield ": keep-alive\n\n"
