"""Which model and data paths a spec may name: only paths under configured roots (and hub ids if allowed).

:func:`check_spec_paths` needs no filesystem beyond resolving symlinks (the worker runs it again before a job);
:func:`check_spec_files` is the API's look at what a path names, refusing at submit what is already known to be
the wrong kind of thing. Paths are handled as strings: pathlib parses a 4 KiB path of one-letter names in
milliseconds, and a spec may hold a hundred of them.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from pathlib import Path

from app.config import Settings
from app.fields import looks_local
from app.schemas import JobSpec

# "org/name" or "name": what a Hugging Face hub id looks like (and a local path does not claim to be).
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
HUB_ID_MAX = 96  # huggingface_hub refuses longer repo ids
DIR_SCAN_MAX = 10_000  # entries of a model directory looked at for a .gguf file before giving the benefit of the doubt


class PathRefused(ValueError):
    def __init__(self, field: str, message: str, code: str = "path_not_allowed"):
        super().__init__(message)
        self.field = field
        self.message = message
        self.code = code


def looks_like_hub_id(value: str) -> bool:
    """A well-formed hub id that the loader would fetch from the hub (``looks_local``: not a local path)."""
    return not looks_local(value) and bool(_HUB_ID.match(value)) and ".." not in value


def check_local_path(value: str, roots: list[Path], field: str) -> str:
    """``value`` resolved (symlinks followed) if it lies under one of ``roots``; else :class:`PathRefused`."""
    if "\x00" in value:
        raise PathRefused(field, f"{field}: invalid path")
    expanded = os.path.expanduser(value)  # "~someone" with no such user stays as given: relative, refused below
    if "/../" in f"/{value}/" or "/../" in f"/{expanded}/":
        raise PathRefused(field, f"{field}: '..' is not allowed in paths")
    if not os.path.isabs(expanded):
        raise PathRefused(field, f"{field}: use an absolute path under an allowed root")
    if not roots:
        raise PathRefused(field, f"{field}: local paths are not accepted (no roots configured)")
    try:
        resolved = resolve(expanded)
    except (OSError, ValueError) as e:  # a symlink loop; a name the OS cannot take
        raise PathRefused(field, f"{field}: the path cannot be resolved ({getattr(e, 'strerror', None) or e})") from e
    for root in roots:
        r = os.path.realpath(os.path.expanduser(root))
        if resolved == r or resolved.startswith(r.rstrip("/") + "/"):
            return resolved
    raise PathRefused(field, f"{field}: path is outside the allowed roots")


def _exists(path: str) -> bool:
    try:
        os.stat(path)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.EACCES):
            return False
        raise  # ELOOP, ENAMETOOLONG: not a path anything could open
    return True


def resolve(path: str) -> str:
    """An absolute ``path`` without '..', every symlink followed (like ``os.path.realpath``) in O(log depth)
    system calls: the kernel resolves the longest prefix that exists, and the names after it cannot be links.
    That prefix is found by galloping, then bisection (a prefix of an existing path exists). ``realpath`` calls
    lstat once per name, each walking the path again: seconds for a 4 KiB path of one-letter names."""
    names = os.path.normpath(path).split("/")  # ["", "a", "b", ...]

    def prefix(n: int) -> str:
        return "/".join(names[:n]) or "/"

    lo, hi, step = 1, len(names), 1  # prefix(lo) exists (the filesystem root); prefix(hi + 1) does not
    while lo < hi:  # gallop: existing prefixes are short, so probe short ones first
        mid = min(lo + step, hi)
        if not _exists(prefix(mid)):
            hi = mid - 1
            break
        lo, step = mid, step * 2
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _exists(prefix(mid)):
            lo = mid
        else:
            hi = mid - 1
    if lo < len(names) and os.path.islink(prefix(lo + 1)):
        lo += 1  # a dangling symlink: where it points is where a later file would be read from
    return "/".join([os.path.realpath(prefix(lo)).rstrip("/"), *names[lo:]]) or "/"


def check_model_ref(value: str, settings: Settings, field: str) -> str | None:
    """The resolved local path of a model reference, or None for an allowed hub id."""
    if looks_like_hub_id(value):
        if not settings.allow_hub_models:
            raise PathRefused(field, f"{field}: hub models are not allowed on this service; give a local path")
        if len(value) > HUB_ID_MAX:
            raise PathRefused(field, f"{field}: a hub id is at most {HUB_ID_MAX} characters long")
        return None
    return check_local_path(value, settings.model_roots, field)


def check_spec_paths(spec: JobSpec, settings: Settings) -> dict[str, str]:
    """Raise :class:`PathRefused` naming the first field whose path is not allowed; else every local path of
    the spec, resolved, keyed by field."""
    local: dict[str, str] = {}
    for field, value in (("model.id", spec.model.id), ("model.dense", spec.model.dense)):
        if value:
            resolved = check_model_ref(value, settings, field)
            if resolved is not None:
                local[field] = resolved
    if spec.model.gguf_file is not None:
        g = spec.model.gguf_file
        if "/" in g or "\\" in g or g in (".", ".."):
            raise PathRefused("model.gguf_file", "model.gguf_file: a file name, not a path")
    for field, value in spec.data_paths().items():
        local[field] = check_local_path(value, settings.data_roots, field)
    return local


def _mode(path: str) -> int | None:
    """``st_mode`` with symlinks followed; None when the path does not exist or cannot be inspected here."""
    try:
        return os.stat(path).st_mode
    except (OSError, ValueError):
        return None


def _holds_a_model(directory: str) -> bool:
    if os.path.isfile(os.path.join(directory, "config.json")):
        return True
    try:
        with os.scandir(directory) as entries:
            for i, entry in enumerate(entries):
                if entry.name.lower().endswith(".gguf") or i >= DIR_SCAN_MAX:
                    return True
    except OSError:
        return True  # unreadable here: the worker decides
    return False


def check_spec_files(spec: JobSpec, local: dict[str, str]) -> None:
    """Refuse a path that exists but is the wrong kind of thing (a model path that is neither a model directory
    nor a .gguf file; a data path that is not a regular file). A path that does not exist is left to the worker,
    which fails the job with ``model_not_found`` or ``invalid_data``: it may see other mounts, or the file may
    arrive in the meantime."""
    given = {"model.id": spec.model.id, "model.dense": spec.model.dense or "", **spec.data_paths()}
    for field, path in local.items():
        mode = _mode(path)
        if mode is None:
            continue
        value = given[field]
        if not field.startswith("model."):
            if not stat.S_ISREG(mode):
                what = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
                raise PathRefused(field, f"{field}: {value} is {what}; give a JSONL file", "not_a_file")
        elif stat.S_ISREG(mode):
            if not value.lower().endswith(".gguf"):  # as named: a link to a hub-cache blob has no suffix
                raise PathRefused(field, f"{field}: {value} is a file but not a .gguf model", "not_a_model")
        elif not stat.S_ISDIR(mode):
            raise PathRefused(field, f"{field}: {value} is neither a model directory nor a .gguf file", "not_a_model")
        elif field == "model.id" and spec.model.gguf_file:
            gguf = _mode(os.path.join(path, spec.model.gguf_file))
            if gguf is not None and not stat.S_ISREG(gguf):
                raise PathRefused("model.gguf_file",
                                  f"model.gguf_file: {spec.model.gguf_file} in {value} is not a file", "not_a_model")
        elif not _holds_a_model(path):
            raise PathRefused(field, f"{field}: {value} is a directory with neither config.json nor a .gguf file",
                              "not_a_model")
