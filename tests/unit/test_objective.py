"""The distill objective's maths on a tiny model: the stored dense targets are the dense model's own top-k
log-probabilities, the bucketed KL is the exact KL when k covers the vocabulary (and never above it otherwise), a
mixed objective at weight 1 is the cross-entropy, and distilling moves a pruned model toward the dense one."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from tests.tiny import instruction_rows, make_model, make_tokenizer, prune_half_at_random
from worker.model.data import IGNORE, batch_pad_id, encode_pair, pad_batch
from worker.restore.objective import (
    CompletionObjective,
    DistillObjective,
    bucket_kl,
    capture_dense_targets,
    make_objective,
    target_positions,
)


@pytest.fixture(scope="module")
def setup():
    tok = make_tokenizer()
    pad = batch_pad_id(tok)
    samples = [encode_pair(tok, r["prompt"], r["response"], 64) for r in instruction_rows(10)]
    return make_model("llama", seed=3), samples, pad


def _dense_logp(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)


@pytest.mark.parametrize("tokens", ["response", "all"])
def test_stored_targets_are_the_dense_models_top_k(setup, tokens):
    model, samples, pad = setup
    targets = capture_dense_targets(model, samples, pad, top_k=7, tokens=tokens, batch_size=3)
    assert targets.offsets[-1] == targets.rows and targets.ids.shape == (targets.rows, 7)
    for j, (ids, labels) in enumerate(samples):
        rows = targets.sample_rows(j)
        positions = target_positions(labels, len(ids), tokens)
        assert targets.positions[rows].tolist() == positions
        logp = _dense_logp(model, ids)[positions]  # unbatched, unpadded: batching must not change a target
        top, top_ids = logp.topk(7, dim=-1)
        assert torch.equal(targets.ids[rows].long(), top_ids)
        torch.testing.assert_close(targets.logp[rows].float(), top, atol=2e-3, rtol=1e-3)
        rest = torch.logsumexp(logp.scatter(-1, top_ids, float("-inf")), -1)
        torch.testing.assert_close(targets.rest[rows], rest, atol=1e-4, rtol=1e-4)
        # the k tokens and the rest hold all the probability
        total = torch.logsumexp(torch.cat([targets.logp[rows].float(), targets.rest[rows, None]], -1), -1)
        torch.testing.assert_close(total, torch.zeros_like(total), atol=3e-3, rtol=0)
    if tokens == "all":
        assert targets.rows == sum(len(ids) - 1 for ids, _ in samples)
    else:
        assert targets.rows == sum(sum(x != IGNORE for x in labels[1:]) for _, labels in samples)
    assert targets.nbytes == targets.rows * (7 * 6 + 8) + 8 * (len(samples) + 1)


def test_bucket_kl_is_exact_with_the_whole_vocabulary_and_a_lower_bound_otherwise():
    g = torch.Generator().manual_seed(0)
    dense = torch.randn(5, 40, generator=g).log_softmax(-1)
    student = (torch.randn(5, 40, generator=g) * 2).log_softmax(-1)
    exact = F.kl_div(student, dense, log_target=True, reduction="none").sum(-1)
    ids = dense.topk(40, -1).indices
    full = bucket_kl(dense.gather(-1, ids), torch.full((5,), float("-inf")), student, ids)
    torch.testing.assert_close(full, exact)
    for k in (1, 5, 20):
        top, ids = dense.topk(k, -1)
        rest = dense.scatter(-1, ids, float("-inf")).logsumexp(-1)
        part = bucket_kl(top, rest, student, ids)
        assert torch.all(part <= exact + 1e-6) and torch.all(part >= -1e-6)
    top, ids = dense.topk(5, -1)
    same = bucket_kl(top, dense.scatter(-1, ids, float("-inf")).logsumexp(-1), dense, ids)
    torch.testing.assert_close(same, torch.zeros(5), atol=1e-6, rtol=0)


def _batch(samples, pad, idx):
    return pad_batch([samples[j][0] for j in idx], pad, labels=[samples[j][1] for j in idx], samples=idx)


def test_distilling_the_dense_model_from_itself_costs_nothing_and_weight_one_is_cross_entropy(setup):
    model, samples, pad = setup
    targets = capture_dense_targets(model, samples, pad, top_k=16, tokens="response")
    batch = _batch(samples, pad, [4, 0, 7])
    with torch.no_grad():
        loss, n = DistillObjective(targets).loss_sum(model, batch)
    assert n == CompletionObjective().tokens(batch) == DistillObjective(targets).tokens(batch)
    assert abs(float(loss)) < 1e-2 * n  # float16 log-probabilities: not exactly zero
    ce, n_ce = CompletionObjective().loss_sum(model, batch)
    mixed, _ = DistillObjective(targets, sft_weight=1.0).loss_sum(model, batch)
    assert n_ce == n
    torch.testing.assert_close(mixed, ce, rtol=1e-5, atol=1e-4)


def test_distillation_moves_a_pruned_model_toward_the_dense_one(setup):
    from worker.restore.train import train_parameters

    dense, samples, pad = setup
    targets = capture_dense_targets(dense, samples, pad, top_k=320, tokens="all")  # the whole vocabulary: exact KL
    pruned = prune_half_at_random(copy.deepcopy(dense))
    objective = make_objective(type("R", (), {"objective": "distill", "sft_weight": 0.0})(), targets)
    batches = [_batch(samples, pad, list(range(i, i + 5))) for i in (0, 5)]

    def kl() -> float:
        with torch.no_grad():
            return sum(float(objective.loss_sum(pruned, b)[0]) for b in batches)

    before = kl()
    for p in pruned.parameters():
        p.requires_grad_(False)
    bias = torch.nn.Parameter(torch.zeros(pruned.config.vocab_size))
    hook = pruned.lm_head.register_forward_hook(lambda m, i, out: out + bias)
    try:
        stats = train_parameters(pruned, [bias], batches, lr=0.05, max_steps=30, objective=objective)
    finally:
        hook.remove()
    assert stats["loss_curve"][-1] < stats["loss_curve"][0]
    with torch.no_grad():
        bias.data.zero_()
    assert kl() == pytest.approx(before)  # the hook is gone and the model unchanged
    assert make_objective(type("R", (), {"objective": "sft"})(), None).name == "sft"
    with pytest.raises(ValueError, match="dense targets"):
        make_objective(type("R", (), {"objective": "distill", "sft_weight": 0.0})(), None)


def test_the_samples_captured_are_those_the_first_batches_use(tmp_path):
    from app.methods import restoration_config
    from tests.tiny import write_jsonl
    from worker.restore.batches import training_batches

    path = write_jsonl(tmp_path / "train.jsonl", instruction_rows(23))
    r = restoration_config({"method": "bias", "batch_size": 4, "max_steps": 9})
    source = training_batches(make_tokenizer(), str(path), r, seed=5)
    seen, epoch = [], 0
    while len(seen) < 9:  # what the training loop consumes: epoch after epoch
        seen += [b.samples.tolist() for b in source(epoch)][: 9 - len(seen)]
        epoch += 1
    assert source.samples_used(9) == sorted({j for idx in seen for j in idx})
    assert source.samples_used(2) == sorted({j for idx in seen[:2] for j in idx})
    assert source.samples_used(None) == list(range(23))
