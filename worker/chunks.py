"""Bounded pieces of a tensor's rows, for work that upcasts them (pruning statistics, merge arithmetic) without a
whole upcast copy."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from app.plan import STAT_CHUNK_ELEMENTS


def row_chunks(x: torch.Tensor, elements: int = STAT_CHUNK_ELEMENTS) -> Iterator[torch.Tensor]:
    """Views of consecutive rows of ``x`` (tokens, features), at most ``elements`` elements each (one row at least)."""
    rows = max(1, elements // max(1, x.shape[-1]))
    yield from x.split(rows)
