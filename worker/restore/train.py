"""Learn the head offsets: completion-only next-token loss, AdamW on the offsets alone.

Every model weight is frozen (``requires_grad`` False, restored afterwards) and the model runs in eval
mode (no dropout); only β and b receive gradients. Token losses of the micro-batches of one optimizer
step are summed and divided by the step's response-token count, so gradient accumulation is exact.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from worker.errors import Cancelled
from worker.model.arch import DecoderAdapter
from worker.model.data import IGNORE, Batch
from worker.restore.heads import HeadOffsets, inject

TrainProgress = Callable[[int, int, float], None]  # (step, total steps or 0 when unknown, step loss)
BatchSource = Sequence[Batch] | Callable[[int], Iterable[Batch]]  # a list, or epoch → batches


@contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """All parameters frozen and eval mode inside; both restored on exit."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        model.eval()
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


def response_loss_sum(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, int]:
    """(sum of next-token cross-entropy over response tokens, number of those tokens)."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    target = batch.labels[:, 1:]
    keep = target != IGNORE
    n = int(keep.sum())
    if n == 0:
        return logits.new_zeros((), dtype=torch.float32), 0
    picked = logits[:, :-1][keep].float()
    return F.cross_entropy(picked, target[keep], reduction="sum"), n


def _epoch_batches(source: BatchSource, epoch: int, gen: torch.Generator) -> Iterator[Batch]:
    if callable(source):
        yield from source(epoch)
        return
    for i in torch.randperm(len(source), generator=gen).tolist():
        yield source[i]


def _steps(source: BatchSource, epoch: int, gen: torch.Generator, grad_accum: int) -> Iterator[list[Batch]]:
    group: list[Batch] = []
    for batch in _epoch_batches(source, epoch, gen):
        group.append(batch)
        if len(group) == grad_accum:
            yield group
            group = []
    if group:
        yield group


def train_offsets(
    model: nn.Module,
    adapter: DecoderAdapter,
    offsets: HeadOffsets,
    batches: BatchSource,
    *,
    lr: float = 1e-2,
    weight_decay: float = 0.0,
    epochs: int = 1,
    max_steps: int | None = None,
    grad_accum: int = 1,
    seed: int = 0,
    progress: TrainProgress | None = None,
    should_stop: Callable[[], bool] | None = None,
    checkpoint_every: int = 5,
) -> dict[str, Any]:
    """Train ``offsets`` in place. ``batches``: a list of Batch (reshuffled each epoch, seeded) or a
    function epoch → iterable of Batch. With ``max_steps`` epochs repeat until that many optimizer steps.

    Returns ``{"loss_curve", "steps", "epochs", "seconds", "tokens", "trainable_params"}``; the loss curve
    holds the mean response-token loss of every optimizer step. Raises Cancelled when ``should_stop()``.
    """
    if grad_accum < 1 or epochs < 1:
        raise ValueError("epochs and grad_accum must be at least 1")
    device = next(model.parameters()).device
    offsets.to(device)
    params = [p for p in offsets.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    if max_steps is not None:
        total = max_steps
    elif not callable(batches):
        total = epochs * math.ceil(len(batches) / grad_accum)
    else:
        total = 0
    curve: list[float] = []
    tokens = 0
    epoch = 0
    t0 = time.monotonic()
    with frozen(model), inject(adapter, offsets), torch.enable_grad():
        offsets.train()
        done = False
        while not done:
            before = len(curve)
            for group in _steps(batches, epoch, gen, grad_accum):
                group = [b.to(device) for b in group]
                n_tok = sum(int((b.labels[:, 1:] != IGNORE).sum()) for b in group)
                if n_tok == 0:
                    continue
                opt.zero_grad(set_to_none=True)
                step_loss = 0.0
                for b in group:
                    loss_sum, _ = response_loss_sum(model, b)
                    (loss_sum / n_tok).backward()
                    step_loss += float(loss_sum.detach()) / n_tok
                opt.step()
                tokens += n_tok
                curve.append(step_loss)
                if progress is not None:
                    progress(len(curve), total, step_loss)
                if should_stop is not None and len(curve) % max(1, checkpoint_every) == 0 and should_stop():
                    raise Cancelled("cancelled during training")
                if max_steps is not None and len(curve) >= max_steps:
                    done = True
                    break
            epoch += 1
            if len(curve) == before and not done:
                raise ValueError("no training batches with response tokens")
            if max_steps is None and epoch >= epochs:
                done = True
    opt.zero_grad(set_to_none=True)
    offsets.eval()
    return {
        "loss_curve": curve,
        "steps": len(curve),
        "epochs": epoch,
        "seconds": time.monotonic() - t0,
        "tokens": tokens,
        "trainable_params": offsets.num_trainable(),
    }
