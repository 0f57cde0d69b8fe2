"""Downloads and DELETE when the artifact store lets the service down: an object that is gone is a 404 with the
error body, a store that fails is a 503 with Retry-After, and a DELETE that could not remove the job's files keeps
the job so that the same DELETE, repeated once the store is back, finishes the cleanup.

The store is S3 on a real S3 server (moto's server mode) that the tests stop and start again on the same port (its
objects live on in the process), so the failures are what botocore raises for a server that does not answer."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config
from fastapi.testclient import TestClient
from moto.server import ThreadedMotoServer

from app.errors import STORE_RETRY_AFTER_S
from app.main import create_app
from app.schemas import JobStatus
from app.store.artifacts import S3Store, job_key, job_prefix
from tests.conftest import KEYS, api_settings, free_port

H = {"Authorization": f"Bearer {KEYS['alice']}"}
GONE = {"error": {"code": "artifact_not_found", "message": "artifact not found", "field": None}}


class S3Server:
    """moto's S3 server on a fixed port, which can be stopped (connections refused) and started again."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._server: ThreadedMotoServer | None = None

    def start(self) -> None:
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None


@pytest.fixture
def s3_server() -> Iterator[S3Server]:
    server = S3Server()
    server.start()
    yield server
    server.stop()


@dataclass
class S3Api:
    client: TestClient
    services: Any  # app.deps.Services
    store: S3Store
    root: Path

    def running_job(self, *names: str) -> str:
        """A job a worker runs, with one small artifact per name stored in S3."""
        job = self.client.post("/v1/jobs", headers=H, json={
            "model": {"id": str(self.root / "models" / "tiny")}, "pruning": {"method": "magnitude"},
            "restoration": {"method": "none"}}).json()["id"]
        assert self.services.jobs.claim(job, "w")
        for name in names:
            src = self.root / "src.bin"
            src.write_bytes(name.encode() * 10)
            stored = self.store.put_file(job_key(job, name, 1), src)
            self.services.jobs.add_artifact(job, name, stored.size, stored.sha256, stored.key)
        return job

    def finished_job(self, *names: str) -> str:
        job = self.running_job(*names)
        assert self.services.jobs.finish(job, JobStatus.succeeded)
        return job


@pytest.fixture
def s3_api(tmp_path, db_url, s3_server) -> Iterator[S3Api]:
    """The real app configured for S3. Its store's client tries once: the service's own retries five times with
    back-off, which only makes each request to a server that is down slow."""
    settings = api_settings(tmp_path, db_url, s3_bucket="artifacts", s3_prefix="restorelcc",
                            s3_endpoint_url=s3_server.url, s3_access_key_id="testing",
                            s3_secret_access_key="testing")
    app = create_app(settings)
    assert isinstance(app.state.services.artifacts, S3Store)
    once = boto3.client("s3", endpoint_url=s3_server.url, region_name="us-east-1", aws_access_key_id="testing",
                        aws_secret_access_key="testing",
                        config=Config(retries={"max_attempts": 1}, s3={"addressing_style": "path"}))
    store = app.state.services.artifacts = S3Store("artifacts", prefix="restorelcc", client=once)
    store.ensure_bucket()
    with TestClient(app, raise_server_exceptions=False) as client:
        yield S3Api(client, app.state.services, store, tmp_path)


def _unavailable(r: Any) -> None:
    assert r.status_code == 503, r.text
    assert r.headers["retry-after"] == str(STORE_RETRY_AFTER_S)
    assert r.json()["error"]["code"] == "artifact_store_unavailable", r.text


def test_download_of_a_file_gone_from_the_store_is_404(api):
    """Local store: the file was removed behind the service's back (manual cleanup)."""
    job = api.create()["id"]
    jobs, store = api.services.jobs, api.services.artifacts
    assert jobs.claim(job, "w")
    (api.root / "r.json").write_text("{}")
    stored = store.put_file(job_key(job, "report.json", 1), api.root / "r.json")
    jobs.add_artifact(job, "report.json", stored.size, stored.sha256, stored.key)
    jobs.finish(job, JobStatus.succeeded)
    url = f"/v1/jobs/{job}/artifacts/report.json"
    assert api.client.get(url, headers=api.h()).status_code == 200
    (api.services.settings.artifacts_path / stored.key).unlink()
    for extra in ({}, {"Range": "bytes=0-0"}):
        r = api.client.get(url, headers={**api.h(), **extra})
        assert r.status_code == 404 and r.json() == GONE, (extra, r.text)


def test_s3_download_of_a_missing_object_is_404_and_of_a_failing_store_503(s3_api, s3_server):
    job = s3_api.finished_job("report.json", "model/config.json")
    s3_api.store.client.delete_object(Bucket="artifacts", Key=s3_api.store._k(job_key(job, "report.json", 1)))
    for extra in ({}, {"Range": "bytes=0-0"}):
        r = s3_api.client.get(f"/v1/jobs/{job}/artifacts/report.json", headers={**H, **extra})
        assert r.status_code == 404 and r.json() == GONE, (extra, r.text)

    url = f"/v1/jobs/{job}/artifacts/model/config.json"
    s3_server.stop()
    for extra in ({}, {"Range": "bytes=0-0"}):
        _unavailable(s3_api.client.get(url, headers={**H, **extra}))
    s3_server.start()
    r = s3_api.client.get(url, headers=H)
    assert r.status_code == 200 and r.content == b"model/config.json" * 10


def test_delete_while_the_store_is_down_keeps_the_job_and_a_repeat_cleans_up(s3_api, s3_server):
    job = s3_api.finished_job("report.json", "model/config.json")
    other = s3_api.finished_job("report.json")
    running = s3_api.running_job("checkpoints/weights.safetensors")
    r = s3_api.client.delete(f"/v1/jobs/{running}", headers=H)  # decided before the store is asked
    assert r.status_code == 409 and r.json()["error"]["code"] == "job_not_finished", r.text
    assert len(s3_api.store.list_prefix(job_prefix(running))) == 1
    s3_server.stop()
    _unavailable(s3_api.client.delete(f"/v1/jobs/{job}", headers=H))
    s3_server.start()
    assert s3_api.client.get(f"/v1/jobs/{job}", headers=H).status_code == 200  # still there: nothing orphaned
    arts = s3_api.client.get(f"/v1/jobs/{job}/artifacts", headers=H).json()
    assert [a["name"] for a in arts] == ["model/config.json", "report.json"]
    assert len(s3_api.store.list_prefix(job_prefix(job))) == 2

    assert s3_api.client.delete(f"/v1/jobs/{job}", headers=H).status_code == 204
    assert s3_api.store.list_prefix(job_prefix(job)) == []
    r = s3_api.client.get(f"/v1/jobs/{job}", headers=H)
    assert r.status_code == 404 and r.json()["error"]["code"] == "job_not_found"
    assert s3_api.client.delete(f"/v1/jobs/{job}", headers=H).status_code == 404
    assert len(s3_api.store.list_prefix(job_prefix(other))) == 1  # another job's files are left alone
