"""Work on large tensors without tensor-sized temporaries: bounded pieces of their rows for work that upcasts them
(pruning statistics, merge arithmetic), and a finiteness check from their extremes."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from app.plan import STAT_CHUNK_ELEMENTS


def row_chunks(x: torch.Tensor, elements: int = STAT_CHUNK_ELEMENTS) -> Iterator[torch.Tensor]:
    """Views of consecutive rows of ``x`` (tokens, features), at most ``elements`` elements each (one row at least)."""
    rows = max(1, elements // max(1, x.shape[-1]))
    yield from x.split(rows)


def all_finite(t: torch.Tensor) -> bool:
    """Whether no entry of ``t`` is NaN or infinite, from its extremes (NaN if any entry is): ``isfinite`` would
    make three temporaries of ``t``'s size, which beside a 70B down_proj's float32 copy is another 1.6 GB."""
    if t.numel() == 0:
        return True
    low, high = torch.aminmax(t)
    return bool(torch.isfinite(low) & torch.isfinite(high))
