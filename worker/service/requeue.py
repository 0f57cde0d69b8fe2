"""Re-sending queued jobs whose broker message was lost.

Redis keeps the queue in memory; a broker restart without persistence (or a flushed database) drops every
waiting message, and their jobs would stay ``queued`` forever. The sweep looks for queued, due jobs that
have waited longer than ``requeue_after_s`` and whose id appears in no message the broker still holds —
neither waiting in the queue nor delivered and unacknowledged (a running task, or one held for a later
retry) — and sends them again. A message delivered longer ago than that whose job is still queued and due does
not count as held: the worker it went to died before claiming the job (Redis would hand it out again only after
the visibility timeout, hours later). A message that reappears anyway is harmless: only one delivery can claim
a queued job.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any

from app.store.jobs import JobStore

log = logging.getLogger("restorelcc.worker")

PRIORITY_SEP = "\x06\x16"  # kombu's Redis transport: "<queue>\x06\x16<priority>" holds prioritised messages
UNACKED_KEY = "unacked"  # kombu's default hash of delivered, not yet acknowledged messages
UNACKED_INDEX_KEY = "unacked_index"  # ... and its sorted set: delivery tag → delivery time (unix seconds)


def _texts(raw: bytes | str) -> Iterable[str]:
    """A stored message as text, plus its decoded body (where Celery puts the task arguments)."""
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    yield text
    try:
        obj: Any = json.loads(text)
    except ValueError:
        return
    if isinstance(obj, list) and obj:  # unacked entries are [message, exchange, routing_key]
        obj = obj[0]
    body = obj.get("body") if isinstance(obj, dict) else None
    if isinstance(body, str):
        try:
            yield base64.b64decode(body, validate=True).decode("utf-8", "replace")
        except ValueError:
            yield body


def broker_messages(client: Any, queue: str, unacked_key: str = UNACKED_KEY, delivered_after: float | None = None,
                    index_key: str = UNACKED_INDEX_KEY) -> str:
    """Every message the Redis broker holds for ``queue`` (waiting, any priority) or unacknowledged, as one
    text to search for job ids. With ``delivered_after`` (unix time), an unacknowledged message delivered
    before it is left out (one without a delivery time is kept)."""
    parts: list[str] = []
    names = [queue.encode()] + [f"{queue}{PRIORITY_SEP}{p}".encode() for p in range(1, 10)]
    for name in names:
        if client.type(name) in (b"list", "list"):
            for raw in client.lrange(name, 0, -1):
                parts.extend(_texts(raw))
    delivered = dict(client.zrange(index_key, 0, -1, withscores=True)) if delivered_after is not None else {}
    for tag, raw in client.hgetall(unacked_key).items():
        when = delivered.get(tag)
        if when is not None and delivered_after is not None and when < delivered_after:
            continue  # delivered long ago, its job still queued: the worker that took it is gone
        parts.extend(_texts(raw))
    return "\n".join(parts)


def resend_lost(jobs: JobStore, held: Callable[[], str], send: Callable[[str], None], waited_since: datetime
                ) -> list[str]:
    """Send again every queued, due job recorded before ``waited_since`` that no broker message names.

    ``held`` returns the broker's messages as text (read only when there are candidates); ``send``
    enqueues one job id. Returns the ids sent."""
    candidates = jobs.queued_before(waited_since)
    if not candidates:
        return []
    text = held()
    sent = []
    for job_id in candidates:
        if job_id in text:
            continue
        if not jobs.note_requeue(job_id, "its broker message was lost"):
            continue  # claimed or cancelled meanwhile
        send(job_id)
        log.warning("job %s: queued with no broker message; sent again", job_id)
        sent.append(job_id)
    return sent
