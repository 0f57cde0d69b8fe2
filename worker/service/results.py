"""The files of a finished job's result directory, as they are uploaded and handed off."""

from __future__ import annotations

from pathlib import Path


def result_files(out_dir: Path) -> list[tuple[str, Path]]:
    """(artifact name, file) for every regular file under ``out_dir``; names are POSIX paths relative to it."""
    return [(p.relative_to(out_dir).as_posix(), p) for p in sorted(out_dir.rglob("*"))
            if p.is_file() and not p.is_symlink()]
