"""What a job read: a digest of every data file, kept in the report (``data``: which files made this model), and the
identity of every local model (``model_files``: a hub model is pinned to a commit instead, ``model.commits``); both
are checked when a job resumes. The state its checkpoints hold (calibration inputs, probe inputs, dense targets, the
position in the training data, the pruned Linears) was computed from those files; a file or model changed in between
would carry on silently misaligned with it (a replaced model directory would lend its embeddings and norms to the
checkpoint's pruned weights)."""

from __future__ import annotations

import hashlib
import os
import stat
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from app.schemas import JobSpec
from worker.errors import DataError, ModelNotFoundError

_CHUNK = 1 << 20
# How a job whose checkpoints no longer fit its inputs starts from the beginning.
START_OVER = ("submit the spec as a new job (a retry resumes from these checkpoints; with `restorelcc run`, delete "
              "this spec's folder in --checkpoints)")

# A local model's identity is cheap to take, for any model size: a weight file is named and sized, a safetensors
# file's header (its tensors' names, dtypes, shapes and offsets) hashed, and SAMPLE bytes at the start, the middle and
# the end of its tensor data hashed (other weights of the same shapes, a fine-tuned variant put in its place, differ
# there); the small files that say what the weights mean (config, tokenizer, shard index) are hashed whole. A GGUF
# file's first GGUF_HEAD bytes (header, metadata and vocabulary) are hashed, and samples of the rest. Modification
# times do not count: a worker that copied the same model onto its own disk resumes.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")
HASHED_NAMES = ("special_tokens_map.json", "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt",
                "chat_template.jinja", "chat_template.json")
GGUF_HEAD = 32 << 20
SAMPLE = 1 << 20
_SAFETENSORS_HEADER_MAX = 100 << 20  # what the safetensors format allows


def data_digests(spec: JobSpec) -> dict[str, dict[str, Any]]:
    """Field → {"path", "sha256", "bytes"} for every data file of the spec."""
    out: dict[str, dict[str, Any]] = {}
    for field, path in spec.data_paths().items():
        h, size = hashlib.sha256(), 0
        try:
            with open(path, "rb") as f:
                while chunk := f.read(_CHUNK):
                    h.update(chunk)
                    size += len(chunk)
        except OSError as exc:
            raise DataError(f"{field}: {path} cannot be read: {(exc.strerror or str(exc)).lower()}", field) from exc
        out[field] = {"path": path, "sha256": h.hexdigest(), "bytes": size}
    return out


def changed_since(saved: dict[str, Any] | None, now: dict[str, dict[str, Any]], point: str) -> DataError | None:
    """The failure for the first data file whose content differs from what the checkpoint taken at ``point`` was
    computed from (``saved``: the report's ``data`` then; None from a release that kept none)."""
    for field, entry in (saved or {}).items():
        if field in now and isinstance(entry, dict) and entry.get("sha256") != now[field]["sha256"]:
            return DataError(
                f"{field} changed since this job's {point} checkpoint was written ({now[field]['path']}: "
                f"{entry.get('bytes')} bytes then, {now[field]['bytes']} now, other content); the state it holds came "
                f"from the earlier file: restore it, or start over: {START_OVER}",
                field=field)
    return None


# ── local models ─────────────────────────────────────────────────────────────────────────────────────


def model_identities(sources: Iterable[Any]) -> dict[str, dict[str, Any]]:
    """Field → {"path", "kind", "files": {name: ...}} for every local model among ``sources`` (ModelSources or
    None); hub models are left out (their commit pins them)."""
    out: dict[str, dict[str, Any]] = {}
    for source in sources:
        if source is None or source.repo_id:
            continue
        field, path = source.field, Path(source.path)
        try:
            files = _gguf_files(path) if source.kind == "gguf" else _directory_files(path)
        except OSError as exc:
            raise ModelNotFoundError(f"{field}: {path} cannot be read: {(exc.strerror or str(exc)).lower()}",
                                     field) from exc
        out[field] = {"path": str(path), "kind": source.kind, "files": files}
    return out


def model_changed_since(saved: dict[str, Any] | None, now: dict[str, dict[str, Any]],
                        point: str) -> ModelNotFoundError | None:
    """The failure for the first local model that is not the one the checkpoint taken at ``point`` was made from
    (``saved``: the report's ``model_files`` then; None from a release that kept none), as for a data file."""
    for field, entry in (saved or {}).items():
        if field not in now or not isinstance(entry, dict):
            continue
        difference = _difference(entry.get("files") or {}, now[field]["files"])
        if difference is not None:
            return ModelNotFoundError(
                f"{field} changed since this job's {point} checkpoint was written ({now[field]['path']}: "
                f"{difference}); the state it holds came from the earlier model: restore it, or start over: "
                f"{START_OVER}",
                field=field)
    return None


def _difference(then: dict[str, Any], now: dict[str, Any]) -> str | None:
    """How a model's files differ, in words (the first difference), or None."""
    for name in sorted(set(then) | set(now)):
        a, b = then.get(name), now.get(name)
        if a == b:
            continue
        if b is None:
            return f"{name} is gone"
        if a is None:
            return f"{name} is new"
        sizes = f" ({a.get('bytes')} bytes then, {b.get('bytes')} now)" if a.get("bytes") != b.get("bytes") else ""
        if sizes:
            return f"{name} has other content{sizes}"
        return f"{name} has other content"
    return None


def _gguf_files(path: Path) -> dict[str, dict[str, Any]]:
    size = os.stat(path).st_size
    return {path.name: {"bytes": size, "header_sha256": _sha256_head(path, GGUF_HEAD),
                        "sample_sha256": _sample_sha256(path, min(GGUF_HEAD, size), size)}}


def _directory_files(path: Path) -> dict[str, dict[str, Any]]:
    """What identifies the model in directory ``path``: its weight files (top level) by name, size and sampled bytes
    (a safetensors file's header hashed too), and the files that say what they mean hashed whole."""
    files: dict[str, dict[str, Any]] = {}
    for entry in sorted(os.scandir(path), key=lambda e: e.name):
        name = entry.name
        weights = name.endswith(WEIGHT_SUFFIXES)
        hashed = name.endswith(".json") or name.startswith("tokenizer") or name.endswith(".tiktoken") \
            or name in HASHED_NAMES
        if name.startswith(".") or not (weights or hashed):
            continue  # a README or licence does not change what a checkpoint was computed from
        st = entry.stat()  # through a symbolic link (a Hugging Face cache snapshot's)
        if not stat.S_ISREG(st.st_mode):
            continue  # never open a FIFO; a folder is not read by the loader
        if weights:
            files[name] = {"bytes": st.st_size}
            data_start = 0
            if name.endswith(".safetensors"):
                files[name]["header_sha256"], data_start = _safetensors_header(Path(entry.path), st.st_size)
            files[name]["sample_sha256"] = _sample_sha256(Path(entry.path), data_start, st.st_size)
        else:
            files[name] = {"bytes": st.st_size, "sha256": _sha256_head(Path(entry.path), None)}
    return files


def _sha256_head(path: Path, limit: int | None) -> str:
    """The sha256 of the first ``limit`` bytes of ``path`` (None: all of it)."""
    h, left = hashlib.sha256(), limit
    with open(path, "rb") as f:
        while left is None or left > 0:
            chunk = f.read(_CHUNK if left is None else min(_CHUNK, left))
            if not chunk:
                break
            h.update(chunk)
            if left is not None:
                left -= len(chunk)
    return h.hexdigest()


def _safetensors_header(path: Path, size: int) -> tuple[str, int]:
    """The sha256 of a safetensors file's length prefix and JSON header, and where its tensor data starts; of the
    first 8 bytes alone when they announce no header that fits (a corrupt file: loading it names the problem)."""
    with open(path, "rb") as f:
        prefix = f.read(8)
        n = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else 0
        body = f.read(n) if 0 < n <= min(_SAFETENSORS_HEADER_MAX, size - 8) else b""
    return hashlib.sha256(prefix + body).hexdigest(), len(prefix) + len(body)


def _sample_sha256(path: Path, start: int, end: int) -> str:
    """The sha256 of :data:`SAMPLE` bytes at the start, the middle and the end of ``path``'s bytes start..end (all
    of them when they are fewer than three samples)."""
    span = max(0, end - start)
    offsets = [start] if span <= 3 * SAMPLE else [start, start + (span - SAMPLE) // 2, end - SAMPLE]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for offset in offsets:
            f.seek(offset)
            h.update(f.read(min(SAMPLE if len(offsets) > 1 else span, end - offset)))
    return h.hexdigest()
