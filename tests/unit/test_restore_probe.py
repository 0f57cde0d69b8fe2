"""Contrastive probes over all heads at once, ranking and head selection."""

from __future__ import annotations

import pytest
import torch

from worker.restore.offsets.selection import head_count, rank_heads, select_heads
from worker.restore.restorelcc.probe import probe_features, split_pairs, train_probes

CHOSEN = [(0, 2), (1, 1), (2, 3)]


def _synthetic(n: int = 80, layers: int = 3, heads: int = 4, d: int = 6, seed: int = 0):
    """Only CHOSEN heads tell a prompt's own response from its negative."""
    g = torch.Generator().manual_seed(seed)
    pruned = torch.randn(n, layers, heads, d, generator=g)
    pos = torch.randn(n, layers, heads, d, generator=g)
    neg = torch.randn(n, layers, heads, d, generator=g)
    for layer, h in CHOSEN:
        pos[:, layer, h, 1] += 2.5
        neg[:, layer, h, 1] -= 2.5
    comp = torch.randn(layers * heads, d, generator=g)
    return pruned, comp, pos, neg


def test_probe_features_layout():
    pruned, comp, pos, neg = _synthetic(n=5)
    x, y, groups = probe_features(pruned, comp, pos, neg)
    assert x.shape == (10, 12, 12)
    assert y.tolist() == [1.0] * 5 + [0.0] * 5
    assert groups.tolist() == list(range(5)) * 2
    # head (1, 1) is flat index 5; first half is the edited pruned prompt, second the dense response
    torch.testing.assert_close(x[2, 5, :6], pruned[2, 1, 1] + comp[5])
    torch.testing.assert_close(x[2, 5, 6:], pos[2, 1, 1])
    torch.testing.assert_close(x[7, 5, 6:], neg[2, 1, 1])
    torch.testing.assert_close(x[7, 5, :6], x[2, 5, :6])


def test_only_separating_heads_rank_top():
    pruned, comp, pos, neg = _synthetic()
    x, y, groups = probe_features(pruned, comp, pos, neg)
    res = train_probes(x, y, groups, (3, 4), seed=0, head_chunk=5)  # chunks cut across layers
    assert res.accuracy.shape == (3, 4)
    assert res.n_train_pairs == 56 and res.n_test_pairs == 24
    top = {(int(i) // 4, int(i) % 4) for i in rank_heads(res.accuracy, res.val_loss)[:3]}
    assert top == set(CHOSEN)
    for layer, h in CHOSEN:
        assert res.accuracy[layer, h] > 0.95
    others = [res.accuracy[layer, h] for layer in range(3) for h in range(4) if (layer, h) not in CHOSEN]
    assert max(others) < 0.85
    assert select_heads(res.accuracy, 3, "probe", tiebreak=res.val_loss) == sorted(CHOSEN)


def test_probes_are_seeded():
    pruned, comp, pos, neg = _synthetic(n=30)
    x, y, groups = probe_features(pruned, comp, pos, neg)
    a = train_probes(x, y, groups, (3, 4), seed=3, steps=50)
    b = train_probes(x, y, groups, (3, 4), seed=3, steps=50)
    assert torch.equal(a.accuracy, b.accuracy) and torch.equal(a.val_loss, b.val_loss)


def test_split_keeps_pairs_together():
    train, test = split_pairs(10, seed=1)
    assert len(train) == 7 and len(test) == 3
    assert set(train.tolist()).isdisjoint(test.tolist())
    assert sorted(train.tolist() + test.tolist()) == list(range(10))
    assert torch.equal(split_pairs(10, seed=1)[0], train)


def test_rank_ties_break_by_loss_then_index():
    scores = torch.tensor([[0.5, 0.9, 0.9], [0.9, 0.1, 0.5]])
    loss = torch.tensor([[0.1, 0.4, 0.2], [0.4, 0.0, 0.3]])
    assert rank_heads(scores, loss).tolist() == [2, 1, 3, 0, 5, 4]
    assert rank_heads(scores).tolist() == [1, 2, 3, 0, 5, 4]


def test_head_count_and_selection_modes():
    assert head_count(0.3, 10) == 3
    assert head_count(0.01, 10) == 1
    assert head_count(4, 10) == 4
    assert head_count(4.0, 10) == 4
    assert head_count(10, 10) == 10
    with pytest.raises(ValueError, match="exceeds the 10 heads"):
        head_count(11, 10)  # refused, not capped
    with pytest.raises(ValueError):
        head_count(2.5, 10)
    scores = torch.arange(12.0).reshape(3, 4)
    assert select_heads(scores, 0.25, "probe") == [(2, 1), (2, 2), (2, 3)]
    assert len(select_heads(scores, 12, "all")) == 12
    assert select_heads(scores, 0.1, "all") == [(layer, h) for layer in range(3) for h in range(4)]
    r1 = select_heads(scores, 5, "random", seed=7)
    assert r1 == select_heads(scores, 5, "random", seed=7)
    assert len(set(r1)) == 5 and r1 == sorted(r1)
    assert any(select_heads(scores, 5, "random", seed=s) != r1 for s in range(8, 12))
    with pytest.raises(ValueError):
        select_heads(scores, 2, "best")  # type: ignore[arg-type]
