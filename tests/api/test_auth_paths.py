"""Authentication, tenant isolation, and which model/data paths a spec may name."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.auth import KeyRing, ensure_local_key, hash_key
from app.config import Settings, UnsafeSettingsError
from app.main import create_app
from app.schemas import JobStatus
from app.store.artifacts import job_key
from tests.conftest import api_settings


def _finished_with_artifact(api, tenant="alice") -> str:
    job = api.create(tenant)["id"]
    jobs = api.services.jobs
    jobs.claim(job, "w")
    f = api.root / "a.txt"
    f.write_text("hello")
    stored = api.services.artifacts.put_file(job_key(job, "report.json"), f)
    jobs.add_artifact(job, "report.json", stored.size, stored.sha256, stored.key)
    jobs.finish(job, JobStatus.succeeded)
    return job


def test_every_endpoint_but_health_needs_a_key(api):
    job = _finished_with_artifact(api)
    open_paths = {"/healthz", "/readyz", "/metrics", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}
    checked = 0
    for path, ops in api.client.get("/openapi.json").json()["paths"].items():
        if path in open_paths:
            continue
        url = path.replace("{job_id}", job).replace("{name}", "report.json")
        for method in (m.upper() for m in ops):
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic a2V5"}):
                r = api.client.request(method, url, headers=headers, json=api.spec() if method == "POST" else None)
                assert r.status_code == 401, (method, url, headers, r.status_code)
                assert r.json()["error"]["code"] == "unauthorized"
                assert r.headers["www-authenticate"] == "Bearer"
            checked += 1
    assert checked == 10
    for path in ("/healthz", "/readyz", "/metrics"):
        assert api.client.get(path).status_code == 200


def test_another_tenants_job_is_404_everywhere(api):
    job = _finished_with_artifact(api, "alice")
    bob = api.h("bob")
    c = api.client
    for r in (
        c.get(f"/v1/jobs/{job}", headers=bob),
        c.post(f"/v1/jobs/{job}/cancel", headers=bob),
        c.get(f"/v1/jobs/{job}/events", headers=bob),
        c.get(f"/v1/jobs/{job}/events", headers={**bob, "Accept": "text/event-stream"}),
        c.get(f"/v1/jobs/{job}/artifacts", headers=bob),
        c.get(f"/v1/jobs/{job}/deliveries", headers=bob),
        c.get(f"/v1/jobs/{job}/artifacts/report.json", headers=bob),
        c.delete(f"/v1/jobs/{job}", headers=bob),
    ):
        assert r.status_code == 404 and r.json()["error"]["code"] == "job_not_found", r.request.url
    assert c.get("/v1/jobs", headers=bob).json()["items"] == []
    assert c.get(f"/v1/jobs/{job}", headers=api.h("alice")).status_code == 200  # untouched


def test_keyring_parses_hashes_and_files(tmp_path):
    f = tmp_path / "keys"
    f.write_text(f"# comment\ncarol:{'sha256:' + hash_key('secret-c')}\n\ndave:plain-d\n")
    ring = KeyRing.from_settings(Settings(api_keys="alice:ka, bob:kb", api_keys_file=f))
    assert len(ring) == 4
    assert ring.tenant_for("ka") == "alice" and ring.tenant_for("kb") == "bob"
    assert ring.tenant_for("secret-c") == "carol" and ring.tenant_for("plain-d") == "dave"
    assert ring.tenant_for("kc") is None and ring.tenant_for("") is None
    with pytest.raises(ValueError):
        KeyRing.from_settings(Settings(api_keys="no-tenant"))


def test_local_key_is_created_once_and_private(tmp_path):
    s = Settings(data_dir=tmp_path / "d")
    key, created = ensure_local_key(s)
    again, created2 = ensure_local_key(s)
    assert created and not created2 and key == again and len(key) > 30
    assert oct(s.local_key_file.stat().st_mode & 0o777) == "0o600"


def test_unsafe_settings_are_refused(tmp_path):
    with pytest.raises(UnsafeSettingsError, match="no API keys"):
        create_app(Settings(data_dir=tmp_path))
    with pytest.raises(UnsafeSettingsError, match="127.0.0.1"):
        Settings(data_dir=tmp_path, dev_open=True, host="0.0.0.0").check_safe()
    with pytest.raises(UnsafeSettingsError, match="embedded"):
        Settings(data_dir=tmp_path, dev_open=True, redis_url="redis://x").check_safe()
    Settings(data_dir=tmp_path, dev_open=True).check_safe()
    with pytest.raises(ValueError):
        Settings(soft_time_limit_s=100, hard_time_limit_s=50)
    with pytest.raises(ValueError, match="heartbeat_s must be less than stale_after_s"):
        Settings(stale_after_s=1)  # the default heartbeat (10 s) would make every running job look lost
    with pytest.raises(ValueError, match=r"must exceed soft_time_limit_s \(100\) by more than stale_after_s \+ 4 × "):
        Settings(soft_time_limit_s=100, hard_time_limit_s=150)  # the default stale wait (120 s) + 4 beats (40 s)
    Settings(soft_time_limit_s=100, hard_time_limit_s=261)


def test_dev_open_serves_without_a_key(tmp_path):
    s = Settings(data_dir=tmp_path, dev_open=True, model_roots=[tmp_path])
    with TestClient(create_app(s)) as c:
        r = c.post("/v1/jobs", json={"model": {"id": str(tmp_path / "m")}, "restoration": {"method": "none"},
                                     "pruning": {"method": "magnitude"}})
        assert r.status_code == 202
        assert c.get("/v1/jobs").json()["items"][0]["id"] == r.json()["id"]


@pytest.fixture
def roots(tmp_path):
    """Allowed roots with a symlink escaping them; settings with hub models refused."""
    models, data = tmp_path / "models", tmp_path / "data"
    outside = tmp_path / "outside"
    for d in (models, data, outside):
        d.mkdir()
    (data / "train.jsonl").write_text("{}\n")
    (outside / "secret.jsonl").write_text("{}\n")
    os.symlink(outside, data / "escape")
    os.symlink(outside / "secret.jsonl", data / "link.jsonl")
    return tmp_path


@pytest.mark.parametrize(
    "model_id, train, field",
    [
        ("{r}/outside/m", "{r}/data/train.jsonl", "model.id"),
        ("{r}/models/../outside/m", "{r}/data/train.jsonl", "model.id"),
        ("models/m/../../x", "{r}/data/train.jsonl", "model.id"),
        ("./models/m", "{r}/data/train.jsonl", "model.id"),
        ("~/m", "{r}/data/train.jsonl", "model.id"),
        ("{r}/models/m", "{r}/data/escape/secret.jsonl", "data.train"),
        ("{r}/models/m", "{r}/data/link.jsonl", "data.train"),
        ("{r}/models/m", "{r}/data/../outside/secret.jsonl", "data.train"),
        ("{r}/models/m", "data/train.jsonl", "data.train"),
        ("{r}/models/m", "/etc/passwd", "data.train"),
        ("org/some-model", "{r}/data/train.jsonl", "model.id"),  # hub ids are refused unless allowed
    ],
)
def test_paths_outside_the_roots_are_422_naming_the_field(tmp_path, roots, model_id, train, field):
    s = api_settings(tmp_path, f"sqlite:///{tmp_path / 'j.db'}", model_roots=[roots / "models"],
                     data_roots=[roots / "data"])
    spec = {"model": {"id": model_id.format(r=roots)}, "pruning": {"method": "magnitude"},
            "restoration": {"method": "bias"}, "data": {"train": train.format(r=roots)}}
    with TestClient(create_app(s)) as c:
        r = c.post("/v1/jobs", json=spec, headers={"Authorization": "Bearer key-alice-123"})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["field"] == field and r.json()["error"]["code"] == "path_not_allowed"


def test_paths_inside_the_roots_and_allowed_hub_ids_are_accepted(tmp_path, roots):
    s = api_settings(tmp_path, f"sqlite:///{tmp_path / 'j.db'}", model_roots=[roots / "models"],
                     data_roots=[roots / "data"], allow_hub_models=True)
    with TestClient(create_app(s)) as c:
        for model_id in (str(roots / "models" / "m"), "org/some-model", "gpt2"):
            spec = {"model": {"id": model_id}, "pruning": {"method": "magnitude"},
                    "restoration": {"method": "bias"}, "data": {"train": str(roots / "data" / "train.jsonl")},
                    "evaluation": {"tasks": [str(roots / "data" / "train.jsonl")]}}
            r = c.post("/v1/jobs", json=spec, headers={"Authorization": "Bearer key-alice-123"})
            assert r.status_code == 202, r.text
        spec["evaluation"] = {"tasks": [str(roots / "data" / "train.jsonl"), str(roots / "outside" / "x")]}
        r = c.post("/v1/jobs", json=spec, headers={"Authorization": "Bearer key-alice-123"})
        assert r.status_code == 422 and r.json()["error"]["field"] == "evaluation.tasks.1"


def test_a_gguf_file_named_like_a_hub_id_is_a_path_checked_against_the_roots(tmp_path, roots):
    """The loader opens any id ending in .gguf (in any case) as a local file, so the API must not take it for a hub
    id, even with hub models allowed: a relative one lies outside every root."""
    s = api_settings(tmp_path, f"sqlite:///{tmp_path / 'j.db'}", model_roots=[roots / "models"],
                     data_roots=[roots / "data"], allow_hub_models=True)
    with TestClient(create_app(s)) as c:
        for model_id in ("org/m.gguf", "org/m.GGUF", "m.Gguf"):
            spec = {"model": {"id": model_id}, "pruning": {"method": "magnitude"}, "restoration": {"method": "none"}}
            r = c.post("/v1/jobs", json=spec, headers={"Authorization": "Bearer key-alice-123"})
            assert r.status_code == 422, (model_id, r.text)
            assert (r.json()["error"]["field"], r.json()["error"]["code"]) == ("model.id", "path_not_allowed")


def test_importing_the_app_does_not_import_torch_or_the_worker():
    code = (
        "import sys, app.main, app.client\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'peft', 'worker')]\n"
        "print(bad)\nsys.exit(1 if bad else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).parents[2])
    assert proc.returncode == 0, proc.stdout + proc.stderr
