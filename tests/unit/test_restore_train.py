"""Learning the offsets: the response loss falls, only β and b move, the model is left as it was."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.tiny import instruction_batches, instruction_rows, make_model, make_tokenizer, prune_half_at_random
from worker.errors import Cancelled
from worker.model.arch import DecoderAdapter
from worker.model.data import encode_pair, pad_batch
from worker.restore.offsets.heads import inject
from worker.restore.offsets.merge import merge_into_o_proj
from worker.restore.offsets.train import train_offsets
from worker.restore.restorelcc.capture import build_probe_inputs
from worker.restore.restorelcc.pairs import choose_negatives
from worker.restore.restorelcc.steps import (
    capture_dense,
    capture_pruned,
    choose_heads,
    extract_components,
    make_offsets,
    score_heads,
)
from worker.restore.train import lr_scheduler, response_loss_sum


def _prune(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    return prune_half_at_random(copy.deepcopy(model), seed)


_batches = instruction_batches


def _mean_loss(model, adapter, offsets, batches) -> float:
    total, count = 0.0, 0
    with torch.no_grad(), inject(adapter, offsets):
        for b in batches:
            s, n = response_loss_sum(model, b)
            total, count = total + float(s), count + n
    return total / count


@pytest.fixture(scope="module")
def setup():
    dense = make_model("gqa")
    pruned = _prune(dense)
    tok = make_tokenizer()
    pairs = [(r["prompt"], r["response"]) for r in instruction_rows(20)]
    probe = build_probe_inputs(tok, pairs, max_len=64, batch_size=8)
    dense_caps = capture_dense(dense, DecoderAdapter(dense), probe)
    adapter = DecoderAdapter(pruned)
    comps = extract_components(dense_caps, capture_pruned(pruned, adapter, probe))
    return pruned, adapter, comps


def test_training_lowers_loss_and_touches_only_offsets(setup):
    pruned, adapter, comps = setup
    info = adapter.info
    heads = [(0, 1), (1, 0), (1, 4), (2, 2), (2, 5)]
    offsets = make_offsets(heads, info, comps, seed=0)
    assert offsets.num_trainable() == 2 * len(heads) * info.head_dim
    pruned.model.embed_tokens.weight.requires_grad_(False)  # a mixed pattern that must come back
    flags = {n: p.requires_grad for n, p in pruned.named_parameters()}
    weights = {n: p.detach().clone() for n, p in pruned.state_dict().items()}
    beta0, b0, dirs0 = offsets.beta.detach().clone(), offsets.b.detach().clone(), offsets.directions.clone()
    batches = _batches()
    before = _mean_loss(pruned, adapter, offsets, batches)
    pruned.train()
    seen = []
    stats = train_offsets(pruned, adapter, offsets, batches, lr=5e-2, max_steps=12, seed=0,
                          progress=lambda s, t, loss: seen.append((s, t)))
    assert pruned.training
    pruned.eval()
    after = _mean_loss(pruned, adapter, offsets, batches)
    assert after < before - 0.05
    assert stats["steps"] == 12 and len(stats["loss_curve"]) == 12
    assert stats["trainable_params"] == offsets.num_trainable()
    assert seen[-1] == (12, 12)
    assert not torch.equal(offsets.beta, beta0) and not torch.equal(offsets.b, b0)
    assert torch.equal(offsets.directions, dirs0)
    for n, t in pruned.state_dict().items():
        assert torch.equal(t, weights[n]), n
    assert {n: p.requires_grad for n, p in pruned.named_parameters()} == flags
    assert all(p.grad is None for p in pruned.parameters())
    assert not any(adapter.o_proj(i)._forward_pre_hooks for i in range(info.num_layers))


def test_bias_only_training_and_epochs(setup):
    pruned, adapter, _ = setup
    offsets = make_offsets([(0, 0), (2, 3)], adapter.info, None, seed=1)
    assert offsets.mode == "bias" and offsets.num_trainable() == 2 * adapter.info.head_dim
    stats = train_offsets(pruned, adapter, offsets, _batches(8, 2), lr=1e-2, epochs=2, grad_accum=2)
    assert stats["steps"] == 4 and stats["epochs"] == 2


def test_top_directions_learn_beta_over_the_strongest_lost_directions_only(setup):
    pruned, adapter, comps = setup
    heads = [(0, 1), (1, 2)]
    full = make_offsets(heads, adapter.info, comps, seed=4)
    top = make_offsets(heads, adapter.info, comps, seed=4, directions=3)
    d = adapter.info.head_dim
    assert top.num_trainable() == len(heads) * (3 + d) < full.num_trainable() == len(heads) * 2 * d
    assert torch.equal(top.directions, full.directions[:, :3])  # SVD order: the largest singular values first
    with torch.no_grad():  # c = Σ_{i≤3} β_i v_i + b
        top.beta.copy_(torch.randn(top.beta.shape))
        expected = torch.stack([top.beta[j] @ top.directions[j] for j in range(len(heads))]) + top.b
        assert torch.allclose(top.constants(), expected, atol=1e-6)
    stats = train_offsets(pruned, adapter, top, _batches(8, 2), lr=1e-2, max_steps=2, seed=9)
    assert stats["trainable_params"] == top.num_trainable()
    with pytest.raises(ValueError, match=f"1..{d}"):
        make_offsets(heads, adapter.info, comps, directions=d + 1)
    half = make_offsets(heads, adapter.info, comps, directions=0.5)  # a fraction of head_dim
    assert half.directions.shape[1] == d // 2 and make_offsets(heads, adapter.info, comps, directions=0.01
                                                                ).directions.shape[1] == 1


def test_seeded_training_is_reproducible(setup):
    pruned, adapter, comps = setup
    runs = []
    for _ in range(2):
        offsets = make_offsets([(1, 2)], adapter.info, comps, seed=4)
        train_offsets(pruned, adapter, offsets, _batches(8, 2), lr=1e-2, max_steps=3, seed=9)
        runs.append(offsets.constants().detach())
    assert torch.equal(runs[0], runs[1])


def _lrs(schedule: str, warmup: int, total: int) -> list[float]:
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = lr_scheduler(opt, schedule, warmup, total)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_lr_schedules_warm_up_then_hold_or_decay():
    assert _lrs("constant", 0, 5) == [1.0] * 5
    assert _lrs("constant", 2, 5) == [0.0, 0.5, 1.0, 1.0, 1.0]
    linear = _lrs("linear", 0, 4)
    assert linear == pytest.approx([1.0, 0.75, 0.5, 0.25])
    cosine = _lrs("cosine", 2, 10)
    assert cosine[:3] == pytest.approx([0.0, 0.5, 1.0])
    assert all(a > b for a, b in zip(cosine[2:], cosine[3:], strict=False)) and cosine[-1] < 0.05
    with pytest.raises(ValueError, match="known number of steps"):
        _lrs("cosine", 0, 0)
    with pytest.raises(ValueError, match="unknown lr schedule"):
        _lrs("step", 0, 3)


def test_schedule_reaches_the_optimizer(setup):
    """One step at the start of a warm-up has lr 0, so nothing moves; without warm-up the same step does."""
    pruned, adapter, comps = setup
    moved = {}
    for warmup in (0, 3):
        offsets = make_offsets([(1, 2)], adapter.info, comps, seed=4)
        before = offsets.constants().detach().clone()
        train_offsets(pruned, adapter, offsets, _batches(8, 2), lr=1e-2, max_steps=1, seed=9,
                      schedule="constant", warmup_steps=warmup)
        moved[warmup] = not torch.equal(before, offsets.constants().detach())
    assert moved == {0: True, 3: False}


def test_should_stop_cancels_and_restores_state(setup):
    pruned, adapter, comps = setup
    offsets = make_offsets([(1, 2)], adapter.info, comps)
    with pytest.raises(Cancelled):
        train_offsets(pruned, adapter, offsets, _batches(8, 2), max_steps=50, should_stop=lambda: True,
                      checkpoint_every=2)
    assert all(p.requires_grad for n, p in pruned.named_parameters() if "embed_tokens" not in n)
    assert not any(adapter.o_proj(i)._forward_pre_hooks for i in range(adapter.info.num_layers))


def test_steps_in_pipeline_order():
    """The documented call order: negatives, probe inputs, captures, SVD, probes, heads, train, merge."""
    tok = make_tokenizer()
    pairs = [(r["prompt"], r["response"]) for r in instruction_rows(16)]
    negatives, backend = choose_negatives([r for _, r in pairs], backend="tfidf")
    probe = build_probe_inputs(tok, pairs, max_len=64, batch_size=8, negatives=negatives)
    model = make_model("llama")
    adapter = DecoderAdapter(model)
    dense = capture_dense(model, adapter, probe)
    assert dense.positive.shape == dense.negative.shape == dense.prompt.shape == (16, 2, 4, 16)
    pruned = _prune(model)
    del model
    adapter = DecoderAdapter(pruned)
    zp = capture_pruned(pruned, adapter, probe)
    comps = extract_components(dense, zp)
    result = score_heads(dense, zp, comps, k=4, seed=0)
    assert result.accuracy.shape == (2, 4) and ((result.accuracy >= 0) & (result.accuracy <= 1)).all()
    heads = choose_heads(result, adapter.info, 0.25, "probe", seed=0)
    assert len(heads) == 2
    rand = choose_heads(None, adapter.info, 3, "random", seed=0)
    assert len(rand) == 3 and rand == choose_heads(None, adapter.info, 3, "random", seed=0)
    offsets = make_offsets(heads, adapter.info, comps)
    train_offsets(pruned, adapter, offsets, _batches(8, 4), lr=1e-2, max_steps=2)
    batch = _batches(4, 4)[0]
    with torch.no_grad(), inject(adapter, offsets):
        hooked = pruned(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    merged = merge_into_o_proj(pruned, adapter, offsets)
    with torch.no_grad():
        out = merged(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    assert (out - hooked).abs().max() <= 1e-5
    assert backend == "tfidf"


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_response_loss_uses_only_response_positions_exactly(kind):
    """Logits computed only where a response token is predicted give the full-logit loss exactly."""
    import torch.nn.functional as F

    from worker.model.data import IGNORE
    from worker.restore.train import response_loss_sum

    model, tok = make_model(kind), make_tokenizer()
    enc = [encode_pair(tok, r["prompt"], r["response"], 64) for r in instruction_rows(5)]
    batch = pad_batch([e[0] for e in enc], 1, labels=[e[1] for e in enc])
    with torch.no_grad():
        loss, n = response_loss_sum(model, batch)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    target = batch.labels[:, 1:]
    keep = target != IGNORE
    ref = F.cross_entropy(logits[:, :-1][keep].float(), target[keep], reduction="sum")
    assert n == int(keep.sum()) > 0
    assert torch.allclose(loss, ref, rtol=1e-6, atol=1e-5)


def test_length_grouped_batches_cover_every_sample_once_with_less_padding():
    from worker.model.data import shuffled_batches

    lengths = [int(x) for x in torch.randint(5, 256, (403,), generator=torch.Generator().manual_seed(1))]

    def epoch(group: bool, seed: int) -> list[list[int]]:
        return shuffled_batches(lengths, 8, torch.Generator().manual_seed(seed), group_by_length=group,
                                group_batches=10)

    def padded(batches: list[list[int]]) -> int:
        return sum(len(b) * max(lengths[i] for i in b) for b in batches)

    plain, grouped = epoch(False, 0), epoch(True, 0)
    for batches in (plain, grouped):
        assert sorted(i for b in batches for i in b) == list(range(403))
        assert all(1 <= len(b) <= 8 for b in batches)
    assert padded(grouped) < 0.8 * padded(plain)
    assert grouped == epoch(True, 0) and grouped != epoch(True, 1)  # seeded
    # the batch order is shuffled: not simply longest first within each group of 10 batches
    firsts = [max(lengths[i] for i in b) for b in grouped[:10]]
    assert firsts != sorted(firsts, reverse=True)
