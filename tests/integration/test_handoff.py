"""Hand-off to ``output.destination``: a real tiny job through ``run_job`` copies its result to an S3 server (moto in
server mode) with a manifest whose sha256s match the objects and the job's artifacts; a destination the tenant may
not use fails the job; an S3 refusal fails the hand-off naming the destination, and only transient errors are
tried again."""

from __future__ import annotations

import hashlib
import json

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError

from app.config import Settings
from app.schemas import JobSpec
from app.store.artifacts import s3_client
from app.store.db import upgrade
from worker.errors import JobFailure
from worker.service.handoff import HandoffFailed, _retry, hand_off, is_transient
from worker.service.tasks import Outcome, WorkerContext, make_context, run_job

TENANT = "acme"
BUCKET = "handoff"


def _settings(tmp_path, assets, endpoint: str) -> Settings:
    return Settings(data_dir=tmp_path / "state", model_roots=[assets.root / "models"],
                    data_roots=[assets.root / "data"], progress_interval_s=0,
                    output_destinations=f"{TENANT}:s3://{BUCKET}/models/", s3_endpoint_url=endpoint,
                    s3_access_key_id="testing", s3_secret_access_key="testing")


def _ctx(tmp_path, assets, endpoint: str) -> WorkerContext:
    ctx = make_context(_settings(tmp_path, assets, endpoint))
    upgrade(ctx.jobs.engine)
    return ctx


def _submit(ctx: WorkerContext, tenant: str, spec: dict) -> str:
    job, _ = ctx.jobs.create(tenant, JobSpec.model_validate(spec).model_dump(mode="json"))
    return job.id


@pytest.fixture(scope="module")
def s3(s3_endpoint):
    client = s3_client(s3_endpoint, access_key_id="testing", secret_access_key="testing")
    client.create_bucket(Bucket=BUCKET)
    return client


def _objects(client, prefix: str) -> dict[str, bytes]:
    listed = client.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])
    return {o["Key"][len(prefix):]: client.get_object(Bucket=BUCKET, Key=o["Key"])["Body"].read() for o in listed}


def test_a_job_hands_its_result_off_with_a_checked_manifest(tmp_path, tiny_assets, s3_endpoint, s3):
    ctx = _ctx(tmp_path, tiny_assets, s3_endpoint)
    spec = tiny_assets.spec()
    spec["output"] = {"destination": f"s3://{BUCKET}/models/"}
    job_id = _submit(ctx, TENANT, spec)
    assert run_job(job_id, ctx).outcome is Outcome.succeeded

    objects = _objects(s3, f"models/{job_id}/")
    manifest = json.loads(objects.pop("manifest.json"))
    artifacts = {a.name: a for a in ctx.jobs.artifacts(job_id)}
    assert "model/README.md" in artifacts and objects["model/README.md"].startswith(b"---\n")
    assert {"model/model.safetensors", "model/config.json", "report.json"} <= set(artifacts)
    # Exactly the job's artifacts, each object's bytes matching the manifest and the artifact record.
    assert manifest["job_id"] == job_id and manifest["created_at"]
    names = [f["name"] for f in manifest["files"]]
    assert names == sorted(names) == sorted(artifacts) == sorted(objects)
    for f in manifest["files"]:
        data = objects[f["name"]]
        assert f["size"] == len(data) == artifacts[f["name"]].size
        assert f["sha256"] == hashlib.sha256(data).hexdigest() == artifacts[f["name"]].sha256, f["name"]

    job = ctx.jobs.get(job_id)
    expected = {"destination": f"s3://{BUCKET}/models/{job_id}/",
                "manifest": f"s3://{BUCKET}/models/{job_id}/manifest.json",
                "files": len(artifacts), "bytes": sum(a.size for a in artifacts.values())}
    assert job.status == "succeeded" and job.output == expected
    assert [e.data for e in ctx.jobs.events(job_id) if e.kind == "handoff"] == [expected]


def test_a_destination_the_tenant_may_not_use_fails_the_job(tmp_path, tiny_assets, s3_endpoint, s3):
    """Another tenant names the first one's prefix: refused, and nothing is written there."""
    ctx = _ctx(tmp_path, tiny_assets, s3_endpoint)
    spec = tiny_assets.spec()
    spec["output"] = {"destination": f"s3://{BUCKET}/models/"}
    job_id = _submit(ctx, "intruder", spec)
    assert run_job(job_id, ctx).outcome is Outcome.failed
    job = ctx.jobs.get(job_id)
    assert (job.status, job.error_code) == ("failed", "destination_not_allowed")
    assert f"s3://{BUCKET}/models/" in job.error_message and "intruder" in job.error_message
    assert job.output is None
    errors = [e.data for e in ctx.jobs.events(job_id) if e.kind == "error"]
    assert errors and errors[-1]["field"] == "output.destination"
    assert _objects(s3, f"models/{job_id}/") == {}


def test_an_s3_refusal_fails_the_hand_off_naming_the_destination(tmp_path, tiny_assets, s3_endpoint):
    out = tmp_path / "result"
    (out / "model").mkdir(parents=True)
    (out / "model" / "config.json").write_text("{}", encoding="utf-8")
    settings = _settings(tmp_path, tiny_assets, s3_endpoint)
    with pytest.raises(HandoffFailed) as info:
        hand_off(settings, out, "s3://no-such-bucket/x/", "job-1")
    failure = info.value
    assert isinstance(failure, JobFailure)
    assert (failure.code, failure.field) == ("handoff_failed", "output.destination")
    assert "s3://no-such-bucket/x/job-1/" in failure.message and "NoSuchBucket" in failure.message
    assert "testing" not in failure.message  # the credentials never appear


def test_only_transient_errors_are_tried_again():
    throttled = ClientError({"Error": {"Code": "SlowDown"}, "ResponseMetadata": {"HTTPStatusCode": 503}}, "PutObject")
    missing = ClientError({"Error": {"Code": "NoSuchBucket"}, "ResponseMetadata": {"HTTPStatusCode": 404}},
                          "PutObject")
    assert is_transient(throttled) and is_transient(EndpointConnectionError(endpoint_url="http://x"))
    assert not is_transient(missing) and not is_transient(ValueError("x"))
    try:  # an error raised while handling a transient one (as boto3 wraps upload errors) is transient too
        try:
            raise throttled
        except ClientError:
            raise RuntimeError("upload failed") from None
    except RuntimeError as wrapped:
        assert wrapped.__context__ is throttled and is_transient(wrapped)

    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise throttled
        return "ok"

    assert _retry(flaky, "x", tries=4, backoff_s=0) == "ok" and len(calls) == 3
    calls.clear()

    def refused() -> str:
        calls.append(1)
        raise missing

    with pytest.raises(ClientError):
        _retry(refused, "x", tries=4, backoff_s=0)
    assert len(calls) == 1
    calls.clear()

    def always_throttled() -> str:
        calls.append(1)
        raise throttled

    with pytest.raises(ClientError):
        _retry(always_throttled, "x", tries=3, backoff_s=0)
    assert len(calls) == 3
