"""Learn restoration parameters: completion-only next-token loss, AdamW on those parameters alone.

:func:`train_parameters` is the loop shared by the head offsets (worker.restore.offsets.train) and the LoRA/DoRA
baselines (worker.restore.adapters.peft). Every model weight is frozen (``requires_grad`` False, restored
afterwards) and the model runs in eval mode (no dropout); only the trained parameters receive gradients.
Token losses of the micro-batches of one optimizer step are summed and divided by the step's
response-token count, so gradient accumulation is exact. The learning rate follows a schedule
(``transformers.get_scheduler``: constant, linear or cosine decay to zero, after optional linear warm-up).
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

from app.methods import SCHEDULES
from worker.errors import Cancelled
from worker.model.data import IGNORE, Batch

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
    """(sum of next-token cross-entropy over response tokens, number of those tokens).

    Logits are computed only at positions that predict a response token of some row (``logits_to_keep``),
    which spares the vocabulary projection, and its backward, on prompts and padding.
    """
    target = batch.labels[:, 1:]
    keep = target != IGNORE
    n = int(keep.sum())
    if n == 0:
        return torch.zeros((), dtype=torch.float32, device=batch.input_ids.device), 0
    positions = keep.any(dim=0).nonzero().squeeze(1)
    logits = model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False, logits_to_keep=positions
    ).logits
    picked = logits[keep[:, positions]].float()
    return F.cross_entropy(picked, target[:, positions][keep[:, positions]], reduction="sum"), n


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


def _total_steps(source: BatchSource, epochs: int, grad_accum: int, max_steps: int | None) -> int:
    """Optimizer steps the run will take, or 0 when unknown (a callable source without a length)."""
    if max_steps is not None:
        return max_steps
    if hasattr(source, "__len__"):
        return epochs * math.ceil(len(source) / grad_accum)  # type: ignore[arg-type]
    return 0


def lr_scheduler(opt: torch.optim.Optimizer, schedule: str, warmup_steps: int, total_steps: int
                 ) -> torch.optim.lr_scheduler.LRScheduler:
    """The learning-rate schedule over ``total_steps`` optimizer steps (decays need that total to be known)."""
    from transformers import get_scheduler

    if schedule not in SCHEDULES:
        raise ValueError(f"unknown lr schedule {schedule!r}; expected one of {', '.join(SCHEDULES)}")
    if warmup_steps < 0:
        raise ValueError("warmup_steps must be at least 0")
    if schedule == "constant":
        name = "constant_with_warmup" if warmup_steps else "constant"
    elif total_steps <= 0:
        raise ValueError(f"a {schedule} lr schedule needs a known number of steps (set max_steps)")
    else:
        name = schedule
    return get_scheduler(name, opt, num_warmup_steps=warmup_steps, num_training_steps=max(total_steps, 1))


def train_parameters(
    model: nn.Module,
    params: Sequence[nn.Parameter],
    batches: BatchSource,
    *,
    lr: float,
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
    """The shared loop: AdamW on ``params`` against the completion-only loss of ``model``.

    The caller freezes everything else and installs whatever makes ``params`` part of the forward pass
    (hooks, adapter layers). ``schedule`` and ``warmup_steps`` shape the learning rate (:func:`lr_scheduler`).
    ``batches``: a list of Batch (reshuffled each epoch, seeded) or a function
    epoch → iterable of Batch (its ``len``, when it has one, sizes the progress total). With
    ``max_steps`` epochs repeat until that many optimizer steps.

    Returns ``{"loss_curve", "steps", "epochs", "seconds", "tokens", "trainable_params"}``; the loss curve
    holds the mean response-token loss of every optimizer step. Raises Cancelled when ``should_stop()``.
    """
    if grad_accum < 1 or epochs < 1:
        raise ValueError("epochs and grad_accum must be at least 1")
    params = list(params)
    if not params:
        raise ValueError("nothing to train")
    device = next(model.parameters()).device
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    total = _total_steps(batches, epochs, grad_accum, max_steps)
    sched = lr_scheduler(opt, schedule, warmup_steps, total)
    curve: list[float] = []
    tokens = 0
    epoch = 0
    t0 = time.monotonic()
    try:
        with torch.enable_grad():
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
                    sched.step()
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
    finally:
        opt.zero_grad(set_to_none=True)
    return {
        "loss_curve": curve,
        "steps": len(curve),
        "epochs": epoch,
        "seconds": time.monotonic() - t0,
        "tokens": tokens,
        "trainable_params": sum(p.numel() for p in params),
    }
