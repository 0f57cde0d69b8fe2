"""The MLOps contract at the API: quotas (429 + Retry-After), running limits that hold jobs back, worker queues and
priorities, webhook URL and hand-off destination checks, and the deliveries endpoint — on SQLite and PostgreSQL."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from app.schemas import JobStatus
from app.webhooks.signing import DELIVERY_HEADER, SIGNATURE_HEADER, verify
from tests.conftest import Api, api_settings, wait_until
from tests.receiver import receiving

GiB = 2**30


@pytest.fixture
def make_api(tmp_path, db_url) -> Iterator[Callable[..., Any]]:
    from fastapi.testclient import TestClient

    from app.main import create_app

    opened: list[Any] = []

    @contextmanager
    def build(**overrides: Any) -> Iterator[Api]:
        app = create_app(api_settings(tmp_path, db_url, **overrides))
        with TestClient(app) as client:
            opened.append(client)
            yield Api(client, app.state.services, tmp_path)

    yield build


def test_a_full_queue_is_refused_429_and_nothing_is_lost(make_api):
    with make_api(quotas="alice:max_queued=2") as api:
        first = api.client.post("/v1/jobs", json=api.spec(), headers={**api.h(), "Idempotency-Key": "k1"})
        assert first.status_code == 202
        api.create()
        r = api.client.post("/v1/jobs", json=api.spec(), headers=api.h())
        assert r.status_code == 429, r.text
        assert r.headers["Retry-After"] == "30"
        err = r.json()["error"]
        assert err["code"] == "quota_exceeded" and "max_queued" in err["message"] and "2" in err["message"]
        # A repeated request of a job that exists is answered with it, not refused; other tenants are not limited.
        again = api.client.post("/v1/jobs", json=api.spec(), headers={**api.h(), "Idempotency-Key": "k1"})
        assert again.status_code == 202 and again.json()["id"] == first.json()["id"]
        api.create("bob")
        assert len(api.client.get("/v1/jobs", headers=api.h()).json()["items"]) == 2
        # A cancelled job leaves the queue: there is room again.
        api.client.post(f"/v1/jobs/{first.json()['id']}/cancel", headers=api.h())
        api.create()


def test_the_create_rate_is_limited_per_minute(make_api):
    with make_api(quotas="*:creates_per_minute=2") as api:
        api.create()
        api.create()
        r = api.client.post("/v1/jobs", json=api.spec(), headers=api.h())
        assert r.status_code == 429
        assert 1 <= int(r.headers["Retry-After"]) <= 61
        assert "creates_per_minute" in r.json()["error"]["message"]
        api.create("bob")  # '*' gives every tenant its own count


def test_a_tenant_at_its_running_limit_waits_without_holding_back_others(make_api):
    with make_api(quotas="alice:max_running=1", webhook_poll_s=0.05) as api:
        jobs = api.services.jobs
        a1, a2 = api.create(), api.create()
        b1 = api.create("bob")
        assert (a1["held"], a2["held"], b1["held"]) == (False, True, False)
        assert a2["status"] == "queued"
        assert jobs.claim(a1["id"], "w") and jobs.claim(b1["id"], "w")
        assert jobs.get(a2["id"]).held  # b1 running does not count against alice
        high = api.create(resources={"priority": 9})
        assert high["held"]
        assert jobs.finish(a1["id"], JobStatus.succeeded)
        # The API's dispatcher releases the held job with the highest priority first.
        wait_until(lambda: not jobs.get(high["id"]).held, 20, lambda: "held job not released")
        assert jobs.get(a2["id"]).held
        kinds = [e["kind"] for e in api.client.get(f"/v1/jobs/{high['id']}/events", headers=api.h()).json()]
        assert "released" in kinds


def test_queues_are_checked_and_chosen_by_the_memory_plan(make_api):
    with make_api(queues="big=80GiB,small=20GiB") as api:
        model = api.root / "models" / "tiny"
        r = api.client.post("/v1/jobs", json=api.spec(resources={"queue": "nope"}), headers=api.h())
        assert r.status_code == 422 and r.json()["error"]["field"] == "resources.queue"
        assert "big" in r.json()["error"]["message"]
        assert api.create(resources={"queue": "big", "priority": 2})["queue"] == "big"
        model.mkdir(parents=True, exist_ok=True)
        for hidden, inter, layers, expect in ((4096, 11008, 32, "small"), (5120, 13824, 40, "big")):
            (model / "config.json").write_text(json.dumps({
                "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": hidden,
                "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": hidden // 128,
                "num_key_value_heads": 8, "vocab_size": 32000, "torch_dtype": "bfloat16",
                "max_position_embeddings": 4096}))
            job = api.create(pruning={"method": "magnitude"})
            peak = job["plan"]["devices"]["cuda"]["peak"]["device_bytes"]
            assert job["queue"] == expect, (peak / GiB, expect)
        (model / "config.json").unlink()
        model.rmdir()
        assert api.create()["queue"] == api.services.settings.queue  # no plan: the default queue


def test_webhook_urls_and_destinations_are_checked_at_submit(make_api):
    with make_api(webhook_allowed_hosts="127.0.0.1:9", webhook_secrets="alice:s3cret",
                  output_destinations="alice:s3://models/team-a/") as api:
        def refused(tenant: str = "alice", **sections: Any) -> dict:
            r = api.client.post("/v1/jobs", json=api.spec(**sections), headers=api.h(tenant))
            assert r.status_code == 422, r.text
            return r.json()["error"]

        for url in ("http://example.com/hook", "http://127.0.0.1:10/hook", "http://169.254.169.254/latest",
                    "http://[::ffff:169.254.169.254]:9/", "ftp://127.0.0.1:9/"):
            err = refused(notify={"url": url})
            assert err["field"] == "notify.url", (url, err)
        assert "secret" in refused("bob", notify={"url": "http://127.0.0.1:9/h"})["message"]
        assert api.create(notify={"url": "http://127.0.0.1:9/h"})["spec"]["notify"]["url"] == "http://127.0.0.1:9/h"
        for dest in ("s3://models/team-b/x", "s3://models/team-ab/", "s3://other/team-a/"):
            err = refused(output={"destination": dest})
            assert err["field"] == "output.destination" and err["code"] == "destination_not_allowed"
        assert refused("bob", output={"destination": "s3://models/team-a/"})["field"] == "output.destination"
        assert api.create(output={"destination": "s3://models/team-a/run-1"})["status"] == "queued"


def test_each_status_event_is_signed_retried_and_shown(make_api):
    """500 twice, then 200: the same delivery id on every try, a valid signature each time, in order; a redirect
    to the metadata address is never followed and ends the delivery."""
    failures: dict[str, int] = {}

    def answer(req, earlier):
        if req.path == "/redirect":
            return 302, {"Location": "http://169.254.169.254/latest/meta-data/"}
        delivery = req.headers[DELIVERY_HEADER.lower()]
        failures[delivery] = failures.get(delivery, 0) + 1
        return (500, {}) if failures[delivery] <= 2 else (200, {})

    with receiving(answer) as rx, make_api(webhook_allowed_hosts=f"127.0.0.1:{rx.port}", webhook_secrets="alice:k1",
                                           webhook_retry_base_s=0.05, webhook_poll_s=0.05) as api:
        job = api.create(notify={"url": rx.url + "/hook"})
        api.client.post(f"/v1/jobs/{job['id']}/cancel", headers=api.h())
        deliveries = wait_until(lambda: (d := api.client.get(f"/v1/jobs/{job['id']}/deliveries",
                                                             headers=api.h()).json())
                                and all(x["state"] != "pending" for x in d) and len(d) == 2 and d, 30,
                                lambda: "deliveries not finished")
        assert [d["payload"]["job"]["status"] for d in deliveries] == ["queued", "cancelled"]
        for d in deliveries:
            assert d["state"] == "delivered" and [a["status_code"] for a in d["attempts"]] == [500, 500, 200]
        seen = [r for r in rx.seen() if r.path == "/hook"]
        assert [r.headers[DELIVERY_HEADER.lower()] for r in seen] == [deliveries[0]["id"]] * 3 + [
            deliveries[1]["id"]] * 3
        for r in seen:
            assert verify("k1", r.body, r.headers[SIGNATURE_HEADER.lower()])
            assert not verify("other", r.body, r.headers[SIGNATURE_HEADER.lower()])
        assert json.loads(seen[-1].body)["job"]["status"] == "cancelled"

        other = api.create(notify={"url": rx.url + "/redirect"})
        d = wait_until(lambda: (x := api.client.get(f"/v1/jobs/{other['id']}/deliveries",
                                                    headers=api.h()).json()) and x[0]["state"] != "pending" and x,
                       30, lambda: "redirect delivery still pending")[0]
        assert d["state"] == "failed" and len(d["attempts"]) == 1 and d["attempts"][0]["permanent"]
        assert "169.254.169.254" in d["attempts"][0]["error"]
        assert len([r for r in rx.seen() if r.path == "/redirect"]) == 1
        assert api.client.get(f"/v1/jobs/{other['id']}/deliveries", headers=api.h("bob")).status_code == 404


def test_openapi_documents_the_new_contract(make_api):
    with make_api() as api:
        schema = api.client.get("/openapi.json").json()
        create = schema["paths"]["/v1/jobs"]["post"]["responses"]
        assert "Retry-After" in create["429"]["headers"]
        assert "/v1/jobs/{job_id}/deliveries" in schema["paths"]
        spec = schema["components"]["schemas"]["JobSpec"]["properties"]
        assert {"notify", "resources"} <= set(spec)


@pytest.mark.parametrize("overrides, name", [
    ({"quotas": "alice:creates_per_minute=0"}, "creates_per_minute"),
    ({"quotas": "alice:max_running=0"}, "max_running"),
    ({"quotas": "alice:max_queud=3"}, "max_queud"),
    ({"queues": "a100=lots"}, "a100"),
    ({"queues": "bad name"}, "bad name"),
])
def test_bad_tenancy_settings_stop_the_service_at_start(tmp_path, overrides, name):
    from app.main import create_app

    with pytest.raises(ValueError, match=name):
        create_app(api_settings(tmp_path, f"sqlite:///{tmp_path / 'j.db'}", **overrides))


def test_held_jobs_are_released_once_the_running_limit_is_gone(make_api):
    from app.service import LocalEnqueuer, dispatch_held
    from app.tenancy import TenantPolicy

    with make_api(quotas="alice:max_running=1") as api:
        api.create()
        held = api.create()
        assert held["held"]
        settings = api.services.settings.model_copy(update={"quotas": None})
        assert dispatch_held(api.services.jobs, TenantPolicy(settings), LocalEnqueuer()) == [held["id"]]
        assert not api.services.jobs.get(held["id"]).held


def test_a_repeated_request_at_a_full_queue_gets_its_job(make_api):
    with make_api(quotas="alice:max_queued=1") as api:
        h = {**api.h(), "Idempotency-Key": "same"}
        first = api.client.post("/v1/jobs", json=api.spec(), headers=h)
        again = api.client.post("/v1/jobs", json=api.spec(), headers=h)
        assert (first.status_code, again.status_code) == (202, 202)
        assert again.json()["id"] == first.json()["id"] and again.headers["Idempotent-Replayed"] == "true"


def test_a_delivery_is_recorded_only_by_the_sender_that_holds_it(make_api):
    from datetime import timedelta

    from app.store.models import utcnow

    with make_api(webhook_allowed_hosts="127.0.0.1:9", webhook_secrets="alice:s") as api:
        jobs = api.services.jobs
        job = api.create(notify={"url": "http://127.0.0.1:9/h"})
        (d,) = jobs.deliveries(job["id"])
        old, _ = jobs.claim_delivery(d.id, hold_s=0)  # a claim that has already expired
        assert jobs.claim_delivery(d.id, hold_s=60) is not None  # taken over by another sender
        late = {"at": utcnow().isoformat(), "ok": True, "status_code": 200, "error": None, "duration_ms": 5,
                "permanent": False}
        assert not jobs.record_attempt(d.id, old, late, "delivered")  # the first sender's late answer is dropped
        (d,) = jobs.deliveries(job["id"])
        assert d.state == "pending" and d.attempts == []
        assert jobs.claim_delivery(d.id, hold_s=60) is None  # held
        with jobs.session() as s:  # the hold ran out, but a back-off still applies
            s.execute(__import__("sqlalchemy").update(type(d)).where(type(d).id == d.id).values(
                claimed_until=None, next_attempt_at=utcnow() + timedelta(hours=1)))
        assert jobs.claim_delivery(d.id, hold_s=60) is None
