"""Per-head attention outputs (the input of every ``o_proj``) at each row's last real token.

A forward pre-hook on ``o_proj`` sees the concatenated query-head outputs before the output
projection: ``num_heads * head_dim`` columns, head ``h`` in columns ``h*d … (h+1)*d - 1`` (also with
grouped-query attention). Batches are right-padded, so each row's last real token is
``Batch.last_index``. The dense and the pruned model are captured separately.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from worker.errors import DataError
from worker.model.arch import DecoderAdapter
from worker.model.data import IGNORE, Batch, batch_pad_id, chunks, encode_pair, pad_batch

Progress = Callable[[int, int], None]  # (batches done, batches total or 0 when unknown)


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def capture_head_outputs(
    model: torch.nn.Module,
    adapter: DecoderAdapter,
    batches: Iterable[Batch],
    progress: Progress | None = None,
) -> torch.Tensor:
    """(N, L, H, d) float32 on CPU: every query head's output at the last real token of each row.

    Runs the decoder stack only (no LM head). Hooks are removed however the forward ends.
    """
    info = adapter.info
    n_layers, n_heads, d = info.num_layers, info.num_heads, info.head_dim
    device = _model_device(model)
    current: dict[int, torch.Tensor] = {}
    rows: torch.Tensor | None = None

    def make_hook(layer: int):
        def hook(_module: torch.nn.Module, args: tuple) -> None:
            x = args[0]  # (B, T, H*d)
            picked = x[torch.arange(x.shape[0], device=x.device), rows.to(x.device)]  # (B, H*d)
            current[layer] = picked.reshape(x.shape[0], n_heads, d)  # on the device: one copy per batch, below

        return hook

    total = len(batches) if isinstance(batches, Sequence) else 0
    out: list[torch.Tensor] = []
    handles = [adapter.o_proj(i).register_forward_pre_hook(make_hook(i)) for i in range(n_layers)]
    try:
        for k, batch in enumerate(batches):
            b = batch.to(device)
            rows = b.last_index
            current.clear()
            adapter.base(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False)
            missing = [i for i in range(n_layers) if i not in current]
            if missing:
                raise RuntimeError(f"o_proj of layers {missing} did not run during capture")
            # a model split over GPUs has its layers' outputs on several devices: gathered on the first
            out.append(torch.stack([current[i].to(device) for i in range(n_layers)], dim=1).float().cpu())
            if progress is not None:
                progress(k + 1, total)
    finally:
        for h in handles:
            h.remove()
    if not out:
        raise ValueError("no batches to capture")
    return torch.cat(out, dim=0)


@dataclass
class ProbeInputs:
    """Token batches for probing, in pair order (batch k holds pairs k*B … k*B+B-1).

    ``prompt``: the prompt alone (last prompt token); ``positive``: prompt + its own response;
    ``negative``: prompt + the response of pair ``negatives[i]`` (last response token).
    """

    prompt: list[Batch]
    positive: list[Batch]
    negative: list[Batch] | None
    n: int
    dropped: int = 0  # pairs left out: their own and their negative's sequences were the same tokens


def _prompt_and_full(tokenizer, prompt: str, response: str, max_len: int) -> tuple[list[int], list[int]]:
    ids, labels = encode_pair(tokenizer, prompt, response, max_len)
    if not ids:
        raise DataError(f"a probe pair encodes to no tokens: {prompt[:60]!r} + {response[:60]!r}", field="data.train")
    n_prompt = sum(1 for v in labels if v == IGNORE)
    # A prompt that fills max_len leaves no response token: both sequences are then the prompt.
    return ids[: max(1, n_prompt)], ids


def build_probe_inputs(
    tokenizer,
    pairs: Sequence[tuple[str, str]],
    max_len: int,
    batch_size: int,
    negatives: Sequence[int] | None = None,
) -> ProbeInputs:
    """Right-padded batches of prompts, prompt+response and (with ``negatives``) prompt+negative response.

    Responses are truncated at the end to fit ``max_len`` (as in training). With ``negatives``, a pair whose
    positive and negative sequences come out as the same tokens (a prompt that fills ``max_len``, or two responses
    that agree as far as they fit) is left out: labelled both 1 and 0 on the same activations, it would only pull
    every head's probe accuracy toward chance. ``ProbeInputs.dropped`` counts them.
    """
    if not pairs:
        raise ValueError("no probe pairs")
    if negatives is not None and len(negatives) != len(pairs):
        raise ValueError(f"{len(negatives)} negatives for {len(pairs)} pairs")
    pad = batch_pad_id(tokenizer)
    prompt_seqs, pos_seqs, neg_seqs = [], [], []
    dropped = 0
    for i, (p, r) in enumerate(pairs):
        prompt_ids, full = _prompt_and_full(tokenizer, p, r, max_len)
        if negatives is not None:
            negative = _prompt_and_full(tokenizer, p, pairs[negatives[i]][1], max_len)[1]
            if negative == full:
                dropped += 1
                continue
            neg_seqs.append(negative)
        prompt_seqs.append(prompt_ids)
        pos_seqs.append(full)

    def batched(seqs: list[list[int]]) -> list[Batch]:
        return [pad_batch(list(c), pad) for c in chunks(seqs, batch_size)]

    return ProbeInputs(
        prompt=batched(prompt_seqs),
        positive=batched(pos_seqs),
        negative=batched(neg_seqs) if negatives is not None else None,
        n=len(prompt_seqs),
        dropped=dropped,
    )
