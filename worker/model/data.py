"""JSONL data sets, tokenisation and padded batches.

Formats (one JSON object per line):
- text: ``{"text": ...}``
- instruction: ``{"prompt": ..., "response": ...}`` (loss and perplexity on response tokens only)
- multiple choice: ``{"context": ..., "choices": [...], "label": int}``

Batches are right-padded with an attention mask; label positions that must not count are -100.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

IGNORE = -100


class DataFormatError(ValueError):
    """A data file is missing, unreadable or not in the expected format."""


def read_jsonl(path: str | Path, required: Sequence[str] = (), limit: int | None = None) -> list[dict[str, Any]]:
    """Rows of a JSONL file (a fixed prefix of ``limit`` rows), each checked for ``required`` keys."""
    p = Path(path)
    if not p.is_file():
        raise DataFormatError(f"data file not found: {p}")
    rows: list[dict[str, Any]] = []
    with p.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if limit is not None and len(rows) >= limit:
                break
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataFormatError(f"{p}:{lineno}: not valid JSON ({exc.msg})") from exc
            if not isinstance(row, dict):
                raise DataFormatError(f"{p}:{lineno}: expected a JSON object")
            missing = [k for k in required if k not in row]
            if missing:
                raise DataFormatError(f"{p}:{lineno}: missing key(s) {missing}; expected {list(required)}")
            rows.append(row)
    if not rows:
        raise DataFormatError(f"{p}: no rows")
    return rows


def read_texts(path: str | Path, limit: int | None = None) -> list[str]:
    return [str(r["text"]) for r in read_jsonl(path, ("text",), limit)]


def read_instructions(path: str | Path, limit: int | None = None) -> list[tuple[str, str]]:
    return [(str(r["prompt"]), str(r["response"])) for r in read_jsonl(path, ("prompt", "response"), limit)]


@dataclass(frozen=True)
class ChoiceItem:
    context: str
    choices: list[str]
    label: int


def read_choices(path: str | Path, limit: int | None = None) -> list[ChoiceItem]:
    items = []
    for i, r in enumerate(read_jsonl(path, ("context", "choices", "label"), limit)):
        choices = r["choices"]
        if not isinstance(choices, list) or len(choices) < 2:
            raise DataFormatError(f"{path}: row {i + 1}: 'choices' must be a list of at least 2 strings")
        label = int(r["label"])
        if not 0 <= label < len(choices):
            raise DataFormatError(f"{path}: row {i + 1}: label {label} out of range for {len(choices)} choices")
        items.append(ChoiceItem(str(r["context"]), [str(c) for c in choices], label))
    return items


def read_calibration_texts(path: str | Path, limit: int | None = None) -> list[str]:
    """Calibration text from a text JSONL or an instruction JSONL (prompt + response joined)."""
    rows = read_jsonl(path, (), limit)
    out = []
    for i, r in enumerate(rows):
        if "text" in r:
            out.append(str(r["text"]))
        elif "prompt" in r and "response" in r:
            out.append(str(r["prompt"]) + str(r["response"]))
        else:
            raise DataFormatError(f"{path}: row {i + 1}: expected 'text' or 'prompt'+'response'")
    return out


def ensure_pad_token(tokenizer: Any) -> int:
    """Pad id for batching; reuses EOS (or 0) when the tokenizer has no pad token. Padding is masked anyway."""
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        else:
            return 0
    return int(tokenizer.pad_token_id)


def encode_text(tokenizer: Any, text: str, max_len: int) -> list[int]:
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])[:max_len]


def encode_pair(tokenizer: Any, prompt: str, response: str, max_len: int) -> tuple[list[int], list[int]]:
    """(input ids, labels) for prompt + response; labels are -100 on the prompt. Truncates the response end."""
    p = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    r = list(tokenizer(response, add_special_tokens=False)["input_ids"])
    ids = (p + r)[:max_len]
    labels = ([IGNORE] * len(p) + r)[:max_len]
    return ids, labels


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T) long
    attention_mask: torch.Tensor  # (B, T) long, 1 = real token
    labels: torch.Tensor  # (B, T) long, -100 = not scored

    @property
    def last_index(self) -> torch.Tensor:
        """Index of each row's last real token (right padding)."""
        return self.attention_mask.sum(dim=1) - 1

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device))


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int, labels: Sequence[Sequence[int]] | None = None) -> Batch:
    """Right-pad token lists to one tensor. Without ``labels`` every real token is a label."""
    if not seqs:
        raise ValueError("empty batch")
    width = max(len(s) for s in seqs)
    n = len(seqs)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    lab = torch.full((n, width), IGNORE, dtype=torch.long)
    for i, s in enumerate(seqs):
        if not s:
            raise ValueError("empty sequence in batch")
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
        src = labels[i] if labels is not None else s
        lab[i, : len(src)] = torch.tensor(src, dtype=torch.long)
    return Batch(ids, mask, lab)


def chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def length_sorted(n: int, key: Sequence[int]) -> list[int]:
    """Indices sorted by length, longest first: batches of similar lengths waste less padding."""
    return sorted(range(n), key=lambda i: -key[i])


def shuffled_batches(lengths: Sequence[int], batch_size: int, gen: torch.Generator, group_by_length: bool = False,
                     group_batches: int = 50) -> list[list[int]]:
    """One epoch's batches of sample indices: a seeded shuffle, every sample exactly once.

    With ``group_by_length`` the shuffled samples are cut into groups of ``group_batches`` batches and each
    group is sorted by length before it is cut into batches, so a batch holds samples of similar length and
    little padding (on Alpaca-like data random batches of 8 pad to about 1.7× the real tokens); the batch
    order is then shuffled again, so long and short batches alternate at random.
    """
    order = torch.randperm(len(lengths), generator=gen).tolist()
    if not group_by_length:
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    span = batch_size * group_batches
    batches: list[list[int]] = []
    for g in range(0, len(order), span):
        group = sorted(order[g : g + span], key=lambda i: lengths[i], reverse=True)
        batches += [group[i : i + batch_size] for i in range(0, len(group), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]
