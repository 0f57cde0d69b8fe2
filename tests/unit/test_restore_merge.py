"""Merging offsets into o_proj biases: exact, sparsity-preserving, loadable with plain transformers."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.tiny import make_config, make_model
from worker.errors import UnsupportedModelError
from worker.model.arch import DecoderAdapter
from worker.model.data import pad_batch
from worker.restore.offsets.heads import HeadOffsets, inject
from worker.restore.offsets.merge import (
    check_mergeable,
    load_restoration,
    merge_into_o_proj,
    restoration_info,
    save_restoration,
)
from worker.run.export import reload_problem

KINDS = ["llama", "gqa", "qwen2", "gemma3", "mistral", "qwen3", "gemma2"]


def with_random_biases(model: torch.nn.Module) -> torch.nn.Module:
    """Tiny models start with zero biases; make existing ones (Qwen2's q/k/v) non-zero so they count."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.1)
    return model


def prune_randomly(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """A 'pruned' copy: half the weights of every Linear inside the decoder layers set to zero."""
    pruned = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, lin in DecoderAdapter(pruned).named_prunable_linears():
            lin.weight.mul_((torch.rand(lin.weight.shape, generator=g) >= 0.5).to(lin.weight.dtype))
    return pruned


def random_offsets(adapter: DecoderAdapter, fraction: float = 0.3, seed: int = 0) -> HeadOffsets:
    info = adapter.info
    g = torch.Generator().manual_seed(seed)
    total = info.num_layers * info.num_heads
    flat = torch.randperm(total, generator=g)[: max(1, round(fraction * total))].tolist()
    heads = [(i // info.num_heads, i % info.num_heads) for i in flat]
    q, _ = torch.linalg.qr(torch.randn(len(heads), info.head_dim, info.head_dim, generator=g))
    return HeadOffsets(heads, info.num_heads, info.head_dim, q.transpose(-1, -2), seed=seed, init_std=0.3)


def _batch():
    return pad_batch([list(range(3, 23)), list(range(40, 52)), [7, 8, 9]], pad_id=1)


def _logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits


def _weights(model) -> dict[str, torch.Tensor]:
    return {n: lin.weight.detach().clone() for n, lin in DecoderAdapter(model).named_prunable_linears()}


@pytest.mark.parametrize("kind", KINDS)
def test_merge_is_exact_keeps_zeros_and_reloads(kind, tmp_path):
    pruned = prune_randomly(with_random_biases(make_model(kind)))
    adapter = DecoderAdapter(pruned)
    offsets = random_offsets(adapter)
    info = adapter.info
    assert offsets.num_trainable() == 2 * len(offsets.heads) * info.head_dim
    batch = _batch()
    before = _weights(pruned)
    plain = _logits(pruned, batch)
    with inject(adapter, offsets):
        hooked = _logits(pruned, batch)
    assert (hooked - plain).abs().max() > 1e-3

    merged = merge_into_o_proj(pruned, adapter, offsets)
    merged_logits = _logits(merged, batch)
    assert (merged_logits - hooked).abs().max() <= 1e-5
    assert (merged_logits - plain).abs().max() > 1e-3
    after = _weights(merged)
    assert before.keys() == after.keys()
    for name, w in before.items():
        assert torch.equal(after[name], w), name  # bit-identical, so the zero pattern is too
        assert (w == 0).float().mean() > 0.4

    merged.save_pretrained(tmp_path)
    assert reload_problem(tmp_path) is None
    reloaded, loading = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    reloaded.eval()
    assert not loading["missing_keys"] and not loading["unexpected_keys"]
    expected_type = "LlamaForCausalLM" if kind in ("qwen2", "mistral") else type(pruned).__name__
    assert type(reloaded).__name__ == expected_type
    assert reloaded.config.attention_bias is True
    assert (_logits(reloaded, batch) - hooked).abs().max() <= 1e-5
    for name, w in _weights(reloaded).items():
        assert torch.equal(w, before[name]), name


def test_tied_embeddings_survive_re_expression_as_llama(tmp_path):
    cfg = make_config("qwen2")
    cfg.tie_word_embeddings = True
    torch.manual_seed(0)
    model = with_random_biases(AutoModelForCausalLM.from_config(cfg).eval())
    adapter = DecoderAdapter(model)
    offsets = random_offsets(adapter)
    with inject(adapter, offsets):
        hooked = _logits(model, _batch())
    merged = merge_into_o_proj(model, adapter, offsets)
    assert merged.lm_head.weight is merged.model.embed_tokens.weight
    merged.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert (_logits(reloaded, _batch()) - hooked).abs().max() <= 1e-5


def test_qwen2_keeps_its_qkv_biases_and_mistral_gets_zeros():
    for kind in ("qwen2", "mistral"):
        model = with_random_biases(make_model(kind))
        adapter = DecoderAdapter(model)
        q_bias = model.model.layers[0].self_attn.q_proj.bias
        q_before = None if q_bias is None else q_bias.detach().clone()
        merged = merge_into_o_proj(model, adapter, random_offsets(adapter))
        q_after = merged.model.layers[0].self_attn.q_proj.bias
        if kind == "qwen2":
            assert torch.equal(q_after, q_before) and q_after.abs().sum() > 0
        else:
            assert q_before is None and torch.count_nonzero(q_after) == 0


def test_active_sliding_window_is_refused():
    cfg = make_config("mistral")
    cfg.sliding_window = 8
    with pytest.raises(UnsupportedModelError, match="sliding window"):
        check_mergeable(cfg)
    cfg.sliding_window = 4096  # longer than max_position_embeddings: never active
    check_mergeable(cfg)
    q = make_config("qwen2")
    q.sliding_window, q.layer_types = 8, ["full_attention", "sliding_attention"]
    with pytest.raises(UnsupportedModelError, match="sliding window"):
        check_mergeable(q)
    check_mergeable(make_config("gemma3"))  # its own sliding layers survive: the model type is kept


@pytest.mark.parametrize("mode", ["restorelcc", "bias", "top-3"])
def test_restoration_file_round_trip(tmp_path, mode):
    pruned = prune_randomly(make_model("gqa"))
    adapter = DecoderAdapter(pruned)
    offsets = random_offsets(adapter)
    bias_only = mode == "bias"
    if bias_only:
        offsets = HeadOffsets(offsets.heads, offsets.num_heads, offsets.head_dim, None, seed=3, init_std=0.3)
        assert offsets.num_trainable() == len(offsets.heads) * offsets.head_dim
    elif mode == "top-3":  # β over each head's first three directions only
        offsets = HeadOffsets(offsets.heads, offsets.num_heads, offsets.head_dim, offsets.directions[:, :3],
                              seed=3, init_std=0.3)
        assert offsets.num_trainable() == len(offsets.heads) * (3 + offsets.head_dim)
    scores = torch.rand(adapter.info.num_layers, adapter.info.num_heads)
    batch = _batch()
    with inject(adapter, offsets):
        hooked = _logits(pruned, batch)
    path = save_restoration(tmp_path / "restoration.safetensors", offsets, scores,
                            {"model_type": "llama", "lr": 0.01})
    loaded = load_restoration(path)
    assert loaded.heads == offsets.heads and loaded.mode == ("bias" if bias_only else "restorelcc")
    assert loaded.num_trainable() == offsets.num_trainable()
    with inject(adapter, loaded):
        assert torch.equal(_logits(pruned, batch), hooked)
    info = restoration_info(path)
    assert info["model_type"] == "llama" and info["meta"] == {"lr": 0.01}
    assert (info["num_heads"], info["head_dim"]) == (adapter.info.num_heads, adapter.info.head_dim)
    assert info["scores"] == pytest.approx([float(scores[layer, h]) for layer, h in offsets.heads])


def test_a_saved_model_its_config_cannot_load_is_named(tmp_path):
    """The export's reload check: a merged o_proj bias under a config without attention_bias would be dropped by
    from_pretrained without an error; a tensor the config expects but the files lack would be left at its init."""
    import json

    from safetensors.torch import load_file, save_file

    pruned = prune_randomly(make_model("llama"))
    adapter = DecoderAdapter(pruned)
    merged = merge_into_o_proj(pruned, adapter, random_offsets(adapter))
    merged.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "attention_bias": False}))
    problem = reload_problem(tmp_path)
    assert problem is not None and "have no place" in problem and "bias" in problem
    (tmp_path / "config.json").write_text(json.dumps(config))
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    assert "model.layers.1.mlp.down_proj.weight" in reload_problem(tmp_path)
