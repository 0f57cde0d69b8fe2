"""The dense reference of an already-pruned model: its layer store is closed (its hooks removed) even when measuring
it fails, and it is measured on the job's own token ids: a dense model whose vocabulary differs is refused."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from app.schemas import JobSpec
from worker.errors import Cancelled
from worker.reporting import NullReporter
from worker.run import pipeline


class FakeStore:
    adapter = None

    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True


def test_the_dense_store_is_closed_when_measuring_the_dense_model_fails(monkeypatch, tmp_path: Path) -> None:
    store = FakeStore()
    loaded: list[str] = []

    def load(state: Any, source: Any, name: str) -> tuple[Any, Any, Any]:
        loaded.append(name)
        return object(), object(), store

    def measure(*_args: Any) -> None:
        raise Cancelled("cancelled while evaluating the dense model")

    monkeypatch.setattr(pipeline, "_load", load)
    monkeypatch.setattr(pipeline, "_tokenizer", lambda source: SimpleNamespace(get_vocab=lambda: {"a": 0}))
    monkeypatch.setattr(pipeline, "_measure_dense", measure)
    spec = JobSpec.model_validate({"model": {"id": "/m", "dense": "/d"}, "pruning": {"method": "none"},
                                   "data": {"train": "/t.jsonl"}})
    checked = SimpleNamespace(source="/m", info=SimpleNamespace(), dense_source="/d")
    state = pipeline.RunState(spec=spec, out_dir=tmp_path, checked=checked)
    with pytest.raises(Cancelled):
        pipeline._stage_loading(state, lambda _f, _m: None, NullReporter())
    assert loaded == ["dense"] and store.closed


def _pruned_and_dense(tmp_path: Path, dense_vocab: int = 320) -> tuple[Path, Path]:
    from transformers import AutoModelForCausalLM

    from tests.tiny import make_config, make_tokenizer, save_tiny

    pruned = save_tiny("llama", tmp_path / "pruned")
    dense = tmp_path / "dense"
    AutoModelForCausalLM.from_config(make_config("llama", vocab_size=dense_vocab)).save_pretrained(dense)
    make_tokenizer().save_pretrained(dense)
    return pruned, dense


def _spec(pruned: Path, dense: Path, tmp_path: Path) -> JobSpec:
    from tests.tiny import instruction_rows, write_jsonl

    train = write_jsonl(tmp_path / "train.jsonl", instruction_rows(16))
    return JobSpec.model_validate({
        "model": {"id": str(pruned), "dense": str(dense)}, "pruning": {"method": "none"},
        "restoration": {"method": "restorelcc", "probe_samples": 8, "max_steps": 2, "batch_size": 4,
                        "max_seq_len": 64},
        "data": {"train": str(train)}})


def test_a_dense_model_with_another_vocabulary_size_is_refused_before_any_weight_loads(tmp_path: Path) -> None:
    from worker.errors import SpecError
    from worker.run.check import check_job

    pruned, dense = _pruned_and_dense(tmp_path, dense_vocab=384)
    with pytest.raises(SpecError) as err:
        check_job(_spec(pruned, dense, tmp_path))
    assert err.value.field == "model.dense" and "vocabulary of 384 tokens, model.id 320" in err.value.message


def test_a_dense_model_whose_tokenizer_maps_other_ids_is_refused(tmp_path: Path) -> None:
    """Same shapes, same vocabulary size, but one token more in its tokenizer: its targets would be other tokens."""
    from transformers import AutoTokenizer

    from worker.errors import SpecError

    pruned, dense = _pruned_and_dense(tmp_path)
    tok = AutoTokenizer.from_pretrained(dense)
    tok.add_tokens(["<extra-token>"])
    tok.save_pretrained(dense)
    with pytest.raises(SpecError) as err:
        pipeline.run_pipeline(_spec(pruned, dense, tmp_path), tmp_path / "out", NullReporter())
    assert err.value.field == "model.dense"
    assert "tokenizer is not model.id's" in err.value.message and "<extra-token>" in err.value.message


def test_the_dense_model_is_measured_with_the_jobs_tokenizer(monkeypatch, tmp_path: Path) -> None:
    """Its own tokenizer may encode differently (here: it adds a BOS where model.id's does not) with the same
    vocabulary; the targets and probe captures must be taken on the ids training uses, model.id's."""
    from transformers import AutoTokenizer

    pruned, dense = _pruned_and_dense(tmp_path)
    job_tok = AutoTokenizer.from_pretrained(pruned)
    tok = AutoTokenizer.from_pretrained(dense)
    tok.add_bos_token = True
    tok.save_pretrained(dense)
    text = "a question and its answer"
    assert AutoTokenizer.from_pretrained(dense)(text)["input_ids"] != job_tok(text)["input_ids"]
    seen: list[Any] = []

    def measure(state: Any, model: Any, tokenizer: Any, *_args: Any) -> None:
        seen.append(tokenizer)
        raise Cancelled("enough: the dense model's tokenizer is known")

    monkeypatch.setattr(pipeline, "_measure_dense", measure)
    with pytest.raises(Cancelled):
        pipeline.run_pipeline(_spec(pruned, dense, tmp_path), tmp_path / "out", NullReporter())
    assert seen[0](text)["input_ids"] == job_tok(text)["input_ids"]
