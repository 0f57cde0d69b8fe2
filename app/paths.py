"""Which model and data paths a spec may name: only paths under configured roots (and hub ids if allowed)."""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

from app.config import Settings
from app.schemas import JobSpec

# "org/name" or "name": what a Hugging Face hub id looks like (and a local path does not claim to be).
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


class PathRefused(ValueError):
    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field
        self.message = message


def looks_like_hub_id(value: str) -> bool:
    return bool(_HUB_ID.match(value)) and not value.endswith(".gguf") and ".." not in value


def check_local_path(value: str, roots: list[Path], field: str) -> Path:
    """``value`` resolved (symlinks followed) if it lies under one of ``roots``; else :class:`PathRefused`."""
    if "\x00" in value:
        raise PathRefused(field, f"{field}: invalid path")
    p = Path(value).expanduser()
    if ".." in PurePosixPath(value).parts or ".." in p.parts:
        raise PathRefused(field, f"{field}: '..' is not allowed in paths")
    if not p.is_absolute():
        raise PathRefused(field, f"{field}: use an absolute path under an allowed root")
    if not roots:
        raise PathRefused(field, f"{field}: local paths are not accepted (no roots configured)")
    resolved = p.resolve(strict=False)
    for root in roots:
        r = Path(root).expanduser().resolve(strict=False)
        if resolved == r or resolved.is_relative_to(r):
            return resolved
    raise PathRefused(field, f"{field}: path is outside the allowed roots")


def check_model_ref(value: str, settings: Settings, field: str) -> None:
    if looks_like_hub_id(value) and not value.startswith(("/", "~", ".")):
        if not settings.allow_hub_models:
            raise PathRefused(field, f"{field}: hub models are not allowed on this service; give a local path")
        return
    check_local_path(value, settings.model_roots, field)


def check_spec_paths(spec: JobSpec, settings: Settings) -> None:
    """Raise :class:`PathRefused` naming the first field whose path is not allowed."""
    check_model_ref(spec.model.id, settings, "model.id")
    if spec.model.dense:
        check_model_ref(spec.model.dense, settings, "model.dense")
    if spec.model.gguf_file is not None:
        g = spec.model.gguf_file
        if "/" in g or "\\" in g or g in (".", ".."):
            raise PathRefused("model.gguf_file", "model.gguf_file: a file name, not a path")
    for field, value in spec.data_paths().items():
        check_local_path(value, settings.data_roots, field)
