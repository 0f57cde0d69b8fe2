"""Choosing the heads to compensate: by score, at random (seeded), or all (pure tensor maths)."""

from __future__ import annotations

from typing import Literal

import torch

Selection = Literal["probe", "random", "all"]


def rank_heads(scores: torch.Tensor, tiebreak: torch.Tensor | None = None) -> torch.Tensor:
    """Flat head indices (layer·H + head), best first: higher score, then lower ``tiebreak``, then index."""
    s = scores.reshape(-1).float()
    order = torch.arange(s.numel())
    if tiebreak is not None:
        order = order[torch.sort(tiebreak.reshape(-1).float()[order], stable=True).indices]
    return order[torch.sort(-s[order], stable=True).indices]


def head_count(heads: float | int, total: int) -> int:
    """A fraction of all heads (0 < x < 1, rounded, at least 1) or a whole count (at most ``total``)."""
    if 0 < heads < 1:
        return max(1, round(heads * total))
    if heads >= 1 and float(heads).is_integer():
        if heads > total:
            raise ValueError(f"heads {heads:g} exceeds the {total} heads there are")
        return int(heads)
    raise ValueError(f"heads must be a fraction in (0, 1) or a whole count ≥ 1, got {heads}")


def select_heads(
    scores: torch.Tensor,
    heads: float | int,
    selection: Selection = "probe",
    seed: int = 0,
    tiebreak: torch.Tensor | None = None,
) -> list[tuple[int, int]]:
    """Chosen (layer, head) pairs sorted by (layer, head). ``scores``: (L, H), higher is better."""
    layers, n_heads = scores.shape
    total = layers * n_heads
    if selection == "all":
        flat = list(range(total))
    else:
        k = head_count(heads, total)
        if selection == "probe":
            flat = rank_heads(scores, tiebreak)[:k].tolist()
        elif selection == "random":
            g = torch.Generator().manual_seed(seed)
            flat = torch.randperm(total, generator=g)[:k].tolist()
        else:
            raise ValueError(f"unknown head selection {selection!r}")
    return sorted((i // n_heads, i % n_heads) for i in flat)



def choose_heads(
    layers: int,
    n_heads: int,
    heads: float | int,
    selection: Selection,
    seed: int = 0,
    scores: torch.Tensor | None = None,
    tiebreak: torch.Tensor | None = None,
) -> list[tuple[int, int]]:
    """The job's heads: by ``scores`` (ties by ``tiebreak``: lower first), at random (seeded), or all."""
    if selection == "probe":
        if scores is None:
            raise ValueError("head_selection 'probe' needs probe scores")
        return select_heads(scores, heads, "probe", seed, tiebreak=tiebreak)
    return select_heads(torch.zeros(layers, n_heads), heads, selection, seed)
