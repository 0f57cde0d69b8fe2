"""Lost components: SVD of the per-head lost activations ΔZ = Z_dense − Z_pruned (pure tensor maths).

For one head ΔZ (N × d) = U Σ Vᵀ. The rows of Vᵀ are the lost directions v_i (unit length; zero rows
when N < d) and α_i = σ_i · mean_n U[n, i], so Σ_i α_i v_i is the mean lost vector and
c_K = Σ_{i≤K} α_i v_i its projection on the top-K directions. No mean-centring.
All heads go through one batched ``torch.linalg.svd`` call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LostComponents:
    directions: torch.Tensor  # (L·H, d, d): row i = i-th right singular vector (zeros beyond min(N, d))
    singular_values: torch.Tensor  # (L·H, d), descending, zero-padded
    alpha: torch.Tensor  # (L·H, d), α_i = σ_i · mean_n U[n, i], zero-padded

    @property
    def num_heads_total(self) -> int:
        return self.directions.shape[0]

    @property
    def head_dim(self) -> int:
        return self.directions.shape[-1]


def lost_activations(dense: torch.Tensor, pruned: torch.Tensor) -> torch.Tensor:
    """(N, L, H, d) captures of both models → ΔZ as (N, L·H, d) float32."""
    if dense.shape != pruned.shape:
        raise ValueError(f"dense captures {tuple(dense.shape)} vs pruned {tuple(pruned.shape)}")
    n, layers, heads, d = dense.shape
    return (dense.float() - pruned.float()).reshape(n, layers * heads, d)


def lost_components(delta: torch.Tensor) -> LostComponents:
    """SVD of every head's lost activations at once. ``delta``: (N, L·H, d)."""
    if delta.dim() != 3:
        raise ValueError(f"delta must be (N, L·H, d), got shape {tuple(delta.shape)}")
    n, heads, d = delta.shape
    a = delta.float().transpose(0, 1)  # (L·H, N, d)
    u, s, vh = torch.linalg.svd(a, full_matrices=False)  # u (L·H, N, r), s (L·H, r), vh (L·H, r, d)
    r = s.shape[-1]
    alpha = s * u.mean(dim=1)  # (L·H, r)
    if r < d:  # N < d: pad with zero directions
        vh = torch.cat([vh, vh.new_zeros(heads, d - r, d)], dim=1)
        s = torch.cat([s, s.new_zeros(heads, d - r)], dim=1)
        alpha = torch.cat([alpha, alpha.new_zeros(heads, d - r)], dim=1)
    return LostComponents(vh.contiguous(), s.contiguous(), alpha.contiguous())


def summary_component(lc: LostComponents, k: int) -> torch.Tensor:
    """(L·H, d): c = Σ_{i≤k} α_i v_i, the mean lost vector projected on the top-k directions."""
    if k < 1:
        raise ValueError("k must be at least 1")
    k = min(k, lc.head_dim)
    return torch.einsum("hi,hid->hd", lc.alpha[:, :k], lc.directions[:, :k])
