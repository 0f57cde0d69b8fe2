"""The FastAPI application: ``create_app(settings)`` wires stores, auth, routes, errors and metrics.

Never imports torch, transformers or anything under ``worker/``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from app.auth import KeyRing
from app.config import Settings, get_settings
from app.deps import Services
from app.errors import install_handlers
from app.limits import BodyLimitMiddleware
from app.metrics import Metrics, MetricsMiddleware
from app.routes import artifacts, health, jobs
from app.service import make_enqueuer
from app.store.artifacts import make_store
from app.store.db import make_engine, upgrade
from app.store.jobs import JobStore
from app.store.polls import make_polls
from app.tenancy import TenantPolicy
from app.webhooks.dispatcher import Dispatcher

log = logging.getLogger("restorelcc.api")

API_VERSION = "1"


def build_services(settings: Settings) -> Services:
    store = JobStore(make_engine(settings.db_url))
    return Services(
        settings=settings,
        jobs=store,
        polls=make_polls(settings.db_url, store, settings.db_read_pool_size),
        artifacts=make_store(settings),
        enqueuer=make_enqueuer(settings),
        keys=KeyRing.from_settings(settings),
        metrics=Metrics(store.counts_by_status, store.checkpoint_bytes, store.delivery_counts),
        policy=TenantPolicy(settings).validate(),
    )


def create_app(settings: Settings | None = None, *, migrate: bool = True) -> FastAPI:
    """The API. Refuses unsafe settings; runs the schema migrations at startup when ``migrate``."""
    settings = settings or get_settings()
    settings.check_safe()
    services = build_services(settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if migrate:
            upgrade(services.jobs.engine)
        dispatcher = Dispatcher(settings, services.jobs, services.policy, services.enqueuer)
        dispatcher.start()
        await services.polls.open()
        try:
            yield
        finally:
            await services.polls.close()
            dispatcher.stop()
            services.jobs.dispose()

    app = FastAPI(
        title="restorelcc",
        version=API_VERSION,
        summary="Restore the quality of pruned LLMs with RestoreLCC, as a service.",
        lifespan=lifespan,
    )
    app.state.services = services
    _document_errors(app)
    install_handlers(app)
    app.include_router(jobs.router)
    app.include_router(artifacts.router)
    app.include_router(health.router)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=services.metrics)  # outermost: counts the 413s too
    return app


def _document_errors(app: FastAPI) -> None:
    """FastAPI documents a 422 with its own body on every route with parameters, and error bodies in the media
    type of the route's success answer; the service answers every error with ``ErrorBody`` as JSON (app.errors)."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()
            error = {"$ref": "#/components/schemas/ErrorBody"}
            for operation in (op for ops in schema["paths"].values() for op in ops.values()):
                for status, answer in operation.get("responses", {}).items():
                    content = answer.get("content", {})
                    if status == "422" and content.get("application/json", {}).get("schema") == {
                            "$ref": "#/components/schemas/HTTPValidationError"}:
                        answer["description"] = "Invalid input; `field` names it"
                        content["application/json"]["schema"] = error
                    if status[0] in "45" and any(m.get("schema") == error for m in content.values()):
                        answer["content"] = {"application/json": {"schema": error}}  # whatever the route serves
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def app_factory() -> FastAPI:
    """For ``uvicorn --factory app.main:app_factory``: settings from the environment."""
    return create_app()
