"""Wanda (Sun et al., 2023): score |W_ij| · ‖X_j‖₂, compared per output row.

``X_j`` is input feature j over every calibration token (padding excluded by the caller). Unstructured:
each output row loses exactly ``prune_count(in_features, sparsity)`` weights. N:M: exact pattern.
"""

from __future__ import annotations

import torch
from torch import nn

from worker.chunks import row_chunks
from worker.prune.masks import Group, apply_mask_, make_mask


class ColumnNormAccumulator:
    """Streaming sum of squares of each input feature, over tokens (rows of ``x``)."""

    def __init__(
        self, in_features: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float64
    ):
        self.sq_sum = torch.zeros(in_features, device=device, dtype=dtype)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        """``x``: (tokens, in_features) inputs of the layer (real tokens only), upcast a bounded chunk of rows at a
        time (the whole batch in float64 was two 3.7 GB copies for a 70B down_proj at 2048 tokens × 8)."""
        x = x.reshape(-1, x.shape[-1])
        for chunk in row_chunks(x):
            self.sq_sum += chunk.to(device=self.sq_sum.device, dtype=self.sq_sum.dtype).pow(2).sum(dim=0)
        self.tokens += x.shape[0]

    def finite(self) -> bool:
        return bool(torch.isfinite(self.sq_sum).all())

    @property
    def norms(self) -> torch.Tensor:
        """‖X_j‖₂ for every input feature j (float32)."""
        return self.sq_sum.sqrt().float()


def wanda_scores(weight: torch.Tensor, col_norms: torch.Tensor) -> torch.Tensor:
    return weight.detach().float().abs() * col_norms.to(weight.device, torch.float32).reshape(1, -1)


@torch.no_grad()
def prune_wanda(
    linear: nn.Linear,
    stats: ColumnNormAccumulator,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    group: Group = "row",
) -> torch.Tensor:
    """Prune ``linear`` in place from accumulated input norms; returns the keep mask."""
    if stats.tokens == 0:
        raise ValueError("Wanda needs calibration tokens; the accumulator saw none")
    mask = make_mask(wanda_scores(linear.weight, stats.norms), sparsity, nm, group)
    apply_mask_(linear.weight, mask)
    return mask
