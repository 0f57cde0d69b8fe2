"""Resuming in the embedded setup (`restorelcc serve`: local worker process, SQLite) with the artifacts and the
checkpoints in S3 (moto's server): the local worker killed with -9 mid-training, `serve` starts a new one, and the
job resumes from its checkpoint in S3 to the same model bytes as an uninterrupted job; then its checkpoints go."""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path

import pytest

from app.client import Client
from app.store.artifacts import S3Store, checkpoint_prefix
from tests.conftest import wait_until
from tests.integration.test_service_embedded import serving

ROOT = Path(__file__).parents[2]
BUCKET = "restorelcc-resume"
STEPS = 300


@pytest.fixture(scope="module")
def embedded(tmp_path_factory, tiny_assets, s3_endpoint):
    data_dir = tmp_path_factory.mktemp("embedded-s3")
    s3 = {"RESTORELCC_S3_BUCKET": BUCKET, "RESTORELCC_S3_ENDPOINT_URL": s3_endpoint,
          "RESTORELCC_S3_ACCESS_KEY_ID": "test", "RESTORELCC_S3_SECRET_ACCESS_KEY": "test"}
    store = S3Store(BUCKET, endpoint_url=s3_endpoint, access_key_id="test", secret_access_key="test")
    store.ensure_bucket()
    with serving(data_dir, tiny_assets.root, RESTORELCC_STALE_AFTER_S="3", RESTORELCC_PROGRESS_INTERVAL_S="0",
                 RESTORELCC_CHECKPOINT_EVERY_STEPS="10", **s3) as service:
        key = (data_dir / "local.key").read_text().strip()
        with Client(service["url"], api_key=key, timeout=60) as client:
            yield {"client": client, "store": store, "log": service["log"]}


def _spec(tiny_assets) -> dict:
    spec = tiny_assets.spec(restore=True)
    spec["restoration"].update(max_steps=STEPS, batch_size=2)
    return spec


def _checkpoint(store: S3Store, job_id: str) -> dict | None:
    from app.store.artifacts import ArtifactNotFound

    try:
        return json.loads(b"".join(store.open_range(checkpoint_prefix(job_id) + "checkpoint.json")))
    except ArtifactNotFound:
        return None


def _model_sha(client: Client, job_id: str) -> str:
    return {a.name: a.sha256 for a in client.artifacts(job_id)}["model/model.safetensors"]


def test_a_killed_local_worker_resumes_from_checkpoints_in_s3(embedded, tiny_assets):
    c, store = embedded["client"], embedded["store"]
    reference = c.create(_spec(tiny_assets))
    assert c.wait(reference.id, poll_s=0.3, timeout_s=240).status.value == "succeeded"
    job = c.create(_spec(tiny_assets))

    def training_checkpointed() -> bool:
        ck = _checkpoint(store, job.id)
        return c.get(job.id).stage == "training" and ck is not None and (ck["meta"].get("step") or 0) >= 20

    wait_until(training_checkpointed, timeout=240, what=lambda: c.get(job.id).progress.message)
    pids = [int(p) for p in re.findall(r"Embedded worker started \(pid (\d+)\)", embedded["log"].read_text())]
    os.kill(pids[-1], signal.SIGKILL)
    saved = _checkpoint(store, job.id)
    done = c.wait(job.id, poll_s=0.3, timeout_s=240)
    assert done.status.value == "succeeded", done.error
    resumed = [e.data for e in c.events(job.id) if e.kind == "resumed"]
    assert resumed == [{"checkpoint": "training", "stage": "training", "step": saved["meta"]["step"], "attempt": 2}]
    assert _model_sha(c, job.id) == _model_sha(c, reference.id)
    assert store.list_prefix(checkpoint_prefix(job.id)) == [] and c.get(job.id).checkpoint_bytes == 0
