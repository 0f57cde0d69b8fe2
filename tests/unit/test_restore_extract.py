"""Lost components: SVD directions, α, the summary component, one batched call."""

from __future__ import annotations

import torch

from worker.restore.restorelcc import extract
from worker.restore.restorelcc.extract import lost_activations, lost_components, summary_component


def _orthonormal_rows(v: torch.Tensor, atol: float = 1e-5) -> bool:
    eye = torch.eye(v.shape[-2]).expand(v.shape[0], -1, -1)
    return torch.allclose(v @ v.transpose(-1, -2), eye, atol=atol)


def test_directions_orthonormal_and_alpha_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(40, 6, 8, generator=g) + 0.5  # not centred: the mean matters
    lc = lost_components(delta)
    assert lc.directions.shape == (6, 8, 8)
    assert _orthonormal_rows(lc.directions)
    for h in range(6):
        u, s, vh = torch.linalg.svd(delta[:, h, :].double(), full_matrices=False)
        alpha = s * u.mean(dim=0)
        # α_i v_i is invariant to the sign ambiguity of an SVD, so compare those products.
        ours = lc.alpha[h, :, None].double() * lc.directions[h].double()
        brute = alpha[:, None] * vh
        torch.testing.assert_close(ours, brute, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(lc.singular_values[h].double(), s, atol=1e-4, rtol=1e-4)


def test_summary_component_full_rank_is_the_mean_and_top1_is_a_projection():
    g = torch.Generator().manual_seed(1)
    delta = torch.randn(30, 5, 4, generator=g) + torch.tensor([1.0, -2.0, 0.5, 0.0])
    lc = lost_components(delta)
    torch.testing.assert_close(summary_component(lc, 4), delta.mean(0), atol=1e-5, rtol=1e-5)
    c1 = summary_component(lc, 1)
    v1 = lc.directions[:, 0]
    expected = (delta.mean(0) * v1).sum(-1, keepdim=True) * v1  # mean projected on the top direction
    torch.testing.assert_close(c1, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(c1, delta.mean(0), atol=1e-3)


def test_fewer_samples_than_head_dim_pads_with_zero_directions():
    g = torch.Generator().manual_seed(2)
    delta = torch.randn(3, 4, 8, generator=g)
    lc = lost_components(delta)
    assert lc.directions.shape == (4, 8, 8)
    assert torch.count_nonzero(lc.directions[:, 3:]) == 0
    assert torch.count_nonzero(lc.alpha[:, 3:]) == 0
    assert torch.count_nonzero(lc.singular_values[:, 3:]) == 0
    assert _orthonormal_rows(lc.directions[:, :3])
    torch.testing.assert_close(summary_component(lc, 8), delta.mean(0), atol=1e-5, rtol=1e-5)


def test_one_batched_svd_call(monkeypatch):
    calls = []
    real = torch.linalg.svd

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(extract.torch.linalg, "svd", counting)
    lost_components(torch.randn(20, 12, 4))
    assert calls == [torch.Size([12, 20, 4])]


def test_lost_activations_flattens_layers_and_heads_in_order():
    dense = torch.zeros(2, 3, 4, 5)
    pruned = torch.zeros(2, 3, 4, 5)
    dense[:, 1, 2] = 1.0  # layer 1, head 2 → flat index 1·4 + 2 = 6
    delta = lost_activations(dense, pruned)
    assert delta.shape == (2, 12, 5)
    assert delta[:, 6].eq(1).all() and delta.abs().sum() == 2 * 5
