"""SparseGPT (Frantar & Alistarh, 2023): prune with an OBS weight update that compensates the removed weights.

The layer's reconstruction error ‖WX − ŴX‖² has Hessian H = 2XXᵀ (X: in_features × tokens). Columns are
processed left to right in blocks of 128; pruning a weight adds its error, spread by the inverse
Hessian's Cholesky factor, onto the not yet processed columns of the same row.

Guarantees:
- Unstructured: the mask is chosen per column block (as in the paper), over the whole block (all rows):
  each block of ``b`` columns loses exactly ``prune_count(rows · b, sparsity)`` weights, so each tensor
  loses the sum of those (equal to ``prune_count(numel, sparsity)`` whenever ``sparsity · rows · b`` is
  whole, e.g. 50%). Rows may differ from one another.
- N:M: exact pattern (exactly N kept in every M consecutive inputs of every row).
Kept weights are updated, so a kept weight could in principle land on exactly 0.0 (measure-zero in practice).

Dead inputs (H_jj = 0: the feature never fired on calibration data) get H_jj = 1 and a selection score of 0,
so they are pruned first at no calibration cost; the surplus, if any, keeps its original values.
All maths runs in float32 (the Hessian may be accumulated in float64); weights are written back in the
model's dtype.
"""

from __future__ import annotations

import torch
from torch import nn

from worker.prune.masks import nm_mask, unstructured_mask

BLOCK_SIZE = 128
PERCDAMP = 0.01


def default_hessian_dtype(device: torch.device | str) -> torch.dtype:
    """float64 on CPU (cheap, exact enough for any token count); float32 on accelerators."""
    return torch.float64 if torch.device(device).type == "cpu" else torch.float32


class HessianAccumulator:
    """Streaming H = (2 / tokens) · Σ x xᵀ over real calibration tokens (a running mean, as in SparseGPT)."""

    def __init__(
        self, in_features: int, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
    ):
        dtype = dtype or default_hessian_dtype(device)
        self.H = torch.zeros(in_features, in_features, device=device, dtype=dtype)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        """``x``: (tokens, in_features) inputs of the layer (real tokens only)."""
        x = x.reshape(-1, x.shape[-1])
        b = x.shape[0]
        if b == 0:
            return
        total = self.tokens + b
        x = x.to(device=self.H.device, dtype=self.H.dtype)
        self.H.mul_(self.tokens / total)
        self.H.addmm_(x.t(), x, alpha=2.0 / total)
        self.tokens = total

    def finite(self) -> bool:
        return bool(torch.isfinite(self.H).all())


def _inverse_cholesky(H: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + λI)⁻¹ with λ = percdamp · mean(diag H); raises the damping if needed."""
    mean_diag = torch.diag(H).mean()
    damp = percdamp
    for _ in range(6):
        Hd = H.clone()
        Hd.diagonal().add_(damp * mean_diag)
        L, info = torch.linalg.cholesky_ex(Hd)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0:
                return U
        damp *= 10
    raise ValueError("SparseGPT: the calibration Hessian is not positive definite even with heavy dampening")


def sparsegpt_prune_weight(
    weight: torch.Tensor,
    H: torch.Tensor,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    block_size: int = BLOCK_SIZE,
    percdamp: float = PERCDAMP,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(new float32 weight, keep mask) for ``weight`` (out × in) and its input Hessian ``H`` (in × in)."""
    rows, cols = weight.shape
    if H.shape != (cols, cols):
        raise ValueError(f"Hessian shape {tuple(H.shape)} does not match in_features={cols}")
    if nm is not None:
        n, m = nm
        if cols % m:
            raise ValueError(f"N:M pattern {n}:{m}: M={m} does not divide in_features={cols}")
        block_size = max(m, block_size - block_size % m)
    device = weight.device
    W = weight.detach().to(torch.float32).clone()
    H = H.to(device).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    Hinv = _inverse_cholesky(H, percdamp).to(torch.float32)
    live = (~dead).to(torch.float32).reshape(1, -1)
    mask = torch.zeros(rows, cols, dtype=torch.bool, device=device)

    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d1 = torch.diag(Hinv1).reshape(1, -1)
        live1 = live[:, i1:i2]
        if nm is None:
            score = W1.pow(2) / d1.pow(2) * live1
            mask[:, i1:i2] = unstructured_mask(score, sparsity, group="tensor", check=False)
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                j = slice(i, i + nm[1])
                score = W1[:, j].pow(2) / d1[:, j].pow(2) * live1[:, j]
                mask[:, i1 + i : i1 + i + nm[1]] = nm_mask(score, *nm, check=False)
            w = W1[:, i]
            d = Hinv1[i, i]
            q = w * mask[:, i1 + i]
            Q1[:, i] = q
            err = (w - q) / d
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    # Checked once here rather than in every mask choice above: a check waits for the device, which once per N:M
    # group held the loop up (docs/scaling.md). NaN or infinite inputs end here as non-finite weights.
    if not bool(torch.isfinite(W).all()):
        raise ValueError("SparseGPT: the pruned weights are not finite (NaN or infinite weights or calibration inputs)")
    W.masked_fill_(~mask, 0)
    return W, mask


@torch.no_grad()
def prune_sparsegpt(
    linear: nn.Linear,
    stats: HessianAccumulator,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    block_size: int = BLOCK_SIZE,
    percdamp: float = PERCDAMP,
) -> torch.Tensor:
    """Prune ``linear`` in place from its accumulated Hessian; returns the keep mask."""
    if stats.tokens == 0:
        raise ValueError("SparseGPT needs calibration tokens; the accumulator saw none")
    W, mask = sparsegpt_prune_weight(linear.weight, stats.H, sparsity, nm, block_size, percdamp)
    linear.weight.copy_(W.to(linear.weight.dtype))
    return mask
