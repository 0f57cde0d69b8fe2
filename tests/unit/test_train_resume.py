"""The training loop stopped at any step and resumed from its saved state ends exactly where an uninterrupted run
ends: the same trained values, loss curve and optimizer state, for lists and epoch sources, with accumulation."""

from __future__ import annotations

import contextlib

import pytest
import torch

from worker.errors import Cancelled, TrainingDiverged
from worker.model.data import Batch
from worker.restore.batches import EpochSource
from worker.restore.objective import CompletionObjective
from worker.restore.train import TrainState, train_parameters
from worker.run.snapshot import pack, unpack


class Tiny(torch.nn.Module):
    """A next-token model small enough to train in milliseconds; ``scale`` is the trained parameter."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(11, 8)
        self.out = torch.nn.Linear(8, 11)
        self.scale = torch.nn.Parameter(torch.ones(8))
        self.dropout = torch.nn.Dropout(0.5)  # random: resumes must restore the random state too

    def forward(self, input_ids, attention_mask=None, use_cache=False, logits_to_keep=None):
        h = self.dropout(self.emb(input_ids) * self.scale)
        logits = self.out(h)
        if logits_to_keep is not None:
            logits = logits[:, logits_to_keep]
        return type("Out", (), {"logits": logits})()


def _batches(n: int = 7) -> list[Batch]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 11, (2, 6), generator=g)
        labels = ids.clone()
        labels[:, :2] = -100
        out.append(Batch(ids, torch.ones_like(ids), labels))
    return out


def _source(kind: str):
    batches = _batches()
    if kind == "list":
        return batches
    return EpochSource(lambda epoch: iter(batches[epoch % 2:] + batches[:epoch % 2]), len(batches) * 2, 2)


def _train(source, stop_at: int | None = None, resume: TrainState | None = None, **kw):
    model = Tiny()
    model.train()  # dropout on: the global random state matters
    saved: list[TrainState] = []

    def save(step, state, force):
        if force:
            saved.append(state())

    steps = {"n": 0}

    def should_stop():
        steps["n"] += 1
        return stop_at is not None and steps["n"] >= stop_at

    torch.manual_seed(5)
    options = dict(lr=0.05, schedule="cosine", warmup_steps=2, max_steps=9, grad_accum=2, seed=3)
    options.update(kw)
    stats = None
    with contextlib.suppress(Cancelled):  # stopped: the state of that step was offered to save
        stats = train_parameters(model, [model.scale], source, save=save, should_stop=should_stop, resume=resume,
                                 **options)
    return model, stats, saved


@pytest.mark.parametrize("kind", ["list", "epochs"])
@pytest.mark.parametrize("stop_at", [1, 4, 8])
def test_a_resumed_run_equals_an_uninterrupted_one(tmp_path, kind, stop_at):
    ref_model, ref, _ = _train(_source(kind))
    _, none, saved = _train(_source(kind), stop_at=stop_at)
    assert none is None and saved[-1].step == stop_at  # stopped, with the state of that step saved
    tensors, skeleton = pack(saved[-1])  # through a checkpoint's packing, as a worker would read it back
    state = unpack(tensors, skeleton)
    model, stats, _ = _train(_source(kind), resume=state)
    assert torch.equal(model.scale, ref_model.scale)
    assert stats["loss_curve"] == ref["loss_curve"] and stats["tokens"] == ref["tokens"]
    assert stats["steps"] == ref["steps"] == 9 and stats["epochs"] == ref["epochs"]


def test_resuming_from_the_end_trains_no_more_and_saves_nothing_new():
    ref_model, ref, saved = _train(_source("list"))
    assert saved[-1].finished and saved[-1].step == 9
    again = []
    model = Tiny()
    stats = train_parameters(model, [model.scale], _source("list"), lr=0.05, max_steps=9, grad_accum=2, seed=3,
                             resume=saved[-1], save=lambda s, st, f: again.append(s),
                             schedule="cosine", warmup_steps=2)
    assert again == [] and stats["loss_curve"] == ref["loss_curve"]
    assert torch.equal(model.scale, ref_model.scale)


def test_epochs_without_max_steps_resume_mid_epoch():
    ref_model, ref, _ = _train(_source("list"), max_steps=None, epochs=3)
    _, _, saved = _train(_source("list"), stop_at=5, max_steps=None, epochs=3)
    assert saved[-1].epoch == 1 and saved[-1].groups_done == 1  # 4 steps an epoch: stopped inside the second
    model, stats, _ = _train(_source("list"), resume=saved[-1], max_steps=None, epochs=3)
    assert torch.equal(model.scale, ref_model.scale) and stats["loss_curve"] == ref["loss_curve"]
    assert stats["epochs"] == ref["epochs"] == 3


def test_a_state_for_other_parameters_is_refused():
    _, _, saved = _train(_source("list"), stop_at=2)
    model = Tiny()
    with pytest.raises(ValueError, match="do not match"):
        train_parameters(model, [model.out.weight], _source("list"), lr=0.1, max_steps=3, resume=saved[-1])


def test_a_state_saved_with_more_gpus_resumes_on_a_worker_with_fewer(monkeypatch):
    """The CUDA random states are per device; a worker that sees fewer GPUs sets those it has, instead of failing
    (torch.cuda.set_rng_state_all indexes a generator per saved state). The CUDA calls are recorded, not run."""
    import dataclasses

    _, ref, _ = _train(_source("list"))
    _, _, saved = _train(_source("list"), stop_at=4)
    state = dataclasses.replace(saved[-1], cuda_rng=[torch.tensor([i], dtype=torch.uint8) for i in range(4)])
    set_states: list[tuple[int, int]] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [])
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device: set_states.append((int(s[0]), device)))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: pytest.fail("indexes every saved device"))
    _, stats, _ = _train(_source("list"), resume=state)
    assert set_states == [(0, 0), (1, 1)]
    assert stats["loss_curve"] == ref["loss_curve"]


class _PoisonedAtStep3(CompletionObjective):
    """Two micro-batches a step: from the fifth call (step 3) the loss, or only its gradient, is not finite."""

    def __init__(self, where: str):
        self.where, self.calls = where, 0

    def loss_sum(self, model, batch):
        loss, n = super().loss_sum(model, batch)
        self.calls += 1
        if self.calls <= 4:
            return loss, n
        if self.where == "loss":
            return loss * float("nan"), n
        loss.register_hook(lambda g: g * float("inf"))  # the value stays finite, its gradient does not
        return loss, n


@pytest.mark.parametrize("where", ["loss", "gradient"])
def test_a_step_that_is_not_finite_stops_training_before_it_changes_anything(where):
    model = Tiny()
    saved: list[int] = []
    with pytest.raises(TrainingDiverged) as err:
        train_parameters(model, [model.scale], _batches(), lr=0.05, max_steps=9, grad_accum=2,
                         objective=_PoisonedAtStep3(where), save=lambda step, state, force: saved.append(step))
    assert (err.value.code, err.value.field) == ("training_diverged", "restoration.lr")
    assert f"diverged at step 3: the {where}" in err.value.message
    assert saved == [1, 2] and bool(torch.isfinite(model.scale).all())


def test_a_float16_models_gradients_do_not_underflow_at_many_tokens_a_step():
    """The step's loss is summed through the backward and only the trained float32 gradients are divided by its
    tokens: divided first, a float16 model's activation gradients underflow (here, a step of ~80k tokens: the
    gradient was 37% off float32's). Compared with the same model in float32 on the same step."""
    from tests.tiny import instruction_batches, make_model
    from worker.model.arch import DecoderAdapter
    from worker.restore.offsets.heads import HeadOffsets, inject
    from worker.restore.train import step_gradients

    group = instruction_batches(8, 4, 64)
    n_tok = 80_000  # what the mean is taken over: the step's tokens (here mostly other micro-batches')
    grads = {}
    for dtype in (torch.float32, torch.float16):
        model = make_model("llama", dtype=dtype)
        offsets = HeadOffsets([(0, 1), (1, 2), (1, 0)], model.config.num_attention_heads, 16, seed=0)
        with inject(DecoderAdapter(model), offsets):
            step_gradients(model, list(offsets.parameters()), group, n_tok, CompletionObjective())
        grads[dtype] = torch.cat([p.grad.flatten() for p in offsets.parameters()])
    ref = grads[torch.float32]
    assert bool((ref != 0).any())
    assert float((grads[torch.float16] - ref).norm() / ref.norm()) < 0.02


class _SpikeAtStep3(CompletionObjective):
    """The completion loss, its gradient multiplied a thousandfold in the third step (two micro-batches a step)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def loss_sum(self, model, batch):
        loss, n = super().loss_sum(model, batch)
        self.calls += 1
        if self.calls in (5, 6):
            loss.register_hook(lambda g: g * 1000.0)
        return loss, n


def test_max_grad_norm_clips_what_the_optimizer_applies_and_the_norms_before_are_reported():
    """Every step's gradient norm before clipping is in the stats; with max_grad_norm the optimizer is handed
    gradients of at most that norm (seen from a step pre-hook), and a spike no longer sets AdamW's second moment."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    applied: list[float] = []
    hook = register_optimizer_step_pre_hook(lambda opt, args, kwargs: applied.append(float(
        torch.nn.utils.get_total_norm([p.grad for g in opt.param_groups for p in g["params"]]))))
    try:
        runs = {}
        for clip in (None, 0.05):
            applied.clear()
            model = Tiny()
            stats = train_parameters(model, [model.scale], _batches(), lr=0.05, max_steps=3, grad_accum=2,
                                     objective=_SpikeAtStep3(), max_grad_norm=clip)
            runs[clip] = (stats, list(applied), model.scale.detach().clone())
    finally:
        hook.remove()
    free, clipped = runs[None], runs[0.05]
    assert free[0]["grad_norm_curve"] == pytest.approx(free[1], rel=1e-6)  # unclipped: what the optimizer saw
    assert free[0]["grad_norm_curve"][2] > 100 * free[0]["grad_norm_curve"][1]  # the spike
    assert free[0]["clipped_steps"] == 0
    assert clipped[0]["grad_norm_curve"][0] == free[0]["grad_norm_curve"][0]  # the same first step, before clipping
    assert clipped[0]["grad_norm_curve"][2] > 100 * clipped[0]["grad_norm_curve"][1]
    assert max(clipped[1]) <= 0.05 * (1 + 1e-5) and clipped[1][2] == pytest.approx(0.05, rel=1e-5)
    assert clipped[0]["clipped_steps"] == sum(n > 0.05 for n in clipped[0]["grad_norm_curve"]) == 3
    assert not torch.equal(clipped[2], free[2])


def test_the_gradient_norms_resume_with_the_run():
    model = Tiny()
    at_3: list[TrainState] = []
    full = train_parameters(model, [model.scale], _batches(), lr=0.05, max_steps=6, max_grad_norm=0.1,
                            save=lambda step, state, force: at_3.append(state()) if step == 3 else None)
    tensors, skeleton = pack(at_3[0])
    second = Tiny()
    resumed = train_parameters(second, [second.scale], _batches(), lr=0.05, max_steps=6, max_grad_norm=0.1,
                               resume=unpack(tensors, skeleton))
    assert resumed["grad_norm_curve"] == full["grad_norm_curve"] and len(full["grad_norm_curve"]) == 6
    assert resumed["clipped_steps"] == full["clipped_steps"]
