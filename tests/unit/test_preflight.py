"""The restoration method's own checks run in the job check, before any weight loads: an architecture whose merged
model could not be exported, more directions than a head has, too few rows to probe — each a failure naming what
is wrong, while methods that need none of it are not refused for it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from app.schemas import JobSpec
from tests.tiny import instruction_rows, make_model, make_tokenizer, save_tiny, text_rows, write_jsonl
from worker.errors import JobFailure
from worker.run.check import check_job


def spec(model: Path, train: Path, **restoration: Any) -> JobSpec:
    return JobSpec.model_validate({"model": {"id": str(model)}, "pruning": {"method": "magnitude"},
                                   "restoration": restoration, "data": {"train": str(train)}})


@pytest.fixture(scope="module")
def train(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", instruction_rows(8))


def without_key(src: Path, dst: Path, key: str, **changes: Any) -> Path:
    """A copy of a model directory whose config.json lacks ``key`` (so transformers' default applies)."""
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).symlink_to(f)
    (dst / "config.json").unlink()
    config = json.loads((src / "config.json").read_text())
    config.pop(key)
    config.update(changes)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_a_sliding_window_the_config_leaves_to_transformers_is_refused_before_loading(tmp_path, train):
    """Mistral's config class defaults sliding_window to 4096: a config.json without the key has an active window,
    which the exported Llama model could not express."""
    mistral = without_key(save_tiny("mistral", tmp_path / "m"), tmp_path / "m-default-window", "sliding_window",
                          max_position_embeddings=32768)
    with pytest.raises(JobFailure) as err:
        check_job(spec(mistral, train, method="restorelcc", negatives="tfidf"))
    assert err.value.code == "unsupported_model" and "sliding window (4096 tokens)" in err.value.message
    assert check_job(spec(mistral, train, method="lora")).method is not None  # LoRA merges into the weights


def test_too_few_rows_to_probe_fail_only_the_methods_that_probe(tmp_path):
    model = save_tiny("llama", tmp_path / "m")
    three = write_jsonl(tmp_path / "three.jsonl", instruction_rows(3))
    for restoration in ({"method": "restorelcc"}, {"method": "bias", "head_selection": "probe"}):
        with pytest.raises(JobFailure) as err:
            check_job(spec(model, three, **restoration))
        assert (err.value.code, err.value.field) == ("invalid_data", "data.train")
        assert "contrastive probing needs at least 4" in err.value.message
    for restoration in ({"method": "lora"}, {"method": "bias", "head_selection": "all"},
                        {"method": "restorelcc", "head_selection": "random"}):
        assert check_job(spec(model, three, **restoration)).method.config.method == restoration["method"]


def test_more_directions_than_a_head_has_are_refused_naming_the_field(tmp_path, train):
    model = save_tiny("llama", tmp_path / "m")  # head_dim 16
    with pytest.raises(JobFailure) as err:
        check_job(spec(model, train, method="restorelcc", directions=17))
    assert (err.value.code, err.value.field) == ("invalid_spec", "restoration.directions")
    assert check_job(spec(model, train, method="restorelcc", directions=16)).method.config.directions == 16


def test_more_heads_than_the_model_has_are_refused_naming_the_field(tmp_path, train):
    model = save_tiny("llama", tmp_path / "m")  # 2 layers × 4 heads
    for restoration in ({"method": "restorelcc", "heads": 9},
                        {"method": "restorelcc", "heads": 9, "head_selection": "random"},
                        {"method": "bias", "heads": 9, "head_selection": "random"}):
        with pytest.raises(JobFailure) as err:
            check_job(spec(model, train, **restoration))
        assert (err.value.code, err.value.field) == ("invalid_spec", "restoration.heads")
        assert "restoration.heads 9 exceeds the model's 8 attention heads" in err.value.message
    assert check_job(spec(model, train, method="restorelcc", heads=8)).method.config.heads == 8
    assert check_job(spec(model, train, method="restorelcc", heads=0.99)).method.config.heads == 0.99  # a fraction
    assert check_job(spec(model, train, method="bias", heads=9, head_selection="all")).method is not None  # unused


def test_a_lora_target_naming_no_module_is_refused_before_loading(tmp_path, train):
    model = save_tiny("llama", tmp_path / "m")
    with pytest.raises(JobFailure) as err:
        check_job(spec(model, train, method="dora", lora_targets=["q_proj", "v_prj"]))
    assert (err.value.code, err.value.field) == ("invalid_spec", "restoration.lora_targets")
    assert "'v_prj' names no module" in err.value.message and "'q_proj'" not in err.value.message
    full = ["model.layers.1.self_attn.q_proj", "mlp.down_proj"]  # a full name, or its last dotted parts
    assert check_job(spec(model, train, method="lora", lora_targets=full)).method.config.lora_targets == full


def test_a_lora_target_sharing_the_tied_embeddings_is_refused_before_loading(tmp_path, train):
    """lm_head of a model with tied embeddings is the embedding matrix: an adapter merged into it would change every
    input embedding too (the merged model would not be the trained one), so it is refused; untied, it is a target."""
    tied, untied = make_model("llama"), make_model("llama")
    tied.config.tie_word_embeddings = True
    tied.tie_weights()
    tied.save_pretrained(tmp_path / "tied")
    untied.save_pretrained(tmp_path / "untied")
    for d in ("tied", "untied"):
        make_tokenizer().save_pretrained(tmp_path / d)
    with pytest.raises(JobFailure) as err:
        check_job(spec(tmp_path / "tied", train, method="lora", lora_targets=["q_proj", "lm_head"]))
    assert (err.value.code, err.value.field) == ("invalid_spec", "restoration.lora_targets")
    assert "'lm_head'" in err.value.message and "embed_tokens" in err.value.message
    assert check_job(spec(tmp_path / "tied", train, method="lora", lora_targets=["q_proj"])).method is not None
    assert check_job(spec(tmp_path / "untied", train, method="dora", lora_targets=["lm_head"])).method is not None


def test_a_sequence_longer_than_the_models_context_is_refused_naming_its_field(tmp_path, train):
    model = save_tiny("llama", tmp_path / "m")  # max_position_embeddings 512
    texts = str(write_jsonl(tmp_path / "texts.jsonl", text_rows(8)))
    base = {"model": {"id": str(model)}, "data": {"train": str(train)}, "evaluation": {"perplexity": [texts]}}
    for field, change in (("pruning.seq_len", {"pruning": {"method": "wanda", "seq_len": 513}}),
                          ("restoration.max_seq_len", {"restoration": {"method": "lora", "max_seq_len": 1024}}),
                          ("evaluation.max_seq_len", {"evaluation": {"perplexity": [texts], "max_seq_len": 600}})):
        with pytest.raises(JobFailure) as err:
            check_job(JobSpec.model_validate(base | change))
        assert (err.value.code, err.value.field) == ("invalid_spec", field)
        assert "exceeds the model's context of 512 tokens" in err.value.message
    # magnitude pruning reads no calibration text, and what is not evaluated has no length to check
    fine = base | {"pruning": {"method": "magnitude", "seq_len": 4096}, "evaluation": {"max_seq_len": 4096}}
    assert check_job(JobSpec.model_validate(fine)).method is not None


def test_probing_fails_naming_the_data_when_too_few_pairs_have_any_contrast(tmp_path):
    """Prompts that fill restoration.max_seq_len leave positive and negative the same tokens: such pairs are left
    out, and with fewer than four left the job fails naming data.train instead of probing on noise."""
    from tests.tiny import make_model, make_tokenizer
    from worker.errors import DataError
    from worker.model.arch import DecoderAdapter
    from worker.restore.registry import method_for

    rows = [{"prompt": f"question {i} " + "word " * 200, "response": f" answer {i}"} for i in range(3)]
    rows += [{"prompt": r["prompt"], "response": r["response"]} for r in instruction_rows(3)]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    job = JobSpec.model_validate({"model": {"id": str(tmp_path)}, "data": {"train": str(train)},
                                  "restoration": {"method": "restorelcc", "negatives": "tfidf", "max_seq_len": 64}})
    model = make_model("llama").eval()
    method = method_for(job)
    with pytest.raises(DataError) as err:
        method.prepare(job, model, make_tokenizer(), DecoderAdapter(model), lambda *_: None)
    assert err.value.field == "data.train"
    assert "3 of the 6 probe pairs differ from their contrastive negative" in err.value.message
