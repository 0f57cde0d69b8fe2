"""Artifact listing and download: streaming, Range (206/416), ETag (304), sha256."""

from __future__ import annotations

import hashlib
import os

import pytest

from app.client import ChecksumMismatch, Client
from app.schemas import JobStatus
from app.store.artifacts import job_key


@pytest.fixture
def finished(api):
    """A succeeded job with three artifacts (one of 3 MiB, spanning several stream chunks)."""
    job = api.create()["id"]
    jobs, store = api.services.jobs, api.services.artifacts
    jobs.claim(job, "w")
    src = api.root / "out"
    (src / "model").mkdir(parents=True)
    (src / "model" / "model.safetensors").write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    (src / "model" / "config.json").write_text('{"model_type": "llama"}')
    (src / "report.json").write_text('{"metrics": {}}')
    for p in sorted(src.rglob("*")):
        if p.is_file():
            name = p.relative_to(src).as_posix()
            s = store.put_file(job_key(job, name), p)
            jobs.add_artifact(job, name, s.size, s.sha256, s.key)
    jobs.finish(job, JobStatus.succeeded)
    return job, src


def test_list_artifacts_with_size_and_sha256(api, finished):
    job, src = finished
    arts = api.client.get(f"/v1/jobs/{job}/artifacts", headers=api.h()).json()
    assert [a["name"] for a in arts] == ["model/config.json", "model/model.safetensors", "report.json"]
    for a in arts:
        data = (src / a["name"]).read_bytes()
        assert a["size"] == len(data) and a["sha256"] == hashlib.sha256(data).hexdigest()


def test_download_full_range_and_etag(api, finished):
    job, src = finished
    data = (src / "model" / "model.safetensors").read_bytes()
    url = f"/v1/jobs/{job}/artifacts/model/model.safetensors"
    r = api.client.get(url, headers=api.h())
    assert r.status_code == 200 and r.content == data
    etag = r.headers["etag"]
    assert etag == f'"{hashlib.sha256(data).hexdigest()}"' and r.headers["accept-ranges"] == "bytes"
    assert int(r.headers["content-length"]) == len(data)

    for header, lo, hi in (("bytes=0-99", 0, 99), ("bytes=1048570-1048585", 1048570, 1048585),
                           ("bytes=-10", len(data) - 10, len(data) - 1),
                           (f"bytes={len(data) - 5}-", len(data) - 5, len(data) - 1),
                           ("bytes=100-99999999", 100, len(data) - 1)):
        r = api.client.get(url, headers={**api.h(), "Range": header})
        assert r.status_code == 206, header
        assert r.content == data[lo:hi + 1], header
        assert r.headers["content-range"] == f"bytes {lo}-{hi}/{len(data)}"
        assert r.headers["etag"] == etag

    r = api.client.get(url, headers={**api.h(), "Range": f"bytes={len(data)}-"})
    assert r.status_code == 416 and r.headers["content-range"] == f"bytes */{len(data)}"
    r = api.client.get(url, headers={**api.h(), "Range": "bytes=0-1,5-6"})  # multiple ranges: whole file
    assert r.status_code == 200 and r.content == data
    r = api.client.get(url, headers={**api.h(), "Range": "bytes=0-9", "If-Range": '"stale"'})
    assert r.status_code == 200 and len(r.content) == len(data)

    r = api.client.get(url, headers={**api.h(), "If-None-Match": etag})
    assert r.status_code == 304 and r.content == b"" and r.headers["etag"] == etag
    r = api.client.get(url, headers={**api.h(), "If-None-Match": '"other"'})
    assert r.status_code == 200


def test_range_positions_of_any_length_follow_rfc_9110(api, finished):
    """Positions have no digit limit in RFC 9110; ones with thousands of digits (past what Python converts) are
    answered as the range means: a first position past the end is 416, a suffix length or last position past it
    stops at the end. A last position below the first is an invalid range: ignored, the whole file."""
    job, src = finished
    data = (src / "report.json").read_bytes()
    url = f"/v1/jobs/{job}/artifacts/report.json"
    huge = "9" * 5000
    r = api.client.get(url, headers={**api.h(), "Range": f"bytes={huge}-"})
    assert r.status_code == 416 and r.headers["content-range"] == f"bytes */{len(data)}", r.text
    assert r.json()["error"] == {"code": "range_not_satisfiable", "message": "requested range not satisfiable",
                                 "field": "Range"}
    for header, lo in ((f"bytes=-{huge}", 0), (f"bytes=3-{huge}", 3), (f"bytes={'0' * 5000}3-{huge}", 3)):
        r = api.client.get(url, headers={**api.h(), "Range": header})
        assert r.status_code == 206, (header[:20], r.text)
        assert r.content == data[lo:] and r.headers["content-range"] == f"bytes {lo}-{len(data) - 1}/{len(data)}"
    for header in (f"bytes={huge}-{'9' * 4999}", "bytes=²-"):  # last < first; a digit that is not ASCII
        r = api.client.get(url, headers={**api.h(), "Range": header.encode("latin-1")})
        assert r.status_code == 200 and r.content == data, header[:20]


def test_downloads_are_files_whatever_their_name(api, finished):
    """As /openapi.json says: application/octet-stream, even for report.json."""
    job, src = finished
    for name in ("report.json", "model/config.json", "model/model.safetensors"):
        r = api.client.get(f"/v1/jobs/{job}/artifacts/{name}", headers=api.h())
        assert r.status_code == 200 and r.content == (src / name).read_bytes()
        assert r.headers["content-type"] == "application/octet-stream", name
        base = name.rsplit("/", 1)[-1]
        assert r.headers["content-disposition"] == f"attachment; filename=\"{base}\"; filename*=UTF-8''{base}"


def test_unknown_artifact_and_traversal_are_404(api, finished):
    job, _ = finished
    for name in ("nope.bin", "../report.json", "model/../../x", "%2e%2e/report.json"):
        r = api.client.get(f"/v1/jobs/{job}/artifacts/{name}", headers=api.h())
        assert r.status_code == 404, name


def test_delete_removes_artifacts_and_checkpoints_from_the_store(api, finished, tmp_path):
    from app.store.artifacts import checkpoint_prefix

    job, _ = finished
    key = job_key(job, "report.json")
    assert api.services.artifacts.size(key) > 0
    kept = tmp_path / "part.safetensors"  # what a failed run keeps for a retry to resume from
    kept.write_bytes(b"checkpoint")
    api.services.artifacts.put_file(checkpoint_prefix(job) + "weights-00001.safetensors", kept)
    assert api.client.delete(f"/v1/jobs/{job}", headers=api.h()).status_code == 204
    assert not (api.services.settings.artifacts_path / "jobs" / job).exists()
    assert api.services.artifacts.list_prefix(checkpoint_prefix(job)) == []


def test_client_downloads_everything_and_checks_sha256(api, finished, tmp_path):
    job, src = finished
    client = Client(api_key="key-alice-123", http=api.client)
    files = client.download_all(job, tmp_path / "dl")
    assert len(files) == 3
    for f in files:
        assert f.read_bytes() == (src / f.relative_to(tmp_path / "dl")).read_bytes()
    with pytest.raises(ChecksumMismatch):
        client.download(job, "report.json", tmp_path / "bad.json", sha256="0" * 64)
    assert not (tmp_path / "bad.json").exists()
