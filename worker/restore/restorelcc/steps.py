"""RestoreLCC's steps on tensors, in the order its method (restorelcc/method.py) calls them::

    negatives, backend = choose_negatives([r for _, r in pairs], negatives_backend)  # probed heads only (pairs.py)
    probe = build_probe_inputs(tokenizer, pairs, max_len, batch_size, negatives)
    dense = capture_dense(model, adapter, probe)                    # dense model, before pruning
    ... prune the model in place ...
    pruned = capture_pruned(model, adapter, probe)                  # (N, L, H, d) at the prompt's last token
    components = extract_components(dense, pruned)                  # lost directions per head (one SVD call)
    result = score_heads(dense, pruned, components, seed=seed)     # probed heads only
    heads = choose_heads(result, adapter.info, heads, selection, seed)
    offsets = make_offsets(heads, adapter.info, components, seed=seed, directions=K)  # components=None: bias only

then ``worker.restore.offsets``: train_offsets (train.py), merge_into_o_proj and save_restoration (merge.py).
``dense`` holds three captures (prompt, prompt + response, prompt + negative response); with
``negatives=None`` only the prompt is captured (enough for "random"/"all" selection).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from worker.model.arch import ArchInfo, DecoderAdapter
from worker.restore.offsets.heads import HeadOffsets
from worker.restore.offsets.selection import Selection
from worker.restore.offsets.selection import choose_heads as select
from worker.restore.restorelcc.capture import ProbeInputs, Progress, build_probe_inputs, capture_head_outputs
from worker.restore.restorelcc.extract import LostComponents, lost_activations, lost_components, summary_component
from worker.restore.restorelcc.probe import ProbeResult, probe_features, train_probes

__all__ = [
    "DenseCaptures",
    "build_probe_inputs",
    "capture_dense",
    "capture_pruned",
    "extract_components",
    "score_heads",
    "choose_heads",
    "make_offsets",
]


@dataclass
class DenseCaptures:
    prompt: torch.Tensor  # (N, L, H, d) at the last prompt token
    positive: torch.Tensor | None  # (N, L, H, d) at the last token of prompt + own response
    negative: torch.Tensor | None  # (N, L, H, d) at the last token of prompt + negative response


def capture_dense(
    model: torch.nn.Module, adapter: DecoderAdapter, probe: ProbeInputs, progress: Progress | None = None
) -> DenseCaptures:
    """The dense model's captures; positive/negative only when ``probe`` has negatives."""
    prompt = capture_head_outputs(model, adapter, probe.prompt, progress)
    if probe.negative is None:
        return DenseCaptures(prompt, None, None)
    positive = capture_head_outputs(model, adapter, probe.positive, progress)
    negative = capture_head_outputs(model, adapter, probe.negative, progress)
    return DenseCaptures(prompt, positive, negative)


def capture_pruned(
    model: torch.nn.Module, adapter: DecoderAdapter, probe: ProbeInputs, progress: Progress | None = None
) -> torch.Tensor:
    """The pruned model's head outputs at each prompt's last token: (N, L, H, d)."""
    return capture_head_outputs(model, adapter, probe.prompt, progress)


def extract_components(dense: DenseCaptures | torch.Tensor, pruned: torch.Tensor) -> LostComponents:
    prompt = dense.prompt if isinstance(dense, DenseCaptures) else dense
    return lost_components(lost_activations(prompt, pruned))


def score_heads(
    dense: DenseCaptures,
    pruned: torch.Tensor,
    components: LostComponents,
    k: int = 10,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> ProbeResult:
    """Contrastive probe per head; ``result.accuracy`` (L, H) is the head score.

    The features carry the summary component c over the top ``k`` directions as the paper writes them (k = 10
    as in the authors' code), but c is one constant added to every sample and the probe standardises each
    feature, so no ``k`` changes a score: it is not a setting of the job.
    """
    if dense.positive is None or dense.negative is None:
        raise ValueError("probing needs dense captures of prompt + response and prompt + negative")
    _, layers, heads, _ = pruned.shape
    c = summary_component(components, k)
    x, y, groups = probe_features(pruned, c, dense.positive, dense.negative)
    return train_probes(x, y, groups, (layers, heads), seed=seed, device=device)


def choose_heads(
    result: ProbeResult | None,
    info: ArchInfo,
    heads: float | int,
    selection: Selection,
    seed: int = 0,
) -> list[tuple[int, int]]:
    """Chosen (layer, head) pairs: by probe score (ties by held-out loss), at random, or all."""
    scores, tiebreak = (result.accuracy, result.val_loss) if result is not None else (None, None)
    return select(info.num_layers, info.num_heads, heads, selection, seed, scores, tiebreak)


def direction_count(directions: float | None, head_dim: int) -> int | None:
    """Top lost directions to learn per head: a fraction of ``head_dim`` (rounded, at least 1) or a whole
    count; None (all of them) stays None."""
    if directions is None:
        return None
    if 0 < directions < 1:
        return max(1, round(directions * head_dim))
    if directions >= 1 and float(directions).is_integer():
        return int(directions)
    raise ValueError(f"directions must be a fraction in (0, 1) or a whole count ≥ 1, got {directions}")


def make_offsets(
    heads: list[tuple[int, int]],
    info: ArchInfo,
    components: LostComponents | None,
    seed: int = 0,
    init_std: float = 1e-3,
    directions: float | None = None,
) -> HeadOffsets:
    """RestoreLCC offsets (β over the lost directions + b); bias-only offsets when ``components`` is None.

    ``directions``: β over each head's top-K lost directions only (:func:`direction_count`; fewer parameters
    per head, so more heads fit a parameter budget); None: all head_dim of them, as in the paper."""
    if components is None:
        return HeadOffsets(heads, info.num_heads, info.head_dim, None, seed, init_std)
    top = direction_count(directions, info.head_dim)
    d = components.head_dim
    if top is not None and not 1 <= top <= d:
        raise ValueError(f"top directions must lie in 1..{d} (the head width), got {top}")
    hs = sorted(heads)
    idx = torch.tensor([layer * info.num_heads + h for layer, h in hs])
    return HeadOffsets(hs, info.num_heads, d, components.directions[idx, : top or d], seed, init_std)
