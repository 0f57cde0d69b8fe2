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

from worker.chunks import all_finite, row_chunks
from worker.prune.masks import nm_mask, unstructured_mask

BLOCK_SIZE = 128
PERCDAMP = 0.01
DAMP_TRIES = 3  # PERCDAMP, then 10× and 100× it (see _inverse_cholesky)


def default_hessian_dtype(device: torch.device | str) -> torch.dtype:
    """float64 on CPU (cheap, exact enough for any token count); float32 on accelerators."""
    return torch.float64 if torch.device(device).type == "cpu" else torch.float32


class HessianAccumulator:
    """Streaming H = (2 / tokens) · Σ x xᵀ over real calibration tokens (a running mean, as in SparseGPT)."""

    def __init__(
        self, in_features: int, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
    ):
        dtype = dtype or default_hessian_dtype(device)
        self.H: torch.Tensor | None = torch.zeros(in_features, in_features, device=device, dtype=dtype)
        self.tokens = 0
        self.damping: float | None = None  # the damping pruning took (prune_sparsegpt), once it has used H up
        self._finite_when_taken = True

    def add(self, x: torch.Tensor) -> None:
        """``x``: (tokens, in_features) inputs of the layer (real tokens only)."""
        x = x.reshape(-1, x.shape[-1])
        b = x.shape[0]
        if b == 0:
            return
        if self.H is None:
            raise ValueError("SparseGPT: this accumulator's Hessian was handed to pruning already")
        total = self.tokens + b
        self.H.mul_(self.tokens / total)
        for chunk in row_chunks(x):  # upcast a bounded chunk of rows at a time, not the whole batch
            chunk = chunk.to(device=self.H.device, dtype=self.H.dtype)
            self.H.addmm_(chunk.t(), chunk, alpha=2.0 / total)
        self.tokens = total

    def finite(self) -> bool:
        """Whether every input added was finite: the diagonal tells (a non-finite or overflowing x_i x_j implies
        the same in x_i² or x_j²), at the cost of in_features elements, not in_features²."""
        if self.H is None:
            return self._finite_when_taken
        return bool(torch.isfinite(self.H.diagonal()).all())

    def take(self) -> torch.Tensor:
        """The Hessian, handed over to pruning, which uses it as scratch; the accumulator keeps whether it was
        finite (for the runner's diagnosis of a failure)."""
        if self.H is None:
            raise ValueError("SparseGPT: this accumulator's Hessian was handed to pruning already")
        self._finite_when_taken = self.finite()
        H, self.H = self.H, None
        return H


def _inverse_cholesky(H: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + λI)⁻¹ with λ = damp · mean(diag H), and the damp it took; ``H`` is damped in
    place (no copy of it: a 70B down_proj's Hessian is 3.3 GB in float32).

    A Hessian that will not factor at ``percdamp`` (near-duplicate inputs, few tokens) is retried at 10× and 100× the
    damping; the caller reports the damping a module took (a silent rise would prune it closer to magnitude while
    the report says SparseGPT). At 100×, λ = mean(diag H) bounds the condition number by in_features + 1, which
    every finite Hessian factors at; one that still does not is an error.
    """
    mean_diag = torch.diag(H).mean()
    damp, added = percdamp, 0.0
    for _ in range(DAMP_TRIES):
        H.diagonal().add_((damp - added) * mean_diag)
        added = damp
        L, info = torch.linalg.cholesky_ex(H)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            del L
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            del Hinv
            if int(info) == 0:
                return U, damp
            del U  # a retry holds no copy of the failed try's
        else:
            del L
        damp *= 10
    raise ValueError(f"SparseGPT: the calibration Hessian is not positive definite even with damping "
                     f"{added:g} of its mean diagonal")


def sparsegpt_prune_weight(
    weight: torch.Tensor,
    H: torch.Tensor,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    block_size: int = BLOCK_SIZE,
    percdamp: float = PERCDAMP,
    overwrite: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(new float32 weight, keep mask, the damping it took) for ``weight`` (out × in) and its input Hessian ``H``
    (in × in). ``overwrite``: ``H`` may be used as scratch (it is changed; no copy is made when it is on the weight's
    device already)."""
    rows, cols = weight.shape
    if H.shape != (cols, cols):
        raise ValueError(f"Hessian shape {tuple(H.shape)} does not match in_features={cols}")
    if nm is not None:
        n, m = nm
        if cols % m:
            raise ValueError(f"N:M pattern {n}:{m}: M={m} does not divide in_features={cols}")
        block_size = max(m, block_size - block_size % m)
    device = weight.device
    W = weight.detach().to(torch.float32, copy=True)
    H = H.to(device) if overwrite else H.to(device).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    U, damp = _inverse_cholesky(H, percdamp)
    del H  # the caller's reference, if any, is all that keeps it
    Hinv = U.to(torch.float32)
    del U
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
    if not all_finite(W):
        raise ValueError("SparseGPT: the pruned weights are not finite (NaN or infinite weights or calibration inputs)")
    W.masked_fill_(~mask, 0)
    return W, mask, damp


@torch.no_grad()
def prune_sparsegpt(
    linear: nn.Linear,
    stats: HessianAccumulator,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    block_size: int = BLOCK_SIZE,
    percdamp: float = PERCDAMP,
) -> torch.Tensor:
    """Prune ``linear`` in place from its accumulated Hessian, which it uses up (``stats.take``; ``stats.damping``
    is then the damping it took); returns the keep mask."""
    if stats.tokens == 0:
        raise ValueError("SparseGPT needs calibration tokens; the accumulator saw none")
    W, mask, stats.damping = sparsegpt_prune_weight(linear.weight, stats.take(), sparsity, nm, block_size, percdamp,
                                                    overwrite=True)
    linear.weight.copy_(W.to(linear.weight.dtype))
    return mask
