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

from app.plan import MASK_CHUNK_ELEMENTS, SORT_MAX_ELEMENTS
from worker.chunks import all_finite

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
    if not all_finite(scores):  # an infinite weight would be kept and poison every output
        raise ValueError("scores are not finite (NaN or infinite)")


def _keep_top(scores: torch.Tensor, keep: int, probe: bool = True) -> torch.Tensor:
    """Bool mask keeping the ``keep`` highest scores along the last dimension (ties: lower index kept; NaN, as a
    sort ranks it, highest).

    Groups are sorted MASK_CHUNK_ELEMENTS scores at a time: a sort holds float32 values and int64 indices beside them
    (25 bytes per score with its buffers, measured). One float32 group larger than SORT_MAX_ELEMENTS (the whole
    tensor, magnitude's) is chosen by threshold instead, with bool and int32 temporaries. ``probe``: the threshold
    may look at the scores' signs first (a wait for the device) to spare a copy when none is negative."""
    if keep <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if keep >= scores.shape[-1]:
        return torch.ones_like(scores, dtype=torch.bool)
    if scores.shape[-1] > SORT_MAX_ELEMENTS and scores.dtype == torch.float32:  # the keys are float32's bits
        return _keep_top_by_threshold(scores, keep, probe)
    groups = scores.reshape(-1, scores.shape[-1])
    mask = torch.zeros_like(groups, dtype=torch.bool)
    step = max(1, MASK_CHUNK_ELEMENTS // groups.shape[1])
    for start in range(0, groups.shape[0], step):
        order = torch.sort(groups[start : start + step], dim=-1, descending=True, stable=True).indices
        mask[start : start + step].scatter_(-1, order[:, :keep], True)
        del order
    return mask.reshape(scores.shape)


def _order_keys(scores: torch.Tensor, probe: bool) -> torch.Tensor:
    """int32 keys that order as the float32 scores do as a sort ranks them (-0.0 equal to 0.0, every NaN highest):
    with ``probe`` and no score negative or NaN, the bits themselves (a view, no copy); else with a negative score's
    magnitude bits flipped."""
    if probe and bool(scores.min() >= 0):  # NaN if any score is
        keys = scores.view(torch.int32)
        if bool(torch.signbit(scores).any()):  # -0.0, whose bits are int32's minimum
            keys = torch.where(keys == torch.iinfo(torch.int32).min, 0, keys)
        return keys
    keys = (scores + 0.0).view(torch.int32)  # + 0.0 turns -0.0 into 0.0
    keys = torch.where(keys < 0, keys ^ 0x7FFFFFFF, keys)
    return torch.where(torch.isnan(scores), torch.iinfo(torch.int32).max, keys)


def _keep_top_by_threshold(scores: torch.Tensor, keep: int, probe: bool) -> torch.Tensor:
    """For long groups: each group's ``keep``-th highest key by bisection (32 counting passes), then every key
    above it and, of the keys equal to it, the first ones in order."""
    keys = _order_keys(scores, probe)
    lo = torch.full(keys.shape[:-1] + (1,), torch.iinfo(torch.int32).min, dtype=torch.int64, device=keys.device)
    hi = torch.full_like(lo, torch.iinfo(torch.int32).max)
    for _ in range(32):
        mid = (lo + hi + 1) // 2
        enough = (keys >= mid.to(torch.int32)).sum(-1, keepdim=True) >= keep
        lo, hi = torch.where(enough, mid, lo), torch.where(enough, hi, mid - 1)
    threshold = lo.to(torch.int32)  # count(keys >= threshold) >= keep > count(keys > threshold)
    mask = keys > threshold
    ties_wanted = keep - mask.sum(-1, keepdim=True)
    step = max(1, MASK_CHUNK_ELEMENTS // max(1, mask[..., :1].numel()))  # columns a chunk of ranks spans
    seen = torch.zeros_like(ties_wanted)
    for start in range(0, keys.shape[-1], step):
        tied = keys[..., start : start + step] == threshold
        rank = tied.cumsum(-1, dtype=torch.int32)
        mask[..., start : start + step] |= tied & (rank <= (ties_wanted - seen).clamp_(min=0).to(torch.int32))
        seen += tied.sum(-1, keepdim=True)
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
        return _keep_top(scores, cols - prune_count(cols, sparsity), probe=check)
    if group == "tensor":
        flat = scores.reshape(1, -1)
        return _keep_top(flat, flat.shape[1] - prune_count(flat.shape[1], sparsity), probe=check).reshape(scores.shape)
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
