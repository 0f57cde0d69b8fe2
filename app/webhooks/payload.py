"""The JSON body of a webhook event: the job as it stands right after the change it announces."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

MAX_METRICS_BYTES = 32 * 1024  # a larger metrics dict is left out of the event (GET the job for it)


def event_payload(delivery_id: str, event: str, job: Any, artifacts: list[Any], data: dict[str, Any],
                  now: datetime) -> dict[str, Any]:
    """``job``: the job row (app.store.models.Job); ``artifacts``: its artifact rows (listed on success);
    ``data``: what the change itself says (the status event's data, or the stage)."""
    metrics: dict[str, Any] | None = job.metrics or {}
    if len(json.dumps(metrics, default=str)) > MAX_METRICS_BYTES:
        metrics = None
    body: dict[str, Any] = {
        "id": delivery_id,
        "type": event,
        "created_at": now.isoformat(),
        "data": data,
        "job": {
            "id": job.id,
            "status": job.status,
            "stage": job.stage,
            "error": {"code": job.error_code, "message": job.error_message or ""} if job.error_code else None,
            "metrics": metrics,
            "retry_of": job.retry_of,
            "output": job.output,
        },
    }
    if artifacts:
        body["job"]["artifacts"] = [{"name": a.name, "size": a.size, "sha256": a.sha256} for a in artifacts]
    return body
