"""Mask maths: exact N:M patterns, exact unstructured counts per comparison group, clear errors."""

from __future__ import annotations

import pytest
import torch

from worker.prune.masks import apply_mask_, make_mask, nm_mask, prune_count, unstructured_mask
from worker.prune.measure import check_nm

SHAPES = [(1, 8), (3, 16), (7, 24), (16, 64), (5, 128)]


def _scores(shape: tuple[int, int], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g)


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
@pytest.mark.parametrize("shape", SHAPES)
def test_nm_mask_keeps_exactly_n_of_every_m(n: int, m: int, shape: tuple[int, int]) -> None:
    assert shape[1] % m == 0
    s = _scores(shape, seed=n * 100 + m + shape[1])
    mask = nm_mask(s, n, m)
    assert mask.dtype == torch.bool and mask.shape == s.shape
    groups = mask.reshape(shape[0], -1, m)
    assert (groups.sum(-1) == n).all()
    # The kept ones are the top-n of their group.
    g = s.reshape(shape[0], -1, m)
    kept_min = torch.where(groups, g, torch.inf).amin(-1)
    pruned_max = torch.where(~groups, g, -torch.inf).amax(-1)
    assert (kept_min >= pruned_max).all()
    # And the pruned weight then passes the pattern check (at most n non-zeros per group).
    w = torch.randn(shape)
    apply_mask_(w, mask)
    assert check_nm(w, n, m)


def test_nm_mask_ties_are_deterministic() -> None:
    s = torch.ones(3, 8)
    a, b = nm_mask(s, 2, 4), nm_mask(s.clone(), 2, 4)
    assert torch.equal(a, b)
    assert (a.reshape(3, 2, 4).sum(-1) == 2).all()
    # Ties keep the lower input index.
    assert a[0].tolist() == [True, True, False, False] * 2


@pytest.mark.parametrize("cols,m", [(10, 4), (12, 8), (7, 4)])
def test_nm_mask_refuses_m_not_dividing_inputs(cols: int, m: int) -> None:
    with pytest.raises(ValueError, match="does not divide"):
        nm_mask(torch.randn(4, cols), 2, m)


@pytest.mark.parametrize("n,m", [(0, 4), (4, 4), (5, 4)])
def test_nm_mask_refuses_bad_pattern(n: int, m: int) -> None:
    with pytest.raises(ValueError, match="0 < N < M"):
        nm_mask(torch.randn(4, 8), n, m)


@pytest.mark.parametrize("sparsity", [0.1, 0.25, 0.5, 0.6, 0.7, 0.9])
@pytest.mark.parametrize("shape", SHAPES + [(9, 33), (4, 7)])
def test_unstructured_row_mask_exact_per_row(sparsity: float, shape: tuple[int, int]) -> None:
    s = _scores(shape, seed=int(sparsity * 1000) + shape[0])
    mask = unstructured_mask(s, sparsity, group="row")
    want = prune_count(shape[1], sparsity)
    assert ((~mask).sum(dim=1) == want).all()
    kept_min = torch.where(mask, s, torch.inf).amin(1)
    pruned_max = torch.where(~mask, s, -torch.inf).amax(1)
    assert (kept_min >= pruned_max).all()


@pytest.mark.parametrize("sparsity", [0.1, 0.25, 0.5, 0.7, 0.9])
@pytest.mark.parametrize("shape", SHAPES + [(9, 33)])
def test_unstructured_tensor_mask_exact_per_tensor(sparsity: float, shape: tuple[int, int]) -> None:
    s = _scores(shape, seed=int(sparsity * 1000) + shape[1])
    mask = unstructured_mask(s, sparsity, group="tensor")
    assert int((~mask).sum()) == prune_count(s.numel(), sparsity)
    if mask.any() and (~mask).any():
        assert s[mask].min() >= s[~mask].max()


def test_unstructured_mask_exact_with_ties() -> None:
    s = torch.zeros(4, 10)
    s[:, ::3] = 1.0
    for group in ("row", "tensor"):
        mask = unstructured_mask(s, 0.5, group=group)
        assert torch.equal(mask, unstructured_mask(s.clone(), 0.5, group=group))
    row = unstructured_mask(s, 0.5, group="row")
    assert ((~row).sum(1) == 5).all()
    assert row[:, ::3].all()  # every high score kept
    tensor = unstructured_mask(s, 0.5, group="tensor")
    assert int((~tensor).sum()) == 20


def test_prune_count_rounds_half_up() -> None:
    assert prune_count(10, 0.25) == 3  # 2.5
    assert prune_count(7, 0.5) == 4  # 3.5
    assert prune_count(10, 0.7) == 7  # 7.000000000000001
    assert prune_count(10, 0.3) == 3  # 3.0000000000000004
    assert prune_count(5, 0.0) == 0 and prune_count(5, 1.0) == 5
    with pytest.raises(ValueError):
        prune_count(5, 1.5)


def test_make_mask_dispatches_and_errors() -> None:
    s = _scores((4, 8), 0)
    assert torch.equal(make_mask(s, 0.5, (2, 4)), nm_mask(s, 2, 4))
    assert torch.equal(make_mask(s, 0.5, None, "tensor"), unstructured_mask(s, 0.5, "tensor"))
    with pytest.raises(ValueError, match="group"):
        unstructured_mask(s, 0.5, group="column")  # type: ignore[arg-type]
    for bad in (float("nan"), float("inf"), float("-inf")):
        with pytest.raises(ValueError, match="not finite"):
            unstructured_mask(torch.full((2, 4), bad), 0.5)
        with pytest.raises(ValueError, match="not finite"):
            nm_mask(torch.full((2, 4), bad), 2, 4)
    with pytest.raises(ValueError, match="2-D"):
        unstructured_mask(torch.randn(8), 0.5)


def test_check_nm_detects_violations() -> None:
    w = torch.tensor([[1.0, 0.0, 2.0, 0.0, 0.0, 0.0, 3.0, 4.0]])
    assert check_nm(w, 2, 4)
    w[0, 1] = 5.0  # three non-zeros in the first group
    assert not check_nm(w, 2, 4)
    assert not check_nm(torch.zeros(2, 6), 2, 4)  # 4 does not divide 6


def test_apply_mask_zeroes_in_place() -> None:
    w = torch.randn(3, 4)
    before = w.clone()
    mask = torch.rand(3, 4) > 0.5
    out = apply_mask_(w, mask)
    assert out is w
    assert (w[~mask] == 0).all() and torch.equal(w[mask], before[mask])
    with pytest.raises(ValueError, match="shape"):
        apply_mask_(w, mask[:, :2])
