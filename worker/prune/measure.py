"""Measured sparsity of the pruned Linears (every Linear inside the decoder layers)."""

from __future__ import annotations

from typing import Any

import torch

from worker.model.arch import DecoderAdapter


def check_nm(weight: torch.Tensor, n: int, m: int) -> bool:
    """True when every run of ``m`` consecutive inputs of every row has at most ``n`` non-zeros.

    False when ``m`` does not divide the input width (the pattern cannot hold).
    """
    rows, cols = weight.shape
    if cols % m:
        return False
    nonzero = (weight.detach() != 0).reshape(rows, cols // m, m).sum(dim=-1)
    return bool((nonzero <= n).all())


def measure_sparsity(adapter: DecoderAdapter, nm: tuple[int, int] | None = None) -> dict[str, Any]:
    """Fraction of zeros per pruned Linear (full names) and overall; with ``nm``, whether each holds it."""
    modules: dict[str, float] = {}
    zeros = total = 0
    nm_ok: dict[str, bool] = {}
    for name, lin in adapter.named_prunable_linears():
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


def zero_masks(adapter: DecoderAdapter) -> dict[str, torch.Tensor]:
    """The zero pattern (bool, True = zero, on the CPU) of every pruned Linear's weight, by full name."""
    return {name: (lin.weight.detach() == 0).cpu() for name, lin in adapter.named_prunable_linears()}
