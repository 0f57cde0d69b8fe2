"""Hand-off: copy a finished job's result directory to the S3 prefix its spec names (``output.destination``).

The files land under ``<destination>/<job id>/`` with the same relative names as the job's artifacts; each one's
sha256 is computed from the bytes sent, and ``manifest.json`` is written last, so a reader that finds the manifest
knows every file it lists is complete (and can check it). Transient S3 errors are tried again a few times; what
still fails ends the job ``handoff_failed``, naming the destination (never the credentials).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from app.store.artifacts import S3Store, s3_client
from worker.errors import JobFailure
from worker.service.results import result_files

log = logging.getLogger("restorelcc.worker")

FIELD = "output.destination"
MANIFEST = "manifest.json"
TRIES = 4
BACKOFF_S = 0.5  # doubled after each failed try

# S3 error codes worth another try (besides any 5xx answer).
_TRANSIENT_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeoutException",
                    "InternalError", "ServiceUnavailable", "RequestLimitExceeded"}

T = TypeVar("T")


class HandoffFailed(JobFailure):
    code = "handoff_failed"


class DestinationNotAllowed(JobFailure):
    code = "destination_not_allowed"


def split_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b/`` → ``("bucket", "a/b")`` (no leading or trailing slash; "" for the bucket's root)."""
    if not uri.startswith("s3://"):
        raise ValueError(f"not an s3:// URI: {uri!r}")
    bucket, _, prefix = uri[5:].partition("/")
    return bucket, prefix.strip("/")


def hand_off(settings: Any, out_dir: Path, destination: str, job_id: str) -> dict[str, Any]:
    """Copy every regular file under ``out_dir`` to ``<destination>/<job_id>/<name>``, then ``manifest.json``
    (``{job_id, created_at, files: [{name, size, sha256}]}``, sorted by name). Returns where it went:
    ``{destination, manifest, files, bytes}``. Raises :class:`HandoffFailed` once a file cannot be written."""
    bucket, prefix = split_uri(destination)
    folder = f"{prefix}/{job_id}" if prefix else job_id
    target = f"s3://{bucket}/{folder}/"
    try:
        client = s3_client(settings.s3_endpoint_url, settings.s3_region, settings.s3_access_key_id,
                           settings.s3_secret_access_key)
        store = S3Store(bucket, folder, client=client)
        files = []
        for name, path in result_files(Path(out_dir)):
            stored = _retry(lambda n=name, p=path: store.put_file(n, p), f"{name} to {target}")
            files.append({"name": name, "size": stored.size, "sha256": stored.sha256})
        files.sort(key=lambda f: f["name"])
        manifest = {"job_id": job_id, "created_at": datetime.now(UTC).isoformat(timespec="seconds"), "files": files}
        body = (json.dumps(manifest, indent=2) + "\n").encode("utf-8")
        _retry(lambda: client.put_object(Bucket=bucket, Key=f"{folder}/{MANIFEST}", Body=body,
                                         ContentType="application/json"), f"{MANIFEST} to {target}")
    except HandoffFailed:
        raise
    except Exception as e:  # building the client, a file that cannot be read, a permanent S3 refusal
        raise HandoffFailed(_message(target, e), field=FIELD) from e
    return {"destination": target, "manifest": f"{target}{MANIFEST}", "files": len(files),
            "bytes": sum(f["size"] for f in files)}


def _retry(call: Callable[[], T], what: str, tries: int = TRIES, backoff_s: float = BACKOFF_S) -> T:
    """``call()``, tried again after a transient S3 error (with a doubling pause); any other error at once."""
    for k in range(tries):
        try:
            return call()
        except Exception as e:
            if k == tries - 1 or not is_transient(e):
                raise
            log.warning("hand-off of %s failed (%s); trying again", what, type(e).__name__)
            time.sleep(backoff_s * 2 ** k)  # a back-off between tries, not synchronisation
    raise AssertionError("unreachable")


def is_transient(e: BaseException) -> bool:
    """Whether an S3 error (or one it was raised from) may go away when tried again: a dropped or timed-out
    connection, throttling, or a 5xx answer. A missing bucket or refused credentials will not."""
    from botocore.exceptions import ClientError, ConnectionError, HTTPClientError

    seen: set[int] = set()
    x: BaseException | None = e
    while x is not None and id(x) not in seen:
        seen.add(id(x))
        if isinstance(x, ClientError):
            status = int(x.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            return status >= 500 or x.response.get("Error", {}).get("Code") in _TRANSIENT_CODES
        if isinstance(x, ConnectionError | HTTPClientError):
            return True
        x = x.__cause__ or x.__context__
    return False


def _message(target: str, e: BaseException) -> str:
    """What the job's error says: the destination and the error; botocore's messages name the operation and the
    bucket or endpoint, never the keys."""
    return f"could not hand the result off to {target}: {type(e).__name__}: {e}"[:2000]
