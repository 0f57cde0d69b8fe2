"""What restoration trains toward: the training data (``sft``, the completion loss on the responses) or the dense
model (``distill``, the KL divergence from its next-token distribution), or a mix of the two.

The dense targets are captured once, in the loading stage, while the dense model is in memory (dense and pruned
are never in memory at once): at every target position of every training sample, the dense model's top-k
log-probabilities and the log of the probability mass left outside them. Stored as int32 token ids, float16
log-probabilities and one float32 per position: ``6k + 8`` bytes per token (with its position). The KL divergence
is taken over the k tokens plus one bucket for the rest — exact when k is the vocabulary, and never above the full
KL otherwise (merging outcomes can only lose information).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from worker.model.arch import output_device
from worker.model.data import IGNORE, Batch, pad_batch

Sample = tuple[list[int], list[int]]  # (input ids, labels with the prompt masked)


@dataclass
class DenseTargets:
    """The dense model's next-token distributions at the target positions of every training sample."""

    offsets: torch.Tensor  # (samples + 1,) int64: sample j's rows are offsets[j]:offsets[j + 1]
    positions: torch.Tensor  # (N,) int32: position t of the row (it predicts token t + 1), increasing per sample
    ids: torch.Tensor  # (N, k) int32: the k most likely next tokens
    logp: torch.Tensor  # (N, k) float16: their log-probabilities
    rest: torch.Tensor  # (N,) float32: log of the probability outside the k (-inf when none is left)
    tokens: str  # "response" (positions predicting a response token) or "all" (every next token)
    captured: torch.Tensor | None = None  # (samples,) bool: which samples have targets (None: all of them)

    @property
    def rows(self) -> int:
        return int(self.positions.numel())

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.offsets, self.positions, self.ids, self.logp,
                                                           self.rest))

    def sample_rows(self, j: int) -> slice:
        return slice(int(self.offsets[j]), int(self.offsets[j + 1]))


def target_positions(labels: Sequence[int], length: int, tokens: str) -> list[int]:
    """Positions t whose next token is a target: a response token (``response``) or any real token (``all``)."""
    if tokens == "all":
        return list(range(length - 1))
    return [t for t in range(length - 1) if labels[t + 1] != IGNORE]


@torch.no_grad()
def capture_dense_targets(model: nn.Module, samples: Sequence[Sample], pad_id: int, top_k: int, tokens: str,
                          batch_size: int = 4, progress: Callable[[int, int], None] | None = None,
                          only: Sequence[int] | None = None) -> DenseTargets:
    """Run the dense ``model`` over the samples (batched by length; ``only``: just those, e.g. the ones training
    will see) and keep its top-k next-token log-probabilities and the rest's log-mass at each target position.
    Sample order is kept whatever the batching."""
    device = next(model.parameters()).device
    wanted_samples = range(len(samples)) if only is None else sorted(set(only))
    order = sorted(wanted_samples, key=lambda j: len(samples[j][0]))
    per_sample: dict[int, tuple[torch.Tensor, ...]] = {j: _empty(top_k) for j in range(len(samples))}
    for done, start in enumerate(range(0, len(order), batch_size)):
        idx = order[start:start + batch_size]
        batch = pad_batch([samples[j][0] for j in idx], pad_id, labels=[samples[j][1] for j in idx])
        wanted = [target_positions(samples[j][1], len(samples[j][0]), tokens) for j in idx]
        keep = sorted({t for w in wanted for t in w})
        if not keep:
            for j in idx:
                per_sample[j] = _empty(top_k)
            continue
        where = {t: i for i, t in enumerate(keep)}
        logits = model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device),
                       use_cache=False, logits_to_keep=torch.tensor(keep, device=output_device(model))).logits
        for row, (j, w) in enumerate(zip(idx, wanted, strict=True)):
            if not w:
                per_sample[j] = _empty(top_k)
                continue
            logp = logits[row, [where[t] for t in w]].float().log_softmax(-1)
            k = min(top_k, logp.shape[-1])
            top, ids = logp.topk(k, dim=-1)
            per_sample[j] = (torch.tensor(w, dtype=torch.int32), ids.to(torch.int32).cpu(),
                             top.to(torch.float16).cpu(), _rest(logp, ids).cpu())
        if progress is not None:
            progress(done + 1, math.ceil(len(order) / batch_size))
    parts = [per_sample[j] for j in range(len(samples))]
    counts = torch.tensor([0] + [p[0].numel() for p in parts], dtype=torch.int64)
    captured = torch.zeros(len(samples), dtype=torch.bool)
    captured[list(wanted_samples)] = True
    return DenseTargets(offsets=counts.cumsum(0), positions=torch.cat([p[0] for p in parts]),
                        ids=torch.cat([p[1] for p in parts]), logp=torch.cat([p[2] for p in parts]),
                        rest=torch.cat([p[3] for p in parts]), tokens=tokens, captured=captured)


def _empty(k: int) -> tuple[torch.Tensor, ...]:
    return (torch.zeros(0, dtype=torch.int32), torch.zeros(0, k, dtype=torch.int32),
            torch.zeros(0, k, dtype=torch.float16), torch.zeros(0, dtype=torch.float32))


def _rest(logp: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log Σ p over the tokens not in ``ids``, per row (from the log-probabilities themselves: no cancellation)."""
    if ids.shape[-1] == logp.shape[-1]:
        return torch.full(logp.shape[:-1], -math.inf, dtype=torch.float32, device=logp.device)
    return logp.scatter(-1, ids.long(), -math.inf).logsumexp(-1)


def bucket_kl(logp_top: torch.Tensor, rest: torch.Tensor, student_logp: torch.Tensor, ids: torch.Tensor
              ) -> torch.Tensor:
    """Per row, KL(dense ‖ student) over the k target tokens plus one bucket for every other token.

    ``logp_top`` (n, k) and ``rest`` (n,): the dense log-probabilities; ``student_logp`` (n, V): the student's
    log-softmax; ``ids`` (n, k): the k tokens."""
    p_top = logp_top.float()
    student_top = student_logp.gather(-1, ids.long())
    kl = (p_top.exp() * (p_top - student_top)).sum(-1)
    student_rest = _rest(student_logp, ids)
    has_rest = torch.isfinite(rest)
    rest_term = torch.where(has_rest, rest.exp() * (rest - student_rest), torch.zeros_like(rest))
    return kl + rest_term


def response_loss_sum(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, int]:
    """(sum of next-token cross-entropy over response tokens, number of those tokens).

    Logits are computed only at positions that predict a response token of some row (``logits_to_keep``),
    which spares the vocabulary projection, and its backward, on prompts and padding.
    """
    target = batch.labels[:, 1:]
    keep = target != IGNORE
    n = int(keep.sum())
    if n == 0:
        return torch.zeros((), dtype=torch.float32, device=batch.input_ids.device), 0
    positions = keep.any(dim=0).nonzero().squeeze(1)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False,
                   logits_to_keep=positions.to(output_device(model))).logits
    kept = keep[:, positions]
    picked = logits[kept.to(logits.device)].float()
    return F.cross_entropy(picked, target[:, positions][kept].to(logits.device), reduction="sum"), n


class Objective(Protocol):
    """The loss of one micro-batch as a sum over its target tokens, and how many those are (an optimizer step
    divides the summed losses of its micro-batches by their summed token counts)."""

    name: str

    def tokens(self, batch: Batch) -> int: ...

    def loss_sum(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, int]: ...


class CompletionObjective:
    """``sft``: next-token cross-entropy on the response tokens (the paper's recipe)."""

    name = "sft"

    def tokens(self, batch: Batch) -> int:
        return int((batch.labels[:, 1:] != IGNORE).sum())

    def loss_sum(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, int]:
        return response_loss_sum(model, batch)


class DistillObjective:
    """``distill``: KL(dense ‖ restored) at the dense targets' positions, plus ``sft_weight`` × the cross-entropy of
    the actual next token at the same positions: ``(1 - w)·KL + w·CE`` per token."""

    name = "distill"

    def __init__(self, targets: DenseTargets, sft_weight: float = 0.0):
        self.targets = targets
        self.sft_weight = float(sft_weight)

    def _rows(self, batch: Batch) -> list[slice]:
        if batch.samples is None:
            raise ValueError("distillation needs batches that know their samples (worker.restore.batches)")
        t = self.targets
        if t.captured is not None and not bool(t.captured[batch.samples].all()):
            missing = [int(j) for j in batch.samples if not bool(t.captured[j])]
            raise ValueError(f"training samples {missing} have no dense targets (captured for other batches)")
        return [t.sample_rows(int(j)) for j in batch.samples]

    def tokens(self, batch: Batch) -> int:
        return sum(r.stop - r.start for r in self._rows(batch))

    def loss_sum(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, int]:
        t = self.targets
        rows = self._rows(batch)
        n = sum(r.stop - r.start for r in rows)
        device = batch.input_ids.device
        if n == 0:
            return torch.zeros((), dtype=torch.float32, device=device), 0
        mask = torch.zeros(batch.input_ids.shape, dtype=torch.bool)
        for b, r in enumerate(rows):
            mask[b, t.positions[r].long()] = True
        keep = mask.any(dim=0).nonzero().squeeze(1)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False,
                       logits_to_keep=keep.to(output_device(model))).logits
        device = logits.device
        picked = mask[:, keep].to(device)  # (B, P): row-major, so rows come out sample by sample, position order
        student = logits[picked].float().log_softmax(-1)
        index = torch.cat([torch.arange(r.start, r.stop) for r in rows])
        kl = bucket_kl(t.logp[index].to(device), t.rest[index].to(device), student, t.ids[index].to(device))
        loss = (1.0 - self.sft_weight) * kl.sum()
        if self.sft_weight:
            ids = batch.input_ids.to(device)
            nxt = torch.cat([ids[b, t.positions[r].long().to(device) + 1] for b, r in enumerate(rows)])
            loss = loss + self.sft_weight * F.nll_loss(student, nxt, reduction="sum")
        return loss, n


def make_objective(config: Any, targets: DenseTargets | None) -> Objective:
    """The objective a training config asks for (``objective``, ``sft_weight``); distillation needs the targets the
    loading stage captured."""
    if getattr(config, "objective", "sft") == "sft":
        return CompletionObjective()
    if targets is None:
        raise ValueError("the distill objective needs the dense targets captured in the loading stage")
    return DistillObjective(targets, getattr(config, "sft_weight", 0.0))
