"""Artifact stores: a local directory by default, S3-compatible storage (AWS, MinIO) in production.

Keys are ``jobs/{job_id}/attempt-{n}/{name}``: each run of a job uploads under its own attempt, so a run
that lost the job to another (a frozen worker that wakes up) can never overwrite the files the new run
recorded. Deleting a job deletes ``jobs/{job_id}/`` whole. The sha256 of every file is computed while it
is uploaded and recorded by the caller; reads stream in chunks and accept a byte range.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, Protocol

CHUNK = 1024 * 1024


class ArtifactNotFound(KeyError):
    pass


def is_storage_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is the store or the local disk failing (an OSError: disk full, connection refused, timeout;
    a boto3/botocore error, the S3 server's answers included: an operator can fix a missing bucket or credentials
    while the job waits), which may pass when tried again, rather than a bug, which would not (botocore's
    ParamValidationError: a request this code built wrong)."""
    if isinstance(exc, OSError):
        return True
    try:
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError, ParamValidationError
    except ImportError:  # pragma: no cover - boto3 is a dependency
        return False
    return isinstance(exc, (BotoCoreError, ClientError, Boto3Error)) and not isinstance(exc, ParamValidationError)


@dataclass(frozen=True)
class Stored:
    key: str
    size: int
    sha256: str


def job_key(job_id: str, name: str, attempt: int | None = None) -> str:
    """Where artifact ``name`` of a job's run ``attempt`` is stored (no attempt: directly under the job)."""
    base = job_prefix(job_id) if attempt is None else attempt_prefix(job_id, attempt)
    return f"{base}{safe_name(name)}"


def job_prefix(job_id: str) -> str:
    return f"jobs/{job_id}/"


def attempt_prefix(job_id: str, attempt: int) -> str:
    return f"jobs/{job_id}/attempt-{int(attempt)}/"


def checkpoint_prefix(job_id: str) -> str:
    """A job's checkpoints: scratch space of its runs, never listed as artifacts, deleted with the job."""
    return f"jobs/{job_id}/checkpoints/"


def safe_name(name: str) -> str:
    """A relative POSIX artifact name with no empty, '.' or '..' parts (refuses anything else)."""
    p = PurePosixPath(name)
    if not name or p.is_absolute() or "\\" in name or any(part in ("", ".", "..") for part in name.split("/")):
        raise ValueError(f"invalid artifact name: {name!r}")
    return str(p)


def sha256_file(path: Path) -> tuple[int, str]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


class ArtifactStore(Protocol):
    def put_file(self, key: str, path: Path, move: bool = False) -> Stored:
        """Upload ``path`` under ``key``; returns its size and sha256 (computed while uploading). ``move``: the
        caller no longer needs ``path`` (a local store may rename it into place instead of copying it)."""

    def open_range(self, key: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        """Stream bytes ``start..end`` (inclusive end; None = to the end)."""

    def size(self, key: str) -> int: ...

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under ``prefix``; returns how many."""

    def list_prefix(self, prefix: str) -> list[tuple[str, int]]:
        """(key, size) of every object under ``prefix`` (a folder: ends with '/')."""

    def check(self) -> None:
        """Raise if the store is unusable (readiness)."""


def verify(store: ArtifactStore, key: str, sha256: str) -> bool:
    """Read the whole object back and compare its sha256."""
    h = hashlib.sha256()
    for chunk in store.open_range(key):
        h.update(chunk)
    return h.hexdigest() == sha256


class LocalStore:
    def __init__(self, root: Path):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        p = (self.root / safe_name(key)).resolve()
        if not p.is_relative_to(self.root):
            raise ValueError(f"key escapes the store: {key!r}")
        return p

    def put_file(self, key: str, path: Path, move: bool = False) -> Stored:
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if move and os.stat(path).st_dev == os.stat(dest.parent).st_dev:
            size, digest = sha256_file(Path(path))
            os.replace(path, dest)  # atomic, and no second copy of a large checkpoint
            return Stored(key, size, digest)
        h = hashlib.sha256()
        size = 0
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".upload-")
        try:
            with os.fdopen(fd, "wb") as out, open(path, "rb") as src:
                while chunk := src.read(CHUNK):
                    h.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return Stored(key, size, h.hexdigest())

    def open_range(self, key: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        p = self._path(key)
        if not p.is_file():
            raise ArtifactNotFound(key)
        f: BinaryIO = open(p, "rb")  # noqa: SIM115 - closed by the generator

        def gen() -> Iterator[bytes]:
            with f:
                f.seek(start)
                remaining = None if end is None else end - start + 1
                while remaining is None or remaining > 0:
                    chunk = f.read(CHUNK if remaining is None else min(CHUNK, remaining))
                    if not chunk:
                        break
                    if remaining is not None:
                        remaining -= len(chunk)
                    yield chunk

        return gen()

    def size(self, key: str) -> int:
        p = self._path(key)
        if not p.is_file():
            raise ArtifactNotFound(key)
        return p.stat().st_size

    def delete_prefix(self, prefix: str) -> int:
        d = self._path(prefix.rstrip("/"))
        if not d.exists():
            return 0
        n = sum(1 for x in d.rglob("*") if x.is_file()) if d.is_dir() else 1
        if d.is_dir():
            shutil.rmtree(d)
        else:
            d.unlink()
        return n

    def list_prefix(self, prefix: str) -> list[tuple[str, int]]:
        d = self._path(prefix.rstrip("/"))
        if not d.is_dir():
            return []
        return sorted((p.relative_to(self.root).as_posix(), p.stat().st_size) for p in d.rglob("*")
                      if p.is_file() and not p.name.startswith(".upload-"))

    def check(self) -> None:
        probe = self.root / ".ready"
        probe.write_bytes(b"ok")
        probe.unlink()


class _HashingReader:
    """A file wrapper that hashes what boto3 reads while uploading."""

    def __init__(self, f: BinaryIO):
        self.f = f
        self.h = hashlib.sha256()
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        b = self.f.read(n)
        self.h.update(b)
        self.size += len(b)
        return b


def s3_client(endpoint_url: str | None = None, region: str | None = None, access_key_id: str | None = None,
              secret_access_key: str | None = None) -> Any:
    """A boto3 S3 client as the service uses it everywhere (artifact store, hand-off): path-style addressing, which
    MinIO and other S3-compatible servers need, and botocore's standard retries."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        region_name=region or "us-east-1",
        aws_access_key_id=access_key_id,
        aws_secret_access_key=secret_access_key,
        config=Config(retries={"max_attempts": 5, "mode": "standard"}, s3={"addressing_style": "path"}),
    )


class S3Store:
    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str | None = None,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        client: Any = None,
    ):
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.client = client or s3_client(endpoint_url, region, access_key_id, secret_access_key)

    def _k(self, key: str) -> str:
        return self.prefix + safe_name(key)

    def put_file(self, key: str, path: Path, move: bool = False) -> Stored:
        from boto3.s3.transfer import TransferConfig

        # One sequential pass: the hash covers exactly the bytes sent.
        cfg = TransferConfig(use_threads=False, multipart_threshold=64 * CHUNK, multipart_chunksize=64 * CHUNK)
        with open(path, "rb") as f:
            reader = _HashingReader(f)
            self.client.upload_fileobj(reader, self.bucket, self._k(key), Config=cfg)
        digest = reader.h.hexdigest()
        return Stored(key, reader.size, digest)

    def open_range(self, key: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        kw: dict[str, Any] = {}
        if start or end is not None:
            kw["Range"] = f"bytes={start}-{'' if end is None else end}"
        try:
            obj = self.client.get_object(Bucket=self.bucket, Key=self._k(key), **kw)
        except self.client.exceptions.NoSuchKey as e:
            raise ArtifactNotFound(key) from e
        body = obj["Body"]

        def gen() -> Iterator[bytes]:
            try:
                yield from body.iter_chunks(CHUNK)
            finally:
                body.close()

        return gen()

    def size(self, key: str) -> int:
        from botocore.exceptions import ClientError

        try:
            return int(self.client.head_object(Bucket=self.bucket, Key=self._k(key))["ContentLength"])
        except ClientError as e:
            raise ArtifactNotFound(key) from e

    def delete_prefix(self, prefix: str) -> int:
        n = 0
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + prefix):
            objs = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if objs:
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": objs, "Quiet": True})
                n += len(objs)
        return n

    def list_prefix(self, prefix: str) -> list[tuple[str, int]]:
        out = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                          Prefix=self.prefix + prefix):
            out += [(o["Key"][len(self.prefix):], int(o["Size"])) for o in page.get("Contents", [])]
        return sorted(out)

    def check(self) -> None:
        self.client.head_bucket(Bucket=self.bucket)

    def ensure_bucket(self) -> None:
        from botocore.exceptions import ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError:
            self.client.create_bucket(Bucket=self.bucket)


def make_store(settings: Any) -> ArtifactStore:
    """S3Store when an S3 bucket is configured, else a LocalStore under the data directory."""
    if settings.s3_enabled:
        return S3Store(
            settings.s3_bucket, settings.s3_prefix, settings.s3_endpoint_url, settings.s3_region,
            settings.s3_access_key_id, settings.s3_secret_access_key,
        )
    return LocalStore(settings.artifacts_path)
