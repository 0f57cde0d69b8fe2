"""Prometheus metrics: HTTP request counts and latency, jobs created, jobs by status, checkpoint storage and webhook
deliveries (read from the store), and whether the store could be read."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy.exc import SQLAlchemyError

from app.schemas import JobStatus

log = logging.getLogger("restorelcc.api")
T = TypeVar("T")

# The ``method`` label's values: any other token a client sends is counted as "other", so that nobody (the
# endpoints it reaches need no key) can add a time series per request.
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNMATCHED_ROUTE = "unmatched"


def method_label(method: str) -> str:
    """``method`` when it is a standard HTTP method, else ``"other"``."""
    return method if method in HTTP_METHODS else "other"


class JobStatusCollector(Collector):
    """``restorelcc_jobs{status}``: how many jobs the store holds in each status, ``restorelcc_checkpoint_bytes``:
    what their checkpoints hold in the artifact store, and ``restorelcc_webhook_deliveries{state}``, read from the
    job store at scrape time. ``restorelcc_database_up`` is 1 when every read succeeded; a read that fails (the
    database is unreachable) leaves its family out of the scrape and sets it to 0, rather than reporting zeros."""

    def __init__(self, counts: Callable[[], dict[str, int]], checkpoint_bytes: Callable[[], int] | None = None,
                 deliveries: Callable[[], dict[str, int]] | None = None):
        self._counts = counts
        self._checkpoint_bytes = checkpoint_bytes
        self._deliveries = deliveries

    def collect(self) -> Iterable[GaugeMetricFamily]:
        failed: list[str] = []
        counts = _read(self._counts, "restorelcc_jobs", failed)
        if counts is not None:
            g = GaugeMetricFamily("restorelcc_jobs", "Jobs in the job store by status", labels=["status"])
            for status in JobStatus:
                g.add_metric([status.value], counts.get(status.value, 0))
            yield g
        if self._checkpoint_bytes is not None:
            held = _read(self._checkpoint_bytes, "restorelcc_checkpoint_bytes", failed)
            if held is not None:
                yield GaugeMetricFamily("restorelcc_checkpoint_bytes",
                                        "Bytes held by job checkpoints in the artifact store", value=held)
        if self._deliveries is not None:
            states = _read(self._deliveries, "restorelcc_webhook_deliveries", failed)
            if states is not None:
                d = GaugeMetricFamily("restorelcc_webhook_deliveries", "Webhook deliveries by state", labels=["state"])
                for state in ("pending", "delivered", "failed"):
                    d.add_metric([state], states.get(state, 0))
                yield d
        yield GaugeMetricFamily("restorelcc_database_up", "1 when this scrape read the job store; 0 when a read "
                                "failed (the families it feeds are left out)", value=0 if failed else 1)


def _read(read: Callable[[], T], family: str, failed: list[str]) -> T | None:
    """``read()``, or None (``family`` appended to ``failed``, a warning logged) when the database fails it."""
    try:
        return read()
    except SQLAlchemyError as e:
        log.warning("metrics: %s left out: the job store could not be read: %s", family, e)
        failed.append(family)
        return None


class Metrics:
    def __init__(self, counts: Callable[[], dict[str, int]], checkpoint_bytes: Callable[[], int] | None = None,
                 deliveries: Callable[[], dict[str, int]] | None = None):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "restorelcc_http_requests", "HTTP requests", ["method", "route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "restorelcc_http_request_duration_seconds", "HTTP request latency", ["method", "route"],
            registry=self.registry,
        )
        self.jobs_created = Counter(
            "restorelcc_jobs_created", "Jobs created through the API", ["tenant"], registry=self.registry
        )
        self.registry.register(JobStatusCollector(counts, checkpoint_bytes, deliveries))


class MetricsMiddleware:
    """Pure ASGI middleware (streaming-safe): counts requests and observes latency per route template. Every label
    is bounded: ``route`` is a route's template (a path no route matches is ``unmatched``), ``method`` one of
    :data:`HTTP_METHODS` or ``other``."""

    def __init__(self, app: Any, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = {"code": 500}

        async def _send(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, _send)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or UNMATCHED_ROUTE
            method = method_label(scope.get("method", ""))
            self.metrics.requests.labels(method, path, str(status["code"])).inc()
            self.metrics.latency.labels(method, path).observe(time.perf_counter() - start)
