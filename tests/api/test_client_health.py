"""The typed client over the API, readiness, metrics."""

from __future__ import annotations

import pytest
import redis
from fastapi.testclient import TestClient

from app.client import ApiClientError, Client
from app.main import create_app
from app.schemas import JobStatus
from tests.conftest import api_settings, free_port


def test_client_round_trip(api):
    c = Client(api_key="key-alice-123", http=api.client)
    job = c.create(api.spec(), idempotency_key="abc")
    assert c.create(api.spec(), idempotency_key="abc").id == job.id
    assert c.get(job.id).status is JobStatus.queued
    assert [j.id for j in c.list().items] == [job.id]
    assert c.cancel(job.id).status is JobStatus.cancelled
    assert c.wait(job.id, poll_s=0.01).status is JobStatus.cancelled
    kinds = [e.kind for e in c.events(job.id)]
    assert kinds == ["status", "status"]
    assert [name for name, _ in c.stream_events(job.id)] == ["status", "status", "end"]
    assert c.artifacts(job.id) == []
    c.delete(job.id)
    with pytest.raises(ApiClientError) as e:
        c.get(job.id)
    assert e.value.status == 404 and e.value.code == "job_not_found"
    with pytest.raises(ApiClientError) as e:
        c.create({"model": {"id": "/x"}, "pruning": {"sparsity": 3}})
    assert e.value.status == 422 and e.value.field == "pruning.sparsity"


def test_health_ready_and_metrics(api):
    assert api.client.get("/healthz").json() == {"status": "ok"}
    ready = api.client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"] == {"database": "ok", "artifacts": "ok"}
    api.create()
    job = api.create()["id"]
    api.client.post(f"/v1/jobs/{job}/cancel", headers=api.h())
    api.client.get("/v1/jobs/nope", headers=api.h())
    api.services.jobs.set_checkpoint_bytes(job, 123_456)  # what a worker records as it writes the job's checkpoints
    assert api.client.get(f"/v1/jobs/{job}", headers=api.h()).json()["checkpoint_bytes"] == 123_456
    text = api.client.get("/metrics").text
    assert "restorelcc_checkpoint_bytes 123456.0" in text
    assert 'restorelcc_jobs_created_total{tenant="alice"} 2.0' in text
    assert 'restorelcc_jobs{status="queued"} 1.0' in text and 'restorelcc_jobs{status="cancelled"} 1.0' in text
    assert 'restorelcc_http_requests_total{method="POST",route="/v1/jobs",status="202"} 2.0' in text
    assert 'restorelcc_http_requests_total{method="GET",route="/v1/jobs/{job_id}",status="404"} 1.0' in text
    assert "restorelcc_http_request_duration_seconds_bucket" in text


def test_readyz_reports_an_unreachable_broker(tmp_path):
    port = free_port()  # nothing listens there
    s = api_settings(tmp_path, f"sqlite:///{tmp_path / 'j.db'}", redis_url=f"redis://127.0.0.1:{port}/0")
    with TestClient(create_app(s)) as c:
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["checks"]["broker"].startswith("error")
        r = c.post("/v1/jobs", json={"model": {"id": str(tmp_path / "models" / "m")},
                                     "restoration": {"method": "none"}, "pruning": {"method": "magnitude"}},
                   headers={"Authorization": "Bearer key-alice-123"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "broker_unavailable"
        job = c.get("/v1/jobs", headers={"Authorization": "Bearer key-alice-123"}).json()["items"][0]
        assert job["status"] == "failed" and job["error"]["code"] == "enqueue_failed"


def test_retry_after_broker_outage_with_the_same_idempotency_key_gets_a_new_job(tmp_path):
    """A 503 must not burn the Idempotency-Key: the failed job stays recorded, the retry runs."""
    db = f"sqlite:///{tmp_path / 'j.db'}"
    body = {"model": {"id": str(tmp_path / "models" / "m")}, "restoration": {"method": "none"},
            "pruning": {"method": "magnitude"}}
    h = {"Authorization": "Bearer key-alice-123", "Idempotency-Key": "pipeline-run-7"}
    down = api_settings(tmp_path, db, redis_url=f"redis://127.0.0.1:{free_port()}/0")
    with TestClient(create_app(down)) as c:
        assert c.post("/v1/jobs", json=body, headers=h).status_code == 503
        failed = c.get("/v1/jobs", headers=h).json()["items"][0]
    assert failed["status"] == "failed" and failed["error"]["code"] == "enqueue_failed"
    up = api_settings(tmp_path, db, redis_url="redis://127.0.0.1:6379/14")
    try:
        with TestClient(create_app(up)) as c:
            r = c.post("/v1/jobs", json=body, headers=h)
            assert r.status_code == 202 and "Idempotent-Replayed" not in r.headers
            assert r.json()["id"] != failed["id"] and r.json()["status"] == "queued"
            again = c.post("/v1/jobs", json=body, headers=h)  # now the key replays the queued job
            assert again.json()["id"] == r.json()["id"] and again.headers["Idempotent-Replayed"] == "true"
            assert {j["id"] for j in c.get("/v1/jobs", headers=h).json()["items"]} == {failed["id"], r.json()["id"]}
    finally:
        redis.Redis.from_url("redis://127.0.0.1:6379/14").flushdb()


def test_readyz_with_a_live_broker(tmp_path):
    s = api_settings(tmp_path, f"sqlite:///{tmp_path / 'j.db'}", redis_url="redis://127.0.0.1:6379/0")
    with TestClient(create_app(s)) as c:
        r = c.get("/readyz")
        assert r.status_code == 200 and r.json()["checks"]["broker"] == "ok"


def test_metrics_token_guards_metrics_only(tmp_path):
    s = api_settings(tmp_path, f"sqlite:///{tmp_path / 'j.db'}", metrics_token="scrape-me")
    with TestClient(create_app(s)) as c:
        r = c.get("/metrics")
        assert r.status_code == 401 and r.json()["error"]["field"] == "Authorization"
        assert c.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
        ok = c.get("/metrics", headers={"Authorization": "Bearer scrape-me"})
        assert ok.status_code == 200 and "restorelcc_http_requests_total" in ok.text
        assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200


def test_celery_pool_processes_are_recycled_per_job_by_default(tmp_path):
    from worker.service.celery_app import make_celery

    s = api_settings(tmp_path, f"sqlite:///{tmp_path / 'j.db'}")
    assert make_celery(s).conf.worker_max_tasks_per_child == 1
    s = api_settings(tmp_path, f"sqlite:///{tmp_path / 'j.db'}", worker_max_tasks_per_child=None)
    assert make_celery(s).conf.worker_max_tasks_per_child is None


def test_celery_gives_back_a_message_whose_task_hit_the_hard_time_limit(tmp_path):
    """Celery acknowledges such a message by default, and the job would wait for the sweep; rejected, it comes back
    at once and the redelivered task fails the job ``time_limit`` (a run killed by the limit is not run again)."""
    from worker.service.celery_app import make_celery

    app = make_celery(api_settings(tmp_path, f"sqlite:///{tmp_path / 'j.db'}"))

    @app.task(name="restorelcc.test.probe")
    def probe() -> None:
        return None

    assert probe.acks_late and probe.reject_on_worker_lost and probe.acks_on_timeout is False


def test_wait_rides_out_a_service_briefly_unavailable(api):
    """Client.wait polls a real HTTP server that answers 503 (Retry-After: 0), then drops the connection, then
    answers the finished job: the wait returns it. A 404 still ends the wait at once."""
    import http.server
    import json
    import threading

    c = Client(api_key="key-alice-123", http=api.client)
    job = c.create(api.spec())
    c.cancel(job.id)
    finished = api.client.get(f"/v1/jobs/{job.id}", headers=api.h()).content
    answers = ["503", "drop", "job"]
    seen: list[str] = []

    class Flaky(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
            answer = answers.pop(0) if answers else "missing"
            seen.append(answer)
            if answer == "drop":
                self.close_connection = True
                self.connection.shutdown(2)
                return
            status, body = {"503": (503, json.dumps({"error": {"code": "store_unavailable", "message": "down"}})),
                            "job": (200, finished.decode()),
                            "missing": (404, json.dumps({"error": {"code": "job_not_found", "message": "no"}}))}[answer]
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Retry-After", "0")
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Flaky)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        flaky = Client(f"http://127.0.0.1:{server.server_address[1]}", api_key="k")
        assert flaky.wait(job.id, poll_s=0.01, timeout_s=60).status is JobStatus.cancelled
        assert seen == ["503", "drop", "job"]
        with pytest.raises(ApiClientError) as e:
            flaky.wait(job.id, poll_s=0.01, timeout_s=60)
        assert e.value.status == 404 and seen[-1] == "missing"
        answers.extend(["503"] * 3)  # unavailable for longer than the wait allows: the last error, not a hang
        with pytest.raises(ApiClientError) as e:
            flaky.wait(job.id, poll_s=0.01, unavailable_s=0)
        assert e.value.status == 503 and seen[-1] == "503"
    finally:
        server.shutdown()
        server.server_close()
