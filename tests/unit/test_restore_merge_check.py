"""The merge check: exact up to the bias's one rounding in every dtype, so a wrong merge fails in bfloat16 too.

The rule it replaced compared logits within 16 eps of the batch's largest logit, about 12% of it in bfloat16:
every corruption below passes that rule and fails the new check, naming the layer.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

from app.methods import restoration_config
from tests.tiny import instruction_rows, make_config, make_tokenizer, write_jsonl
from tests.unit.test_restore_merge import _batch, prune_randomly, random_offsets, with_random_biases
from worker.errors import JobFailure
from worker.model.arch import DecoderAdapter
from worker.restore.method import check_batch
from worker.restore.offsets import merge as merge_module
from worker.restore.offsets.heads import HeadOffsets, inject
from worker.restore.offsets.merge import (
    MergeCheckError,
    capture_o_proj_inputs,
    check_merge,
    logit_differences,
    merge_into_o_proj,
    merge_reference,
    token_rel_tolerance,
)
from worker.restore.restorelcc.method import RestoreLCC

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def old_merge_tolerance(dtype: torch.dtype, logits: torch.Tensor) -> float:
    """The logit tolerance this check replaced (worker/run/restoration.py before): 16 eps of the largest |logit|."""
    scale = float(logits.abs().max())
    return max(1e-4, 16 * torch.finfo(dtype).eps * scale) if dtype != torch.float32 else max(1e-4, 1e-6 * scale)


def tiny_model(kind: str, dtype: torch.dtype, o_proj_bias: bool = False) -> torch.nn.Module:
    """A randomly pruned tiny model in ``dtype``; ``o_proj_bias``: Llama with non-zero attention biases already."""
    cfg = make_config(kind)
    if o_proj_bias:
        cfg.attention_bias = True
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    return prune_randomly(with_random_biases(model)).to(dtype)


def small_offsets(adapter: DecoderAdapter, scale: float = 0.03) -> HeadOffsets:
    """Trained-sized constants: they move the logits, but a mistake in one head stays within the old tolerance."""
    offsets = random_offsets(adapter, fraction=0.5)
    with torch.no_grad():
        offsets.b.mul_(scale)
        offsets.beta.mul_(scale)
    return offsets


def logits(model: torch.nn.Module) -> torch.Tensor:
    batch = _batch()
    with torch.no_grad():
        return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()


def hooked_and_reference(model, adapter, offsets):
    with capture_o_proj_inputs(adapter) as inputs, inject(adapter, offsets):
        hooked = logits(model)
    return hooked, merge_reference(adapter, offsets, inputs)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind, o_proj_bias", [("llama", False), ("llama", True), ("gqa", False),
                                               ("qwen2", False), ("gemma3", False)])
def test_correct_merge_passes_within_one_rounding(kind, o_proj_bias, dtype):
    model = tiny_model(kind, dtype, o_proj_bias)
    adapter = DecoderAdapter(model)
    offsets = random_offsets(adapter)
    hooked, reference = hooked_and_reference(model, adapter, offsets)
    assert all(r.inputs is not None and r.inputs.shape[0] == 8 for r in reference)
    merged = merge_into_o_proj(model, adapter, offsets)
    merged_adapter = DecoderAdapter(merged)
    assert all(not merged_adapter.o_proj(i)._forward_pre_hooks for i in range(merged_adapter.info.num_layers))
    result = check_merge(merged_adapter, reference)
    unit = torch.finfo(dtype).eps / 2 + (torch.finfo(torch.float32).eps / 2 if dtype != torch.float32 else 0)
    assert result.tolerance == unit
    assert 0 < result.bias_max_rel_err <= unit and result.output_max_rel_err <= unit
    _, token_rel = logit_differences(hooked, logits(merged), _batch().attention_mask)
    assert token_rel <= token_rel_tolerance(dtype)


def _neighbour_slice(model, adapter, offsets) -> tuple[torch.nn.Module, int]:
    """A merge that puts one head's constant on the next (unchosen) head's columns."""
    wrong = copy.deepcopy(offsets)
    chosen = set(offsets.heads)
    for j, (layer, h) in enumerate(offsets.heads):
        for other in (h + 1, h - 1):
            if 0 <= other < offsets.num_heads and (layer, other) not in chosen:
                wrong.heads[j] = (layer, other)
                return merge_into_o_proj(model, adapter, wrong), layer
    raise AssertionError("no free neighbouring head")


def _scaled_bias(model, adapter, offsets) -> tuple[torch.nn.Module, int]:
    """A merge whose bias on one layer is 1.05 times too large."""
    merged = merge_into_o_proj(model, adapter, offsets)
    layer = offsets.layers[-1]
    with torch.no_grad():
        DecoderAdapter(merged).o_proj(layer).bias.mul_(1.05)
    return merged, layer


def _dropped_bias(model, adapter, offsets) -> tuple[torch.nn.Module, int]:
    """A merge that forgets one layer's heads."""
    merged = merge_into_o_proj(model, adapter, offsets)
    layer = offsets.layers[0]
    with torch.no_grad():
        DecoderAdapter(merged).o_proj(layer).bias.zero_()
    return merged, layer


def _changed_weight(model, adapter, offsets) -> tuple[torch.nn.Module, int]:
    """A right bias, but one o_proj weight row changed by 5% (caught on the real o_proj inputs)."""
    merged = merge_into_o_proj(model, adapter, offsets)
    layer = offsets.layers[0]
    with torch.no_grad():
        DecoderAdapter(merged).o_proj(layer).weight[0].mul_(1.05)
    return merged, layer


CORRUPTIONS: dict[str, Callable] = {
    "neighbour slice": _neighbour_slice,
    "bias x1.05": _scaled_bias,
    "layer dropped": _dropped_bias,
    "weight row x1.05": _changed_weight,
}


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_corrupted_merge_in_bfloat16_is_caught_naming_the_layer(name):
    model = tiny_model("llama", torch.bfloat16)
    adapter = DecoderAdapter(model)
    offsets = small_offsets(adapter)
    hooked, reference = hooked_and_reference(model, adapter, offsets)
    merged, layer = CORRUPTIONS[name](model, adapter, offsets)
    wrong_logits = logits(merged)
    max_abs, _ = logit_differences(hooked, wrong_logits, _batch().attention_mask)
    # Why the check changed: the old logit tolerance let this corruption through.
    assert 0 < max_abs <= old_merge_tolerance(torch.bfloat16, hooked)
    what = "output on real inputs" if name.startswith("weight") else "bias"
    with pytest.raises(MergeCheckError, match=rf"layer {layer}: the merged o_proj {what} is off by"):
        check_merge(DecoderAdapter(merged), reference)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_scaled_bias_is_caught_in_other_dtypes(dtype):
    model = tiny_model("gqa", dtype)
    adapter = DecoderAdapter(model)
    offsets = small_offsets(adapter)
    _, reference = hooked_and_reference(model, adapter, offsets)
    merged, layer = _scaled_bias(model, adapter, offsets)
    with pytest.raises(MergeCheckError, match=rf"layer {layer}: the merged o_proj bias"):
        check_merge(DecoderAdapter(merged), reference)


def test_logit_differences_are_per_token_and_skip_padding():
    hooked = torch.tensor([[[100.0, 0.0], [1.0, 0.5], [9.0, 9.0]]])
    merged = hooked + torch.tensor([[[0.5, 0.0], [0.0, 0.02], [5.0, 0.0]]])
    max_abs, rel = logit_differences(hooked, merged, torch.tensor([[1, 1, 0]]))
    assert max_abs == 5.0  # every position, padding included
    assert rel == pytest.approx(0.02)  # token 2 (scale 1), not token 1 (0.5 of 100), not the padding


# ── through the method's merge step (worker.restore.offsets.method) ─────────────────────────────────────────


def _state(tmp_path, dtype: torch.dtype) -> SimpleNamespace:
    model = tiny_model("llama", dtype)
    adapter = DecoderAdapter(model)
    train = write_jsonl(tmp_path / "train.jsonl", instruction_rows(4))
    method = RestoreLCC(restoration_config({}), seed=0)
    method.offsets = small_offsets(adapter)
    return SimpleNamespace(
        spec=SimpleNamespace(data=SimpleNamespace(train=str(train))), tokenizer=make_tokenizer(), model=model,
        adapter=adapter, method=method, report={},
    )


def merge(state, progress, _reporter) -> None:
    state.method.merge(state, check_batch(state.tokenizer, state.spec.data.train), progress)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_merge_stage_reports_both_checks(tmp_path, dtype):
    state = _state(tmp_path, dtype)
    merge(state, lambda *_: None, None)
    checks = state.report["checks"]
    assert checks["merge_rel_tolerance"] <= torch.finfo(dtype).eps
    assert 0 < checks["merge_bias_max_rel_err"] <= checks["merge_rel_tolerance"]
    assert checks["merge_o_proj_max_rel_err"] <= checks["merge_rel_tolerance"]
    assert checks["merged_vs_hooked_max_token_rel_diff"] <= checks["merged_vs_hooked_token_rel_tolerance"]
    assert checks["merged_vs_hooked_max_abs_diff"] >= 0
    assert all(not o._forward_pre_hooks for o in (state.adapter.o_proj(i) for i in range(2)))


def test_merge_stage_fails_the_job_on_a_corrupted_merge_in_bfloat16(tmp_path, monkeypatch):
    real = merge_module.merge_into_o_proj

    def corrupted(model, adapter, offsets, **kwargs):
        merged = real(model, adapter, offsets, **kwargs)
        with torch.no_grad():
            DecoderAdapter(merged).o_proj(offsets.layers[-1]).bias.mul_(1.05)
        return merged

    monkeypatch.setattr(merge_module, "merge_into_o_proj", corrupted)
    state = _state(tmp_path, torch.bfloat16)
    layer = state.method.offsets.layers[-1]
    with pytest.raises(JobFailure, match=rf"internal check failed: layer {layer}: the merged o_proj bias"):
        merge(state, lambda *_: None, None)
    checks = state.report["checks"]
    assert checks["merged_vs_hooked_max_abs_diff"] > 0  # measured (and within the old rule) before the check failed
    assert all(not state.adapter.o_proj(i)._forward_pre_hooks for i in range(2))


def test_the_end_to_end_tolerance_grows_with_depth_past_the_measured_one():
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        base = token_rel_tolerance(dtype)
        assert token_rel_tolerance(dtype, 2) == token_rel_tolerance(dtype, 30) == base
        assert token_rel_tolerance(dtype, 80) == pytest.approx(base * 80 / 30)
