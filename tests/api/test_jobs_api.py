"""The jobs endpoints against the real job store (SQLite and PostgreSQL)."""

from __future__ import annotations

import json

import httpx
import pytest

from app.schemas import JobStatus
from tests.conftest import Api, api_settings, serve_in_thread


def test_create_returns_202_location_and_queued_job(api):
    r = api.client.post("/v1/jobs", json=api.spec(), headers=api.h())
    assert r.status_code == 202
    job = r.json()
    assert r.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["status"] == "queued" and job["stage"] is None
    assert job["progress"] == {"fraction": 0.0, "message": "queued"}
    assert job["spec"]["pruning"]["sparsity"] == 0.5 and job["spec"]["seed"] == 42  # normalised, defaults filled
    got = api.client.get(r.headers["location"], headers=api.h()).json()
    assert got["id"] == job["id"] and got["created_at"] and got["error"] is None and got["metrics"] == {}


def test_a_request_repeated_across_restorelccs_objective_default_change_finds_its_job(api):
    """RestoreLCC's default objective changed from sft to the mix (docs/objective.md). A pipeline that repeats a
    request sent before the change, with its Idempotency-Key, gets the job that request made; the same body without
    a key gets the new default; naming the new default explicitly under the old key is another request. Keys stored
    since compare requests as they resolve now: sft and the default are two requests, the default named or left
    out one."""
    import sqlalchemy as sa

    from app.schemas import JobSpec
    from app.store.models import IdempotencyKey

    train = api.root / "data" / "train.jsonl"
    train.write_text('{"prompt": "Say hi.", "response": " hi"}\n')
    body = api.spec(restoration={"method": "restorelcc"}, data={"train": str(train)})
    before = JobSpec.model_validate(body).model_dump(mode="json")  # as the release before the change resolved it
    before["restoration"] |= {"objective": "sft", "sft_weight": 0.0}
    old, _ = api.services.jobs.create("alice", before, idempotency_key="nightly")
    with api.services.jobs.session() as s:  # ... and hashed it (revision 0007 marks such keys version 1)
        s.execute(sa.update(IdempotencyKey).where(IdempotencyKey.job_id == old.id).values(hash_version=1))
    again = api.client.post("/v1/jobs", json=body, headers={**api.h(), "Idempotency-Key": "nightly"})
    assert again.headers["idempotent-replayed"] == "true" and again.json()["id"] == old.id
    assert again.json()["spec"]["restoration"]["objective"] == "sft"
    new = api.client.post("/v1/jobs", json=body, headers=api.h()).json()
    assert (new["spec"]["restoration"]["objective"], new["spec"]["restoration"]["sft_weight"]) == ("distill", 0.5)
    named = {**body, "restoration": {"method": "restorelcc", "objective": "distill", "sft_weight": 0.5}}
    r = api.client.post("/v1/jobs", json=named, headers={**api.h(), "Idempotency-Key": "nightly"})
    assert r.status_code == 409 and r.json()["error"]["code"] == "idempotency_conflict"

    fresh = {**api.h(), "Idempotency-Key": "after-the-change"}
    first = api.client.post("/v1/jobs", json=body, headers=fresh).json()
    assert api.client.post("/v1/jobs", json=named, headers=fresh).json()["id"] == first["id"]
    sft = {**body, "restoration": {"method": "restorelcc", "objective": "sft"}}
    assert api.client.post("/v1/jobs", json=sft, headers=fresh).status_code == 409
    pure = {**body, "restoration": {"method": "restorelcc", "objective": "distill", "sft_weight": 0}}
    assert api.client.post("/v1/jobs", json=pure, headers=fresh).status_code == 409


def test_list_newest_first_with_cursor_and_status_filter(api):
    ids = [api.create()["id"] for _ in range(5)]
    api.create("bob")
    page1 = api.client.get("/v1/jobs?limit=2", headers=api.h()).json()
    assert [j["id"] for j in page1["items"]] == ids[::-1][:2]
    page2 = api.client.get(f"/v1/jobs?limit=2&after={page1['next_cursor']}", headers=api.h()).json()
    page3 = api.client.get(f"/v1/jobs?limit=2&after={page2['next_cursor']}", headers=api.h()).json()
    assert [j["id"] for j in page2["items"] + page3["items"]] == ids[::-1][2:]
    assert page3["next_cursor"] is None
    api.client.post(f"/v1/jobs/{ids[1]}/cancel", headers=api.h())
    cancelled = api.client.get("/v1/jobs?status=cancelled", headers=api.h()).json()["items"]
    assert [j["id"] for j in cancelled] == [ids[1]]
    assert len(api.client.get("/v1/jobs?status=queued", headers=api.h()).json()["items"]) == 4
    bad = api.client.get("/v1/jobs?status=nope", headers=api.h())
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "status"
    bad = api.client.get("/v1/jobs?after=unknown", headers=api.h())
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "after"


def test_cancel_queued_is_immediate_and_finished_jobs_are_immutable(api):
    job = api.create()
    r = api.client.post(f"/v1/jobs/{job['id']}/cancel", headers=api.h())
    assert r.status_code == 202 and r.json()["status"] == "cancelled" and r.json()["finished_at"]
    again = api.client.post(f"/v1/jobs/{job['id']}/cancel", headers=api.h())
    assert again.status_code == 200 and again.json()["status"] == "cancelled"
    jobs = api.services.jobs
    assert not jobs.claim(job["id"], "w")  # a cancelled job never runs
    assert not jobs.finish(job["id"], JobStatus.succeeded)
    assert jobs.get(job["id"]).status == "cancelled"


def test_cancel_running_goes_through_cancelling_and_succeeded_gives_409(api):
    jobs = api.services.jobs
    a, b = api.create()["id"], api.create()["id"]
    assert jobs.claim(a, "w") and jobs.claim(b, "w")
    r = api.client.post(f"/v1/jobs/{a}/cancel", headers=api.h())
    assert r.status_code == 202 and r.json()["status"] == "cancelling"
    assert jobs.finish(b, JobStatus.succeeded)
    r = api.client.post(f"/v1/jobs/{b}/cancel", headers=api.h())
    assert r.status_code == 409 and r.json()["error"]["code"] == "job_finished"


def test_retry_makes_a_linked_job_of_a_failed_or_cancelled_one(api):
    jobs = api.services.jobs
    failed, cancelled, running = api.create()["id"], api.create()["id"], api.create()["id"]
    assert jobs.claim(failed, "w") and jobs.finish(failed, JobStatus.failed, ("worker_lost", "gone"))
    api.client.post(f"/v1/jobs/{cancelled}/cancel", headers=api.h())
    assert jobs.claim(running, "w")
    for old in (failed, cancelled):
        r = api.client.post(f"/v1/jobs/{old}/retry", headers={**api.h(), "Idempotency-Key": f"retry-{old}"})
        assert r.status_code == 202, r.text
        new = r.json()
        assert new["retry_of"] == old and new["status"] == "queued" and new["id"] != old
        assert new["spec"] == api.client.get(f"/v1/jobs/{old}", headers=api.h()).json()["spec"]
        assert r.headers["Location"] == f"/v1/jobs/{new['id']}"
        again = api.client.post(f"/v1/jobs/{old}/retry", headers={**api.h(), "Idempotency-Key": f"retry-{old}"})
        assert again.json()["id"] == new["id"] and again.headers["Idempotent-Replayed"] == "true"
        assert api.client.get(f"/v1/jobs/{new['id']}", headers=api.h()).json()["retry_of"] == old
    for active in (running, api.create()["id"]):  # running, queued
        r = api.client.post(f"/v1/jobs/{active}/retry", headers=api.h())
        assert r.status_code == 409 and r.json()["error"]["code"] == "job_not_retryable", r.text
    assert api.client.post(f"/v1/jobs/{failed}/retry", headers=api.h("bob")).status_code == 404  # not bob's
    assert api.client.post("/v1/jobs/nope/retry", headers=api.h()).status_code == 404
    assert api.client.get(f"/v1/jobs/{failed}", headers=api.h()).json()["retry_of"] is None


def test_delete_only_finished_jobs(api):
    jobs = api.services.jobs
    job = api.create()["id"]
    r = api.client.delete(f"/v1/jobs/{job}", headers=api.h())
    assert r.status_code == 409 and r.json()["error"]["code"] == "job_not_finished"
    jobs.claim(job, "w")
    assert api.client.delete(f"/v1/jobs/{job}", headers=api.h()).status_code == 409
    jobs.finish(job, JobStatus.failed, ("x", "boom"))
    assert api.client.delete(f"/v1/jobs/{job}", headers=api.h()).status_code == 204
    assert api.client.get(f"/v1/jobs/{job}", headers=api.h()).status_code == 404
    assert api.client.delete(f"/v1/jobs/{job}", headers=api.h()).status_code == 404


def test_idempotency_key_replays_and_conflicts(api):
    h = {**api.h(), "Idempotency-Key": "k1"}
    first = api.client.post("/v1/jobs", json=api.spec(), headers=h)
    second = api.client.post("/v1/jobs", json=api.spec(), headers=h)
    assert first.status_code == second.status_code == 202
    assert first.json()["id"] == second.json()["id"]
    assert second.headers["idempotent-replayed"] == "true"
    other = api.client.post("/v1/jobs", json=api.spec(seed=7), headers=h)
    assert other.status_code == 409 and other.json()["error"]["code"] == "idempotency_conflict"
    # Keys are per tenant.
    bob = api.client.post("/v1/jobs", json=api.spec(), headers={**api.h("bob"), "Idempotency-Key": "k1"})
    assert bob.status_code == 202 and bob.json()["id"] != first.json()["id"]
    assert len(api.client.get("/v1/jobs", headers=api.h()).json()["items"]) == 1


def test_events_json_list_in_order(api):
    jobs = api.services.jobs
    job = api.create()["id"]
    jobs.claim(job, "w")
    jobs.set_stage(job, "loading")
    jobs.set_progress(job, 0.3, "half", event=True, stage="loading")
    jobs.merge_metrics(job, {"sparsity": 0.5})
    jobs.finish(job, JobStatus.succeeded, metrics={"sparsity": 0.5})
    events = api.client.get(f"/v1/jobs/{job}/events", headers=api.h()).json()
    assert [e["kind"] for e in events] == ["status", "status", "stage", "progress", "metrics", "status"]
    assert [e["data"].get("status") for e in events if e["kind"] == "status"] == ["queued", "running", "succeeded"]
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(seqs)
    tail = api.client.get(f"/v1/jobs/{job}/events?after={seqs[2]}", headers=api.h()).json()
    assert [e["seq"] for e in tail] == seqs[3:]
    got = api.client.get(f"/v1/jobs/{job}", headers=api.h()).json()
    assert got["status"] == "succeeded" and got["progress"]["fraction"] == 1.0 and got["metrics"] == {"sparsity": 0.5}


def _finished_job(api: Api) -> tuple[str, list[int]]:
    """A succeeded job and the seqs of its events."""
    job = api.create()["id"]
    api.services.jobs.claim(job, "w")
    api.services.jobs.finish(job, JobStatus.succeeded)
    return job, [e["seq"] for e in api.client.get(f"/v1/jobs/{job}/events", headers=api.h()).json()]


@pytest.mark.parametrize("accept", ["application/json", "text/event-stream"])
def test_last_event_id_resumes_after_that_seq_in_either_form(api, accept):
    """What an EventSource sends on reconnecting wins over `after` (the URL it reconnects to still carries it)."""
    job, seqs = _finished_job(api)
    assert len(seqs) == 3
    r = api.client.get(f"/v1/jobs/{job}/events?after=0",
                       headers={**api.h(), "Accept": accept, "Last-Event-ID": str(seqs[0])})
    assert r.status_code == 200, r.text
    got = [e["seq"] for e in r.json()] if accept == "application/json" else [
        data["seq"] for name, data in _sse(r.text) if name != "end"]
    assert got == seqs[1:]


@pytest.mark.parametrize("value", ["²".encode("latin-1"), "9" * 5000, str(2**31), "9" * 10, "-1", "+1", "1.0",
                                   "0x1"])
@pytest.mark.parametrize("accept", ["application/json", "text/event-stream"])
def test_a_last_event_id_that_is_no_seq_is_422_naming_the_header(api, value, accept):
    """Only ASCII digits up to the largest seq the store holds (32 bits on PostgreSQL): '²' passes str.isdigit but
    not int(), thousands of digits are past what int() takes."""
    job, _ = _finished_job(api)
    r = api.client.get(f"/v1/jobs/{job}/events", headers={**api.h(), "Accept": accept, "Last-Event-ID": value})
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err == {"code": "invalid_header", "field": "Last-Event-ID",
                   "message": "Last-Event-ID: must be an event seq, 0 to 2147483647 in ASCII digits"}


@pytest.mark.parametrize("accept", ["application/json", "text/event-stream"])
def test_an_empty_last_event_id_means_none_received(api, accept):
    """An empty or blank Last-Event-ID (a client with no event yet) is as if none were sent."""
    job, seqs = _finished_job(api)
    r = api.client.get(f"/v1/jobs/{job}/events?after={seqs[0]}",
                       headers={**api.h(), "Accept": accept, "Last-Event-ID": " "})
    assert r.status_code == 200, r.text
    got = [e["seq"] for e in r.json()] if accept == "application/json" else [
        data["seq"] for name, data in _sse(r.text) if name != "end"]
    assert got == seqs[1:]


def test_after_is_bounded_by_the_largest_seq(api):
    """The largest seq the store holds (PostgreSQL's 32-bit integer) is a valid (empty) page on both stores, as
    `after` and as Last-Event-ID; one more is a 422 naming `after`, not the store's overflow (a 500)."""
    job, _ = _finished_job(api)
    r = api.client.get(f"/v1/jobs/{job}/events?after={2**31 - 1}", headers=api.h())
    assert r.status_code == 200 and r.json() == [], r.text
    r = api.client.get(f"/v1/jobs/{job}/events", headers={**api.h(), "Last-Event-ID": str(2**31 - 1)})
    assert r.status_code == 200 and r.json() == [], r.text
    for after in (str(2**31), str(2**63), "1" + "0" * 5000):
        r = api.client.get(f"/v1/jobs/{job}/events?after={after}", headers=api.h())
        assert r.status_code == 422, r.text
        assert r.json()["error"]["field"] == "after"


def _sse(text: str) -> list[tuple[str, dict]]:
    out = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines() if not line.startswith(":"))
        if "event" in lines:
            out.append((lines["event"], json.loads(lines["data"])))
    return out


def test_event_stream_is_live_and_ends_when_the_job_finishes(tmp_path, db_url):
    """What is written after the stream opened reaches it: the job runs only once the stream's first event (its
    history) has arrived, and the stream ends with the job. On a real server, so that the response streams."""
    from app.main import create_app

    app = create_app(api_settings(tmp_path, db_url))
    api = Api(None, app.state.services, tmp_path)
    jobs = app.state.services.jobs
    lines: list[str] = []
    with serve_in_thread(app) as url, httpx.Client(base_url=url, headers=api.h(), timeout=60) as http:
        created = http.post("/v1/jobs", json=api.spec())
        assert created.status_code == 202, created.text
        job = created.json()["id"]
        with http.stream("GET", f"/v1/jobs/{job}/events", headers={"Accept": "text/event-stream"}) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            ran = False
            for line in r.iter_lines():
                lines.append(line)
                if not ran and line == "" and _sse("\n".join(lines)):
                    ran = True
                    jobs.claim(job, "w")
                    for stage in ("loading", "pruning"):
                        jobs.set_stage(job, stage)
                    jobs.finish(job, JobStatus.succeeded)
    events = _sse("\n".join(lines))
    assert [name for name, _ in events] == ["status", "status", "stage", "stage", "status", "end"]
    assert events[0][1]["data"]["status"] == "queued" and events[-1][1] == {"status": "succeeded"}


@pytest.mark.parametrize(
    "body, field",
    [
        ({"model": {"id": "/x"}, "pruning": {"sparsity": 1.5}, "restoration": {"method": "none"}},
         "pruning.sparsity"),
        ({"model": {"id": "/x"}, "pruning": {"pattern": "3:2"}, "restoration": {"method": "none"}},
         "pruning.pattern"),
        ({"model": {}, "restoration": {"method": "none"}}, "model.id"),
        ({"model": {"id": "/x"}, "restoration": {"method": "magic"}}, "restoration.method"),
        ({"model": {"id": "/x"}, "restoration": {"method": "none"}, "colour": "red"}, "colour"),
        ({"model": {"id": "/x"}, "pruning": {"method": "magnitude"}}, "data.train"),
        ({"model": {"id": "/x"}, "restoration": {"method": "none"}, "evaluation": {"tasks": "x"}},
         "evaluation.tasks"),
        ({"model": {"id": "/x"}, "restoration": {"method": "lora", "lr_schedule": "step"}},
         "restoration.lr_schedule"),
        ({"model": {"id": "/x"}, "restoration": {"method": "lora", "max_steps": 10, "warmup_steps": 10}},
         "restoration.warmup_steps"),
        ({"model": {"id": "/x"}, "restoration": {"method": "restorelcc", "lora_r": 8}}, "restoration.lora_r"),
        ({"model": {"id": "/x"}, "restoration": {"method": "lora", "heads": 0.5}}, "restoration.heads"),
        ({"model": {"id": "/x"}, "restoration": {"method": "none", "max_steps": 5}}, "restoration.max_steps"),
    ],
)
def test_validation_errors_name_the_field(api, body, field):
    r = api.client.post("/v1/jobs", json=body, headers=api.h())
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["field"] == field and err["code"] == "invalid_spec" and err["message"]


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"", b"null", b"[]", b"42", b'"spec"', b'{"model": null}', b"\xff\xfe", b'{"model": {"id": 1}}',
     b'{"seed": 1e999, "model": {"id": "/x"}}', b'{"model": {"id": "' + b"a" * 100_000 + b'"}}'],
)
def test_malformed_bodies_are_4xx_never_500(api, content):
    r = api.client.post("/v1/jobs", content=content, headers={**api.h(), "Content-Type": "application/json"})
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    assert set(r.json()["error"]) == {"code", "message", "field"}


def test_unknown_job_and_route_use_the_error_shape(api):
    r = api.client.get("/v1/jobs/nope", headers=api.h())
    assert r.status_code == 404 and r.json()["error"]["code"] == "job_not_found"
    r = api.client.get("/v2/whatever", headers=api.h())
    assert r.status_code == 404 and "error" in r.json()


def test_openapi_and_docs_are_served(api):
    spec = api.client.get("/openapi.json").json()
    paths = spec["paths"]
    for p in ("/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/cancel", "/v1/jobs/{job_id}/events",
              "/v1/jobs/{job_id}/artifacts", "/v1/jobs/{job_id}/artifacts/{name}", "/healthz", "/readyz",
              "/metrics"):
        assert p in paths, p
    assert "JobSpec" in spec["components"]["schemas"]
    assert api.client.get("/docs").status_code == 200
