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
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from app.methods import SCHEDULES
from worker.errors import Cancelled, TrainingDiverged
from worker.model.data import Batch
from worker.restore.objective import CompletionObjective, response_loss_sum  # noqa: F401 (re-exported)

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


@dataclass
class TrainState:
    """Everything a training run needs to continue exactly where it stopped, at an optimizer-step boundary:
    the trained values, AdamW's and the schedule's state, the random states and the position in the data."""

    step: int  # optimizer steps taken
    epoch: int  # the epoch in progress
    groups_done: int  # step groups of that epoch already consumed (those without response tokens included)
    curve: list[float]
    tokens: int
    seconds: float  # training time so far, over every run
    params: list[torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    epoch_generator: torch.Tensor  # the shuffling generator's state at the start of ``epoch``
    rng: torch.Tensor  # torch's global CPU random state
    cuda_rng: list[torch.Tensor] = field(default_factory=list)
    finished: bool = False  # the run's last step: resuming from here trains no more
    grad_norms: list[float] = field(default_factory=list)  # every step's gradient norm before clipping


@dataclass
class TrainControl:
    """How the runner steers a method's training: progress, stop requests, and checkpoints to resume from and to
    offer (:func:`train_parameters`' keyword arguments of the same names)."""

    progress: TrainProgress | None = None
    should_stop: Callable[[], bool] | None = None
    resume: TrainState | None = None
    save: SaveHook | None = None
    objective: Any = None  # worker.restore.objective.Objective; None: the completion loss (sft)
    max_grad_norm: float | None = None  # restoration.max_grad_norm

    def options(self) -> dict[str, Any]:
        return {"progress": self.progress, "should_stop": self.should_stop, "resume": self.resume, "save": self.save,
                "objective": self.objective, "max_grad_norm": self.max_grad_norm}


# Called after every optimizer step with a way to take the state (and again with force=True when the run stops or
# ends): the caller decides whether this step is worth a checkpoint.
SaveHook = Callable[[int, Callable[[], TrainState], bool], None]


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
    checkpoint_every: int = 1,
    resume: TrainState | None = None,
    save: SaveHook | None = None,
    objective: Any = None,
    max_grad_norm: float | None = None,
) -> dict[str, Any]:
    """The shared loop: AdamW on ``params`` against ``objective`` (worker.restore.objective; default: the
    completion-only loss of ``model``).

    The caller freezes everything else and installs whatever makes ``params`` part of the forward pass
    (hooks, adapter layers). ``schedule`` and ``warmup_steps`` shape the learning rate (:func:`lr_scheduler`).
    ``batches``: a list of Batch (reshuffled each epoch, seeded) or a function
    epoch → iterable of Batch (its ``len``, when it has one, sizes the progress total). With
    ``max_steps`` epochs repeat until that many optimizer steps.

    ``resume`` (a :class:`TrainState` taken by ``save``) continues a run exactly: the same parameters, optimizer
    steps and batches follow as if it had never stopped. ``save`` is offered the state after every step.
    ``should_stop()`` is asked every ``checkpoint_every`` steps; when it answers True the state is offered to
    ``save`` (forced) and Cancelled is raised.

    ``max_grad_norm`` clips the gradient's global L2 norm over ``params`` before each optimizer step.

    Returns ``{"loss_curve", "grad_norm_curve", "clipped_steps", "steps", "epochs", "seconds", "tokens",
    "trainable_params"}``; the loss curve holds the mean response-token loss of every optimizer step, the norm curve
    its gradient's norm before clipping.
    """
    if grad_accum < 1 or epochs < 1:
        raise ValueError("epochs and grad_accum must be at least 1")
    params = list(params)
    if not params:
        raise ValueError("nothing to train")
    if objective is None:
        objective = CompletionObjective()
    device = next(model.parameters()).device
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    total = _total_steps(batches, epochs, grad_accum, max_steps)
    sched = lr_scheduler(opt, schedule, warmup_steps, total)
    run = _Run(params, opt, sched, gen)
    if resume is not None:
        run.load(resume)
    t0 = time.monotonic() - run.seconds
    steps_before = len(run.curve)

    def state() -> TrainState:
        return run.state(time.monotonic() - t0)

    try:
        with torch.enable_grad():
            while not run.finished:
                before, resumed_at = len(run.curve), run.groups_done
                gen.set_state(run.epoch_generator)
                for k, group in enumerate(_steps(batches, run.epoch, gen, grad_accum)):
                    if k < run.groups_done:  # consumed before the run stopped
                        continue
                    run.groups_done = k + 1
                    group = [b.to(device) for b in group]
                    n_tok = sum(objective.tokens(b) for b in group)
                    if n_tok == 0:
                        continue
                    opt.zero_grad(set_to_none=True)
                    step_loss = step_gradients(model, params, group, n_tok, objective)
                    norm = _checked_norm(len(run.curve) + 1, step_loss, params, lr)
                    if max_grad_norm is not None and norm > max_grad_norm:
                        torch.nn.utils.clip_grads_with_norm_(params, max_grad_norm, torch.tensor(norm))
                    opt.step()
                    sched.step()
                    run.tokens += n_tok
                    run.curve.append(step_loss)
                    run.grad_norms.append(norm)
                    if progress is not None:
                        progress(len(run.curve), total, step_loss)
                    if max_steps is not None and len(run.curve) >= max_steps:
                        run.finished = True
                        break
                    if save is not None:
                        save(len(run.curve), state, False)
                    if should_stop is not None and len(run.curve) % max(1, checkpoint_every) == 0 and should_stop():
                        if save is not None:
                            save(len(run.curve), state, True)
                        raise Cancelled("cancelled during training")
                if run.finished:
                    break
                if len(run.curve) == before and resumed_at == 0:
                    raise ValueError("no training batches with target tokens")
                run.next_epoch()
                if max_steps is None and run.epoch >= epochs:
                    run.finished = True
            if save is not None and len(run.curve) > steps_before:  # nothing new when resumed from the end
                save(len(run.curve), state, True)
    finally:
        opt.zero_grad(set_to_none=True)
    return {
        "loss_curve": run.curve,
        "grad_norm_curve": run.grad_norms,
        "clipped_steps": sum(n > max_grad_norm for n in run.grad_norms) if max_grad_norm is not None else 0,
        "steps": len(run.curve),
        "epochs": run.epoch + (1 if max_steps is not None else 0),
        "seconds": time.monotonic() - t0,
        "tokens": run.tokens,
        "trainable_params": sum(p.numel() for p in params),
    }


def step_gradients(model: nn.Module, params: Sequence[nn.Parameter], group: Sequence[Batch], n_tok: int,
                   objective: Any) -> float:
    """Leave in ``params``' gradients the step's mean loss over its ``n_tok`` target tokens; returns that loss.

    The backward runs on each micro-batch's summed loss, every token's gradient at its own size, and the trained
    (float32) parameters' gradients are divided by the token count afterwards: divided before the backward, a float16
    model's activation gradients underflow (5% off the float32 gradient at 5k tokens a step, 37% at 80k; summed,
    0.1%)."""
    step_loss = 0.0
    for b in group:
        loss_sum, _ = objective.loss_sum(model, b)
        loss_sum.backward()
        step_loss += float(loss_sum.detach()) / n_tok
    for p in params:
        if p.grad is not None:
            p.grad.div_(n_tok)
    return step_loss


def _checked_norm(step: int, loss: float, params: Sequence[nn.Parameter], lr: float) -> float:
    """The global L2 norm of the step's gradients; refuses a step whose loss or gradients are not finite, before the
    optimizer applies it (AdamW would spread a NaN into every trained value, and every later checkpoint would hold
    it)."""
    grads = [p.grad for p in params if p.grad is not None]
    norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
    if math.isfinite(loss) and math.isfinite(norm):
        return norm
    what = "loss" if not math.isfinite(loss) else "gradient"
    raise TrainingDiverged(
        f"training diverged at step {step}: the {what} is {loss if what == 'loss' else norm} (restoration.lr {lr:g}); "
        "lower restoration.lr, or train in bfloat16 or float32 (model.dtype) where float16 overflows",
        field="restoration.lr")


class _Run:
    """The loop's position and what it has produced so far; taken and restored as a :class:`TrainState`."""

    def __init__(self, params: list[nn.Parameter], opt: torch.optim.Optimizer,
                 sched: torch.optim.lr_scheduler.LRScheduler, gen: torch.Generator):
        self.params, self.opt, self.sched, self.gen = params, opt, sched, gen
        self.epoch = 0
        self.groups_done = 0
        self.curve: list[float] = []
        self.grad_norms: list[float] = []
        self.tokens = 0
        self.seconds = 0.0
        self.finished = False
        self.epoch_generator = gen.get_state()

    def next_epoch(self) -> None:
        self.epoch += 1
        self.groups_done = 0
        self.epoch_generator = self.gen.get_state()

    def state(self, seconds: float) -> TrainState:
        return TrainState(
            step=len(self.curve), epoch=self.epoch, groups_done=self.groups_done, curve=list(self.curve),
            tokens=self.tokens, seconds=seconds, params=[p.detach().cpu().clone() for p in self.params],
            optimizer=_cpu(self.opt.state_dict()), scheduler=dict(self.sched.state_dict()),
            epoch_generator=self.epoch_generator.clone(), rng=torch.get_rng_state(),
            cuda_rng=list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
            finished=self.finished, grad_norms=list(self.grad_norms),
        )

    @torch.no_grad()
    def load(self, s: TrainState) -> None:
        if len(s.params) != len(self.params) or any(a.shape != b.shape for a, b in zip(s.params, self.params,
                                                                                       strict=True)):
            raise ValueError("the checkpoint's trained parameters do not match this run's")
        for p, saved in zip(self.params, s.params, strict=True):
            p.copy_(saved.to(p.device, p.dtype))
        self.opt.load_state_dict(s.optimizer)
        self.sched.load_state_dict(s.scheduler)
        self.epoch, self.groups_done, self.curve = s.epoch, s.groups_done, list(s.curve)
        self.grad_norms = list(s.grad_norms)
        self.tokens, self.seconds, self.finished = s.tokens, s.seconds, s.finished
        self.epoch_generator = s.epoch_generator.clone()
        torch.set_rng_state(s.rng)
        if s.cuda_rng and torch.cuda.is_available():
            # A job may resume on a worker that sees fewer GPUs (a requeue, a hand-off): set those it has.
            for index, state in enumerate(s.cuda_rng[: torch.cuda.device_count()]):
                torch.cuda.set_rng_state(state, index)


def _cpu(obj: Any) -> Any:
    """A copy of an optimizer state dict with every tensor on the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_cpu(v) for v in obj]
    return obj
