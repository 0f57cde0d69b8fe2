"""Train head offsets in place through hooks on ``o_proj`` (the shared loop of worker.restore.train)."""

from __future__ import annotations

from typing import Any

from torch import nn

from worker.model.arch import DecoderAdapter
from worker.restore.offsets.heads import HeadOffsets, inject
from worker.restore.train import BatchSource, frozen, train_parameters


def train_offsets(
    model: nn.Module,
    adapter: DecoderAdapter,
    offsets: HeadOffsets,
    batches: BatchSource,
    *,
    lr: float = 1e-2,
    **options: Any,
) -> dict[str, Any]:
    """Train ``offsets`` in place; ``options`` are :func:`train_parameters`' (schedule, warmup_steps, weight_decay,
    epochs, max_steps, grad_accum, seed, progress, should_stop, checkpoint_every), as is the result.

    Every model weight stays frozen; the offsets act through hooks on ``o_proj``, removed afterwards.
    Raises Cancelled when ``should_stop()``.
    """
    offsets.to(next(model.parameters()).device)
    params = [p for p in offsets.parameters() if p.requires_grad]
    with frozen(model), inject(adapter, offsets):
        offsets.train()
        try:
            stats = train_parameters(model, params, batches, lr=lr, **options)
        finally:
            offsets.eval()
    stats["trainable_params"] = offsets.num_trainable()
    return stats
