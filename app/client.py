"""A typed Python client for the restorelcc API (httpx), used by the CLI and by MLOps integrations.

    from app.client import Client
    with Client("http://127.0.0.1:8000", api_key="...") as c:
        job = c.create(spec)
        job = c.wait(job.id)
        c.download_all(job.id, "out/")
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from app.schemas import ArtifactPublic, DeliveryPublic, EventPublic, JobList, JobPublic, JobSpec, JobStatus


class ApiClientError(Exception):
    """An error answer from the API: HTTP status plus the body's code, message and field."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None,
                 retry_after: float | None = None):
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.retry_after = retry_after  # seconds, from the answer's Retry-After (503, 429)

    @property
    def transient(self) -> bool:
        """A dependency of the service is briefly down (the job store, the artifact store, a proxy): asking again
        later may succeed."""
        return self.status in (502, 503, 504)


class ChecksumMismatch(Exception):
    pass


def _retry_after(r: httpx.Response) -> float | None:
    value = r.headers.get("Retry-After", "")
    return float(value) if value.isascii() and value.isdigit() else None


def _raise_for(r: httpx.Response) -> None:
    if r.is_success or r.status_code == 304:
        return
    wait = _retry_after(r)
    try:
        err = r.json()["error"]
        raise ApiClientError(r.status_code, err.get("code", "error"), err.get("message", ""), err.get("field"), wait)
    except (ValueError, KeyError, TypeError):
        raise ApiClientError(r.status_code, "http_error", r.text[:500], retry_after=wait) from None


class Client:
    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        api_key: str | None = None,
        timeout: float = 30.0,
        http: httpx.Client | None = None,
    ):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        if http is not None:
            http.headers.update(headers)
            self.http = http
        else:
            self.http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # Jobs -------------------------------------------------------------------------------------------
    def create(self, spec: JobSpec | dict[str, Any], idempotency_key: str | None = None) -> JobPublic:
        body = spec.model_dump(mode="json") if isinstance(spec, JobSpec) else spec
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        r = self.http.post("/v1/jobs", json=body, headers=headers)
        _raise_for(r)
        return JobPublic.model_validate(r.json())

    def get(self, job_id: str) -> JobPublic:
        r = self.http.get(f"/v1/jobs/{job_id}")
        _raise_for(r)
        return JobPublic.model_validate(r.json())

    def list(self, limit: int = 50, after: str | None = None, status: JobStatus | str | None = None) -> JobList:
        params: dict[str, Any] = {"limit": limit}
        if after:
            params["after"] = after
        if status:
            params["status"] = str(status)
        r = self.http.get("/v1/jobs", params=params)
        _raise_for(r)
        return JobList.model_validate(r.json())

    def cancel(self, job_id: str) -> JobPublic:
        r = self.http.post(f"/v1/jobs/{job_id}/cancel")
        _raise_for(r)
        return JobPublic.model_validate(r.json())

    def retry(self, job_id: str, idempotency_key: str | None = None) -> JobPublic:
        """A new job with the spec of a failed or cancelled one (``retry_of`` names it)."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        r = self.http.post(f"/v1/jobs/{job_id}/retry", headers=headers)
        _raise_for(r)
        return JobPublic.model_validate(r.json())

    def delete(self, job_id: str) -> None:
        _raise_for(self.http.delete(f"/v1/jobs/{job_id}"))

    def events(self, job_id: str, after: int | None = None) -> list[EventPublic]:
        params = {"after": after} if after is not None else {}
        r = self.http.get(f"/v1/jobs/{job_id}/events", params=params)
        _raise_for(r)
        return [EventPublic.model_validate(e) for e in r.json()]

    def deliveries(self, job_id: str) -> list[DeliveryPublic]:
        """The job's webhook events with every attempt to deliver them."""
        r = self.http.get(f"/v1/jobs/{job_id}/deliveries")
        _raise_for(r)
        return [DeliveryPublic.model_validate(d) for d in r.json()]

    def stream_events(self, job_id: str, after: int | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
        """Live events as (event name, data) until the job ends (the final one is ``("end", {...})``)."""
        import json

        params = {"after": after} if after is not None else {}
        with self.http.stream("GET", f"/v1/jobs/{job_id}/events", params=params,
                              headers={"Accept": "text/event-stream"}, timeout=None) as r:
            if not r.is_success:
                r.read()
                _raise_for(r)
            name, data = "message", ""
            for line in r.iter_lines():
                if line.startswith("event:"):
                    name = line[6:].strip()
                elif line.startswith("data:"):
                    data += line[5:].strip()
                elif line == "" and data:
                    yield name, json.loads(data)
                    name, data = "message", ""

    def wait(
        self,
        job_id: str,
        poll_s: float = 1.0,
        timeout_s: float | None = None,
        on_update: Callable[[JobPublic], None] | None = None,
        unavailable_s: float = 600.0,
    ) -> JobPublic:
        """Poll until the job has finished; returns its final state (raises TimeoutError after ``timeout_s``). A
        job can run for hours, so a poll that meets the service briefly unavailable (a 502/503/504, after its
        ``Retry-After``; a refused or dropped connection) is made again rather than ending the wait; once it has
        been unavailable for ``unavailable_s`` on end (a wrong URL, a service that is gone), the last error is
        raised."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        status = "unknown"
        down_since: float | None = None
        while True:
            pause = poll_s
            try:
                job = self.get(job_id)
            except (ApiClientError, httpx.TransportError) as e:
                if isinstance(e, ApiClientError) and not e.transient:
                    raise
                down_since = down_since if down_since is not None else time.monotonic()
                if time.monotonic() - down_since >= unavailable_s:
                    raise
                if isinstance(e, ApiClientError):
                    pause = max(poll_s, e.retry_after or 0.0)
            else:
                down_since = None
                if on_update is not None:
                    on_update(job)
                if job.status.finished:
                    return job
                status = job.status.value
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {status} after {timeout_s}s")
            time.sleep(pause)

    def submit(
        self,
        spec: JobSpec | dict[str, Any],
        *,
        wait: bool = False,
        download: str | os.PathLike[str] | None = None,
        poll_s: float = 1.0,
        idempotency_key: str | None = None,
        on_created: Callable[[JobPublic], None] | None = None,
        on_update: Callable[[JobPublic], None] | None = None,
    ) -> tuple[JobPublic, list[Path]]:
        """Create a job; with ``wait`` or ``download``, poll until it has finished; with ``download``, fetch every
        artifact of a job that succeeded into that directory (sha256-checked). Returns the job's last state and
        the files downloaded."""
        job = self.create(spec, idempotency_key=idempotency_key)
        if on_created is not None:
            on_created(job)
        if not (wait or download is not None):
            return job, []
        job = self.wait(job.id, poll_s=poll_s, on_update=on_update)
        files = self.download_all(job.id, download) if download is not None and job.status.value == "succeeded" else []
        return job, files

    # Artifacts --------------------------------------------------------------------------------------
    def artifacts(self, job_id: str) -> list[ArtifactPublic]:
        r = self.http.get(f"/v1/jobs/{job_id}/artifacts")
        _raise_for(r)
        return [ArtifactPublic.model_validate(a) for a in r.json()]

    def download(self, job_id: str, name: str, dest: str | os.PathLike[str],
                 sha256: str | None = None) -> Path:
        """Stream one artifact to ``dest`` and check its sha256 (the given one, else the ETag). The name is
        percent-encoded in the path ('/' kept), so '#', '?', '%', spaces and non-ASCII reach the server as written."""
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".part")
        h = hashlib.sha256()
        with self.http.stream("GET", f"/v1/jobs/{job_id}/artifacts/{quote(name, safe='/')}") as r:
            if not r.is_success:
                r.read()
                _raise_for(r)
            expected = sha256 or r.headers.get("etag", "").strip('"') or None
            with open(tmp, "wb") as f:
                for chunk in r.iter_bytes(1024 * 1024):
                    h.update(chunk)
                    f.write(chunk)
        if expected and h.hexdigest() != expected:
            tmp.unlink(missing_ok=True)
            raise ChecksumMismatch(f"{name}: sha256 {h.hexdigest()} != expected {expected}")
        tmp.replace(dest)
        return dest

    def download_all(self, job_id: str, directory: str | os.PathLike[str]) -> list[Path]:
        """Every artifact of the job under ``directory`` (same relative names), each sha256-checked."""
        root = Path(directory)
        out = []
        for a in self.artifacts(job_id):
            target = (root / a.name).resolve()
            if not target.is_relative_to(root.resolve()):
                raise ValueError(f"artifact name escapes the directory: {a.name}")
            out.append(self.download(job_id, a.name, target, a.sha256))
        return out
