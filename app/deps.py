"""Annotated dependencies: the app's services, the caller (principal) and the job service.

They do no I/O, so they are coroutines: FastAPI runs a plain ``def`` dependency in its thread pool, and three hops
there per request cost a status poll more than its database read."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Header, Request

from app.auth import DEV_TENANT, KeyRing, Principal, bearer_token
from app.config import Settings
from app.errors import ApiError
from app.metrics import Metrics
from app.service import Enqueuer, JobService
from app.store.artifacts import ArtifactStore
from app.store.jobs import JobStore
from app.store.polls import Polls
from app.tenancy import TenantPolicy


@dataclass
class Services:
    settings: Settings
    jobs: JobStore
    polls: Polls  # the status reads pollers make (a job, its events)
    artifacts: ArtifactStore
    enqueuer: Enqueuer
    keys: KeyRing
    metrics: Metrics
    policy: TenantPolicy

    @property
    def job_service(self) -> JobService:
        return JobService(self.settings, self.jobs, self.artifacts, self.enqueuer, self.policy)


async def get_services(request: Request) -> Services:
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(get_services)]


async def get_principal(
    services: ServicesDep,
    authorization: Annotated[str | None, Header(description="Bearer <API key>")] = None,
) -> Principal:
    if services.settings.dev_open:
        return Principal(DEV_TENANT)
    token = bearer_token(authorization)
    tenant = services.keys.tenant_for(token) if token else None
    if tenant is None:
        raise ApiError(
            401, "unauthorized", "a valid API key is required (Authorization: Bearer <key>)",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return Principal(tenant)


PrincipalDep = Annotated[Principal, Depends(get_principal)]


async def get_job_service(services: ServicesDep) -> JobService:
    return services.job_service


JobServiceDep = Annotated[JobService, Depends(get_job_service)]
