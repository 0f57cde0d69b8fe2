"""S3Store against moto's server mode on 127.0.0.1: round trip, ranges, sha256, prefix delete; and the API
serving artifacts from it."""

from __future__ import annotations

import hashlib
import os

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.schemas import JobStatus
from app.store.artifacts import ArtifactNotFound, S3Store, job_key, job_prefix, verify
from tests.conftest import KEYS, api_settings


def _store(endpoint: str, bucket: str) -> S3Store:
    s = S3Store(bucket, prefix="restorelcc", endpoint_url=endpoint, access_key_id="testing",
                secret_access_key="testing")
    s.ensure_bucket()
    return s


def test_s3_round_trip_with_sha256_and_ranges(s3_endpoint, tmp_path):
    store = _store(s3_endpoint, "roundtrip")
    data = os.urandom(5 * 1024 * 1024 + 3)
    f = tmp_path / "w.bin"
    f.write_bytes(data)
    stored = store.put_file(job_key("j1", "model/w.bin"), f)
    assert stored.size == len(data) and stored.sha256 == hashlib.sha256(data).hexdigest()
    assert store.size(stored.key) == len(data)
    assert b"".join(store.open_range(stored.key)) == data
    assert b"".join(store.open_range(stored.key, 10, 19)) == data[10:20]
    assert b"".join(store.open_range(stored.key, len(data) - 4)) == data[-4:]
    assert verify(store, stored.key, stored.sha256) and not verify(store, stored.key, "0" * 64)
    (tmp_path / "r.json").write_text("{}")
    store.put_file(job_key("j1", "report.json"), tmp_path / "r.json")
    store.put_file(job_key("j2", "report.json"), tmp_path / "r.json")
    assert store.delete_prefix(job_prefix("j1")) == 2
    with pytest.raises(ArtifactNotFound):
        store.size(stored.key)
    assert store.size(job_key("j2", "report.json")) == 2
    store.check()


def test_api_serves_artifacts_from_s3(s3_endpoint, tmp_path):
    _store(s3_endpoint, "apibucket")
    s = api_settings(tmp_path, f"sqlite:///{tmp_path / 'j.db'}", s3_bucket="apibucket", s3_prefix="restorelcc",
                     s3_endpoint_url=s3_endpoint, s3_access_key_id="testing", s3_secret_access_key="testing")
    app = create_app(s)
    assert isinstance(app.state.services.artifacts, S3Store)
    h = {"Authorization": f"Bearer {KEYS['alice']}"}
    with TestClient(app) as c:
        assert c.get("/readyz").json()["checks"]["artifacts"] == "ok"
        job = c.post("/v1/jobs", json={"model": {"id": str(tmp_path / "models" / "m")},
                                       "pruning": {"method": "magnitude"}, "restoration": {"method": "none"}},
                     headers=h).json()["id"]
        jobs, store = app.state.services.jobs, app.state.services.artifacts
        jobs.claim(job, "w")
        data = os.urandom(100_000)
        (tmp_path / "m.bin").write_bytes(data)
        st = store.put_file(job_key(job, "model/m.bin"), tmp_path / "m.bin")
        jobs.add_artifact(job, "model/m.bin", st.size, st.sha256, st.key)
        jobs.finish(job, JobStatus.succeeded)
        r = c.get(f"/v1/jobs/{job}/artifacts/model/m.bin", headers=h)
        assert r.content == data and r.headers["etag"] == f'"{hashlib.sha256(data).hexdigest()}"'
        r = c.get(f"/v1/jobs/{job}/artifacts/model/m.bin", headers={**h, "Range": "bytes=500-599"})
        assert r.status_code == 206 and r.content == data[500:600]
        assert c.delete(f"/v1/jobs/{job}", headers=h).status_code == 204
        with pytest.raises(ArtifactNotFound):
            store.size(st.key)


def test_real_s3_failures_count_as_storage_failures_and_checkpoints_retry_them(s3_endpoint, tmp_path):
    """What a real S3 server and a closed port raise is what the worker retries (a checkpoint write becomes a
    TransientError); a bug would not be (tests/unit/test_checkpoint_failures.py)."""
    import socket

    import torch

    from app.store.artifacts import is_storage_failure
    from worker.errors import TransientError
    from worker.run.checkpoints import CheckpointStore

    f = tmp_path / "r.json"
    f.write_text("{}")
    no_bucket = S3Store("never-created", endpoint_url=s3_endpoint, access_key_id="testing",
                        secret_access_key="testing")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    unreachable = S3Store("b", endpoint_url=f"http://127.0.0.1:{closed_port}", access_key_id="testing",
                          secret_access_key="testing")
    for store in (no_bucket, unreachable):
        with pytest.raises(Exception) as info:
            store.put_file(job_key("j", "r.json"), f)
        assert is_storage_failure(info.value), repr(info.value)
        checkpoints = CheckpointStore(store, "jobs/j/checkpoint/", "fp", tmp_path / "scratch")
        with pytest.raises(TransientError, match="could not write a checkpoint"):
            checkpoints.save("training", {"step": 1}, {"state": {"w": torch.ones(3)}})
        with pytest.raises(TransientError, match="could not read checkpoints"):
            checkpoints.load()
