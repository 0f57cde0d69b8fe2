"""A job whose memory plan does not fit is refused before any weight loads, naming the stage and the numbers; the
plan the worker checked is in report.json, in a `plan` event and on the job; `restorelcc plan` says the same."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import torch

from app.client import Client
from tests.conftest import wait_until
from tests.integration.test_service_embedded import serving
from tests.tiny import save_tiny

ROOT = Path(__file__).parents[2]


def run_cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    full = {**{k: v for k, v in os.environ.items() if not k.startswith("RESTORELCC_")}, "HF_HUB_OFFLINE": "1",
            **env}
    return subprocess.run([sys.executable, "-m", "worker.cli", *args], capture_output=True, text=True, timeout=300,
                          env=full, cwd=ROOT)


def corrupt_model(tmp_path: Path) -> Path:
    """A model whose config is fine and whose weights cannot be read: any job that loads them fails otherwise."""
    model = save_tiny("llama", tmp_path / "model")
    (model / "model.safetensors").write_bytes(b"\x00" * 64)
    return model


def test_a_job_that_does_not_fit_fails_before_loading_weights(tmp_path, tiny_assets):
    spec = tiny_assets.spec(model=str(corrupt_model(tmp_path)))
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    refused = run_cli("run", str(tmp_path / "spec.json"), "--out", str(tmp_path / "a"),
                      RESTORELCC_MAX_DEVICE_MEMORY="64MiB")
    assert refused.returncode == 2, refused.stderr
    assert "error [insufficient_memory]" in refused.stderr
    assert "stage needs about" in refused.stderr and "which has 64 MiB" in refused.stderr
    loaded = run_cli("run", str(tmp_path / "spec.json"), "--out", str(tmp_path / "b"))
    assert "error [unsupported_model]" in loaded.stderr  # with room, the same job gets to the weights


def test_plan_command_agrees_with_the_worker(tmp_path, tiny_assets):
    (tmp_path / "spec.json").write_text(json.dumps(tiny_assets.spec(restore=True)))
    fits = run_cli("plan", str(tmp_path / "spec.json"), "--json")
    assert fits.returncode == 0, fits.stderr
    plan = json.loads(fits.stdout)
    assert plan["fits"] is True and plan["device"] == "cpu"
    assert list(plan["stages"]) == ["loading", "pruning", "probing", "extracting", "training", "merging",
                                    "evaluating", "exporting"]
    run = run_cli("run", str(tmp_path / "spec.json"), "--out", str(tmp_path / "out"), "--quiet")
    assert run.returncode == 0, run.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["plan"]["stages"] == plan["stages"]
    assert report["environment"]["device"] == "cpu"
    tight = run_cli("plan", str(tmp_path / "spec.json"), RESTORELCC_MAX_DEVICE_MEMORY="100MiB")
    assert tight.returncode == 3 and "does not fit: the training stage needs about" in tight.stdout


def test_a_device_the_worker_lacks_is_a_failure_not_a_fallback(tmp_path, tiny_assets):
    (tmp_path / "spec.json").write_text(json.dumps(tiny_assets.spec()))
    missing = f"cuda:{torch.cuda.device_count()}"  # one past the last GPU: none on a machine without any
    proc = run_cli("run", str(tmp_path / "spec.json"), "--out", str(tmp_path / "out"), RESTORELCC_DEVICE=missing)
    assert proc.returncode == 2 and "error [device_unavailable]" in proc.stderr, proc.stderr


def test_the_service_fails_a_job_that_does_not_fit_and_keeps_the_workers_plan(tmp_path, tiny_assets):
    (tmp_path / "state").mkdir()
    with serving(tmp_path / "state", tiny_assets.root, RESTORELCC_MAX_DEVICE_MEMORY="64MiB") as service:
        key = (service["data_dir"] / "local.key").read_text().strip()
        with Client(service["url"], api_key=key) as c:
            job = c.create(tiny_assets.spec())
            assert job.plan is not None and job.plan["source"] in ("submit", "worker")

            def ended():
                got = c.get(job.id)
                return got if got.status.value in ("failed", "succeeded") else None

            final = wait_until(ended, timeout=120, what=lambda: service["log"].read_text()[-2000:])
            assert final.status.value == "failed" and final.error.code == "insufficient_memory"
            assert "which has 64 MiB" in final.error.message
            assert final.plan["source"] == "worker" and final.plan["device"] == "cpu"
            assert final.plan["available_bytes"]["device"] == 64 * 2**20
            assert [e.kind for e in c.events(job.id)].count("plan") == 1
            assert not any(e.kind == "stage" for e in c.events(job.id))  # no stage began: nothing was loaded
            assert httpx.get(f"{service['url']}/readyz").status_code == 200
