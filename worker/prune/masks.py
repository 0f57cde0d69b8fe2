"""Pruning masks from score matrices (pure tensor maths, no modules).

A score matrix ``S`` has the weight's shape (out × in); a higher score means "keep". Masks are bool
tensors of the same shape, ``True`` = keep.

Guarantees:
- ``unstructured_mask``: every comparison group (each output row, or the whole tensor) loses exactly
  ``prune_count(group_size, sparsity)`` entries.
- ``nm_mask``: every run of ``m`` consecutive inputs of every row keeps exactly ``n`` entries.

Ties are broken deterministically: among equal scores the entry with the lower flat index in its group
is kept (a stable descending sort).
"""

from __future__ import annotations

import math
from typing import Literal

import torch

Group = Literal["row", "tensor"]


def prune_count(group_size: int, sparsity: float) -> int:
    """Entries to remove from a group: ``sparsity · group_size`` rounded half up."""
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    # The tiny epsilon keeps products such as 0.7 * 10 = 7.000000000000001 from depending on float noise.
    return min(group_size, max(0, math.floor(sparsity * group_size + 0.5 + 1e-9)))


def _check_scores(scores: torch.Tensor) -> None:
    if scores.dim() != 2:
        raise ValueError(f"scores must be a 2-D (out × in) matrix, got shape {tuple(scores.shape)}")
    if not bool(torch.isfinite(scores).all()):  # an infinite weight would be kept and poison every output
        raise ValueError("scores are not finite (NaN or infinite)")


def _keep_top(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Bool mask keeping the ``keep`` highest scores along the last dimension (ties: lower index kept)."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if keep <= 0:
        return mask
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    mask.scatter_(-1, order[..., :keep], True)
    return mask


def unstructured_mask(scores: torch.Tensor, sparsity: float, group: Group = "row", *,
                      check: bool = True) -> torch.Tensor:
    """Remove exactly ``prune_count(group_size, sparsity)`` lowest scores in each comparison group.

    ``group="row"`` compares the inputs of each output row (Wanda's choice); ``group="tensor"``
    compares all entries of the matrix (classic magnitude pruning). ``check``: as in :func:`nm_mask`.
    """
    if check:
        _check_scores(scores)
    if group == "row":
        cols = scores.shape[1]
        return _keep_top(scores, cols - prune_count(cols, sparsity))
    if group == "tensor":
        flat = scores.reshape(1, -1)
        return _keep_top(flat, flat.shape[1] - prune_count(flat.shape[1], sparsity)).reshape(scores.shape)
    raise ValueError(f"group must be 'row' or 'tensor', got {group!r}")


def nm_mask(scores: torch.Tensor, n: int, m: int, *, check: bool = True) -> torch.Tensor:
    """Keep the top ``n`` of every ``m`` consecutive inputs in each row (exactly ``n`` kept per group).

    ``check=False`` skips the finiteness check, which waits for the device: for callers in a loop over columns
    (SparseGPT) that check their result once instead."""
    if check:
        _check_scores(scores)
    if not 0 < n < m:
        raise ValueError(f"N:M needs 0 < N < M, got {n}:{m}")
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"N:M pattern {n}:{m}: M={m} does not divide in_features={cols}")
    grouped = scores.reshape(rows, cols // m, m)
    return _keep_top(grouped, n).reshape(rows, cols)


def make_mask(
    scores: torch.Tensor, sparsity: float, nm: tuple[int, int] | None = None, group: Group = "row"
) -> torch.Tensor:
    """``nm_mask`` when an N:M pattern is given, else ``unstructured_mask``."""
    if nm is not None:
        return nm_mask(scores, *nm)
    return unstructured_mask(scores, sparsity, group)


@torch.no_grad()
def apply_mask_(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Zero ``weight`` in place where ``mask`` is False; returns ``weight``."""
    if mask.shape != weight.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match weight shape {tuple(weight.shape)}")
    return weight.masked_fill_(~mask.to(weight.device), 0)
