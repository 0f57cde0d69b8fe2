"""What a job read: a digest of every data file, kept in the report (``data``: which files made this model) and
checked when a job resumes. The state its checkpoints hold (calibration inputs, probe inputs, dense targets, the
position in the training data) was computed from those files; a file changed in between would carry on silently
misaligned with it."""

from __future__ import annotations

import hashlib
from typing import Any

from app.schemas import JobSpec
from worker.errors import DataError

_CHUNK = 1 << 20
# How a job whose checkpoints no longer fit its inputs starts from the beginning.
START_OVER = ("submit the spec as a new job (a retry resumes from these checkpoints; with `restorelcc run`, delete "
              "this spec's folder in --checkpoints)")


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
