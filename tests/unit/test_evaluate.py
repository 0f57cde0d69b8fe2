"""Evaluation: batched + padded equals one-by-one, acc_norm by brute force, limits, response masking."""

from __future__ import annotations

import math

import pytest
import torch

from app.schemas import EvaluationSpec
from tests.tiny import choice_rows, instruction_rows, make_model, make_tokenizer, text_rows, write_jsonl
from worker.errors import DataError
from worker.model.data import ChoiceItem
from worker.run.evaluate import (
    choice_logliks,
    evaluate_spec,
    multiple_choice,
    perplexity,
    response_perplexity,
)

TEXTS = [r["text"] for r in text_rows(7)] + ["Short.", "A somewhat longer sentence about pruning and heads."]


@pytest.fixture(scope="module")
def mt():
    return make_model("gqa"), make_tokenizer()


def _nll_one(model, ids: list[int], scored_from: int) -> tuple[float, int]:
    """Unpadded reference: summed NLL of ids[scored_from:] given everything before."""
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
    total = -sum(logp[t - 1, ids[t]].item() for t in range(max(scored_from, 1), len(ids)))
    return total, len(ids) - max(scored_from, 1)


def test_perplexity_batched_equals_one_by_one(mt):
    model, tok = mt
    got = perplexity(model, tok, TEXTS, batch_size=4, max_len=24)
    nll = n = 0
    for t in TEXTS:
        a, b = _nll_one(model, tok(t)["input_ids"][:24], 0)
        nll, n = nll + a, n + b
    assert got["tokens"] == n
    assert got["nll"] == pytest.approx(nll / n, rel=1e-4)
    assert got["ppl"] == pytest.approx(math.exp(nll / n), rel=1e-4)
    # batch size does not change the result
    assert perplexity(model, tok, TEXTS, batch_size=1, max_len=24)["ppl"] == pytest.approx(got["ppl"], rel=1e-5)


def test_response_perplexity_masks_prompt(mt):
    model, tok = mt
    pairs = [(r["prompt"], r["response"]) for r in instruction_rows(6)]
    got = response_perplexity(model, tok, pairs, batch_size=3, max_len=64)
    nll = n = 0
    for p, r in pairs:
        pid = tok(p)["input_ids"]
        rid = tok(r, add_special_tokens=False)["input_ids"]
        a, b = _nll_one(model, (pid + rid)[:64], len(pid))
        nll, n = nll + a, n + b
    assert got["tokens"] == n
    assert got["nll"] == pytest.approx(nll / n, rel=1e-4)
    full = perplexity(model, tok, [p + r for p, r in pairs], batch_size=3, max_len=64)
    assert full["tokens"] > got["tokens"] and abs(full["ppl"] - got["ppl"]) > 1e-3


def test_choice_logliks_batched_equal_unpadded(mt):
    model, tok = mt
    items = [ChoiceItem(r["context"], r["choices"], r["label"]) for r in choice_rows(5)]
    items.append(ChoiceItem("Question: which is a colour?\nAnswer:", [" blue", " the river flows", " 7"], 0))
    got = choice_logliks(model, tok, items, batch_size=4, max_len=64)
    for item, lls in zip(items, got, strict=True):
        ctx = tok(item.context)["input_ids"]
        for choice, ll in zip(item.choices, lls, strict=True):
            cont = tok(choice, add_special_tokens=False)["input_ids"]
            ref, n = _nll_one(model, ctx + cont, len(ctx))
            assert n == len(cont)
            assert ll == pytest.approx(-ref, rel=1e-4)


def test_only_scored_tail_gets_logits(mt):
    """Prompts and contexts get no LM-head logits: the forward asks only for the scored tail."""
    model, tok = mt
    kept: list[tuple[int, int]] = []

    def spy(module, args, kwargs, out):
        kept.append((kwargs["input_ids"].shape[1], out.logits.shape[1]))

    handle = model.register_forward_hook(spy, with_kwargs=True)
    try:
        pairs = [(r["prompt"], r["response"]) for r in instruction_rows(4)]
        response_perplexity(model, tok, pairs, batch_size=4, max_len=64)
        items = [ChoiceItem(r["context"], r["choices"], r["label"]) for r in choice_rows(4)]
        choice_logliks(model, tok, items, batch_size=8, max_len=64)
    finally:
        handle.remove()
    assert len(kept) == 2
    for length, with_logits in kept:
        assert 1 <= with_logits < length


class _FixedModel(torch.nn.Module):
    """Log-probs chosen by hand: token t always has log-probability LOGP[t], whatever came before."""

    def __init__(self, logp: torch.Tensor):
        super().__init__()
        self.w = torch.nn.Parameter(logp.clone())

    def forward(self, input_ids, attention_mask=None, logits_to_keep=0):
        class Out:
            pass

        o = Out()
        o.logits = self.w.expand(*input_ids.shape, -1)[:, -logits_to_keep:]
        return o


class _CharTok:
    """One token per character (ord), no special tokens."""

    pad_token_id = 0
    eos_token = None

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [ord(c) for c in text]}


def test_acc_norm_brute_force():
    # 'a' is likely, 'b' much less: a long choice of a's beats a short b on acc_norm but not on acc.
    logp = torch.full((128,), -20.0)
    logp[ord("a")], logp[ord("b")], logp[ord("?")] = -1.0, -2.5, -0.1
    logp = torch.log_softmax(logp, -1)
    model, tok = _FixedModel(logp), _CharTok()
    items = [
        ChoiceItem("?", ["aaa", "b"], 0),  # sum: -3 vs -2.5 → acc picks 1; per char: -1 vs -2.5 → norm picks 0
        ChoiceItem("?", ["b", "aaaa"], 0),  # acc: 0 (-2.5 > -4); norm: 1 (-1 > -2.5)
        ChoiceItem("?", ["a", "a"], 1),  # tie → first → both wrong
    ]
    lls = choice_logliks(model, tok, items, batch_size=2, max_len=16)
    for item, ll in zip(items, lls, strict=True):
        want = [sum(logp[ord(c)].item() for c in ch) for ch in item.choices]
        assert ll == pytest.approx(want, rel=1e-5)
    def first_max(v: list[float]) -> int:
        return next(i for i, x in enumerate(v) if x == max(v))

    brute_acc = brute_norm = 0
    for it, ll in zip(items, lls, strict=True):
        brute_acc += first_max(ll) == it.label
        brute_norm += first_max([v / len(c) for v, c in zip(ll, it.choices, strict=True)]) == it.label
    got = multiple_choice(model, tok, items, batch_size=2, max_len=16)
    assert got == {"acc": brute_acc / 3, "acc_norm": brute_norm / 3, "n": 3, "rows_cut": 0}
    assert got["acc"] == pytest.approx(1 / 3) and got["acc_norm"] == pytest.approx(1 / 3)
    # item 0 is right on norm only, item 1 on acc only
    assert multiple_choice(model, tok, items[:1], 1, 16) == {"acc": 0.0, "acc_norm": 1.0, "n": 1, "rows_cut": 0}
    assert multiple_choice(model, tok, items[1:2], 1, 16) == {"acc": 1.0, "acc_norm": 0.0, "n": 1, "rows_cut": 0}


def test_long_context_is_cut_from_the_left(mt):
    model, tok = mt
    item = ChoiceItem("word " * 200 + "Answer:", [" yes", " no"], 0)
    lls = choice_logliks(model, tok, [item], batch_size=2, max_len=32)
    assert all(math.isfinite(v) and v < 0 for v in lls[0])


def test_what_max_seq_len_cuts_is_counted_in_every_result(mt):
    """A text, response or context longer than max_seq_len is scored cut, never silently: rows_cut says how many."""
    model, tok = mt
    long = "word " * 200
    assert perplexity(model, tok, [long, "Short."], 2, 32)["rows_cut"] == 1
    assert perplexity(model, tok, [long, "Short."], 2, 2048)["rows_cut"] == 0
    pairs = [("Say it.", long), ("Say it.", "Short.")]
    assert response_perplexity(model, tok, pairs, 2, 32)["rows_cut"] == 1
    items = [ChoiceItem(long + "Answer:", [" yes", " no"], 0), ChoiceItem("Answer:", [" yes", " no"], 1),
             ChoiceItem(long + "Answer:", [" a long answer", " b"], 0)]
    assert multiple_choice(model, tok, items, 2, 32)["rows_cut"] == 2
    assert multiple_choice(model, tok, items, 2, 2048)["rows_cut"] == 0


def test_evaluate_spec_names_limit_and_mean(mt, tmp_path):
    model, tok = mt
    texts = write_jsonl(tmp_path / "wiki.jsonl", text_rows(10))
    valid = write_jsonl(tmp_path / "valid.jsonl", instruction_rows(10))
    boolq = write_jsonl(tmp_path / "boolq.jsonl", choice_rows(10))
    piqa = write_jsonl(tmp_path / "piqa.jsonl", list(reversed(choice_rows(9))))
    spec = EvaluationSpec(perplexity=[str(texts)], response_perplexity=[str(valid)],
                          tasks=[str(boolq), str(piqa)], limit=4, batch_size=3, max_seq_len=64)
    seen = []
    model.train()
    res = evaluate_spec(model, tok, spec, progress=lambda f, m: seen.append((f, m)))
    assert model.training  # state restored
    model.eval()
    assert set(res) == {"wiki", "valid", "boolq", "piqa", "mean_acc"}
    assert res["wiki"] == perplexity(model, tok, [r["text"] for r in text_rows(4)], 3, 64)
    assert set(res["valid"]) == {"response_ppl", "nll", "tokens", "rows_unscored", "rows_cut", "stop_nll", "stop_top1",
                                 "stop_rows"}
    assert res["boolq"]["n"] == 4 and res["piqa"]["n"] == 4
    items = [ChoiceItem(r["context"], r["choices"], r["label"]) for r in choice_rows(4)]
    assert res["boolq"] == multiple_choice(model, tok, items, 3, 64)
    assert res["mean_acc"] == pytest.approx((res["boolq"]["acc"] + res["piqa"]["acc"]) / 2)
    assert seen[-1][0] == 1.0 and [f for f, _ in seen] == sorted(f for f, _ in seen)


def test_an_interrupted_evaluation_continues_with_the_sets_it_had_not_finished(mt, tmp_path):
    model, tok = mt
    texts = write_jsonl(tmp_path / "wiki.jsonl", text_rows(6))
    boolq = write_jsonl(tmp_path / "boolq.jsonl", choice_rows(6))
    piqa = write_jsonl(tmp_path / "piqa.jsonl", choice_rows(5))
    spec = EvaluationSpec(perplexity=[str(texts)], tasks=[str(boolq), str(piqa)], limit=4, batch_size=3,
                          max_seq_len=64)
    notes = []
    full = evaluate_spec(model, tok, spec, on_set=lambda r: notes.append(dict(r)))
    assert [list(n) for n in notes] == [["wiki"], ["wiki", "boolq"], ["wiki", "boolq", "piqa"]]
    marked = {**notes[1], "wiki": {**notes[1]["wiki"], "ppl": -1.0}}  # a value no evaluation gives: not redone
    resumed = evaluate_spec(model, tok, spec, done=marked)
    assert resumed["wiki"]["ppl"] == -1.0 and resumed["boolq"] == full["boolq"] and resumed["piqa"] == full["piqa"]
    assert resumed["mean_acc"] == full["mean_acc"]


def test_evaluate_spec_bad_file_names_field(mt, tmp_path):
    model, tok = mt
    spec = EvaluationSpec(tasks=[str(tmp_path / "missing.jsonl")])
    with pytest.raises(DataError) as err:
        evaluate_spec(model, tok, spec)
    assert err.value.field == "evaluation.tasks" and "missing.jsonl" in err.value.message


def test_evaluate_spec_per_set_limits_override(mt, tmp_path):
    model, tok = mt
    write_jsonl(tmp_path / "boolq.jsonl", choice_rows(9))
    write_jsonl(tmp_path / "piqa.jsonl", choice_rows(9))
    ev = EvaluationSpec(tasks=[str(tmp_path / "boolq.jsonl"), str(tmp_path / "piqa.jsonl")], limit=6,
                        limits={"piqa": 3})
    out = evaluate_spec(model, tok, ev)
    assert out["boolq"]["n"] == 6 and out["piqa"]["n"] == 3


def test_one_token_choices_share_one_context_row(mt):
    """Items whose choices are one token each (BoolQ's " no"/" yes") run once per item,
    and score exactly as one row per choice would."""
    from worker.run.evaluate import _choice_rows

    model, tok = mt
    items = [ChoiceItem(f"Passage {i} about water.\nQuestion: is it wet?\nAnswer:", ["A", "B"], 1)
             for i in range(4)]
    assert all(len(tok(c, add_special_tokens=False)["input_ids"]) == 1 for c in ("A", "B"))
    assert len(_choice_rows(tok, items, 64)) == len(items)
    got = choice_logliks(model, tok, items, batch_size=3, max_len=64)
    for item, lls in zip(items, got, strict=True):
        ctx = tok(item.context)["input_ids"]
        for choice, ll in zip(item.choices, lls, strict=True):
            ref, _ = _nll_one(model, ctx + tok(choice, add_special_tokens=False)["input_ids"], len(ctx))
            assert ll == pytest.approx(-ref, rel=1e-4)


def test_rows_a_long_prompt_leaves_without_a_response_token_are_counted_not_hidden(tmp_path):
    from app.methods import LoRAConfig
    from worker.restore.batches import training_samples
    from worker.run.evaluate import response_perplexity

    tok, model = make_tokenizer(), make_model("llama").eval()
    pairs = [(r["prompt"], r["response"]) for r in instruction_rows(3)]
    long_pair = ("word " * 200, " a response cut away")
    scored = response_perplexity(model, tok, pairs, batch_size=2, max_len=64)
    with_long = response_perplexity(model, tok, [*pairs, long_pair], batch_size=2, max_len=64)
    assert scored["rows_unscored"] == 0 and with_long["rows_unscored"] == 1
    assert with_long["tokens"] == scored["tokens"] and with_long["rows"] == 4
    rows = instruction_rows(3) + [{"prompt": long_pair[0], "response": long_pair[1]}]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    samples, left_out = training_samples(tok, str(path), LoRAConfig(max_seq_len=64))
    assert (len(samples), left_out) == (3, 1)


def test_acc_norm_divides_by_the_answer_without_its_separating_space():
    """As lm-evaluation-harness: the space between context and answer is scored with the answer but not counted in
    its length. Here that flips the choice: per character with the space, ' b' wins; without it, ' aaaa' does."""
    logp = torch.full((128,), -20.0)
    logp[ord("a")], logp[ord("b")], logp[ord(" ")] = -1.0, -0.95, -0.1
    logp = torch.log_softmax(logp, -1)
    item = ChoiceItem("?", [" aaaa", " b"], 0)
    ll = choice_logliks(_FixedModel(logp), _CharTok(), [item], batch_size=1, max_len=16)[0]
    with_space = [v / len(c) for v, c in zip(ll, item.choices, strict=True)]
    assert with_space[1] > with_space[0] and ll[0] / 4 > ll[1] / 1
    assert multiple_choice(_FixedModel(logp), _CharTok(), [item], 1, 16) == {"acc": 0.0, "acc_norm": 1.0, "n": 1,
                                                                              "rows_cut": 0}


class _NaNAfter(torch.nn.Module):
    """The tiny model, its logits made NaN: what a float16 overflow leaves."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        out = self.model(*args, **kwargs)
        out.logits = out.logits * float("nan")
        return out


@pytest.mark.parametrize("kind", ["perplexity", "response_perplexity", "tasks"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_logits_that_are_not_finite_fail_the_evaluation_naming_the_set_and_dtype(mt, tmp_path, kind, dtype):
    """NaN log-likelihoods give no metric: never an accuracy that is the share of first choices, nor a null
    perplexity; the job fails unsupported_model naming the set, and model.dtype with its remedy when float16 (which
    overflows), else the model."""
    import copy

    from worker.errors import UnsupportedModelError

    model, tok = mt
    files = {"perplexity": text_rows(4), "response_perplexity": instruction_rows(4), "tasks": choice_rows(4)}
    path = write_jsonl(tmp_path / "broken_set.jsonl", files[kind])
    spec = EvaluationSpec(**{kind: [str(path)]}, batch_size=2, max_seq_len=64)
    with pytest.raises(UnsupportedModelError) as err:
        evaluate_spec(_NaNAfter(copy.deepcopy(model).to(dtype)), tok, spec)
    assert "broken_set" in err.value.message and "not finite" in err.value.message
    if dtype == torch.float16:
        assert err.value.field == "model.dtype" and "set model.dtype to bfloat16 or float32" in err.value.message
    else:
        assert err.value.field == "model.id" and "model.dtype" not in err.value.message


def test_a_task_file_named_mean_acc_keeps_its_results_beside_the_mean(mt, tmp_path):
    model, tok = mt
    a = write_jsonl(tmp_path / "mean_acc.jsonl", choice_rows(4))
    b = write_jsonl(tmp_path / "boolq.jsonl", choice_rows(4))
    res = evaluate_spec(model, tok, EvaluationSpec(tasks=[str(a), str(b)], batch_size=2, max_seq_len=64))
    assert set(res) == {"mean_acc_2", "boolq", "mean_acc"} and res["mean_acc_2"]["n"] == 4
    assert res["mean_acc"] == pytest.approx((res["mean_acc_2"]["acc"] + res["boolq"]["acc"]) / 2)
