"""Perplexity, response perplexity and zero-shot multiple-choice accuracy.

Pure functions over a model and a tokenizer: no gradients, batches right-padded and sorted by length
(results come back in the input order). Multiple choice follows lm-evaluation-harness: each choice is
scored by the summed log-likelihood of its tokens after the context; ``acc_norm`` divides that by the
choice's length in characters.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from app.schemas import EvaluationSpec
from worker.errors import DataError, UnsupportedModelError
from worker.model.data import (
    ChoiceItem,
    batch_pad_id,
    chunks,
    cut_left,
    encode_continuations,
    encode_scored_response,
    eos_id,
    leading_specials,
    length_sorted,
    pad_batch,
    read_choices,
    read_instructions,
    read_texts,
    token_ids,
)

Progress = Callable[[float, str], None]


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _tail_logits(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, first: int) -> torch.Tensor:
    """Logits of positions ``first .. L-1`` only.

    The LM head is a fifth of a small model's compute and its (batch, L, vocab) output the largest tensor
    of a forward pass; prompts and contexts need no logits, so only the tail that is scored gets them
    (``logits_to_keep``). The values are those of a full forward pass.
    """
    length = input_ids.shape[1]
    first = max(0, min(first, length - 1))
    kwargs = {"logits_to_keep": length - first} if first > 0 else {}
    return model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).logits


def _token_nll(model: Any, seqs: Sequence[Sequence[int]], labels: Sequence[Sequence[int]], pad_id: int,
               stops: Sequence[int] | None = None, stop_token: int | None = None) -> torch.Tensor:
    """One padded batch's summed next-token NLL and scored-token count, and, where ``stops`` names each row's closing
    EOS (-1: none), that EOS's summed NLL, the rows with one, and those whose most likely token there is the EOS: a
    (5,) float64 tensor."""
    batch = pad_batch(seqs, pad_id, labels).to(_device(model))
    scored = batch.labels[:, 1:] != -100
    rows_first = torch.where(scored.any(1), scored.int().argmax(1), scored.shape[1])
    stop_at = [s - 1 if s > 0 else -1 for s in (stops or [-1] * len(seqs))]  # the position predicting each EOS
    first = min([int(rows_first.min()), *(p for p in stop_at if p >= 0)])  # earliest position whose next token counts
    logits = _tail_logits(model, batch.input_ids, batch.attention_mask, first)
    start = batch.input_ids.shape[1] - logits.shape[1]
    target = batch.labels[:, start + 1 :].to(logits.device)
    # Row by row: the float32 copy and log-softmax of one row beside the batch's logits, not of the whole batch
    # (with a 128k vocabulary those would be twice the logits themselves).
    out = torch.zeros(5, dtype=torch.float64, device=logits.device)
    for row in range(logits.shape[0]):
        out[0] += F.cross_entropy(logits[row, :-1].float(), target[row], ignore_index=-100, reduction="sum").double()
        if stop_at[row] >= 0:
            log_probs = logits[row, stop_at[row] - start].float().log_softmax(-1)
            out[2] -= log_probs[stop_token].double()
            out[3] += 1
            out[4] += (log_probs.argmax() == stop_token).double()
    out[1] = (target != -100).sum().double()
    return out.cpu()


class NonFiniteScores(ValueError):
    """The model's log-likelihoods on a set are NaN or infinite (float16 overflowing, a broken model): no metric can
    be taken from them (NaN compares as never greater: an accuracy would be the share of the first choice)."""


def _scored_nll(model: Any, tokenizer: Any, seqs: list[list[int]], labels: list[list[int]], batch_size: int,
                what: str, cut: int, stops: list[int] | None = None) -> dict[str, float]:
    """The token-weighted NLL of ``labels``; ``cut``: how many rows max_len shortened (reported as ``rows_cut``);
    with ``stops`` (each row's closing EOS, -1: none) also the mean NLL of those EOS tokens, and the share of them
    the model ranks first (``stop_nll``, ``stop_top1``; None when no row has one)."""
    pad_id = batch_pad_id(tokenizer)
    order = length_sorted(len(seqs), [len(s) for s in seqs])
    total = torch.zeros(5, dtype=torch.float64)
    with torch.no_grad():
        for idx in chunks(order, batch_size):
            total += _token_nll(model, [seqs[i] for i in idx], [labels[i] for i in idx], pad_id,
                                None if stops is None else [stops[i] for i in idx], eos_id(tokenizer))
    nll, tokens, stop_nll, stop_rows, stop_top1 = total.tolist()
    if not math.isfinite(nll) or not math.isfinite(stop_nll):
        raise NonFiniteScores(what)
    if tokens == 0:
        raise DataError(f"{what}: no tokens to score (every sequence is a single token or fully masked)")
    mean = nll / tokens
    # rows that add nothing (a prompt that fills max_len leaves no response token): counted, so the report says so
    unscored = sum(1 for lab in labels if not any(x != -100 for x in lab[1:]))
    result = {"ppl": math.exp(mean), "nll": mean, "tokens": int(tokens), "rows": len(seqs), "rows_unscored": unscored,
              "rows_cut": cut}
    if stops is not None:
        result |= {"stop_nll": stop_nll / stop_rows if stop_rows else None,
                   "stop_top1": stop_top1 / stop_rows if stop_rows else None, "stop_rows": int(stop_rows)}
    return result


def perplexity(model: Any, tokenizer: Any, texts: Sequence[str], batch_size: int = 8, max_len: int = 512
               ) -> dict[str, float]:
    """Token-weighted perplexity over all texts, each scored on its own (BOS, if added, is context only) up to
    ``max_len`` tokens (``rows_cut``: the texts longer than that)."""
    full = [token_ids(tokenizer, t) for t in texts]
    seqs = [s[:max_len] for s in full if s]
    return _scored_nll(model, tokenizer, seqs, seqs, batch_size, "perplexity", sum(len(s) > max_len for s in full))


def response_perplexity(model: Any, tokenizer: Any, pairs: Sequence[tuple[str, str]], batch_size: int = 8,
                        max_len: int = 512) -> dict[str, float]:
    """Perplexity of the responses given their prompts (prompt tokens are context, not scored; ``rows_cut``: the
    responses cut at their end by ``max_len``)."""
    encoded = [encode_scored_response(tokenizer, p, r, max_len) for p, r in pairs]
    return _scored_nll(model, tokenizer, [e.ids for e in encoded], [e.labels for e in encoded], batch_size,
                       "response perplexity", sum(e.cut for e in encoded), [e.stop for e in encoded])


def _joined_choices(tokenizer: Any, item: ChoiceItem) -> list[tuple[list[int], int]]:
    """Each choice as (ids of context + choice tokenised as one text, number of leading context ids)."""
    out = encode_continuations(tokenizer, item.context, item.choices)
    for choice, (ids, n_ctx) in zip(item.choices, out, strict=True):
        if len(ids) == n_ctx:
            raise DataError(f"choice {choice!r} encodes to no tokens after its context")
    return out


def _shared_context(joined: Sequence[tuple[list[int], int]]) -> list[int] | None:
    """The common context ids when every choice is one token after the same context ids, else None."""
    ids0, n0 = joined[0]
    one_token = all(len(ids) == n + 1 for ids, n in joined)
    if n0 < 1 or not one_token or any(ids[:n] != ids0[:n0] for ids, n in joined):
        return None
    return ids0[:n0]


def _choice_rows(tokenizer: Any, items: Sequence[ChoiceItem], max_len: int, cut: list[int] | None = None
                 ) -> list[tuple[list[int], list[int], bool]]:
    """Rows to run, as (token ids, scored choice token ids, shared), items in order; the index of every item whose
    context ``max_len`` cut is appended to ``cut``.

    Context and choice are tokenised as one text; a choice's tokens are those after the context's
    (``encode_continuations``). An item whose choices are all one token after the same context ids (BoolQ's
    " no"/" yes") becomes one row: its context, scored for every choice at the last position. Other items
    get a row per choice (context + choice tokens).
    """
    rows = []
    lead = leading_specials(tokenizer)  # a BOS stays first when a long context is cut
    for k, item in enumerate(items):
        joined = _joined_choices(tokenizer, item)
        ctx = _shared_context(joined)
        if cut is not None and any(len(joint) > max_len for joint, _ in joined):
            cut.append(k)
        if ctx is not None:
            ids = cut_left(ctx, max_len - 1, lead) if max_len > 1 else ctx[-1:]
            rows.append((ids, [j[-1] for j, _ in joined], True))
            continue
        for choice, (joint, n_ctx) in zip(item.choices, joined, strict=True):
            ids = cut_left(joint, max_len, lead)  # keep the choice, cut the context's start if too long
            n = min(len(joint) - n_ctx, len(ids) - 1)
            if n < 1:
                raise DataError(f"max_len {max_len} leaves no context before choice {choice!r}")
            rows.append((ids, ids[len(ids) - n:], False))
    return rows


def choice_logliks(model: Any, tokenizer: Any, items: Sequence[ChoiceItem], batch_size: int = 8,
                   max_len: int = 512, cut: list[int] | None = None) -> list[list[float]]:
    """Summed log-likelihood of every choice's tokens given its item's context (``cut``: as :func:`_choice_rows`)."""
    rows = _choice_rows(tokenizer, items, max_len, cut)
    pad_id = batch_pad_id(tokenizer)
    scores: list[list[float]] = [[] for _ in rows]
    order = length_sorted(len(rows), [len(r[0]) for r in rows])
    device = _device(model)
    with torch.no_grad():
        for idx in chunks(order, batch_size):
            batch = pad_batch([rows[i][0] for i in idx], pad_id).to(device)
            # first position whose logits are read: the one before the choice, or the context's last
            first = min(len(rows[i][0]) - (1 if rows[i][2] else len(rows[i][1]) + 1) for i in idx)
            logits = _tail_logits(model, batch.input_ids, batch.attention_mask, first)
            shift = batch.input_ids.shape[1] - logits.shape[1]
            for b, i in enumerate(idx):
                ids, scored, shared = rows[i]
                end = len(ids) - shift
                if not shared:
                    # context + choice: the choice's tokens, each predicted from the position before it
                    n = len(scored)
                    logp = torch.log_softmax(logits[b, end - n - 1 : end - 1].float(), dim=-1)
                    target = torch.tensor(scored, device=logp.device)[:, None]
                    scores[i] = [logp.gather(1, target).sum().item()]
                else:
                    # context only: every one-token choice predicted from the last position
                    logp = torch.log_softmax(logits[b, end - 1].float(), dim=-1)
                    scores[i] = logp[torch.tensor(scored, device=logp.device)].tolist()
    out, k = [], 0
    for item in items:
        got: list[float] = []
        while len(got) < len(item.choices):
            got += scores[k]
            k += 1
        out.append(got)
    return out


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))


def multiple_choice(model: Any, tokenizer: Any, items: Sequence[ChoiceItem], batch_size: int = 8,
                    max_len: int = 512) -> dict[str, float]:
    """``acc`` (argmax summed log-likelihood) and ``acc_norm`` (per character of the answer); ties → first."""
    if not items:
        raise DataError("multiple choice: no items")
    cut: list[int] = []
    lls = choice_logliks(model, tokenizer, items, batch_size, max_len, cut)
    if not all(math.isfinite(v) for ll in lls for v in ll):
        raise NonFiniteScores("multiple choice")
    acc = norm = 0
    for item, ll in zip(items, lls, strict=True):
        acc += _argmax(ll) == item.label
        norm += _argmax([v / _answer_chars(c) for v, c in zip(ll, item.choices, strict=True)]) == item.label
    n = len(items)
    return {"acc": acc / n, "acc_norm": norm / n, "n": n, "rows_cut": len(cut)}


def _answer_chars(choice: str) -> int:
    """The characters acc_norm divides by: the answer's, without the space that separates it from the context (as
    lm-evaluation-harness, whose choices come without it)."""
    return max(len(choice) - choice.startswith(" "), 1)


def _set_name(path: str, taken: dict[str, Any]) -> str:
    stem = Path(path).stem
    name, k = stem, 2
    while name in taken or name == "mean_acc":  # the tasks' mean is reported under that name
        name, k = f"{stem}_{k}", k + 1
    return name


def evaluate_spec(model: Any, tokenizer: Any, evaluation: EvaluationSpec, progress: Progress | None = None,
                  done: dict[str, Any] | None = None, on_set: Callable[[dict[str, Any]], None] | None = None
                  ) -> dict[str, Any]:
    """Every set in ``evaluation``, keyed by file stem; ``mean_acc`` over the multiple-choice tasks.

    ``{"wikitext_sentences": {"ppl", "nll", "tokens", "rows", "rows_unscored", "rows_cut"}, "valid": {"response_ppl",
    "nll", "tokens", "rows_unscored", "rows_cut"}, "boolq": {"acc", "acc_norm", "n", "rows_cut"}, "mean_acc": ...}``
    (``rows_cut``: the rows ``max_seq_len`` shortened). ``limit`` takes a fixed prefix of each set.
    Sets already in ``done`` (an interrupted evaluation's results) are not evaluated again; ``on_set(results)``
    hears the results so far after every set.
    """
    jobs: list[tuple[str, str]] = (
        [("ppl", p) for p in evaluation.perplexity]
        + [("response", p) for p in evaluation.response_perplexity]
        + [("choice", p) for p in evaluation.tasks]
    )
    bs, max_len = evaluation.batch_size, evaluation.max_seq_len
    was_training = model.training
    model.eval()
    results: dict[str, Any] = {}
    accs = []
    try:
        for k, (kind, path) in enumerate(jobs):
            name = _set_name(path, results)
            limit = evaluation.limits.get(Path(path).stem, evaluation.limit)
            if done and name in done:
                results[name] = done[name]
                if kind == "choice":
                    accs.append(results[name]["acc"])
                continue
            if progress:
                progress(k / len(jobs), f"evaluating {name}")
            try:
                if kind == "ppl":
                    results[name] = perplexity(model, tokenizer, read_texts(path, limit), bs, max_len)
                elif kind == "response":
                    r = response_perplexity(model, tokenizer, read_instructions(path, limit), bs, max_len)
                    results[name] = {"response_ppl": r["ppl"], "nll": r["nll"], "tokens": r["tokens"],
                                     "rows_unscored": r["rows_unscored"], "rows_cut": r["rows_cut"],
                                     "stop_nll": r["stop_nll"], "stop_top1": r["stop_top1"],
                                     "stop_rows": r["stop_rows"]}
                else:
                    results[name] = multiple_choice(model, tokenizer, read_choices(path, limit), bs, max_len)
                    accs.append(results[name]["acc"])
            except DataError as exc:  # a DataFormatError too: the file, or what its rows encode to
                raise DataError(exc.message, field=f"evaluation.{_field(kind)}") from exc
            except NonFiniteScores as exc:
                dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
                half = dtype == "float16"
                hint = "; float16 overflows on many models: set model.dtype to bfloat16 or float32" if half else ""
                raise UnsupportedModelError(
                    f"the model's log-likelihoods on evaluation set {name} are not finite (NaN or infinite) in "
                    f"{dtype}{hint}", field="model.dtype" if half else "model.id",
                ) from exc
            if on_set is not None:
                on_set(results)
    finally:
        model.train(was_training)
    if accs:
        results["mean_acc"] = sum(accs) / len(accs)
    if progress:
        progress(1.0, "evaluation done")
    return results


def _field(kind: str) -> str:
    return {"ppl": "perplexity", "response": "response_perplexity", "choice": "tasks"}[kind]
