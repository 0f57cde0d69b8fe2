"""Mask maths: exact N:M patterns, exact unstructured counts per comparison group, clear errors."""

from __future__ import annotations

import pytest
import torch

from worker.prune import masks
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


def _sorted_keep(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """The rule every mask follows, by a stable descending sort: the ``keep`` highest, lower index first on ties."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if keep > 0:
        mask.scatter_(-1, torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :keep], True)
    return mask


def _scores_of_kind(kind: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "ties":  # few distinct values: most of the choice is tie-breaking
        return torch.randint(0, 5, shape, generator=g).float()
    if kind == "signed":  # negative scores, both zeros, ties among negatives and huge magnitudes
        s = torch.randint(-3, 3, shape, generator=g).float() * torch.tensor(1e30)
        s.view(-1)[::7] = -0.0
        s.view(-1)[1::7] = 0.0
        return s
    if kind == "subnormal":
        return torch.rand(shape, generator=g) * 1e-40
    if kind == "nan":  # what a caller that checks afterwards may pass (SparseGPT): NaN of either sign, and inf
        s = torch.randint(-3, 3, shape, generator=g).float()
        s.view(-1)[::9] = float("nan")
        s.view(-1)[4::9] = -torch.tensor(float("nan"))
        s.view(-1)[5::9] = float("inf")
        return s
    return torch.rand(shape, generator=g)


@pytest.mark.parametrize("kind", ["uniform", "ties", "signed", "subnormal", "nan"])
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("by", ["threshold", "chunks"])
def test_large_masks_keep_what_the_sort_keeps(monkeypatch, kind: str, seed: int, by: str) -> None:
    """A group larger than SORT_MAX_ELEMENTS is chosen by threshold, and groups are sorted a chunk at a time, without
    a whole sort's copies: either way exactly the entries one stable sort keeps, ties included."""
    monkeypatch.setattr(masks, "SORT_MAX_ELEMENTS", 0 if by == "threshold" else 1 << 30)
    monkeypatch.setattr(masks, "MASK_CHUNK_ELEMENTS", 40)  # rows (or the tie walk) cross chunk borders
    scores = _scores_of_kind(kind, (12, 64), seed)
    checks = (False,) if kind == "nan" else (True, False)  # checked, NaN is refused; unchecked, ranked as a sort does
    for check in checks:
        for sparsity in (0.0, 0.1, 0.5, 0.77, 1.0):
            for group in ("row", "tensor"):
                flat = scores if group == "row" else scores.reshape(1, -1)
                keep = flat.shape[1] - prune_count(flat.shape[1], sparsity)
                expected = _sorted_keep(flat, keep).reshape(scores.shape)
                got = unstructured_mask(scores, sparsity, group, check=check)
                assert torch.equal(got, expected), (kind, sparsity, group, check)
        for n, m in ((1, 2), (2, 4), (4, 8), (3, 16)):
            expected = _sorted_keep(scores.reshape(12, 64 // m, m), n).reshape(scores.shape)
            assert torch.equal(nm_mask(scores, n, m, check=check), expected), (kind, n, m)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method, nm", [("magnitude", None), ("magnitude", (2, 4)), ("wanda", None), ("wanda", (2, 4)),
                                        ("sparsegpt", None), ("sparsegpt", (2, 4))])
def test_pruning_a_large_linear_holds_what_the_plan_counts(dtype, method, nm) -> None:
    """The peak bytes pruning one Linear holds (every tensor its operations make, while it lives), per weight: within
    the plan's PRUNE_BYTES_PER_ELEMENT (SparseGPT's Hessian copies apart: HESSIAN_COPIES), where a sort-based mask
    alone held more than that."""
    from app.plan import (
        HESSIAN_COPIES,
        MASK_CHUNK_ELEMENTS,
        PRUNE_BYTES_PER_ELEMENT,
        SORT_BYTES_PER_ELEMENT,
        SORT_MAX_ELEMENTS,
    )
    from tests.memory import LiveBytes
    from worker.prune.magnitude import prune_magnitude
    from worker.prune.sparsegpt import HessianAccumulator, prune_sparsegpt
    from worker.prune.wanda import ColumnNormAccumulator, prune_wanda

    torch.manual_seed(0)
    linear = torch.nn.Linear(2048, 4096, bias=False).to(dtype)
    n = linear.weight.numel()
    assert n > SORT_MAX_ELEMENTS
    x = torch.randn(64, 2048)
    if method == "wanda":
        stats = ColumnNormAccumulator(2048)
        stats.add(x)
        prune = lambda: prune_wanda(linear, stats, 0.5, nm)  # noqa: E731
    elif method == "sparsegpt":
        stats = HessianAccumulator(2048)
        stats.add(x.to(dtype))
        prune = lambda: prune_sparsegpt(linear, stats, 0.5, nm)  # noqa: E731
    else:
        prune = lambda: prune_magnitude(linear, 0.5, nm)  # noqa: E731
    live = LiveBytes()
    with live:
        mask = prune()
    assert int(mask.sum()) == n // 2
    hessian = HESSIAN_COPIES * 2048 * 2048 * 8 if method == "sparsegpt" else 0
    assert live.peak <= PRUNE_BYTES_PER_ELEMENT * n + SORT_BYTES_PER_ELEMENT * MASK_CHUNK_ELEMENTS + hessian

    scores = torch.rand(4096, 2048)
    sorted_live = LiveBytes()
    with sorted_live:
        _sorted_keep(scores.reshape(1, -1), n // 2)
    assert sorted_live.peak > PRUNE_BYTES_PER_ELEMENT * n


def test_all_finite_reads_the_extremes_and_an_empty_tensor_is_finite() -> None:
    assert masks.all_finite(torch.empty(0, 4)) and masks.all_finite(torch.ones(3))
    for bad in (float("nan"), float("inf"), -float("inf")):
        t = torch.zeros(100)
        t[57] = bad
        assert not masks.all_finite(t)
