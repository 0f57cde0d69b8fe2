"""Measured sparsity of the pruned Linears (every Linear inside the decoder layers)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

from worker.model.arch import DecoderAdapter

# A streamed model's layer is in memory only inside ``layer_scope(layer)`` (worker.model.streaming).
LayerScope = Callable[[int], AbstractContextManager[Any]]


def each_linear(adapter: DecoderAdapter, layer_scope: LayerScope | None = None
                ) -> Iterator[tuple[str, torch.nn.Linear]]:
    """(full name, Linear) of every pruned Linear, layer by layer, each layer inside ``layer_scope``."""
    prefix = adapter._layers_prefix()
    for idx in range(len(adapter.layers)):
        with layer_scope(idx) if layer_scope is not None else nullcontext():
            for name, lin in adapter.prunable_linears(idx).items():
                yield f"{prefix}.{idx}.{name}", lin


def check_nm(weight: torch.Tensor, n: int, m: int) -> bool:
    """True when every run of ``m`` consecutive inputs of every row has at most ``n`` non-zeros.

    False when ``m`` does not divide the input width (the pattern cannot hold).
    """
    rows, cols = weight.shape
    if cols % m:
        return False
    nonzero = (weight.detach() != 0).reshape(rows, cols // m, m).sum(dim=-1)
    return bool((nonzero <= n).all())


def measure_sparsity(adapter: DecoderAdapter, nm: tuple[int, int] | None = None,
                     layer_scope: LayerScope | None = None) -> dict[str, Any]:
    """Fraction of zeros per pruned Linear (full names) and overall; with ``nm``, whether each holds it."""
    modules: dict[str, float] = {}
    zeros = total = 0
    nm_ok: dict[str, bool] = {}
    for name, lin in each_linear(adapter, layer_scope):
        w = lin.weight.detach()
        z = int((w == 0).sum())
        modules[name] = z / w.numel()
        zeros += z
        total += w.numel()
        if nm is not None:
            nm_ok[name] = check_nm(w, *nm)
    out: dict[str, Any] = {
        "overall": zeros / total if total else 0.0,
        "zeros": zeros,
        "total": total,
        "modules": modules,
    }
    if nm is not None:
        out["pattern"] = f"{nm[0]}:{nm[1]}"
        out["nm_ok"] = all(nm_ok.values())
        out["nm_modules"] = nm_ok
    return out


_BITS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor as uint8, eight elements a byte (flattened, zero-padded to a multiple of 8), on the CPU."""
    flat = mask.detach().reshape(-1).cpu()
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, 8).to(torch.uint8) * _BITS).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    n = 1
    for d in shape:
        n *= d
    return (packed.unsqueeze(1) & _BITS).ne(0).reshape(-1)[:n].reshape(shape)


class ZeroMasks(Mapping[str, torch.Tensor]):
    """The zero pattern of every pruned Linear, kept as packed bits: an eighth of a bool tensor's memory (a 7B model's
    masks take 0.8 GB instead of 6.5 GB while the job runs). Reading a name unpacks that one module's mask."""

    def __init__(self, packed: dict[str, tuple[torch.Tensor, torch.Size]]):
        self._packed = packed

    def __getitem__(self, name: str) -> torch.Tensor:
        bits, shape = self._packed[name]
        return unpack_bits(bits, shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self._packed)

    def __len__(self) -> int:
        return len(self._packed)

    def nbytes(self) -> int:
        return sum(bits.numel() for bits, _ in self._packed.values())

    def differs(self, adapter: DecoderAdapter, layer_scope: LayerScope | None = None) -> list[str]:
        """Names of the pruned Linears whose zeros are no longer exactly these (one module at a time)."""
        seen, out = set(), []
        for name, lin in each_linear(adapter, layer_scope):
            seen.add(name)
            bits, shape = self._packed.get(name, (None, None))
            if bits is None or lin.weight.shape != shape or not torch.equal(pack_bits(lin.weight == 0), bits):
                out.append(name)
        return out + [name for name in self._packed if name not in seen]


def zero_masks(adapter: DecoderAdapter, layer_scope: LayerScope | None = None) -> ZeroMasks:
    """The zero pattern (True = zero) of every pruned Linear's weight, by full name."""
    return ZeroMasks({name: (pack_bits(lin.weight.detach() == 0), lin.weight.shape)
                      for name, lin in each_linear(adapter, layer_scope)})
