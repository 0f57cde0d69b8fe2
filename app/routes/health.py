"""Liveness, readiness (DB, broker, artifact store) and Prometheus metrics. No authentication."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from app.deps import ServicesDep

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@router.get("/readyz")
def readyz(services: ServicesDep) -> JSONResponse:
    """Ready to take jobs: the job store answers, the broker (if any) answers, the artifact store is usable."""
    checks: dict[str, str] = {}

    def run(name: str, fn) -> None:
        try:
            fn()
            checks[name] = "ok"
        except Exception as e:
            checks[name] = f"error: {type(e).__name__}: {e}"[:300]

    def db() -> None:
        with services.jobs.engine.connect() as c:
            c.execute(text("SELECT 1 FROM jobs LIMIT 1"))

    run("database", db)
    if not services.settings.embedded:
        run("broker", services.enqueuer.check)
    run("artifacts", services.artifacts.check)
    ok = all(v == "ok" for v in checks.values())
    return JSONResponse({"status": "ok" if ok else "unavailable", "checks": checks}, status_code=200 if ok else 503)


@router.get("/metrics")
def metrics(services: ServicesDep) -> Response:
    """Prometheus exposition."""
    return Response(generate_latest(services.metrics.registry), media_type=CONTENT_TYPE_LATEST)
