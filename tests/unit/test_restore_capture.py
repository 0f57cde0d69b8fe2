"""Head-output capture and injection address exactly one query head's columns, batched or not."""

from __future__ import annotations

import copy

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from tests.tiny import instruction_rows, make_model, make_tokenizer
from worker.model.arch import DecoderAdapter
from worker.model.data import encode_pair, pad_batch
from worker.restore.offsets.heads import HeadOffsets, inject
from worker.restore.restorelcc.capture import build_probe_inputs, capture_head_outputs
from worker.restore.restorelcc.extract import lost_activations

LAYERS, HEADS, D = 3, 5, 16
TARGET = (1, 3)  # the only query head whose weights differ


def _five_head_gqa():
    """3 layers × 5 query heads, 1 KV head, head_dim 16 ≠ 40 / 5."""
    cfg = AutoConfig.for_model(
        "llama", vocab_size=320, hidden_size=40, intermediate_size=64, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=1, head_dim=D, max_position_embeddings=256,
        tie_word_embeddings=False, pad_token_id=1, bos_token_id=0, eos_token_id=0,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    return model.eval()


def _pairs(n: int) -> list[tuple[str, str]]:
    return [(r["prompt"], r["response"]) for r in instruction_rows(n)]


def test_lost_activation_only_at_the_changed_head():
    dense = _five_head_gqa()
    pruned = copy.deepcopy(dense)
    layer, head = TARGET
    with torch.no_grad():
        pruned.model.layers[layer].self_attn.q_proj.weight[head * D : (head + 1) * D] = 0
    probe = build_probe_inputs(make_tokenizer(), _pairs(7), max_len=64, batch_size=3)
    zd = capture_head_outputs(dense, DecoderAdapter(dense), probe.prompt)
    zp = capture_head_outputs(pruned, DecoderAdapter(pruned), probe.prompt)
    assert zd.shape == (7, LAYERS, HEADS, D) and zd.dtype == torch.float32
    delta = (zd - zp).abs()
    assert delta[:, :layer].max() <= 1e-6
    others = [h for h in range(HEADS) if h != head]
    assert delta[:, layer, others].max() <= 1e-6
    assert delta[:, layer, head].max() > 1e-3
    flat = lost_activations(zd, zp).abs().amax(dim=(0, 2))
    assert flat[: layer * HEADS + head].max() <= 1e-6 and flat[layer * HEADS + head] > 1e-3


def test_injection_changes_exactly_the_head_columns():
    model = _five_head_gqa()
    adapter = DecoderAdapter(model)
    layer, head = TARGET
    offsets = HeadOffsets([TARGET], HEADS, D, torch.eye(D)[None], seed=1, init_std=0.5)
    seen: list[torch.Tensor] = []

    def record(_m, args, _out):  # a forward hook sees the input after every pre-hook
        seen.append(args[0].detach().clone())

    batch = pad_batch([[5, 6, 7, 8, 9], [10, 11, 12]], pad_id=1)
    h = adapter.o_proj(layer).register_forward_hook(record)
    try:
        with torch.no_grad():
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
            with inject(adapter, offsets):
                model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    finally:
        h.remove()
    base, injected, after = seen
    changed = (injected != base).any(dim=(0, 1)).nonzero().squeeze(1).tolist()
    assert changed == list(range(head * D, (head + 1) * D))
    cols = slice(head * D, (head + 1) * D)
    expected = offsets.constants()[0].detach().expand(2, 5, D)
    torch.testing.assert_close(injected[..., cols] - base[..., cols], expected)
    assert torch.equal(after, base)  # hooks removed
    assert not adapter.o_proj(layer)._forward_pre_hooks


def test_batched_capture_equals_one_row_at_a_time():
    model = make_model("gqa")
    adapter = DecoderAdapter(model)
    pairs = _pairs(5)
    tok = make_tokenizer()
    batched = build_probe_inputs(tok, pairs, max_len=64, batch_size=4, negatives=[1, 0, 3, 2, 0])
    single = build_probe_inputs(tok, pairs, max_len=64, batch_size=1, negatives=[1, 0, 3, 2, 0])
    for kind in ("prompt", "positive", "negative"):
        a = capture_head_outputs(model, adapter, getattr(batched, kind))
        b = capture_head_outputs(model, adapter, getattr(single, kind))
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert not any(adapter.o_proj(i)._forward_pre_hooks for i in range(3))


def test_probe_inputs_end_at_the_right_tokens():
    tok = make_tokenizer()
    pairs = _pairs(3)
    probe = build_probe_inputs(tok, pairs, max_len=64, batch_size=3, negatives=[2, 0, 1])
    for i, (p, r) in enumerate(pairs):
        ids, labels = encode_pair(tok, p, r, 64)
        n_prompt = labels.count(-100)
        last_p = probe.prompt[0].last_index[i]
        assert last_p == n_prompt - 1
        assert probe.prompt[0].input_ids[i, : n_prompt].tolist() == ids[:n_prompt]
        assert probe.positive[0].input_ids[i, : len(ids)].tolist() == ids
        assert probe.positive[0].last_index[i] == len(ids) - 1
        neg_ids, _ = encode_pair(tok, p, pairs[[2, 0, 1][i]][1], 64)
        assert probe.negative[0].input_ids[i, : len(neg_ids)].tolist() == neg_ids
        assert probe.negative[0].last_index[i] == len(neg_ids) - 1
