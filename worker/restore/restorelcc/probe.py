"""Contrastive probing of heads (pure tensor maths).

Per head, a sample's feature is ``[z_pruned(prompt) + c ; z_dense(prompt + response)]`` (2d wide),
label 1 for the prompt's own response and 0 for its negative. One logistic probe per head, all heads
trained together: weights (heads, 2d), full-batch Adam on standardised features with L2. The split
keeps a prompt's positive and negative on the same side (70 % train / 30 % held out, seeded).
A head's score is its held-out accuracy; ties rank by held-out log loss, then by index.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class ProbeResult:
    accuracy: torch.Tensor  # (L, H) held-out accuracy
    val_loss: torch.Tensor  # (L, H) held-out mean log loss
    train_loss: torch.Tensor  # (L, H) final training log loss (without the L2 term)
    n_train_pairs: int
    n_test_pairs: int


def probe_features(
    pruned_prompt: torch.Tensor,
    component: torch.Tensor,
    dense_positive: torch.Tensor,
    dense_negative: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Features (2N, L·H, 2d), labels (2N,), pair index (2N,): positives first, then negatives.

    ``pruned_prompt``, ``dense_positive``, ``dense_negative``: (N, L, H, d) captures;
    ``component``: (L·H, d) summary lost component c.
    """
    n, layers, heads, d = pruned_prompt.shape
    for name, t in (("dense_positive", dense_positive), ("dense_negative", dense_negative)):
        if t.shape != pruned_prompt.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(pruned_prompt.shape)}")
    # Written in place: x is the only new tensor (four captures' worth), not edited, pos and neg beside it.
    x = torch.empty(2 * n, layers * heads, 2 * d, dtype=torch.float32, device=pruned_prompt.device)
    x[:n, :, :d] = pruned_prompt.reshape(n, layers * heads, d)
    x[:n, :, :d] += component.float().to(pruned_prompt.device)
    x[n:, :, :d] = x[:n, :, :d]
    x[:n, :, d:] = dense_positive.reshape(n, layers * heads, d)
    x[n:, :, d:] = dense_negative.reshape(n, layers * heads, d)
    y = torch.cat([torch.ones(n), torch.zeros(n)])
    groups = torch.cat([torch.arange(n), torch.arange(n)])
    return x, y, groups


def split_pairs(n_pairs: int, seed: int, test_fraction: float = 0.3) -> tuple[torch.Tensor, torch.Tensor]:
    """(train pair indices, test pair indices), seeded; both non-empty (needs at least 2 pairs)."""
    if n_pairs < 2:
        raise ValueError("probing needs at least 2 pairs")
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n_pairs, generator=g)
    n_test = min(n_pairs - 1, max(1, round(test_fraction * n_pairs)))
    return perm[n_test:].sort().values, perm[:n_test].sort().values


def _fit_chunk(
    xtr: torch.Tensor, ytr: torch.Tensor, steps: int, lr: float, l2: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logistic regression for every head of a chunk at once. xtr: (n, h, f) standardised."""
    _, h, f = xtr.shape
    w = torch.zeros(h, f, device=xtr.device, requires_grad=True)
    b = torch.zeros(h, device=xtr.device, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=lr)
    target = ytr[:, None].expand(-1, h)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        logits = torch.einsum("nhf,hf->nh", xtr, w) + b
        loss = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(0)
        (loss.sum() + 0.5 * l2 * (w * w).sum()).backward()
        opt.step()
    return w.detach(), b.detach()


def train_probes(
    x: torch.Tensor,
    y: torch.Tensor,
    groups: torch.Tensor,
    shape: tuple[int, int],
    seed: int = 0,
    test_fraction: float = 0.3,
    steps: int = 300,
    lr: float = 0.05,
    l2: float = 1e-3,
    head_chunk: int = 256,
    device: torch.device | str | None = None,
) -> ProbeResult:
    """Train and score one probe per head. ``x``: (S, L·H, F), ``y``: (S,), ``groups``: pair index (S,).

    ``head_chunk`` bounds memory: heads are fitted in chunks, each chunk as one batched program.
    """
    layers, heads = shape
    total = layers * heads
    if x.shape[1] != total:
        raise ValueError(f"features hold {x.shape[1]} heads, expected {layers}×{heads}")
    n_pairs = int(groups.max()) + 1
    train_pairs, test_pairs = split_pairs(n_pairs, seed, test_fraction)
    is_train = torch.isin(groups, train_pairs)
    tr_idx, te_idx = is_train.nonzero().squeeze(1), (~is_train).nonzero().squeeze(1)
    dev = torch.device(device) if device is not None else x.device
    ytr, yte = y[tr_idx].float().to(dev), y[te_idx].float().to(dev)
    acc, vloss, tloss = (torch.empty(total) for _ in range(3))
    torch.manual_seed(seed)
    for start in range(0, total, head_chunk):
        sl = slice(start, min(total, start + head_chunk))
        xtr = x[tr_idx, sl].float().to(dev)
        xte = x[te_idx, sl].float().to(dev)
        mean = xtr.mean(0, keepdim=True)
        std = xtr.std(0, keepdim=True).clamp_min(1e-6)
        xtr = (xtr - mean) / std
        xte = (xte - mean) / std
        with torch.enable_grad():
            w, b = _fit_chunk(xtr, ytr, steps, lr, l2)
        with torch.no_grad():
            h = xtr.shape[1]
            ltr = torch.einsum("nhf,hf->nh", xtr, w) + b
            lte = torch.einsum("nhf,hf->nh", xte, w) + b
            tloss[sl] = F.binary_cross_entropy_with_logits(
                ltr, ytr[:, None].expand(-1, h), reduction="none"
            ).mean(0).cpu()
            vloss[sl] = F.binary_cross_entropy_with_logits(
                lte, yte[:, None].expand(-1, h), reduction="none"
            ).mean(0).cpu()
            acc[sl] = ((lte > 0).float() == yte[:, None]).float().mean(0).cpu()
    return ProbeResult(
        accuracy=acc.reshape(layers, heads),
        val_loss=vloss.reshape(layers, heads),
        train_loss=tloss.reshape(layers, heads),
        n_train_pairs=len(train_pairs),
        n_test_pairs=len(test_pairs),
    )
