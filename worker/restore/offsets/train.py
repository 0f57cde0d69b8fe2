"""Train head offsets in place through hooks on ``o_proj`` (the shared loop of worker.restore.train)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from worker.model.arch import DecoderAdapter
from worker.restore.offsets.heads import HeadOffsets, inject
from worker.restore.train import BatchSource, TrainProgress, frozen, train_parameters


def train_offsets(
    model: nn.Module,
    adapter: DecoderAdapter,
    offsets: HeadOffsets,
    batches: BatchSource,
    *,
    lr: float = 1e-2,
    schedule: str = "constant",
    warmup_steps: int = 0,
    weight_decay: float = 0.0,
    epochs: int = 1,
    max_steps: int | None = None,
    grad_accum: int = 1,
    seed: int = 0,
    progress: TrainProgress | None = None,
    should_stop: Callable[[], bool] | None = None,
    checkpoint_every: int = 5,
) -> dict[str, Any]:
    """Train ``offsets`` in place (see :func:`train_parameters` for ``batches`` and the result).

    Every model weight stays frozen; the offsets act through hooks on ``o_proj``, removed afterwards.
    Raises Cancelled when ``should_stop()``.
    """
    offsets.to(next(model.parameters()).device)
    params = [p for p in offsets.parameters() if p.requires_grad]
    with frozen(model), inject(adapter, offsets):
        offsets.train()
        try:
            stats = train_parameters(
                model, params, batches, lr=lr, schedule=schedule, warmup_steps=warmup_steps,
                weight_decay=weight_decay, epochs=epochs, max_steps=max_steps,
                grad_accum=grad_accum, seed=seed, progress=progress, should_stop=should_stop,
                checkpoint_every=checkpoint_every,
            )
        finally:
            offsets.eval()
    stats["trainable_params"] = offsets.num_trainable()
    return stats
