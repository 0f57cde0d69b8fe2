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

from worker.errors import DataError, path_problem

IGNORE = -100


class DataFormatError(DataError, ValueError):
    """A data file is missing, unreadable or not in the expected format.

    A :class:`DataError`, so it fails the job as ``invalid_data`` whichever stage reads the file (it may change
    after the job's check); ``path`` lets the runner name the spec field it came from.
    """

    def __init__(self, message: str, path: str | Path | None = None):
        super().__init__(message)
        self.path = None if path is None else str(path)


Row = tuple[str, dict[str, Any]]  # ("file:line" for messages, the row)


def _parse_line(raw: bytes, where: str, path: Path) -> dict[str, Any] | None:
    """One JSONL line as an object (None when blank)."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataFormatError(f"{where}: not valid UTF-8 (byte {exc.start} of the line)", path) from exc
    if not line.strip():
        return None
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataFormatError(f"{where}: not valid JSON ({exc.msg})", path) from exc
    except (ValueError, RecursionError) as exc:  # a number too long to convert; nesting too deep
        raise DataFormatError(f"{where}: not valid JSON ({type(exc).__name__}: {str(exc)[:100]})", path) from exc
    if not isinstance(row, dict):
        raise DataFormatError(f"{where}: expected a JSON object", path)
    return row


def _read_rows(path: str | Path, required: Sequence[str], limit: int | None) -> list[Row]:
    p = Path(path)
    problem = path_problem(p, "file")
    if problem:
        raise DataFormatError(f"data file {p} {problem}", p)
    rows: list[Row] = []
    try:
        with p.open("rb") as fh:
            for lineno, raw in enumerate(fh, 1):
                if limit is not None and len(rows) >= limit:
                    break
                where = f"{p}:{lineno}"
                row = _parse_line(raw, where, p)
                if row is None:
                    continue
                missing = [k for k in required if k not in row]
                if missing:
                    raise DataFormatError(f"{where}: missing key(s) {missing}; expected {list(required)}", p)
                rows.append((where, row))
    except OSError as exc:
        raise DataFormatError(f"data file {p} cannot be read: {(exc.strerror or str(exc)).lower()}", p) from exc
    if not rows:
        raise DataFormatError(f"{p}: no rows", p)
    return rows


def read_jsonl(path: str | Path, required: Sequence[str] = (), limit: int | None = None) -> list[dict[str, Any]]:
    """Rows of a JSONL file (a fixed prefix of ``limit`` rows), each checked for ``required`` keys."""
    return [row for _, row in _read_rows(path, required, limit)]


_JSON_TYPES = {type(None): "null", bool: "a boolean", int: "a number", float: "a number", str: "a string",
               list: "an array", dict: "an object"}


def _json_type(value: Any) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _string(value: Any, key: str, where: str, path: str | Path) -> str:
    """``value`` if it is text a tokenizer takes; a number or null is refused rather than turned into text."""
    if not isinstance(value, str):
        raise DataFormatError(f"{where}: '{key}' must be a string, not {_json_type(value)}", path)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:  # "\ud800" is valid JSON but no text: tokenizers raise on it
        raise DataFormatError(f"{where}: '{key}' holds an unpaired surrogate ({value[exc.start]!r})", path) from exc
    return value


def _some_text(texts: Sequence[str], what: str, path: str | Path) -> None:
    if not any(texts):
        raise DataFormatError(f"{path}: every {what} is empty", path)


def read_texts(path: str | Path, limit: int | None = None) -> list[str]:
    texts = [_string(r["text"], "text", where, path) for where, r in _read_rows(path, ("text",), limit)]
    _some_text(texts, "'text'", path)
    return texts


def read_instructions(path: str | Path, limit: int | None = None) -> list[tuple[str, str]]:
    """(prompt, response) pairs; a row with neither, or a file with no response text, is refused."""
    pairs = []
    for where, r in _read_rows(path, ("prompt", "response"), limit):
        prompt, response = _string(r["prompt"], "prompt", where, path), _string(r["response"], "response", where, path)
        if not prompt and not response:
            raise DataFormatError(f"{where}: 'prompt' and 'response' are both empty", path)
        pairs.append((prompt, response))
    _some_text([resp for _, resp in pairs], "'response'", path)
    return pairs


@dataclass(frozen=True)
class ChoiceItem:
    context: str
    choices: list[str]
    label: int


def _choice_item(r: dict[str, Any], where: str, path: str | Path) -> ChoiceItem:
    choices, label = r["choices"], r["label"]
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise DataFormatError(f"{where}: 'choices' must be a list of at least 2 non-empty strings", path)
    if isinstance(label, bool) or not isinstance(label, int):
        raise DataFormatError(f"{where}: 'label' must be a whole number (the index of the right choice), "
                              f"not {_json_type(label)}", path)
    if not 0 <= label < len(choices):
        raise DataFormatError(f"{where}: label {label} out of range for {len(choices)} choices", path)
    return ChoiceItem(_string(r["context"], "context", where, path),
                      [_string(c, "choices", where, path) for c in choices], label)


def read_choices(path: str | Path, limit: int | None = None) -> list[ChoiceItem]:
    return [_choice_item(r, where, path) for where, r in _read_rows(path, ("context", "choices", "label"), limit)]


def read_calibration_texts(path: str | Path, limit: int | None = None) -> list[str]:
    """Calibration text from a text JSONL or an instruction JSONL (prompt + response joined)."""
    out = []
    for where, r in _read_rows(path, (), limit):
        if "text" in r:
            out.append(_string(r["text"], "text", where, path))
        elif "prompt" in r and "response" in r:
            out.append(_string(r["prompt"], "prompt", where, path) + _string(r["response"], "response", where, path))
        else:
            raise DataFormatError(f"{where}: expected 'text' or 'prompt'+'response'", path)
    _some_text(out, "text", path)
    return out


def batch_pad_id(tokenizer: Any) -> int:
    """Pad id for batching: the tokenizer's own, else EOS, else 0 (padding is masked anyway). The tokenizer is not
    changed: the one exported with the restored model is the model's own, without a pad token it never had."""
    for token_id in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if token_id is not None:
            return int(token_id)
    return 0


def encode_text(tokenizer: Any, text: str, max_len: int) -> list[int]:
    return token_ids(tokenizer, text)[:max_len]


def _ids(tokenizer: Any, text: str, special: bool) -> list[int]:
    """The text's ids; with ``special``, the tokenizer's own BOS once even when the text already starts with it
    (rows written with a chat template begin with "<|begin_of_text|>", "<bos>" or "<s>")."""
    ids = list(tokenizer(text, add_special_tokens=special)["input_ids"])
    bos = getattr(tokenizer, "bos_token_id", None)
    if special and bos is not None and len(ids) >= 2 and ids[0] == ids[1] == bos:
        del ids[0]
    return ids


def token_ids(tokenizer: Any, text: str) -> list[int]:
    """The text's ids with the tokenizer's special tokens, as every model input is encoded."""
    return _ids(tokenizer, text, True)


def _special_counts(tokenizer: Any) -> tuple[int, int]:
    """How many special tokens the tokenizer puts before and after a text (a BOS; an ``add_eos_token`` EOS)."""
    plain, full = _ids(tokenizer, "a", False), _ids(tokenizer, "a", True)
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return start, len(full) - start - len(plain)
    return 0, 0


def leading_specials(tokenizer: Any) -> int:
    """How many special tokens the tokenizer puts before a text: 1 for a BOS-adding tokenizer, else 0."""
    return _special_counts(tokenizer)[0]


def cut_left(ids: Sequence[int], max_len: int, keep: int) -> list[int]:
    """The last tokens of ``ids`` that fit ``max_len``, after its first ``keep`` (a BOS the model expects at
    position 0 stays there)."""
    if len(ids) <= max_len:
        return list(ids)
    keep = min(keep, max_len - 1)
    return list(ids[:keep]) + list(ids[len(ids) - (max_len - keep):])


def _appended_specials(tokenizer: Any) -> int:
    """How many special tokens the tokenizer appends after a text: 1 for an ``add_eos_token`` tokenizer, else 0."""
    return _special_counts(tokenizer)[1]


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def encode_continuations(tokenizer: Any, prefix: str, suffixes: Sequence[str]) -> list[tuple[list[int], int]]:
    """For each suffix: ids of ``prefix + suffix`` tokenised as one text, and how many leading ids are the prefix's.

    Tokenising a suffix on its own is wrong for SentencePiece tokenizers that prepend "▁" (Llama-1/2,
    Mistral v0.1): " yes" alone is "▁", "▁yes". So the joined text is tokenised once (special tokens as for
    any text) and the boundary is where it stops agreeing with the prefix's own ids; a last prefix token that
    merges with the suffix's first characters thus counts as suffix. Special tokens appended after a text (an
    ``add_eos_token`` tokenizer's EOS) are dropped, so the suffix is scored as it would be without them.
    """
    tail = _appended_specials(tokenizer)
    alone = _ids(tokenizer, prefix, True)
    alone = alone[: len(alone) - tail]
    out = []
    for suffix in suffixes:
        joint = _ids(tokenizer, prefix + suffix, True)
        joint = joint[: len(joint) - tail]
        out.append((joint, _common_prefix(alone, joint)))
    return out


def encode_joined(tokenizer: Any, prefix: str, suffix: str) -> tuple[list[int], int]:
    """Ids of ``prefix + suffix`` tokenised once, and the number of leading prefix ids (``encode_continuations``)."""
    return encode_continuations(tokenizer, prefix, [suffix])[0]


def eos_id(tokenizer: Any) -> int | None:
    """The tokenizer's EOS id, the token that ends a response (None when it has none)."""
    token_id = getattr(tokenizer, "eos_token_id", None)
    return None if token_id is None else int(token_id)


def _closing_eos(tokenizer: Any, ids: list[int], n_prompt: int) -> tuple[list[int], int]:
    """``ids`` ending in the EOS that closes the response, and that EOS's index (-1 when the tokenizer has none).
    A response that already ends with it (text written with its chat template's end token) gets no second one."""
    eos = eos_id(tokenizer)
    if eos is None:
        return ids, -1
    if len(ids) > n_prompt and ids[-1] == eos:
        return ids, len(ids) - 1
    return [*ids, eos], len(ids)


def encode_pair(tokenizer: Any, prompt: str, response: str, max_len: int, eos: bool = False
                ) -> tuple[list[int], list[int]]:
    """(input ids, labels) for prompt + response; labels are -100 on the prompt. Truncates the response end.

    With ``eos`` the tokenizer's EOS follows the response and is a label too, so a model trained on it learns where
    the response stops (Stanford Alpaca's recipe); a response cut by ``max_len`` loses it, as it does not end there.
    """
    ids, n_prompt = encode_joined(tokenizer, prompt, response)
    if eos:
        ids = _closing_eos(tokenizer, ids, n_prompt)[0]
    return ids[:max_len], ([IGNORE] * n_prompt + ids[n_prompt:])[:max_len]


@dataclass(frozen=True)
class ScoredResponse:
    """A (prompt, response) pair as evaluation scores it: the response's own tokens for its perplexity, and the EOS
    after it for whether the model stops there."""

    ids: list[int]  # prompt + response (+ the closing EOS), at most max_len
    labels: list[int]  # the response's own tokens; the prompt and an appended EOS are -100
    cut: bool  # max_len cut the response
    stop: int  # index in ids of the EOS that closes the response; -1 if there is none within max_len


def encode_scored_response(tokenizer: Any, prompt: str, response: str, max_len: int) -> ScoredResponse:
    """Prompt + response + closing EOS: labels score the response's tokens (an EOS the response text ends with
    included, as before), ``stop`` locates the EOS (appended when the text does not end with it)."""
    ids, n_prompt = encode_joined(tokenizer, prompt, response)
    labels = [IGNORE] * n_prompt + ids[n_prompt:]
    closed, stop = _closing_eos(tokenizer, ids, n_prompt)
    labels += [IGNORE] * (len(closed) - len(ids))
    return ScoredResponse(closed[:max_len], labels[:max_len], len(ids) > max_len, stop if stop < max_len else -1)


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T) long
    attention_mask: torch.Tensor  # (B, T) long, 1 = real token
    labels: torch.Tensor  # (B, T) long, -100 = not scored
    samples: torch.Tensor | None = None  # (B,) long: each row's index among the training samples (dense targets)

    @property
    def last_index(self) -> torch.Tensor:
        """Index of each row's last real token (right padding)."""
        return self.attention_mask.sum(dim=1) - 1

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device),
                     self.samples)


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int, labels: Sequence[Sequence[int]] | None = None,
              samples: Sequence[int] | None = None) -> Batch:
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
    return Batch(ids, mask, lab, torch.tensor(list(samples), dtype=torch.long) if samples is not None else None)


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
