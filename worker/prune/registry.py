"""Pruning methods by name: what statistics each collects and how it prunes one Linear (what each needs is in the
catalogue, app.methods)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from app.methods import PRUNING_METHODS
from worker.prune.magnitude import prune_magnitude
from worker.prune.sparsegpt import HessianAccumulator, prune_sparsegpt
from worker.prune.wanda import ColumnNormAccumulator, prune_wanda


class Accumulator(Protocol):
    tokens: int

    def add(self, x: torch.Tensor) -> None:
        """Add (tokens, in_features) inputs of one Linear."""

    def finite(self) -> bool:
        """Whether every statistic is finite (False: a NaN or infinite input was added)."""


@dataclass(frozen=True)
class PruneMethod:
    name: str
    # Statistics collector for one Linear (None: the method needs no data).
    new_stats: Callable[[nn.Linear], Accumulator] | None
    # Prune one Linear in place: (linear, stats or None, sparsity, (n, m) or None) → keep mask.
    apply: Callable[[nn.Linear, Any, float, tuple[int, int] | None], torch.Tensor]
    guarantee: str

    @property
    def needs_calibration(self) -> bool:
        return PRUNING_METHODS[self.name].needs_calibration


METHODS: dict[str, PruneMethod] = {
    "magnitude": PruneMethod(
        name="magnitude",
        new_stats=None,
        apply=lambda lin, _stats, sparsity, nm: prune_magnitude(lin, sparsity, nm),
        guarantee="unstructured: exact count per tensor; N:M: exact pattern",
    ),
    "wanda": PruneMethod(
        name="wanda",
        new_stats=lambda lin: ColumnNormAccumulator(lin.in_features, lin.weight.device),
        apply=lambda lin, stats, sparsity, nm: prune_wanda(lin, stats, sparsity, nm),
        guarantee="unstructured: exact count per output row; N:M: exact pattern",
    ),
    "sparsegpt": PruneMethod(
        name="sparsegpt",
        new_stats=lambda lin: HessianAccumulator(lin.in_features, lin.weight.device),
        apply=lambda lin, stats, sparsity, nm: prune_sparsegpt(lin, stats, sparsity, nm),
        guarantee="unstructured: exact count per block of 128 input columns; N:M: exact pattern",
    ),
}


def get_method(name: str) -> PruneMethod:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown pruning method {name!r}; known: {', '.join(METHODS)}") from None
