"""Exporting in another dtype: the saved files are those of the model converted first, byte for byte, while the
live model keeps its own dtype (the cast goes one tensor at a time on the host, never a second model copy)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.tiny import SUPPORTED_KINDS, make_model, make_tokenizer
from worker.run.export import export_model


@pytest.mark.parametrize("kind", SUPPORTED_KINDS)
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_export_in_another_dtype_writes_the_converted_models_files(kind, dtype, tmp_path):
    model = make_model(kind).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    export_model(model, make_tokenizer(), tmp_path / "cast", dtype)
    converted = copy.deepcopy(model).to(getattr(torch, dtype))
    export_model(converted, make_tokenizer(), tmp_path / "converted")  # save_pretrained itself

    a, b = tmp_path / "cast", tmp_path / "converted"
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())
    assert json.loads((a / "config.json").read_text())["dtype"] == dtype
    assert all(v.dtype == torch.float32 and torch.equal(v, before[k]) for k, v in model.state_dict().items())
    reloaded = AutoModelForCausalLM.from_pretrained(a)
    assert reloaded.dtype == getattr(torch, dtype)
    assert all(torch.equal(v, converted.state_dict()[k]) for k, v in reloaded.state_dict().items()
               if k in converted.state_dict() and "rotary" not in k)  # rotary buffers are recomputed at load


def _masks(model) -> dict[str, torch.Tensor]:
    return {name: m.weight == 0 for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def test_a_cast_that_overflows_or_flushes_kept_weights_is_named(tmp_path):
    from worker.run.pipeline import _saved_weights_problem

    model = make_model("llama").eval()
    masks = _masks(model)
    export_model(model, make_tokenizer(), tmp_path / "fine", "float16")
    assert _saved_weights_problem(tmp_path / "fine", masks) is None
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = 1e6  # beyond float16's 65504
    export_model(model, make_tokenizer(), tmp_path / "big", "float16")
    assert _saved_weights_problem(tmp_path / "big", masks) == \
        "turns values of model.layers.1.mlp.down_proj.weight infinite"
    export_model(model, make_tokenizer(), tmp_path / "bf16", "bfloat16")  # float32's range: still finite
    assert _saved_weights_problem(tmp_path / "bf16", masks) is None
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = 1e-30  # below float16's smallest subnormal
    export_model(model, make_tokenizer(), tmp_path / "tiny", "float16")
    assert _saved_weights_problem(tmp_path / "tiny", masks) == \
        "turns kept weights of model.layers.1.mlp.down_proj.weight into zeros"


def test_the_exported_tokenizer_is_the_models_own_without_a_pad_token_it_never_had(tmp_path):
    from worker.model.data import batch_pad_id

    tok = make_tokenizer()
    tok.pad_token = None
    assert tok.pad_token_id is None and tok.eos_token_id is not None
    assert batch_pad_id(tok) == tok.eos_token_id  # batches pad with EOS (masked)...
    assert tok.pad_token_id is None  # ...without changing the tokenizer
    export_model(make_model("llama").eval(), tok, tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert saved.get("pad_token") is None


@pytest.mark.parametrize("dtype", ["auto", "bfloat16"])
def test_a_model_over_the_shard_size_is_written_in_shards_with_an_index_as_save_pretrained_writes_them(dtype,
                                                                                                      tmp_path):
    model = make_model("llama").eval()
    size = 60_000  # bytes: a few tensors a shard
    export_model(model, make_tokenizer(), tmp_path / "ours", dtype, max_shard_size=size)
    reference = copy.deepcopy(model).to(torch.bfloat16) if dtype == "bfloat16" else model
    reference.save_pretrained(tmp_path / "theirs", max_shard_size=size)
    ours = sorted(p.name for p in (tmp_path / "ours").glob("model*"))
    assert ours == sorted(p.name for p in (tmp_path / "theirs").glob("model*"))
    assert len(ours) > 3 and "model.safetensors.index.json" in ours
    for name in ours:
        a, b = (tmp_path / "ours" / name), (tmp_path / "theirs" / name)
        if name.endswith(".json"):
            assert json.loads(a.read_text()) == json.loads(b.read_text())
        else:
            assert a.read_bytes() == b.read_bytes(), name
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ours")
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in reloaded.state_dict().items()
               if "rotary" not in k)


def test_tokenizer_files_save_pretrained_leaves_out_are_copied_from_the_source(tmp_path):
    """SentencePiece's tokenizer.model and a tiktoken vocabulary travel with the export (llama.cpp's converter reads
    them); a file the export already wrote is left as it is, and a FIFO is never opened."""
    import os

    from worker.run.export import copy_tokenizer_files

    source, out = tmp_path / "source", tmp_path / "out"
    source.mkdir()
    out.mkdir()
    (source / "tokenizer.model").write_bytes(b"\x00spm model bytes")
    (source / "cl100k.tiktoken").write_text("vocab", encoding="utf-8")
    (source / "other.model").write_text("not a tokenizer", encoding="utf-8")
    (out / "cl100k.tiktoken").write_text("written by the export", encoding="utf-8")
    os.mkfifo(source / "o200k.tiktoken")
    assert copy_tokenizer_files(source, out) == ["tokenizer.model"]
    assert (out / "tokenizer.model").read_bytes() == b"\x00spm model bytes"
    assert (out / "cl100k.tiktoken").read_text(encoding="utf-8") == "written by the export"
    assert not (out / "other.model").exists() and not (out / "o200k.tiktoken").exists()
