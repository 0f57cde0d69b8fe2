"""Pruning whole tiny models: measured targets, untouched embeddings, layer-by-layer calibration, reload."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from app.schemas import PruningSpec
from tests.tiny import SUPPORTED_KINDS, instruction_rows, make_config, make_model, make_tokenizer, text_rows
from worker.errors import Cancelled, DataError, UnsupportedModelError
from worker.model.arch import DecoderAdapter
from worker.model.calibration import (
    build_calibration_batches,
    calibrate_layerwise,
    capture_layer_inputs,
)
from worker.model.data import Batch, encode_text, pad_batch
from worker.prune.masks import prune_count
from worker.prune.measure import check_nm, measure_sparsity, zero_masks
from worker.prune.runner import prune_model
from worker.prune.sparsegpt import BLOCK_SIZE
from worker.prune.wanda import ColumnNormAccumulator, prune_wanda


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def stream_batches(tokenizer) -> list[Batch]:
    texts = [r["text"] for r in text_rows(24)] + [r["prompt"] + r["response"] for r in instruction_rows(24)]
    return build_calibration_batches(tokenizer, texts, n_samples=6, seq_len=40, batch_size=4, seed=0)


@pytest.fixture(scope="module")
def padded_batches(tokenizer) -> list[Batch]:
    """Right-padded batches of different lengths (padding must not count)."""
    rows = instruction_rows(10)
    seqs = [encode_text(tokenizer, r["prompt"] + r["response"], 20 + 4 * i) for i, r in enumerate(rows)]
    assert len({len(s) for s in seqs}) > 1
    pad = tokenizer.pad_token_id
    return [pad_batch(seqs[:4], pad), pad_batch(seqs[4:7], pad), pad_batch(seqs[7:], pad)]


def _logits(model, batches: list[Batch]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits for b in batches]


def _untouched_params(model, adapter: DecoderAdapter) -> dict[str, torch.Tensor]:
    pruned = {f"{name}.weight" for name, _ in adapter.named_prunable_linears()}
    return {n: p.detach().clone() for n, p in model.named_parameters() if n not in pruned}


def _assert_at_target(method: str, pattern: str, weight: torch.Tensor, name: str) -> None:
    rows, cols = weight.shape
    zeros = weight == 0
    if pattern == "2:4":
        assert check_nm(weight, 2, 4), name
        assert (zeros.reshape(rows, -1, 4).sum(-1) == 2).all(), name  # exactly 2 kept: no extra zeros
    elif method == "magnitude":
        assert int(zeros.sum()) == prune_count(weight.numel(), 0.5), name
    elif method == "wanda":
        assert (zeros.sum(1) == prune_count(cols, 0.5)).all(), name
    else:  # sparsegpt: exact per block of columns
        for c in range(0, cols, BLOCK_SIZE):
            block = zeros[:, c : c + BLOCK_SIZE]
            assert int(block.sum()) == prune_count(block.numel(), 0.5), name


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("kind", SUPPORTED_KINDS)
def test_prune_model_hits_target_and_leaves_the_rest(
    kind: str, method: str, pattern: str, padded_batches: list[Batch]
) -> None:
    model = make_model(kind)
    adapter = DecoderAdapter(model)
    layers_before = list(adapter.layers)
    dense_logits = _logits(model, padded_batches)
    untouched = _untouched_params(model, adapter)
    spec = PruningSpec(method=method, pattern=pattern)

    summary = prune_model(model, adapter, spec, None if method == "magnitude" else padded_batches)

    assert summary["method"] == method and summary["pattern"] == pattern and summary["sparsity"] == 0.5
    assert summary["modules"] == 7 * len(adapter.layers) and summary["seconds"] >= 0
    assert all(a is b for a, b in zip(adapter.layers, layers_before, strict=True))
    for name, lin in adapter.named_prunable_linears():
        _assert_at_target(method, pattern, lin.weight.detach(), name)
    measured = measure_sparsity(adapter, spec.nm)
    assert measured["overall"] == pytest.approx(0.5, abs=1e-12)
    assert len(measured["modules"]) == 7 * len(adapter.layers)
    assert all(name.startswith("model.layers.") for name in measured["modules"])
    if spec.nm:
        assert measured["nm_ok"] is True
    for name, before in untouched.items():  # embeddings, lm_head, norms: bit-identical
        assert torch.equal(dict(model.named_parameters())[name], before), name
    assert not model.training
    pruned_logits = _logits(model, padded_batches)
    for d, p in zip(dense_logits, pruned_logits, strict=True):
        assert torch.isfinite(p).all()
        assert not torch.allclose(d, p, atol=1e-4)


def _alternating_gemma3():
    """Gemma 3 with one sliding and one full attention layer (different masks and rotary tables)."""
    config = make_config("gemma3")
    config.layer_types = ["sliding_attention", "full_attention"]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    return model.eval()


def _reference_norms(
    model, adapter: DecoderAdapter, layer: int, batches: list[Batch]
) -> dict[str, torch.Tensor]:
    """Wanda's input norms for ``layer``'s Linears from full-model forwards (padding dropped by hand)."""
    sums: dict[str, torch.Tensor] = {}
    current: dict[str, torch.Tensor] = {}

    def hook(name):
        def fn(_m, args, _o):
            x = args[0]
            keep = current["mask"]
            real = torch.cat([x[b, : int(keep[b].sum())] for b in range(x.shape[0])])
            sums[name] = sums.get(name, 0) + real.double().pow(2).sum(0)

        return fn

    handles = [lin.register_forward_hook(hook(n)) for n, lin in adapter.prunable_linears(layer).items()]
    try:
        with torch.no_grad():
            for b in batches:
                current["mask"] = b.attention_mask
                model(input_ids=b.input_ids, attention_mask=b.attention_mask)
    finally:
        for h in handles:
            h.remove()
    return {n: s.sqrt().float() for n, s in sums.items()}


@pytest.mark.parametrize("kind", [*SUPPORTED_KINDS, "gemma3-alternating"])
def test_layerwise_calibration_equals_full_forward_reference(kind: str, padded_batches: list[Batch]) -> None:
    model = _alternating_gemma3() if kind == "gemma3-alternating" else make_model(kind)
    adapter = DecoderAdapter(model)
    dense_ref = {i: _reference_norms(model, adapter, i, padded_batches) for i in range(len(adapter.layers))}
    spec = PruningSpec(method="wanda")
    seen: list[int] = []

    def on_layer(index: int, stats: dict) -> None:
        # Layers before ``index`` are pruned already; the reference runs the whole model as it is now.
        ref = _reference_norms(model, adapter, index, padded_batches)
        assert set(stats) == set(ref)
        for name, acc in stats.items():
            torch.testing.assert_close(acc.norms, ref[name], rtol=1e-5, atol=1e-6)
            if index > 0:  # the earlier pruning shows in this layer's inputs
                assert not torch.allclose(acc.norms, dense_ref[index][name], rtol=1e-3)
        for name, lin in adapter.prunable_linears(index).items():
            prune_wanda(lin, stats[name], spec.sparsity)
        seen.append(index)

    tokens = calibrate_layerwise(
        model, adapter, padded_batches, lambda _i, _n, lin: ColumnNormAccumulator(lin.in_features), on_layer
    )
    assert seen == list(range(len(adapter.layers)))
    assert tokens == sum(int(b.attention_mask.sum()) for b in padded_batches)


def test_capture_records_per_layer_kwargs_for_alternating_attention(stream_batches: list[Batch]) -> None:
    model = _alternating_gemma3()
    adapter = DecoderAdapter(model)
    originals = list(adapter.layers)
    inputs = capture_layer_inputs(model, adapter, stream_batches[:1])
    assert all(a is b for a, b in zip(adapter.layers, originals, strict=True))
    k0, k1 = inputs.kwargs[0][0], inputs.kwargs[1][0]
    assert stream_batches[0].input_ids.shape[1] > model.config.sliding_window
    m0, m1 = k0["attention_mask"], k1["attention_mask"]  # full attention without padding may be None
    assert isinstance(m0, torch.Tensor) and (m1 is None or not torch.equal(m0, m1))
    assert not torch.equal(k0["position_embeddings"][0], k1["position_embeddings"][0])
    with torch.no_grad():
        embeds = model.get_input_embeddings()(stream_batches[0].input_ids)
    torch.testing.assert_close(inputs.hidden[0], embeds)


def test_layers_and_state_restored_even_when_the_forward_fails(stream_batches: list[Batch]) -> None:
    model = make_model("llama")
    adapter = DecoderAdapter(model)
    originals = list(adapter.layers)
    model.train()
    model.config.use_cache = True
    bad = Batch(
        input_ids=torch.full((1, 4), 10_000),
        attention_mask=torch.ones(1, 4, dtype=torch.long),
        labels=torch.zeros(1, 4, dtype=torch.long),
    )
    with pytest.raises(IndexError):
        capture_layer_inputs(model, adapter, [stream_batches[0], bad])
    assert all(a is b for a, b in zip(adapter.layers, originals, strict=True))
    assert model.training and model.config.use_cache is True
    capture_layer_inputs(model, adapter, stream_batches)
    prune_model(model, adapter, PruningSpec(method="sparsegpt"), stream_batches)
    assert all(a is b for a, b in zip(adapter.layers, originals, strict=True))
    assert model.training and model.config.use_cache is True


@pytest.mark.parametrize(
    "kind,method,pattern",
    [
        ("llama", "wanda", "unstructured"),
        ("gqa", "sparsegpt", "2:4"),
        ("qwen2", "magnitude", "2:4"),
        ("gemma3", "sparsegpt", "unstructured"),
        ("mistral", "wanda", "2:4"),
    ],
)
def test_save_and_reload_gives_identical_logits(
    kind: str, method: str, pattern: str, stream_batches: list[Batch], tmp_path
) -> None:
    model = make_model(kind)
    adapter = DecoderAdapter(model)
    prune_model(model, adapter, PruningSpec(method=method, pattern=pattern), stream_batches)
    masks = zero_masks(adapter)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    for a, b in zip(_logits(model, stream_batches), _logits(loaded, stream_batches), strict=True):
        assert torch.equal(a, b)
    reloaded_masks = zero_masks(DecoderAdapter(loaded))
    assert masks.keys() == reloaded_masks.keys()
    assert all(torch.equal(masks[n], reloaded_masks[n]) for n in masks)


def test_method_none_prunes_nothing() -> None:
    model = make_model("llama")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    summary = prune_model(model, DecoderAdapter(model), PruningSpec(method="none"), None)
    assert summary["method"] == "none" and summary["modules"] == 0
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_cancel_between_layers_and_progress(stream_batches: list[Batch]) -> None:
    model = make_model("gqa")  # three layers
    adapter = DecoderAdapter(model)
    polls: list[int] = []

    def should_stop() -> bool:
        polls.append(1)
        return len(polls) > 1  # stop before the second layer

    fractions: list[float] = []
    with pytest.raises(Cancelled):
        prune_model(
            model,
            adapter,
            PruningSpec(method="wanda"),
            stream_batches,
            progress=lambda f, _m: fractions.append(f),
            should_stop=should_stop,
        )
    assert fractions == [pytest.approx(1 / 3)]
    sparsity = measure_sparsity(adapter)["modules"]
    assert all(v == 0.5 for n, v in sparsity.items() if n.startswith("model.layers.0."))
    assert all(v == 0.0 for n, v in sparsity.items() if not n.startswith("model.layers.0."))

    fractions.clear()
    other = make_model("gqa")
    prune_model(
        other,
        DecoderAdapter(other),
        PruningSpec(method="magnitude"),
        None,
        progress=lambda f, _m: fractions.append(f),
    )
    assert fractions == pytest.approx([1 / 3, 2 / 3, 1.0])


def test_prune_model_refuses_missing_calibration_and_unfit_pattern() -> None:
    model = make_model("llama")
    adapter = DecoderAdapter(model)
    with pytest.raises(ValueError, match="calibration"):
        prune_model(model, adapter, PruningSpec(method="sparsegpt"), None)
    with pytest.raises(ValueError, match="does not divide"):
        prune_model(model, adapter, PruningSpec(method="magnitude", pattern="2:3"), None)
    assert measure_sparsity(adapter)["overall"] == 0.0


def test_prune_low_precision_model_keeps_dtype(stream_batches: list[Batch]) -> None:
    model = make_model("qwen2", dtype=torch.bfloat16)
    adapter = DecoderAdapter(model)
    prune_model(model, adapter, PruningSpec(method="sparsegpt", pattern="2:4"), stream_batches)
    for name, lin in adapter.named_prunable_linears():
        assert lin.weight.dtype == torch.bfloat16
        _assert_at_target("sparsegpt", "2:4", lin.weight.detach(), name)
    assert all(torch.isfinite(t).all() for t in _logits(model, stream_batches[:1]))


def test_blank_calibration_rows_add_nothing_to_the_stream(tokenizer) -> None:
    """A blank row is no text: it adds no separator (nor, with a BOS tokenizer, a BOS) to the calibration stream,
    wherever the shuffle puts it."""
    text = text_rows(1)[0]["text"]
    want = list(tokenizer(text)["input_ids"]) + [tokenizer.eos_token_id]
    for seed in range(5):
        batches = build_calibration_batches(tokenizer, ["", text, "  \n"], n_samples=len(want), seq_len=1,
                                            batch_size=len(want), seed=seed)
        assert batches[0].input_ids.flatten().tolist() == want


def test_build_calibration_batches(tokenizer) -> None:
    texts = [r["text"] for r in text_rows(30)]
    a = build_calibration_batches(tokenizer, texts, n_samples=5, seq_len=16, batch_size=2, seed=1)
    assert [b.input_ids.shape for b in a] == [torch.Size([2, 16]), torch.Size([2, 16]), torch.Size([1, 16])]
    assert all(bool(b.attention_mask.all()) for b in a)
    b = build_calibration_batches(tokenizer, texts, n_samples=5, seq_len=16, batch_size=2, seed=1)
    assert all(torch.equal(x.input_ids, y.input_ids) for x, y in zip(a, b, strict=True))
    c = build_calibration_batches(tokenizer, texts, n_samples=5, seq_len=16, batch_size=2, seed=2)
    assert not all(torch.equal(x.input_ids, y.input_ids) for x, y in zip(a, c, strict=True))
    # Just enough text: every sequence asked for; one token less: refused, never quietly fewer sequences.
    stream_len = sum(len(tokenizer(t)["input_ids"]) + 1 for t in texts[:2])
    exact = build_calibration_batches(tokenizer, texts[:2], n_samples=stream_len // 4, seq_len=4, batch_size=8,
                                      seed=0)
    assert sum(x.input_ids.shape[0] for x in exact) == stream_len // 4
    for n_samples, seq_len in ((50, 16), (1, stream_len + 1)):  # fewer sequences; shorter than one sequence
        with pytest.raises(DataError) as err:
            build_calibration_batches(tokenizer, texts[:2], n_samples=n_samples, seq_len=seq_len, batch_size=8, seed=0)
        assert err.value.field == "pruning.calibration_samples"
        assert f"holds {stream_len} tokens, enough for {stream_len // seq_len}" in err.value.message


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_non_finite_weights_fail_as_an_unsupported_model_naming_the_module(
    method: str, bad: float, stream_batches: list[Batch]
) -> None:
    model = make_model("llama")
    adapter = DecoderAdapter(model)
    with torch.no_grad():
        adapter.layers[1].mlp.down_proj.weight[3, 5] = bad
    with pytest.raises(UnsupportedModelError) as err:
        prune_model(model, adapter, PruningSpec(method=method), None if method == "magnitude" else stream_batches)
    assert (err.value.code, err.value.field) == ("unsupported_model", "model.id")
    assert "weights are not finite" in err.value.message and "model.layers.1.mlp.down_proj" in err.value.message


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_non_finite_calibration_activations_fail_naming_the_module_they_enter(
    method: str, stream_batches: list[Batch]
) -> None:
    model = make_model("llama")
    adapter = DecoderAdapter(model)
    with torch.no_grad():  # a norm is no pruned Linear: every Linear's weights stay finite, its inputs do not
        adapter.layers[1].input_layernorm.weight[0] = float("nan")
    with pytest.raises(UnsupportedModelError) as err:
        prune_model(model, adapter, PruningSpec(method=method), stream_batches)
    assert err.value.field == "model.id"
    assert "calibration activations entering model.layers.1.self_attn.q_proj are not finite" in err.value.message


def test_a_raised_sparsegpt_damping_is_reported_per_module(stream_batches: list[Batch], monkeypatch) -> None:
    """A Hessian that factors only at a higher damping is pruned (exactly at target) and named in the summary with
    the damping it took, never silently: here every down_proj's first factorisation is made to fail."""
    model = make_model("llama")
    adapter = DecoderAdapter(model)
    width = model.config.intermediate_size
    real = torch.linalg.cholesky_ex
    lower_calls = []

    def down_proj_fails_first(A: torch.Tensor, *args, **kwargs):
        L, info = real(A, *args, **kwargs)
        if A.shape[0] == width and not kwargs.get("upper", False):
            lower_calls.append(1)
            if len(lower_calls) % 2:  # each module's first try fails, its retry at 10x succeeds
                return L, torch.ones_like(info)
        return L, info

    monkeypatch.setattr(torch.linalg, "cholesky_ex", down_proj_fails_first)
    kept = {"model.layers.9.mlp.down_proj": 0.1}  # what a checkpoint's report holds from the layers before it
    summary = prune_model(model, adapter, PruningSpec(method="sparsegpt"), stream_batches, damping_raised=kept)
    layers = len(adapter.layers)
    assert summary["damping_raised"] is kept
    assert kept == {f"model.layers.{i}.mlp.down_proj": pytest.approx(0.1) for i in (*range(layers), 9)}
    for i in range(layers):
        _assert_at_target("sparsegpt", "unstructured", adapter.layers[i].mlp.down_proj.weight, f"layer {i}")
