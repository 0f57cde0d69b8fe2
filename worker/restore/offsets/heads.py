"""Per-head learned offsets and their injection into ``o_proj`` inputs.

For each chosen head j (layer, head): c_j = Σ_i β_{j,i} v_{j,i} + b_j, with the lost directions
v_{j,i} frozen (rows of ``directions[j]``: all d of them, or the top K by singular value) and
β_j ∈ R^K, b_j ∈ R^d trainable. Without directions ("bias" mode) only b_j exists and c_j = b_j.
Parameters stay fp32 whatever the model dtype; the constant is cast to the activation dtype when added.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from worker.model.arch import DecoderAdapter


class HeadOffsets(nn.Module):
    def __init__(
        self,
        heads: Sequence[tuple[int, int]],
        num_heads: int,
        head_dim: int,
        directions: torch.Tensor | None = None,
        seed: int = 0,
        init_std: float = 1e-3,
    ):
        super().__init__()
        chosen = sorted({(int(layer), int(h)) for layer, h in heads})
        if not chosen:
            raise ValueError("no heads chosen")
        if len(chosen) != len(heads):
            raise ValueError("duplicate heads")
        bad = [(layer, h) for layer, h in chosen if layer < 0 or not 0 <= h < num_heads]
        if bad:
            raise ValueError(f"head indices out of range (num_heads={num_heads}): {bad[:5]}")
        k = len(chosen)
        self.heads: list[tuple[int, int]] = chosen
        self.num_heads = int(num_heads)
        self.head_dim = int(head_dim)
        order = sorted(range(k), key=lambda i: tuple(heads[i]))  # map caller order → sorted order
        g = torch.Generator().manual_seed(seed)
        if directions is not None:
            shape = tuple(directions.shape)
            if len(shape) != 3 or shape[0] != k or shape[2] != head_dim or not 1 <= shape[1] <= head_dim:
                raise ValueError(f"directions must be ({k}, K, {head_dim}) with 1 ≤ K ≤ {head_dim}, got {shape}")
            dirs = directions.detach().float()[torch.tensor(order)].clone()
            self.register_buffer("directions", dirs)
            self.beta = nn.Parameter(torch.randn(k, shape[1], generator=g) * init_std)
        else:
            self.register_buffer("directions", None)
            self.beta = None
        self.b = nn.Parameter(torch.randn(k, head_dim, generator=g) * init_std)

    @property
    def mode(self) -> str:
        return "restorelcc" if self.directions is not None else "bias"

    @property
    def layers(self) -> list[int]:
        return sorted({layer for layer, _ in self.heads})

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def constants(self) -> torch.Tensor:
        """(k, d) fp32: every chosen head's constant c_j = Σ_i β_{j,i} v_{j,i} + b_j."""
        if self.directions is None:
            return self.b
        return torch.einsum("ki,kid->kd", self.beta, self.directions) + self.b

    def constant(self, i: int) -> torch.Tensor:
        return self.constants()[i]

    def layer_vector(self, layer: int, consts: torch.Tensor | None = None) -> torch.Tensor | None:
        """(H·d,) vector for ``layer``'s o_proj input: chosen heads' constants, zeros elsewhere."""
        rows = [j for j, (lay, _) in enumerate(self.heads) if lay == layer]
        if not rows:
            return None
        c = self.constants() if consts is None else consts
        cols = torch.tensor([self.heads[j][1] for j in rows], device=c.device)
        full = c.new_zeros(self.num_heads, self.head_dim)
        full = full.index_copy(0, cols, c[torch.tensor(rows, device=c.device)])
        return full.reshape(-1)

    def extra_repr(self) -> str:
        return f"mode={self.mode}, heads={len(self.heads)}, head_dim={self.head_dim}"


def check_compatible(adapter: DecoderAdapter, offsets: HeadOffsets) -> None:
    info = adapter.info
    if (info.num_heads, info.head_dim) != (offsets.num_heads, offsets.head_dim):
        raise ValueError(
            f"offsets are for {offsets.num_heads} heads × {offsets.head_dim}, "
            f"model has {info.num_heads} × {info.head_dim}"
        )
    too_deep = [layer for layer in offsets.layers if layer >= info.num_layers]
    if too_deep:
        raise ValueError(f"offsets name layer {too_deep[0]} but the model has {info.num_layers} layers")


@contextmanager
def inject(adapter: DecoderAdapter, offsets: HeadOffsets) -> Iterator[HeadOffsets]:
    """Add each chosen head's constant to its slice of the o_proj input at every position.

    Constants are recomputed on every forward, so gradients reach β and b. Hooks are always removed.
    """
    check_compatible(adapter, offsets)

    def make_hook(layer: int):
        def hook(_module: nn.Module, args: tuple) -> tuple:
            x = args[0]
            vec = offsets.layer_vector(layer).to(device=x.device, dtype=x.dtype)
            return (x + vec, *args[1:])

        return hook

    handles = []
    try:
        for layer in offsets.layers:
            handles.append(adapter.o_proj(layer).register_forward_pre_hook(make_hook(layer)))
        yield offsets
    finally:
        for h in handles:
            h.remove()
