"""Glue between the runner and the restoration methods (worker/restore/): one function per stage.

The runner calls ``begin`` while the dense model is in memory (the loading stage), then ``probe``,
``extract``, ``train`` and ``merge`` in their stages, and ``export`` when writing results.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def begin(spec, model, tokenizer, adapter, progress) -> Any:
    """Capture what the method needs from the dense model; returns the method's state."""
    if spec.restoration.method == "none":
        return None
    raise NotImplementedError(f"restoration.method {spec.restoration.method!r}")


def probe(state, progress, reporter) -> None:
    raise NotImplementedError


def extract(state, progress, reporter) -> None:
    raise NotImplementedError


def train(state, progress, reporter) -> None:
    raise NotImplementedError


def merge(state, progress, reporter) -> None:
    raise NotImplementedError


def export(state, out_dir: Path) -> None:
    """Write the method's own artifacts (``restoration.safetensors``)."""
    return None
