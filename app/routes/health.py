"""Liveness, readiness (DB, broker, artifact store) and Prometheus metrics.

Health and readiness never need a key. Metrics need ``metrics_token`` when one is set (the counters carry
tenant names)."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from app.deps import ServicesDep
from app.errors import ApiError, error_responses
from app.schemas import Health, Readiness

log = logging.getLogger("restorelcc.api")
router = APIRouter(tags=["health"])

# What /readyz says about a failing dependency. Anyone may call it, so the driver's error (host names, ports, SQL)
# goes to the log only.
NOT_READY = {"database": "error: database unavailable", "broker": "error: broker unavailable",
             "artifacts": "error: artifact store unavailable"}


@router.get("/healthz", response_model=Health)
def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@router.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness, "description": "Not ready"}})
def readyz(services: ServicesDep) -> JSONResponse:
    """Ready to take jobs: the job store answers, the broker (if any) answers, the artifact store is usable."""
    checks: dict[str, str] = {}

    def run(name: str, fn: Callable[[], object]) -> None:
        try:
            fn()
            checks[name] = "ok"
        except Exception as e:
            log.warning("readiness: the %s check failed: %s: %s", name, type(e).__name__, e)
            checks[name] = NOT_READY[name]

    def db() -> None:
        with services.jobs.engine.connect() as c:
            c.execute(text("SELECT 1 FROM jobs LIMIT 1"))

    run("database", db)
    if not services.settings.embedded:
        run("broker", services.enqueuer.check)
    run("artifacts", services.artifacts.check)
    ok = all(v == "ok" for v in checks.values())
    return JSONResponse({"status": "ok" if ok else "unavailable", "checks": checks}, status_code=200 if ok else 503)


@router.get(
    "/metrics", response_class=PlainTextResponse,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                     "description": "Prometheus text exposition"}, **error_responses(401)},
)
def metrics(services: ServicesDep, request: Request) -> Response:
    """Prometheus exposition."""
    token = services.settings.metrics_token
    if token:
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {token}".encode()):
            raise ApiError(401, "unauthorized", "/metrics needs 'Authorization: Bearer <metrics token>'",
                           "Authorization", headers={"WWW-Authenticate": "Bearer"})
    return Response(generate_latest(services.metrics.registry), media_type=CONTENT_TYPE_LATEST)
