"""LoRA/DoRA baselines: training lowers the loss, merging keeps the pruned zeros exactly, the saved adapter loads."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer

from app.methods import AdapterConfig, restoration_config
from tests.tiny import instruction_batches, make_model, prune_half_at_random
from worker.errors import Cancelled, SpecError
from worker.model.arch import DecoderAdapter
from worker.prune.measure import zero_masks
from worker.restore.adapters.peft import detach_adapter, merge_adapter, save_adapter, train_adapter
from worker.restore.train import response_loss_sum

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _pruned(kind: str) -> torch.nn.Module:
    return prune_half_at_random(make_model(kind), seed=1)


_batches = instruction_batches


class _Source:
    """Epoch → batches with a length, as the runner passes them."""

    def __init__(self, batches):
        self.batches = batches

    def __call__(self, epoch: int):
        return list(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _spec(method: str, **kw) -> AdapterConfig:
    base = dict(method=method, lora_r=4, lora_alpha=8, lora_targets=TARGETS, lr=1e-2, max_steps=8)
    return restoration_config({**base, **kw})


@torch.no_grad()
def _loss(model, batches) -> float:
    total, count = 0.0, 0
    for b in batches:
        s, n = response_loss_sum(model, b)
        total, count = total + float(s), count + n
    return total / count


@torch.no_grad()
def _logits(model, batch) -> torch.Tensor:
    return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits


def _expected_weights(model, baseline, masks) -> dict[str, torch.Tensor]:
    """Merged weights computed by hand from the adapter's factors (LoRA: W + s·B·A; DoRA: rescaled rows)."""
    out = {}
    for name in baseline.targets:
        layer = model.get_submodule(name)
        w = layer.get_base_layer().weight.detach()
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        new = w + layer.scaling["default"] * (b @ a)
        if baseline.method == "dora":
            mag = layer.lora_magnitude_vector["default"].weight
            new = (mag / new.norm(dim=1))[:, None] * new
        out[name] = new.masked_fill(masks[name], 0.0)
    return out


@pytest.mark.parametrize("kind", ["llama", "gqa", "qwen2"])
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_train_merge_keeps_zeros(kind, method):
    model = _pruned(kind)
    masks = zero_masks(DecoderAdapter(model))
    pruned_state = {k: v.clone() for k, v in model.state_dict().items()}
    batches = _batches()
    before = _loss(model, batches)
    seen = []
    baseline, stats = train_adapter(model, _Source(batches), _spec(method), seed=0,
                                    progress=lambda s, t, loss: seen.append((s, t)))
    after = _loss(model, batches)
    assert after < before - 0.05, (before, after)
    assert stats["steps"] == 8 and len(stats["loss_curve"]) == 8 and seen[-1] == (8, 8)

    # trainable parameters: r·(in+out) per target (+ out for DoRA), as peft counts them
    r = 4
    expect = sum(r * (i + o) + (o if method == "dora" else 0) for i, o in baseline.targets.values())
    info = DecoderAdapter(make_model(kind)).info
    assert len(baseline.targets) == len(TARGETS) * info.num_layers
    assert stats["trainable_params"] == expect == baseline.num_trainable()
    assert baseline.peft_trainable_params == expect

    # base weights untouched and unfrozen again; only the adapter trained
    for name in baseline.targets:
        assert torch.equal(model.get_submodule(name).get_base_layer().weight, pruned_state[name + ".weight"])
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)

    batch = batches[0]
    unmerged = _logits(model, batch)
    expected = _expected_weights(model, baseline, masks)
    merged, report = merge_adapter(model, baseline, masks)

    assert merged is model and not hasattr(merged, "peft_config")
    assert not any(isinstance(m, BaseTunerLayer) for m in merged.modules())
    assert set(merged.state_dict()) == set(pruned_state)
    assert zero_masks(DecoderAdapter(merged)).keys() == masks.keys()
    for name, mask in zero_masks(DecoderAdapter(merged)).items():
        assert torch.equal(mask, masks[name]), name
    for name, w in expected.items():
        torch.testing.assert_close(merged.get_submodule(name).weight, w, atol=1e-6, rtol=1e-5)
    untouched = [k for k in pruned_state if not any(k.startswith(t + ".") for t in baseline.targets)]
    assert all(torch.equal(merged.state_dict()[k], pruned_state[k]) for k in untouched)

    assert report["remasked_weights"] > 0 and report["merge_zero_collisions"] == 0
    assert 0 < report["remask_weight_change_rel"] < 1 and 0 < report["remask_update_lost_rel"] < 1
    over = report["unmerged_inference_overhead"]
    assert over["extra_params"] == expect and over["extra_matmuls_per_token"] == 2 * len(baseline.targets)
    flops = sum(2 * r * (i + o) for i, o in baseline.targets.values())
    assert over["extra_flops_per_token"] == flops + (2 * sum(o for _, o in baseline.targets.values())
                                                     if method == "dora" else 0)
    # re-masking changed the function: the merged logits move away from the unmerged ones
    assert (_logits(merged, batch) - unmerged).abs().max() > 1e-4


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_merge_without_masking_equals_unmerged(method):
    model = _pruned("gqa")
    none = {name: torch.zeros_like(m) for name, m in zero_masks(DecoderAdapter(model)).items()}
    baseline, _ = train_adapter(model, _batches(), _spec(method, max_steps=4), seed=0)
    assert set(baseline.targets) <= set(none)
    batch = _batches(4, 4)[0]
    unmerged = _logits(model, batch)
    merged, report = merge_adapter(model, baseline, none)
    assert (_logits(merged, batch) - unmerged).abs().max() <= 1e-5
    assert report["remasked_weights"] == 0 and report["remask_weight_change_rel"] == 0.0


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_saved_adapter_reloads_after_merge(method, tmp_path):
    model = _pruned("qwen2")
    model.name_or_path = "/worker/cache/dense-model"  # where the worker loaded it from
    fresh = copy.deepcopy(model)
    masks = zero_masks(DecoderAdapter(model))
    baseline, _ = train_adapter(model, _batches(), _spec(method, max_steps=4), seed=0)
    batch = _batches(4, 4)[0]
    unmerged = _logits(model, batch)
    merge_adapter(model, baseline, masks)  # the runner saves after merging
    out = save_adapter(baseline, tmp_path / "adapter")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["use_dora"] == (method == "dora") and cfg["lora_dropout"] == 0.0
    assert cfg["base_model_name_or_path"] is None  # never the worker's path, nor the dense model's
    assert (out / "adapter_model.safetensors").is_file()
    loaded = PeftModel.from_pretrained(fresh, str(out))
    assert (_logits(loaded, batch) - unmerged).abs().max() <= 1e-5


def test_seeded_and_cancel_restores_model():
    runs = []
    for _ in range(2):
        model = _pruned("llama")
        baseline, _ = train_adapter(model, _batches(), _spec("lora", max_steps=3), seed=5)
        runs.append(baseline.adapter_state_dict())
    assert runs[0].keys() == runs[1].keys()
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])

    model = _pruned("llama")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    with pytest.raises(Cancelled):
        train_adapter(model, _batches(), _spec("dora", max_steps=50), should_stop=lambda: True,
                      checkpoint_every=2)
    assert model.training and not hasattr(model, "peft_config")
    assert not any(isinstance(m, BaseTunerLayer) for m in model.modules())
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert all(p.requires_grad for p in model.parameters())


def test_bad_targets_and_detach():
    model = _pruned("llama")
    with pytest.raises(SpecError) as err:
        train_adapter(model, _batches(), _spec("lora", lora_targets=["no_such_proj"]))
    assert err.value.field == "restoration.lora_targets"
    assert not any(isinstance(m, BaseTunerLayer) for m in model.modules())
    with pytest.raises(SpecError):
        train_adapter(model, _batches(), _spec("lora", lora_targets=["embed_tokens"]))
    assert not any(isinstance(m, BaseTunerLayer) for m in model.modules())
    with pytest.raises(SpecError) as err:  # peft alone would train q_proj and drop the misspelt entry
        train_adapter(model, _batches(), _spec("lora", lora_targets=["q_proj", "v_prj"]))
    assert err.value.field == "restoration.lora_targets" and "'v_prj' names no module" in err.value.message
    assert not any(isinstance(m, BaseTunerLayer) for m in model.modules())
    batch = _batches(4, 4)[0]
    ref = _logits(model, batch)
    baseline, _ = train_adapter(model, _batches(), _spec("lora", max_steps=2))
    assert (_logits(model, batch) - ref).abs().max() > 0
    assert detach_adapter(baseline) is model
    assert torch.equal(_logits(model, batch), ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_attaching_an_adapter_leaves_the_models_outputs_exactly_as_they_were(method, dtype):
    """B = 0 and each DoRA magnitude equal to the norm its forward divides by: on a bfloat16 model too (peft's own
    magnitude, taken in bfloat16 against the forward's float32 norm, rescaled every target layer by up to 2^-8)."""
    from worker.restore.adapters.peft import attach_adapter

    model = make_model("llama", dtype=dtype)
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    baseline = attach_adapter(model, _spec(method), seed=0)
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert torch.equal(before, after)
    detach_adapter(baseline)


def test_a_kept_weight_that_merges_to_zero_stays_nonzero_in_every_export_dtype():
    """A LoRA update that exactly cancels one kept weight of a bfloat16 model: the weight becomes a value float16
    still holds (the model dtype's smallest normal became 0 in a float16 export, which then refused the job)."""
    from worker.restore.adapters.peft import COLLISION_VALUE, attach_adapter

    model = prune_half_at_random(make_model("llama", dtype=torch.bfloat16), seed=1)
    masks = zero_masks(DecoderAdapter(model))
    name = "model.layers.0.self_attn.q_proj"
    baseline = attach_adapter(model, _spec("lora"), seed=0)
    layer = model.get_submodule(name)
    weight = layer.get_base_layer().weight
    i, j = (int(k) for k in torch.nonzero(~masks[name])[0])  # a kept weight
    scaling = layer.scaling["default"]
    with torch.no_grad():
        layer.lora_A["default"].weight.zero_()
        layer.lora_B["default"].weight.zero_()
        layer.lora_A["default"].weight[0, j] = 1.0
        layer.lora_B["default"].weight[i, 0] = -float(weight[i, j]) / scaling
    merged, report = merge_adapter(model, baseline, masks)
    w = merged.get_submodule(name).weight
    assert report["merge_zero_collisions"] == 1 and float(w[i, j]) == COLLISION_VALUE
    assert torch.equal(w.to(torch.float16) == 0, masks[name])


def test_an_adapter_trains_under_max_grad_norm():
    """max_grad_norm (TrainControl's, from restoration.max_grad_norm) reaches the adapters' training: every step above
    it is counted as clipped."""
    model = _pruned("gqa")
    _, free = train_adapter(model, _batches(), _spec("lora", max_steps=3), seed=0)
    cap = min(free["grad_norm_curve"]) / 2
    model = _pruned("gqa")
    _, clipped = train_adapter(model, _batches(), _spec("lora", max_steps=3), seed=0, max_grad_norm=cap)
    assert free["clipped_steps"] == 0 and clipped["clipped_steps"] == 3
    assert clipped["grad_norm_curve"][0] == free["grad_norm_curve"][0]
    assert clipped["loss_curve"][1:] != free["loss_curve"][1:]
