"""Bounded pieces of a calibration batch's inputs, for statistics that upcast them."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from app.plan import STAT_CHUNK_ELEMENTS

CHUNK_ELEMENTS = STAT_CHUNK_ELEMENTS  # 16M elements: 128 MB in float64, whatever the batch (the plan counts it)


def row_chunks(x: torch.Tensor, elements: int = CHUNK_ELEMENTS) -> Iterator[torch.Tensor]:
    """Views of consecutive rows of ``x`` (tokens, features), at most ``elements`` elements each (one row at least)."""
    rows = max(1, elements // max(1, x.shape[-1]))
    yield from x.split(rows)
