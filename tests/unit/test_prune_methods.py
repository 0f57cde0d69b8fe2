"""The pruning methods on single random layers: Wanda's scores, SparseGPT's update and guarantees."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from worker.model.calibration import linear_input_hooks
from worker.prune.magnitude import magnitude_mask, prune_magnitude
from worker.prune.masks import prune_count
from worker.prune.measure import check_nm
from worker.prune.sparsegpt import PERCDAMP, HessianAccumulator, prune_sparsegpt, sparsegpt_prune_weight
from worker.prune.wanda import ColumnNormAccumulator, prune_wanda, wanda_scores


def _linear(out_f: int, in_f: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=False)
    with torch.no_grad():
        lin.weight.normal_()
    return lin.to(dtype)


def test_wanda_scores_equal_brute_force_with_padding_excluded() -> None:
    torch.manual_seed(1)
    lin = _linear(8, 16)
    x = torch.randn(3, 5, 16)
    lengths = [5, 2, 4]
    mask = torch.zeros(3, 5, dtype=torch.bool)
    for b, n in enumerate(lengths):
        mask[b, :n] = True
    x[~mask] = 100.0  # padding positions: huge, so counting them would show

    acc = ColumnNormAccumulator(16)
    with torch.no_grad(), linear_input_hooks({"lin": lin}, lambda _n, t: acc.add(t), lambda: mask):
        lin(x)
    assert acc.tokens == sum(lengths)

    real = torch.cat([x[b, :n] for b, n in enumerate(lengths)])  # (tokens, in)
    norms = torch.tensor([real[:, j].double().pow(2).sum().sqrt().item() for j in range(16)])
    expected = lin.weight.detach().abs() * norms.float().reshape(1, -1)
    torch.testing.assert_close(wanda_scores(lin.weight, acc.norms), expected, rtol=1e-6, atol=0)
    with_padding = x.reshape(-1, 16).norm(dim=0)
    assert not torch.allclose(acc.norms, with_padding)

    mask_keep = prune_wanda(lin, acc, 0.5)
    assert ((~mask_keep).sum(1) == 8).all()
    assert ((lin.weight == 0).sum(1) == 8).all()
    # The pruned ones are the lowest-scoring of each row.
    s = expected
    kept_min = torch.where(mask_keep, s, torch.inf).amin(1)
    assert (kept_min >= torch.where(~mask_keep, s, -torch.inf).amax(1)).all()


def test_magnitude_is_exact_per_tensor() -> None:
    lin = _linear(10, 24, seed=3)
    w0 = lin.weight.detach().clone()
    keep = prune_magnitude(lin, 0.3)
    assert int((lin.weight == 0).sum()) == prune_count(240, 0.3)
    assert w0.abs()[keep].min() >= w0.abs()[~keep].max()
    assert torch.equal(lin.weight[keep], w0[keep])
    assert check_nm(_apply(w0, magnitude_mask(w0, 0.5, (2, 4))), 2, 4)


def _apply(w: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    return w * keep


def _correlated_inputs(in_f: int, tokens: int, rank: int, seed: int) -> torch.Tensor:
    """(tokens, in_f) inputs X = Z·Aᵀ + noise: a few latent factors mixed into every feature."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(in_f, rank, generator=g)
    z = torch.randn(tokens, rank, generator=g)
    scale = torch.rand(in_f, generator=g) * 2 + 0.1
    return (z @ a.t() + 0.1 * torch.randn(tokens, in_f, generator=g)) * scale


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_sparsegpt_reconstructs_better_than_wanda_and_magnitude(pattern: str) -> None:
    nm = (2, 4) if pattern == "2:4" else None
    in_f, out_f = 256, 32
    x = _correlated_inputs(in_f, 2048, rank=24, seed=7)
    dense = _linear(out_f, in_f, seed=5)

    def error(lin: nn.Linear) -> float:
        return float(torch.linalg.norm(x @ dense.weight.detach().t() - x @ lin.weight.detach().t()))

    errors = {}
    for name in ("magnitude", "wanda", "sparsegpt"):
        lin = _linear(out_f, in_f, seed=5)
        if name == "magnitude":
            prune_magnitude(lin, 0.5, nm)
        elif name == "wanda":
            acc = ColumnNormAccumulator(in_f)
            acc.add(x)
            prune_wanda(lin, acc, 0.5, nm)
        else:
            h = HessianAccumulator(in_f)
            for chunk in x.split(500):  # streaming over batches
                h.add(chunk)
            prune_sparsegpt(lin, h, 0.5, nm)
        assert int((lin.weight == 0).sum()) == out_f * in_f // 2
        if nm:
            assert check_nm(lin.weight, *nm)
        errors[name] = error(lin)
    assert errors["sparsegpt"] < 0.8 * errors["wanda"], errors
    assert errors["sparsegpt"] < 0.8 * errors["magnitude"], errors


def test_hessian_accumulator_streams_to_the_batch_hessian() -> None:
    x = torch.randn(300, 12, dtype=torch.float64)
    h = HessianAccumulator(12, dtype=torch.float64)
    for chunk in (x[:7], x[7:7], x[7:150], x[150:]):
        h.add(chunk)
    assert h.tokens == 300
    torch.testing.assert_close(h.H, 2.0 / 300 * x.t() @ x)


def test_sparsegpt_unstructured_exact_per_block_rows_may_differ() -> None:
    rows, cols = 24, 256  # two blocks of 128 columns
    x = _correlated_inputs(cols, 1024, rank=16, seed=2)
    h = HessianAccumulator(cols)
    h.add(x)
    w = _linear(rows, cols, seed=9).weight.detach()
    new_w, keep, _ = sparsegpt_prune_weight(w, h.H, 0.3)
    assert new_w.dtype == torch.float32 and torch.isfinite(new_w).all()
    for b in range(2):
        block = new_w[:, b * 128 : (b + 1) * 128]
        assert int((block == 0).sum()) == prune_count(rows * 128, 0.3)
        assert int((~keep[:, b * 128 : (b + 1) * 128]).sum()) == prune_count(rows * 128, 0.3)
    assert torch.equal(new_w == 0, ~keep)
    per_row = (new_w == 0).sum(1)
    assert per_row.min() != per_row.max()  # the per-row count is not what it promises
    # Kept weights were updated (the OBS compensation), pruned ones are zero.
    assert not torch.equal(new_w[keep], w[keep])


@pytest.mark.parametrize("nm", [(2, 4), (4, 8), (1, 4)])
def test_sparsegpt_nm_exact_pattern(nm: tuple[int, int]) -> None:
    rows, cols = 16, 192  # a partial second block
    x = _correlated_inputs(cols, 512, rank=8, seed=4)
    h = HessianAccumulator(cols)
    h.add(x)
    new_w, keep, _ = sparsegpt_prune_weight(_linear(rows, cols, seed=1).weight, h.H, 1 - nm[0] / nm[1], nm)
    assert (keep.reshape(rows, -1, nm[1]).sum(-1) == nm[0]).all()
    assert check_nm(new_w, *nm)
    assert torch.equal(new_w == 0, ~keep)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_sparsegpt_fails_on_a_non_finite_weight_although_its_mask_choices_skip_the_check(nm, bad) -> None:
    # the column loop checks nothing (a check waits for the device); the result is checked once
    rows, cols = 8, 64
    h = HessianAccumulator(cols)
    h.add(_correlated_inputs(cols, 256, rank=8, seed=3))
    w = _linear(rows, cols, seed=2).weight.detach().clone()
    w[3, 6] = bad
    with pytest.raises(ValueError, match="not finite"):
        sparsegpt_prune_weight(w, h.H, 0.5, nm)


def test_sparsegpt_dead_inputs_are_pruned_first_and_count_stays_exact() -> None:
    rows, cols = 8, 64
    x = _correlated_inputs(cols, 256, rank=8, seed=3)
    dead = torch.tensor([0, 5, 17, 40])
    x[:, dead] = 0
    h = HessianAccumulator(cols)
    h.add(x)
    w = _linear(rows, cols, seed=2).weight.detach()
    new_w, keep, _ = sparsegpt_prune_weight(w, h.H, 0.5)
    assert torch.isfinite(new_w).all()
    assert int((new_w == 0).sum()) == rows * cols // 2
    assert not keep[:, dead].any()
    new_nm, keep_nm, _ = sparsegpt_prune_weight(w, h.H, 0.5, (2, 4))
    assert check_nm(new_nm, 2, 4) and not keep_nm[:, dead].any()


def test_sparsegpt_low_precision_weights_written_back_in_their_dtype() -> None:
    lin = _linear(16, 64, seed=0, dtype=torch.bfloat16)
    x = _correlated_inputs(64, 256, rank=8, seed=0).to(torch.bfloat16)
    h = HessianAccumulator(64)
    h.add(x)
    assert h.H.dtype == torch.float64
    keep = prune_sparsegpt(lin, h, 0.5, (2, 4))
    assert lin.weight.dtype == torch.bfloat16
    assert check_nm(lin.weight, 2, 4)
    assert torch.equal(lin.weight == 0, ~keep)


def test_sparsegpt_refuses_bad_inputs() -> None:
    w = torch.randn(4, 10)
    with pytest.raises(ValueError, match="does not divide"):
        sparsegpt_prune_weight(w, torch.eye(10), 0.5, (2, 4))
    with pytest.raises(ValueError, match="Hessian shape"):
        sparsegpt_prune_weight(w, torch.eye(8), 0.5)
    with pytest.raises(ValueError, match="calibration tokens"):
        prune_sparsegpt(nn.Linear(10, 4), HessianAccumulator(10), 0.5)
    with pytest.raises(ValueError, match="calibration tokens"):
        prune_wanda(nn.Linear(10, 4), ColumnNormAccumulator(10), 0.5)


def test_sparsegpt_raises_the_damping_only_as_far_as_it_must_and_returns_it() -> None:
    """An indefinite Hessian (eigenvalues 2.02 and -0.02, mean diagonal 1) does not factor at 1% damping but does at
    10%, which is returned for the report; the caller's Hessian is left as it was unless it is handed over. One
    that 100% cannot make positive definite is an error naming the damping tried."""
    w = torch.randn(4, 2, generator=torch.Generator().manual_seed(0))
    H = torch.tensor([[1.0, 1.02], [1.02, 1.0]])
    before = H.clone()
    _, keep, damp = sparsegpt_prune_weight(w, H, 0.5)
    assert damp == pytest.approx(10 * PERCDAMP) and int(keep.sum()) == 4
    assert torch.equal(H, before)
    assert sparsegpt_prune_weight(w, torch.eye(2), 0.5)[2] == PERCDAMP
    with pytest.raises(ValueError, match="damping 1 of its mean diagonal"):
        sparsegpt_prune_weight(w, torch.tensor([[1.0, 3.0], [3.0, 1.0]]), 0.5)


def test_sparsegpt_uses_its_accumulators_hessian_up_and_remembers_whether_it_was_finite() -> None:
    lin = _linear(8, 16, seed=0)
    h = HessianAccumulator(16)
    h.add(_correlated_inputs(16, 64, rank=4, seed=0))
    prune_sparsegpt(lin, h, 0.5)
    assert h.H is None and h.damping == PERCDAMP and h.finite()
    with pytest.raises(ValueError, match="handed to pruning already"):
        prune_sparsegpt(lin, h, 0.5)
    bad = HessianAccumulator(16)
    bad.add(torch.full((3, 16), float("inf")))
    bad.take()
    assert not bad.finite()


def test_statistics_upcast_bounded_chunks_and_sum_what_the_whole_batch_gives(monkeypatch) -> None:
    """Accumulated chunk by chunk (a few rows here, 16M elements in use), the Wanda norms and the SparseGPT Hessian
    equal the whole batch's; a batch with no padding reaches them as a view of the layer's input, not a copy."""
    from worker import chunks
    from worker.prune import sparsegpt, wanda

    x = torch.randn(100, 12, dtype=torch.float64)
    whole_norms, whole_h = ColumnNormAccumulator(12), HessianAccumulator(12)
    whole_norms.add(x)
    whole_h.add(x)
    seen: list[int] = []

    def small(t: torch.Tensor):
        parts = list(chunks.row_chunks(t, elements=7 * 12))
        seen.append(len(parts))
        return iter(parts)

    monkeypatch.setattr(wanda, "row_chunks", small)
    monkeypatch.setattr(sparsegpt, "row_chunks", small)
    norms, h = ColumnNormAccumulator(12), HessianAccumulator(12)
    norms.add(x)
    h.add(x)
    assert seen == [15, 15]  # 100 rows, 7 a chunk
    torch.testing.assert_close(norms.sq_sum, whole_norms.sq_sum)
    torch.testing.assert_close(h.H, whole_h.H)
    assert norms.tokens == h.tokens == 100

    lin = _linear(8, 16)
    inputs = torch.randn(2, 5, 16)
    got: list[torch.Tensor] = []
    with torch.no_grad(), linear_input_hooks({"lin": lin}, lambda _n, t: got.append(t), lambda: None):
        lin(inputs)
    assert got[0].shape == (10, 16) and got[0].data_ptr() == inputs.data_ptr()
