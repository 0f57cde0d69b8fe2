"""A create whose send to the broker raises although the message got through (the connection broke after the
broker had taken it) and a worker has already claimed the job: the job runs, so the create succeeded. Neither a 503
nor a freed Idempotency-Key, which would let the client's retry start the same work a second time.

The broker is a stand-in (a connection that breaks after the broker applied the push cannot be staged on demand);
the worker's claim is the job store's real one, made on the message as a Celery worker would."""

from __future__ import annotations

from app.store.jobs import JobStore


class DeliveredThenConnectionLost:
    """An enqueuer whose message reaches a worker, which claims the job, before the publish call fails."""

    def __init__(self, jobs: JobStore) -> None:
        self.jobs = jobs
        self.sent: list[str] = []

    def enqueue(self, job_id: str, queue: str | None = None, priority: int = 5) -> None:
        self.sent.append(job_id)
        assert self.jobs.claim(job_id, "worker-1")
        raise ConnectionResetError(104, "Connection reset by peer")

    def check(self) -> None:
        return None


def test_a_job_claimed_despite_a_broker_error_is_created_and_keeps_its_idempotency_key(api):
    broker = DeliveredThenConnectionLost(api.services.jobs)
    api.services.enqueuer = broker
    h = {**api.h(), "Idempotency-Key": "nightly-1"}
    r = api.client.post("/v1/jobs", json=api.spec(), headers=h)
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["status"] == "running" and job["error"] is None
    assert r.headers["location"] == f"/v1/jobs/{job['id']}" and "idempotent-replayed" not in r.headers

    again = api.client.post("/v1/jobs", json=api.spec(), headers=h)  # the client's retry: a replay, no new job
    assert again.status_code == 202 and again.headers["idempotent-replayed"] == "true"
    assert again.json()["id"] == job["id"]
    assert broker.sent == [job["id"]]
    items = api.client.get("/v1/jobs", headers=api.h()).json()["items"]
    assert [(j["id"], j["status"]) for j in items] == [(job["id"], "running")]
