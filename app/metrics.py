"""Prometheus metrics: HTTP request counts and latency, jobs created, jobs by status and checkpoint storage (read
from the store)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from app.schemas import JobStatus


class JobStatusCollector(Collector):
    """``restorelcc_jobs{status}``: how many jobs the store holds in each status, and
    ``restorelcc_checkpoint_bytes``: what their checkpoints hold in the artifact store, at scrape time."""

    def __init__(self, counts: Callable[[], dict[str, int]], checkpoint_bytes: Callable[[], int] | None = None,
                 deliveries: Callable[[], dict[str, int]] | None = None):
        self._counts = counts
        self._checkpoint_bytes = checkpoint_bytes
        self._deliveries = deliveries

    def collect(self) -> Iterable[GaugeMetricFamily]:
        g = GaugeMetricFamily("restorelcc_jobs", "Jobs in the job store by status", labels=["status"])
        try:
            counts = self._counts()
        except Exception:
            counts = {}
        for status in JobStatus:
            g.add_metric([status.value], counts.get(status.value, 0))
        yield g
        if self._checkpoint_bytes is not None:
            c = GaugeMetricFamily("restorelcc_checkpoint_bytes", "Bytes held by job checkpoints in the artifact store")
            try:
                c.add_metric([], self._checkpoint_bytes())
                yield c
            except Exception:
                pass
        if self._deliveries is not None:
            d = GaugeMetricFamily("restorelcc_webhook_deliveries", "Webhook deliveries by state", labels=["state"])
            try:
                counts = self._deliveries()
            except Exception:
                return
            for state in ("pending", "delivered", "failed"):
                d.add_metric([state], counts.get(state, 0))
            yield d


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
    """Pure ASGI middleware (streaming-safe): counts requests and observes latency per route template."""

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
            path = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "")
            self.metrics.requests.labels(method, path, str(status["code"])).inc()
            self.metrics.latency.labels(method, path).observe(time.perf_counter() - start)
