"""Magnitude pruning: score |W|; no calibration data.

Unstructured comparison group: the whole tensor (classic layer-wise magnitude pruning), so each
pruned Linear loses exactly ``prune_count(numel, sparsity)`` weights. N:M: exact pattern.
"""

from __future__ import annotations

import torch
from torch import nn

from worker.prune.masks import Group, apply_mask_, make_mask


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().float().abs()


def magnitude_mask(
    weight: torch.Tensor, sparsity: float, nm: tuple[int, int] | None = None, group: Group = "tensor"
) -> torch.Tensor:
    return make_mask(magnitude_scores(weight), sparsity, nm, group)


@torch.no_grad()
def prune_magnitude(
    linear: nn.Linear, sparsity: float, nm: tuple[int, int] | None = None, group: Group = "tensor"
) -> torch.Tensor:
    """Prune ``linear`` in place; returns the keep mask."""
    mask = magnitude_mask(linear.weight, sparsity, nm, group)
    apply_mask_(linear.weight, mask)
    return mask
