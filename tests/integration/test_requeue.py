"""Finding queued jobs whose broker message is gone, against a real Redis broker and a real job store."""

from __future__ import annotations

import json
import time
import uuid
from datetime import timedelta

import pytest
import redis
from celery import Celery

from app.schemas import JobStatus
from app.service import TASK_NAME
from app.store.db import make_engine, upgrade
from app.store.jobs import JobStore
from app.store.models import utcnow
from worker.service.requeue import UNACKED_INDEX_KEY, UNACKED_KEY, broker_messages, resend_lost

REDIS_DB = "redis://127.0.0.1:6379/13"  # a database of its own: the test owns its `unacked` hash


@pytest.fixture()
def broker():
    client = redis.Redis.from_url(REDIS_DB)
    client.flushdb()
    app = Celery("requeue-test", broker=REDIS_DB)
    app.conf.update(task_ignore_result=True)
    queue = f"q-{uuid.uuid4().hex[:8]}"
    try:
        yield app, client, queue
    finally:
        client.flushdb()


@pytest.fixture()
def jobs(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'jobs.db'}")
    upgrade(engine)
    yield JobStore(engine)
    engine.dispose()


def test_broker_messages_name_waiting_and_unacknowledged_jobs(broker):
    app, client, queue = broker
    waiting, delivered = "job-waiting-1", "job-delivered-2"
    app.send_task(TASK_NAME, args=[waiting], queue=queue)
    app.send_task(TASK_NAME, args=[delivered], queue=queue)
    text = broker_messages(client, queue)
    assert waiting in text and delivered in text
    # a worker takes the second one: off the list, into the unacknowledged hash as [message, exchange, key]
    raw = client.rpop(queue) if delivered in client.lindex(queue, -1).decode() else client.lpop(queue)
    assert delivered in raw.decode()
    client.hset(UNACKED_KEY, "tag-1", json.dumps([json.loads(raw), "", queue]))
    assert delivered in broker_messages(client, queue) and waiting in broker_messages(client, queue)
    client.hdel(UNACKED_KEY, "tag-1")
    assert delivered not in broker_messages(client, queue)
    assert waiting not in broker_messages(client, f"other-{queue}")


def test_resend_lost_sends_only_old_queued_jobs_without_a_message(broker, jobs):
    app, client, queue = broker
    spec = {"model": {"id": "/m"}}
    ids = {name: jobs.create("alice", {**spec, "n": name})[0].id for name in ("lost", "held", "cancelled")}
    jobs.request_cancel(ids["cancelled"])
    app.send_task(TASK_NAME, args=[ids["held"]], queue=queue)
    cutoff = utcnow()
    young = jobs.create("alice", {**spec, "n": "later"})[0].id  # has not waited long enough yet
    sent: list[str] = []

    def held() -> str:
        return broker_messages(client, queue)

    def send(job_id: str) -> None:
        sent.append(job_id)
        app.send_task(TASK_NAME, args=[job_id], queue=queue)

    assert resend_lost(jobs, held, send, cutoff) == [ids["lost"]] == sent
    assert [e.kind for e in jobs.events(ids["lost"])][-1] == "requeued"
    assert jobs.get(ids["lost"]).status == JobStatus.queued.value
    assert resend_lost(jobs, held, send, cutoff) == []  # the note restarted its wait
    # later: the young job has waited long enough; the lost one is not sent twice (its message is there)
    assert resend_lost(jobs, held, send, utcnow() + timedelta(seconds=1)) == [young]
    assert sent == [ids["lost"], young]


def test_a_message_delivered_to_a_worker_that_died_before_claiming_is_sent_again(broker, jobs):
    """Redis moved the message to its unacknowledged hash when a worker took it; the worker died before marking
    the job running. Long after delivery the job is still queued: it is sent again (not after the visibility
    timeout), while a message delivered a moment ago still counts as in hand."""
    app, client, queue = broker
    stale, fresh = (jobs.create("alice", {"model": {"id": "/m"}, "n": n})[0].id for n in ("stale", "fresh"))
    now = time.time()
    for tag, job_id, delivered_at in (("tag-stale", stale, now - 600), ("tag-fresh", fresh, now - 1)):
        app.send_task(TASK_NAME, args=[job_id], queue=queue)
        raw = client.rpop(queue)  # what the worker took
        client.hset(UNACKED_KEY, tag, json.dumps([json.loads(raw), "", queue]))
        client.zadd(UNACKED_INDEX_KEY, {tag: delivered_at})
    assert stale in broker_messages(client, queue)  # without a cut-off both look in hand, as before
    sent: list[str] = []

    def held() -> str:
        return broker_messages(client, queue, delivered_after=now - 60)

    assert resend_lost(jobs, held, sent.append, utcnow() + timedelta(seconds=1)) == [stale] == sent
    assert [e.kind for e in jobs.events(stale)][-1] == "requeued"
