"""Layer streaming computes what the whole model computes, one decoder layer in memory at a time: logits, pruning
(every method), head captures and training, each compared bit for bit with the model loaded whole (float32)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from app.schemas import PruningSpec
from tests.tiny import SUPPORTED_KINDS, instruction_batches, instruction_rows, make_model, make_tokenizer, save_tiny
from worker.model.arch import DecoderAdapter
from worker.model.calibration import build_calibration_batches
from worker.model.streaming import checkpointed_layers, load_streamed
from worker.prune.runner import prune_model
from worker.restore.offsets.merge import check_merge, export_config, merge_into_o_proj, merge_reference
from worker.restore.offsets.train import train_offsets
from worker.restore.restorelcc.capture import build_probe_inputs, capture_head_outputs
from worker.restore.restorelcc.steps import make_offsets
from worker.run.export import export_model, export_streamed


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("streaming")
    return {kind: save_tiny(kind, root / kind) for kind in SUPPORTED_KINDS}


def both(saved, kind, tmp_path):
    whole = AutoModelForCausalLM.from_pretrained(saved[kind], dtype=torch.float32).eval()
    streamed, store = load_streamed(saved[kind], torch.float32, "cpu", tmp_path / "scratch")
    return whole, streamed, store


@pytest.mark.parametrize("kind", SUPPORTED_KINDS)
def test_logits_are_the_whole_models(saved, kind, tmp_path):
    whole, streamed, store = both(saved, kind, tmp_path)
    ids = torch.randint(0, 300, (3, 21), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, 15:] = 0
    with torch.no_grad():
        expected = whole(input_ids=ids, attention_mask=mask).logits
        got = streamed(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(expected, got)
    assert store.most_loaded == 1 and not store.loaded
    assert all(p.is_meta for p in store.adapter.layers[0].parameters())


def test_a_layer_whose_block_fails_is_not_saved(saved, tmp_path):
    """A block that raises leaves the layer's files as they were (a half-changed layer is never its source) and the
    error is the block's own."""
    _, _, store = both(saved, "llama", tmp_path)
    name = "model.layers.0.mlp.down_proj.weight"
    before = store.state_tensor(name).clone()
    with pytest.raises(RuntimeError, match="the block's own error"), store.resident(0, write=True) as layer:
        layer.mlp.down_proj.weight.data.zero_()
        raise RuntimeError("the block's own error")
    assert not list((tmp_path / "scratch").glob("*.safetensors")) and not store.loaded
    assert torch.equal(store.state_tensor(name), before)


@pytest.mark.parametrize(("kind", "method", "pattern"), [("llama", "wanda", "unstructured"),
                                                         ("gemma3", "sparsegpt", "2:4"),
                                                         ("qwen2", "magnitude", "unstructured")])
def test_pruning_writes_the_whole_models_weights(saved, kind, method, pattern, tmp_path):
    whole, streamed, store = both(saved, kind, tmp_path)
    spec = PruningSpec(method=method, pattern=pattern)
    texts = [r["prompt"] + r["response"] for r in instruction_rows(24)]
    calibration = build_calibration_batches(make_tokenizer(), texts, n_samples=8, seq_len=32, batch_size=4, seed=0)
    prune_model(whole, DecoderAdapter(whole), spec, calibration)
    prune_model(streamed, store.adapter, spec, calibration, layer_scope=lambda i: store.resident(i, write=True))
    assert store.most_loaded == 1 and not store.loaded
    expected = whole.state_dict()
    layers = [n for n in expected if n.startswith("model.layers.")]
    for name in layers:
        assert torch.equal(store.state_tensor(name), expected[name]), name
    assert {store.files[n].parent for n in layers} == {tmp_path / "scratch"}
    assert len(list((tmp_path / "scratch").glob("*.safetensors"))) == len(store.adapter.layers)
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(whole(input_ids=ids).logits, streamed(input_ids=ids).logits)


def test_captures_are_the_whole_models(saved, tmp_path):
    whole, streamed, store = both(saved, "gqa", tmp_path)
    pairs = [(r["prompt"], r["response"]) for r in instruction_rows(12)]
    probe = build_probe_inputs(make_tokenizer(), pairs, max_len=64, batch_size=4)
    expected = capture_head_outputs(whole, DecoderAdapter(whole), probe.prompt)
    assert torch.equal(capture_head_outputs(streamed, store.adapter, probe.prompt), expected)
    assert store.most_loaded == 1


def test_training_with_layers_recomputed_is_the_whole_models(saved, tmp_path):
    whole, streamed, store = both(saved, "gqa", tmp_path)
    heads = [(0, 1), (1, 0), (1, 3)]
    a = make_offsets(heads, DecoderAdapter(whole).info, None, seed=0)
    b = copy.deepcopy(a)
    batches = instruction_batches(8, 4)
    expected = train_offsets(whole, DecoderAdapter(whole), a, batches, lr=5e-2, max_steps=4, seed=0)
    with checkpointed_layers(store):
        got = train_offsets(streamed, store.adapter, b, batches, lr=5e-2, max_steps=4, seed=0)
    assert got["loss_curve"] == expected["loss_curve"]
    assert torch.equal(a.b, b.b)
    assert store.most_loaded <= 2 and not store.loaded  # the layer being recomputed, and the one its graph holds
    assert "forward" not in store.adapter.layers[0].__dict__
    assert all(not p.requires_grad for p in streamed.parameters())


@pytest.mark.parametrize("kind", SUPPORTED_KINDS)
def test_merged_and_exported_byte_for_byte_as_the_whole_model(saved, kind, tmp_path):
    whole, streamed, store = both(saved, kind, tmp_path)
    info = DecoderAdapter(whole).info
    offsets = make_offsets([(0, 1), (info.num_layers - 1, 0)], info, None, seed=0)
    with torch.no_grad():
        offsets.b.normal_(0, 0.5, generator=torch.Generator().manual_seed(2))
    adapter = DecoderAdapter(whole)
    expected_ref = merge_reference(adapter, offsets)
    merged = merge_into_o_proj(whole, adapter, offsets)
    check_merge(DecoderAdapter(merged), expected_ref)
    export_model(merged, make_tokenizer(), tmp_path / "whole")

    scope = store.resident
    refs = merge_reference(store.adapter, offsets, layer_scope=scope)
    assert merge_into_o_proj(streamed, store.adapter, offsets, layer_scope=scope) is streamed
    check_merge(store.adapter, refs, layer_scope=scope)
    export_streamed(streamed, store, make_tokenizer(), tmp_path / "streamed", config=export_config(streamed.config))
    assert store.most_loaded == 1 and not store.loaded
    a, b = tmp_path / "whole", tmp_path / "streamed"
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())
    reloaded = AutoModelForCausalLM.from_pretrained(b)
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, merged(input_ids=ids).logits)


def test_auto_dtype_is_the_one_the_whole_model_loads_in(tmp_path):
    from worker.model.load import load_model, load_streamed_model, resolve_source

    model = make_model("llama").to(torch.bfloat16)
    model.save_pretrained(tmp_path / "m")
    make_tokenizer().save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config.pop("dtype", None)
    config.pop("torch_dtype", None)
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    source = resolve_source(str(tmp_path / "m"))
    whole, _ = load_model(source, "auto")
    streamed, _, store = load_streamed_model(source, "auto", "cpu", tmp_path / "scratch")
    assert whole.dtype == streamed.dtype == store.dtype == torch.bfloat16


def test_a_hub_model_may_stream_and_a_gguf_may_not(tmp_path):
    from types import SimpleNamespace

    from app.schemas import JobSpec
    from worker.run.check import streaming_problem

    spec = JobSpec.model_validate({"model": {"id": "org/model"}, "data": {"train": "/t.jsonl"}})
    hub = SimpleNamespace(kind="hf", repo_id="org/model", path=tmp_path / "nothing-yet", field="model.id")
    gguf = SimpleNamespace(kind="gguf", repo_id=None, path=tmp_path / "m.gguf", field="model.id")
    assert streaming_problem(spec, hub, None) is None
    assert "GGUF" in streaming_problem(spec, gguf, None)
    lora = JobSpec.model_validate({"model": {"id": "org/model"}, "data": {"train": "/t.jsonl"},
                                   "restoration": {"method": "lora"}})
    assert "'lora' does not run on a streamed model" in streaming_problem(lora, hub, None)


def test_a_streamed_export_keeps_the_models_generation_config(tmp_path):
    """The stop tokens and sampling settings the model ships (generation_config.json) are exported as the whole
    model exports them, with the KV cache on: a streamed model is built from its config, which would make another."""
    from transformers import GenerationConfig

    from worker.model.load import load_model, resolve_source

    source_dir = save_tiny("llama", tmp_path / "m")
    GenerationConfig(bos_token_id=0, eos_token_id=[0, 7, 9], pad_token_id=1, do_sample=True, temperature=0.6,
                     top_p=0.9).save_pretrained(source_dir)
    whole, tokenizer = load_model(resolve_source(str(source_dir)))
    export_model(whole, tokenizer, tmp_path / "whole")
    streamed, store = load_streamed(source_dir, torch.float32, "cpu", tmp_path / "scratch")
    export_streamed(streamed, store, tokenizer, tmp_path / "streamed")
    exported = [json.loads((tmp_path / d / "generation_config.json").read_text()) for d in ("whole", "streamed")]
    assert exported[0] == exported[1]
    assert exported[1]["eos_token_id"] == [0, 7, 9] and exported[1]["temperature"] == 0.6
    assert exported[1].get("use_cache", True) is True
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "streamed")
    out = reloaded.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
    assert out.past_key_values is not None
