"""Training batches for every method that trains: (prompt, response) pairs, prompt tokens masked out of the loss."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

from app.methods import TrainingConfig
from worker.errors import DataError
from worker.model.data import Batch, batch_pad_id, encode_pair, pad_batch, read_instructions, shuffled_batches


class EpochSource:
    """Callable epoch → batches, that also knows how many batches an epoch has and, without building them, which
    samples the batches use."""

    def __init__(self, fn: Callable[[int], Iterator[Batch]], n: int, batch_size: int,
                 order: Callable[[int], list[list[int]]] | None = None, left_out: int = 0):
        self.fn, self.n, self.batch_size, self.order = fn, n, batch_size, order
        self.left_out = left_out  # rows of the training file without a response token within max_seq_len

    def samples_used(self, batches: int | None) -> list[int]:
        """The samples of the first ``batches`` batches (epoch after epoch; None: one whole epoch), sorted."""
        if self.order is None or batches is None:
            return list(range(self.n))
        used: set[int] = set()
        epoch = 0
        while batches > 0 and len(used) < self.n:
            for idx in self.order(epoch)[:batches]:
                used.update(idx)
            batches -= len(self)
            epoch += 1
        return sorted(used)

    def __call__(self, epoch: int) -> Iterator[Batch]:
        return self.fn(epoch)

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)


def training_samples(tokenizer: Any, train_path: str, r: TrainingConfig
                     ) -> tuple[list[tuple[list[int], list[int]]], int]:
    """The training samples as (input ids, labels), prompt masked: what every epoch batches, and what the dense
    targets of the distill objective are captured on (sample j is the same in both); and how many rows were left
    out for having no response token within ``max_seq_len`` (the report says so)."""
    pairs = read_instructions(train_path, limit=r.train_samples)
    encoded = [encode_pair(tokenizer, p, resp, r.max_seq_len, eos=r.response_eos) for p, resp in pairs]
    kept = [e for e in encoded if any(x != -100 for x in e[1][1:])]
    if not kept:
        raise DataError(f"data.train: no sample has response tokens within max_seq_len {r.max_seq_len}",
                        field="data.train")
    return kept, len(encoded) - len(kept)


def training_batches(tokenizer: Any, train_path: str, r: TrainingConfig, seed: int) -> EpochSource:
    """Epoch → shuffled, right-padded batches of (prompt, response) with the prompt masked; each batch knows its
    rows' sample indices."""
    pad = batch_pad_id(tokenizer)
    encoded, left_out = training_samples(tokenizer, train_path, r)
    lengths = [len(e[0]) for e in encoded]

    def order(epoch: int) -> list[list[int]]:
        return shuffled_batches(lengths, r.batch_size, torch.Generator().manual_seed(seed * 1000 + epoch),
                                r.group_by_length)

    def epoch_batches(epoch: int) -> Iterator[Batch]:
        for idx in order(epoch):
            chunk = [encoded[j] for j in idx]
            yield pad_batch([c[0] for c in chunk], pad, labels=[c[1] for c in chunk], samples=idx)

    return EpochSource(epoch_batches, len(encoded), r.batch_size, order, left_out)
