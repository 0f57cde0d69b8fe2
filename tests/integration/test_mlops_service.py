"""MLOps integration with real processes: Celery workers on Redis, PostgreSQL, the API (and its webhook dispatcher)
on uvicorn, and a real HTTP receiver on 127.0.0.1 — webhooks for a real job, a tenant's running limit with two
workers, and GPU-class queues with priorities."""

from __future__ import annotations

import json
import uuid

import pytest

from app.webhooks.signing import DELIVERY_HEADER, EVENT_HEADER, SIGNATURE_HEADER, verify
from tests.conftest import KEYS, stop_group, wait_until
from tests.integration.test_service_celery import running_service
from tests.receiver import receiving

pytestmark = pytest.mark.postgres
FINISHED = {"succeeded", "failed", "cancelled"}


def test_a_receiver_that_fails_twice_gets_every_event_in_order(tmp_path_factory, tiny_assets):
    tries: dict[str, int] = {}

    def answer(req, earlier):
        delivery = req.headers[DELIVERY_HEADER.lower()]
        tries[delivery] = tries.get(delivery, 0) + 1
        return (500, {}) if tries[delivery] <= 2 else (200, {})

    with receiving(answer) as rx, running_service(
            tmp_path_factory.mktemp("hooks"), tiny_assets,
            api={"webhook_allowed_hosts": f"127.0.0.1:{rx.port}", "webhook_secrets": "alice:whsec-a",
                 "webhook_retry_base_s": 0.05, "webhook_poll_s": 0.05}) as service:
        c = service.client
        job = c.create({**tiny_assets.spec(), "notify": {"url": rx.url + "/restorelcc", "stages": True}})
        done = service.wait_status(job.id, FINISHED)
        assert done.status.value == "succeeded", done.error

        def settled():
            ds = [d.model_dump(mode="json") for d in c.deliveries(job.id)]
            return ds if ds and ds[-1]["payload"]["job"]["status"] == "succeeded" and all(
                d["state"] != "pending" for d in ds) else None

        deliveries = wait_until(settled, 60, lambda: "deliveries did not settle")
        events = [(d["event"], d["payload"]["data"].get("status") or d["payload"]["data"].get("stage"))
                  for d in deliveries]
        store_events = [(f"job.{e.kind}", e.data.get("status") or e.data.get("stage"))
                        for e in c.events(job.id) if e.kind in ("status", "stage")]
        assert events == store_events  # every status and stage change, in the order they happened
        assert [s for kind, s in events if kind == "job.status"] == ["queued", "running", "succeeded"]
        assert all(d["state"] == "delivered" and [a["status_code"] for a in d["attempts"]] == [500, 500, 200]
                   for d in deliveries)

        received = rx.seen()
        ids = [r.headers[DELIVERY_HEADER.lower()] for r in received]
        assert ids == [i for d in deliveries for i in [d["id"]] * 3]  # in order, the same id on each retry
        for r in received:
            assert verify("whsec-a", r.body, r.headers[SIGNATURE_HEADER.lower()])
        last = json.loads(received[-1].body)
        assert received[-1].headers[EVENT_HEADER.lower()] == "job.status" and last["job"]["status"] == "succeeded"
        names = {a["name"]: a["sha256"] for a in last["job"]["artifacts"]}
        assert names == {a.name: a.sha256 for a in c.artifacts(job.id)}
        assert last["job"]["metrics"]["sparsity"] == pytest.approx(0.5, abs=0.01)


def test_a_tenant_at_its_running_limit_waits_while_others_run(tmp_path_factory, tiny_assets):
    quotas = "alice:max_running=1;max_queued=1"
    with running_service(tmp_path_factory.mktemp("quota"), tiny_assets, api={"quotas": quotas},
                         RESTORELCC_QUOTAS=quotas) as service:
        second = service.start_worker()
        try:
            c = service.client
            from app.client import Client

            with Client(str(c.http.base_url), api_key=KEYS["bob"], timeout=60) as bob:
                a1 = c.create(tiny_assets.spec(slow=True))
                wait_until(lambda: c.get(a1.id).status.value == "running", 60, lambda: "a1 not running")
                a2 = c.create(tiny_assets.spec())
                assert a2.held and a2.status.value == "queued"
                r = c.http.post("/v1/jobs", json=tiny_assets.spec())
                assert r.status_code == 429 and int(r.headers["Retry-After"]) > 0
                assert "max_queued" in r.json()["error"]["message"]
                b1 = bob.create(tiny_assets.spec(slow=True))
                wait_until(lambda: bob.get(b1.id).status.value == "running", 60, lambda: "b1 not running",
                           alive=second)
                assert c.get(a1.id).status.value == "running"  # both workers busy: alice's and bob's job
                waiting = c.get(a2.id)
                assert waiting.status.value == "queued" and waiting.held
                for j, client in ((a1, c), (a2, c), (b1, bob)):
                    done = wait_until(lambda j=j, client=client: (x := client.get(j.id)).status.value in FINISHED
                                      and x, 180, lambda: "job not finished")
                    assert done.status.value == "succeeded", (j.id, done.error)
                first, then = c.get(a1.id), c.get(a2.id)
                assert then.started_at >= first.finished_at  # a2 ran only once a1 had finished
        finally:
            stop_group(second)


def test_queues_and_priorities(tmp_path_factory, tiny_assets):
    """Queues without a stated memory: the plan cannot choose one, so a job that names none goes to the default."""
    big, default_queue = f"big-{uuid.uuid4().hex[:8]}", f"restorelcc-test-{uuid.uuid4().hex[:8]}"
    with running_service(tmp_path_factory.mktemp("queues"), tiny_assets, api={"queues": big}, queue=default_queue,
                         RESTORELCC_QUEUES=big) as service:
        c = service.client
        on_big = c.create({**tiny_assets.spec(), "resources": {"queue": big}})
        default = c.create(tiny_assets.spec())
        assert (on_big.queue, default.queue) == (big, default_queue)
        assert service.wait_status(default.id, FINISHED).status.value == "succeeded"
        assert c.get(on_big.id).status.value == "queued"  # the default queue's worker never takes it
        low = c.create({**tiny_assets.spec(), "resources": {"queue": big, "priority": 0}})
        high = c.create({**tiny_assets.spec(), "resources": {"queue": big, "priority": 9}})
        big_worker = service.start_worker("--queues", big)
        try:
            jobs = [wait_until(lambda j=j: (x := c.get(j.id)).status.value in FINISHED and x, 180,
                               lambda: "job on the big queue not finished", alive=big_worker)
                    for j in (on_big, low, high)]
            assert all(j.status.value == "succeeded" for j in jobs), [j.error for j in jobs]
            by_start = [j.id for j in sorted(jobs, key=lambda j: j.started_at)]
            assert by_start == [high.id, on_big.id, low.id]  # 9, then 5 (the default), then 0
            assert {j.queue for j in jobs} == {big}
        finally:
            stop_group(big_worker)
