"""A job's checkpoints in the artifact store (local directory or S3), under its own scratch prefix.

A checkpoint is one manifest, ``checkpoint.json``, naming the resume point it was taken at and its parts: each
part is one safetensors file (tensors) whose structure the manifest holds (worker.run.snapshot), with its size and
sha256. Parts accumulate: a later checkpoint names the parts it changed and keeps the others (the pruned weights
are written once). Writes are atomic and ordered: the part files first, the manifest last, and only then are the
files it no longer names deleted; a reader checks every file's sha256 against the manifest before it uses
anything, and the spec fingerprint before that. A checkpoint that fails either check is never read. A store that
cannot be reached or written is a TransientError: the job goes back to the queue and resumes later. Anything else
raised on the way (out of memory, a bug) stays itself and fails the job: trying again would not help.
Importing this module does not import torch (the service imports it before a job needs torch).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.store.artifacts import ArtifactNotFound, ArtifactStore, is_storage_failure
from worker.errors import TransientError

log = logging.getLogger("restorelcc.checkpoints")

# 2: token ids changed (BOS once; probe pairs without contrast left out). 3: the calibration stream and batches
# changed (blank rows left out, long sequences fewer per batch: the calibration digest differs), acc_norm's rule
# changed (an interrupted evaluation's sets would mix two), training specs gained max_grad_norm. 4: training samples
# end with EOS (restoration.response_eos), response-perplexity results gained the stop metrics
CHECKPOINT_VERSION = 4
MANIFEST = "checkpoint.json"


def spec_fingerprint(spec_json: dict[str, Any]) -> str:
    """What a checkpoint must have been written for: the spec, the checkpoint format and this release. Where the job
    is announced, queued or handed off to does not change its results, so those fields do not count."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        release = version("restorelcc")
    except PackageNotFoundError:
        release = "unknown"
    spec_json = {k: v for k, v in spec_json.items() if k not in ("notify", "resources")}
    if isinstance(spec_json.get("output"), dict):
        spec_json["output"] = {k: v for k, v in spec_json["output"].items() if k != "destination"}
    text = json.dumps({"spec": spec_json, "format": CHECKPOINT_VERSION, "release": release}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class Checkpoint:
    """A checkpoint read back: its resume point, its metadata and its verified part files (local copies)."""

    point: str
    meta: dict[str, Any]
    files: dict[str, Path]
    skeletons: dict[str, Any] = field(default_factory=dict)
    source: str = ""  # the prefix it was read from

    def part(self, name: str) -> Any:
        """A part unpacked (every tensor in memory)."""
        from safetensors.torch import load_file

        from worker.run.snapshot import unpack

        return unpack(load_file(str(self.files[name])), self.skeletons[name])

    def has(self, name: str) -> bool:
        return name in self.files

    def file_parts(self, prefix: str) -> dict[str, Path]:
        """The parts staged as files (:meth:`CheckpointStore.stage`) whose names start with ``prefix``."""
        return {n: f for n, f in sorted(self.files.items()) if n.startswith(prefix) and self.skeletons.get(n) is None}


def io_failure(exc: BaseException) -> bool:
    """The store or the scratch disk failing, which may pass when tried again. safetensors reports a disk error
    as its own SafetensorError naming an I/O error ("I/O error: …" in recent releases, "IoError(Os { … })" before)."""
    return is_storage_failure(exc) or (
        type(exc).__name__ == "SafetensorError" and ("I/O error" in str(exc) or "IoError" in str(exc)))


class Unreadable(Exception):
    """A checkpoint that is missing a file, fails its sha256, or was written for another spec or format."""


class CheckpointStore:
    """Writes and reads one job's checkpoints under ``prefix`` of ``store``.

    ``scratch`` holds temporary files (each removed once written or read). ``sources``: further prefixes to
    resume from when this one holds nothing (a retried job's predecessor); what is read from there is copied
    here first. ``may_write()`` is asked before every write (False: this run no longer owns the job).
    ``on_usage(bytes)`` hears the bytes the job's checkpoint holds after every change.
    """

    def __init__(self, store: ArtifactStore, prefix: str, fingerprint: str, scratch: Path,
                 sources: tuple[str, ...] = (), may_write: Callable[[], bool] | None = None,
                 on_usage: Callable[[int], None] | None = None):
        self.store, self.prefix, self.fingerprint = store, prefix, fingerprint
        self.scratch = Path(scratch)
        self.sources = sources
        self.may_write = may_write
        self.on_usage = on_usage
        self._parts: dict[str, dict[str, Any]] = {}  # part → {"key", "size", "sha256", "skeleton"}
        self._staged: dict[str, dict[str, Any]] = {}  # file parts uploaded, named by the next manifest
        self._staged_cost = [0, 0.0]  # their bytes and seconds, counted with the next checkpoint
        self._seq = 0
        self.ignored: list[str] = []  # why the checkpoints the last load found were not used
        self.last_write: dict[str, Any] = {}  # what the last save cost: {"point", "bytes", "seconds"}

    # writing ---------------------------------------------------------------------------------------------
    def save(self, point: str, meta: dict[str, Any], parts: dict[str, Any] | None = None,
             copy: tuple[str, ...] = (), drop: tuple[str, ...] = ()) -> bool:
        try:
            return self._save(point, meta, parts, copy, drop)
        except Exception as exc:
            if not io_failure(exc):  # out of memory packing a part, or a bug: never retried
                raise
            raise TransientError(f"could not write a checkpoint to the artifact store: {exc}") from exc

    def stage(self, name: str, source: Path | dict[str, Any]) -> bool:
        """Upload a part kept as a plain safetensors file, tensors under their own names — a file (a streamed
        model's layer: copied as it is, nothing of it in memory) or a dict of named tensors (saved as such a file) —
        now, for the next checkpoint to name (until then no reader sees it; a run that dies first leaves a file the
        next load deletes). Read back, it is a file (:meth:`Checkpoint.file_parts`), not a value. False when this
        run may no longer write."""
        try:
            return self._stage(name, source)
        except Exception as exc:
            if not io_failure(exc):  # out of memory packing a part, or a bug: never retried
                raise
            raise TransientError(f"could not write a checkpoint to the artifact store: {exc}") from exc

    def _stage(self, name: str, source: Path | dict[str, Any]) -> bool:
        import time

        from safetensors.torch import save_file

        if self.may_write is not None and not self.may_write():
            return False
        t0 = time.perf_counter()
        self.scratch.mkdir(parents=True, exist_ok=True)
        key = f"{self.prefix}{name}-{self._seq + 1:05d}.safetensors"
        if isinstance(source, dict):
            tmp = self.scratch / f".{name}-{self._seq + 1}.safetensors"
            try:
                save_file({k: t.detach().cpu().contiguous() for k, t in source.items()}, str(tmp))
                stored = self.store.put_file(key, tmp, move=True)
            finally:
                tmp.unlink(missing_ok=True)
        else:
            stored = self.store.put_file(key, Path(source))
        if name in self._staged:
            self._delete(self._staged[name]["key"])
        self._staged[name] = {"key": stored.key, "size": stored.size, "sha256": stored.sha256, "skeleton": None}
        self._staged_cost[0] += stored.size
        self._staged_cost[1] += time.perf_counter() - t0
        return True

    def _save(self, point: str, meta: dict[str, Any], parts: dict[str, Any] | None, copy: tuple[str, ...],
              drop: tuple[str, ...] = ()) -> bool:
        """Write a checkpoint at ``point``: ``parts`` (name → value to pack) replace parts of that name, the
        staged file parts join them, ``drop`` leave, the others are kept. Parts named in ``copy`` are written
        without a second in-memory copy (model weights). Returns False when this run may no longer write."""
        import time

        from safetensors.torch import save_file

        from worker.run.snapshot import pack

        if self.may_write is not None and not self.may_write():
            return False
        t0 = time.perf_counter()
        self._seq += 1
        self.scratch.mkdir(parents=True, exist_ok=True)
        replaced: list[str] = [self._parts.pop(name)["key"] for name in drop if name in self._parts]
        written = 0
        for name, value in (parts or {}).items():
            tensors, skeleton = pack(value, copy=name not in copy)
            tmp = self.scratch / f".{name}-{self._seq}.safetensors"
            try:
                save_file(tensors, str(tmp))
                del tensors
                stored = self.store.put_file(f"{self.prefix}{name}-{self._seq:05d}.safetensors", tmp, move=True)
            finally:
                tmp.unlink(missing_ok=True)
            if name in self._parts:
                replaced.append(self._parts[name]["key"])
            self._parts[name] = {"key": stored.key, "size": stored.size, "sha256": stored.sha256,
                                 "skeleton": skeleton}
            written += stored.size
        for name, ref in self._staged.items():
            if name in self._parts:
                replaced.append(self._parts[name]["key"])
            self._parts[name] = ref
        self._staged = {}
        written += self._staged_cost[0]
        staged_s, self._staged_cost = self._staged_cost[1], [0, 0.0]
        manifest = {"version": CHECKPOINT_VERSION, "fingerprint": self.fingerprint, "point": point,
                    "seq": self._seq, "meta": meta, "parts": self._parts}
        self._put_json(manifest)
        for key in replaced:
            self._delete(key)
        self.last_write = {"point": point, "bytes": written, "seconds": time.perf_counter() - t0 + staged_s}
        self._report_usage()
        return True

    def _put_json(self, manifest: dict[str, Any]) -> None:
        tmp = self.scratch / f".manifest-{self._seq}.json"
        try:
            tmp.write_text(json.dumps(manifest, allow_nan=True), encoding="utf-8")
            self.store.put_file(self.prefix + MANIFEST, tmp, move=True)
        finally:
            tmp.unlink(missing_ok=True)

    def _delete(self, key: str) -> None:
        try:
            self.store.delete_prefix(key)
        except Exception:  # a leftover file costs storage, not correctness: the next read ignores it
            log.warning("could not delete the old checkpoint file %s", key, exc_info=True)

    def usage(self) -> int:
        return sum(p["size"] for p in self._parts.values())

    def _report_usage(self) -> None:
        if self.on_usage is not None:
            try:
                self.on_usage(self.usage())
            except Exception:
                log.warning("could not record checkpoint usage", exc_info=True)

    def clear(self) -> int:
        """Delete every checkpoint file of this job; returns how many."""
        self._parts, self._staged = {}, {}
        n = self.store.delete_prefix(self.prefix)
        self._report_usage()
        return n

    # reading ---------------------------------------------------------------------------------------------
    def load(self) -> Checkpoint | None:
        """The job's checkpoint, verified, or None (none kept, or none readable: the reason is logged and given
        in ``self.ignored``). Files a killed run left beside it are deleted."""
        self.ignored = []
        for prefix in (self.prefix, *self.sources):
            try:
                found = self._read(prefix)
            except Unreadable as exc:
                self.ignored.append(f"{prefix}: {exc}")
                log.warning("checkpoint under %s not used: %s", prefix, exc)
                continue
            if found is None:
                continue
            if prefix != self.prefix:
                try:
                    self._adopt(found)
                except Exception as exc:
                    if not io_failure(exc):
                        raise
                    raise TransientError(f"could not copy the checkpoint of {prefix}: {exc}") from exc
            else:
                self._drop_unnamed()
            self._report_usage()
            return found
        return None

    def saved_meta(self) -> dict[str, Any] | None:
        """The meta of the checkpoint :meth:`load` would read, from its manifest alone (no part is fetched), or
        None: what a run must know before it reads the checkpoint (the commits its model was read at)."""
        for prefix in (self.prefix, *self.sources):
            try:
                manifest = self._manifest(prefix)
            except Unreadable:
                continue  # load() says why
            if manifest is not None:
                return manifest["meta"]
        return None

    def _manifest(self, prefix: str) -> dict[str, Any] | None:
        """The manifest under ``prefix`` (None: none there); Unreadable when this worker cannot use it."""
        try:
            raw = b"".join(self.store.open_range(prefix + MANIFEST))
        except ArtifactNotFound:
            return None
        except Exception as exc:
            if not io_failure(exc):
                raise
            raise TransientError(f"could not read checkpoints from the artifact store: {exc}") from exc
        try:
            manifest = json.loads(raw)
        except ValueError as exc:
            raise Unreadable(f"manifest is not JSON: {exc}") from exc
        if manifest.get("version") != CHECKPOINT_VERSION:
            raise Unreadable(f"format {manifest.get('version')!r}, this worker reads {CHECKPOINT_VERSION}")
        if manifest.get("fingerprint") != self.fingerprint:
            raise Unreadable("written for another spec or release")
        return manifest

    def _read(self, prefix: str) -> Checkpoint | None:
        manifest = self._manifest(prefix)
        if manifest is None:
            return None
        self.scratch.mkdir(parents=True, exist_ok=True)
        files: dict[str, Path] = {}
        for name, ref in manifest["parts"].items():
            local = self.scratch / f"{name}.safetensors"
            h = hashlib.sha256()
            try:
                with open(local, "wb") as out:
                    for chunk in self.store.open_range(ref["key"]):
                        h.update(chunk)
                        out.write(chunk)
            except ArtifactNotFound as exc:
                raise Unreadable(f"part {name} is missing") from exc
            except Exception as exc:
                if not io_failure(exc):
                    raise
                raise TransientError(f"could not read checkpoints from the artifact store: {exc}") from exc
            if h.hexdigest() != ref["sha256"]:
                raise Unreadable(f"part {name} fails its sha256 check")
            files[name] = local
        self._parts = dict(manifest["parts"])
        self._seq = int(manifest["seq"])
        return Checkpoint(manifest["point"], manifest["meta"], files,
                          {n: r["skeleton"] for n, r in manifest["parts"].items()}, prefix)

    def _adopt(self, found: Checkpoint) -> None:
        """Copy a checkpoint read from another job's prefix under this job's."""
        if self.may_write is not None and not self.may_write():
            return
        for name, path in found.files.items():
            stored = self.store.put_file(f"{self.prefix}{name}-{self._seq:05d}.safetensors", path)
            self._parts[name] = {**self._parts[name], "key": stored.key}
        self._put_json({"version": CHECKPOINT_VERSION, "fingerprint": self.fingerprint, "point": found.point,
                        "seq": self._seq, "meta": found.meta, "parts": self._parts})

    def _drop_unnamed(self) -> None:
        named = {p["key"] for p in self._parts.values()} | {self.prefix + MANIFEST}
        try:
            for key, _ in self.store.list_prefix(self.prefix):
                if key not in named:
                    self.store.delete_prefix(key)
        except Exception:
            log.warning("could not list the checkpoint files under %s", self.prefix, exc_info=True)

    def discard_local(self) -> None:
        shutil.rmtree(self.scratch, ignore_errors=True)
