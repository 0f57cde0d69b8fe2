"""A model split over several GPUs (model.split): the plan's layer placement and per-GPU memory, the device map
transformers loads by, when a worker chooses to split, and the settings and spec that ask for it."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import check_device_map
from pydantic import ValidationError

from app.config import Settings
from app.plan import GiB, PlanError, Shapes, device_params, make_plan, split_layers
from app.schemas import JobSpec
from tests.tiny import SUPPORTED_KINDS, make_config, make_model, save_tiny
from tests.unit.test_plan import LLAMA_7B, spec
from worker.errors import DeviceUnavailableError, InsufficientMemoryFailure
from worker.model.arch import DecoderAdapter
from worker.model.placement import split_device_map
from worker.run.device import DeviceBudget, choose_plan, job_devices

SEVEN_B = Shapes.from_config(LLAMA_7B)


@pytest.mark.parametrize("devices", [1, 2, 3, 4, 8])
def test_layers_go_in_contiguous_balanced_runs_one_run_per_gpu(devices):
    placed = split_layers(SEVEN_B, devices)
    assert len(placed) == SEVEN_B.layers
    assert placed == sorted(placed) and set(placed) == set(range(devices))  # every GPU holds a run of layers
    load = device_params(SEVEN_B, placed, devices)
    assert sum(load) == SEVEN_B.params()
    assert max(load) <= SEVEN_B.params() / devices + SEVEN_B.layer_params() + SEVEN_B.vocab * SEVEN_B.hidden


def test_a_tied_head_stays_with_the_embeddings_on_the_first_gpu():
    tied = replace(SEVEN_B, tied=True)
    load = device_params(tied, split_layers(tied, 2), 2)
    assert load[0] - load[1] == pytest.approx(tied.vocab * tied.hidden + tied.hidden, abs=tied.layer_params())


def test_a_split_plan_holds_the_fullest_gpus_share_and_the_host_gathers_the_whole_model_to_export():
    whole = make_plan(spec(), SEVEN_B, "cuda")
    split = make_plan(spec(), SEVEN_B, "cuda", devices=2)
    assert split.mode == "split" and split.devices == 2 and split.layer_devices == split_layers(SEVEN_B, 2)
    for stage in whole.stages:
        assert split.stages[stage].device_bytes < whole.stages[stage].device_bytes
    share = max(device_params(SEVEN_B, split.layer_devices, 2)) * 2
    assert split.stages["evaluating"].device_bytes > share
    assert split.stages["exporting"].host_bytes >= whole.weight_bytes
    assert split.to_dict()["layer_devices"] == split.layer_devices


def test_only_gpus_split_and_a_split_model_is_never_streamed():
    with pytest.raises(PlanError, match="several GPUs"):
        make_plan(spec(), SEVEN_B, "cpu", devices=2)
    with pytest.raises(PlanError, match="never streamed"):
        make_plan(spec(), SEVEN_B, "cuda", devices=2, streaming=True)


@pytest.mark.parametrize("kind", SUPPORTED_KINDS)
def test_the_device_map_places_every_tensor_and_follows_the_plan(kind):
    model = make_model(kind)
    layers = len(DecoderAdapter(model).layers)
    placed = [0] * (layers // 2) + [1] * (layers - layers // 2)
    devices = ["cuda:0", "cuda:1"]
    mapping = split_device_map(model, placed, devices)
    check_device_map(model, mapping)  # accelerate's own check: every parameter and buffer has a device
    prefix = DecoderAdapter(model)._layers_prefix()
    assert [mapping[f"{prefix}.{i}"] for i in range(layers)] == [devices[d] for d in placed]
    head = [name for name, m in model.named_modules() if m is model.get_output_embeddings()][0]
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert mapping.get(head, mapping.get(head.rpartition(".")[0])) == ("cuda:0" if tied else "cuda:1")
    assert mapping[f"{prefix.rpartition('.')[0]}.norm"] == ("cuda:0" if tied else "cuda:1")


@pytest.mark.parametrize("tied", [True, False])
def test_the_device_map_made_from_the_config_is_the_loaded_models(tied):
    """The pipeline maps devices on the model's structure (meta_model, before any weight loads): tied embeddings
    must show as tied there too, or the LM head goes to the last GPU, away from the embedding it shares."""
    from transformers import AutoModelForCausalLM

    from worker.model.placement import meta_model

    config = make_config("llama")
    config.tie_word_embeddings = tied
    loaded = AutoModelForCausalLM.from_config(config)
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) is tied
    placed, devices = [0, 1], ["cuda:0", "cuda:1"]
    assert split_device_map(meta_model(config), placed, devices) == split_device_map(loaded, placed, devices)


def test_a_placement_for_another_layer_count_is_refused():
    with pytest.raises(ValueError, match="layers"):
        split_device_map(make_model("llama"), [0], ["cuda:0", "cuda:1"])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    directory = save_tiny("llama", tmp_path_factory.mktemp("split") / "m")
    return SimpleNamespace(kind="safetensors", path=directory), make_config("llama")


def gpus(count: int, each: int) -> DeviceBudget:
    return DeviceBudget("cuda:0", f"{count} × test GPU", each, 64 * GiB, tuple(f"cuda:{i}" for i in range(count)))


def job(**model) -> JobSpec:
    return spec(model={"id": "/m", **model})


def test_a_worker_splits_only_when_the_whole_model_does_not_fit_one_gpu_but_fits_across_them(tiny):
    source, config = tiny
    whole = choose_plan(job(), source, config, gpus(2, 64 * GiB), None, measure=False)
    assert whole.mode == "whole"
    need = whole.peak("device")[1]
    split = choose_plan(job(), source, config, gpus(2, need - 1), None, measure=False)
    assert split.mode == "split" and split.devices == 2
    one_gpu = choose_plan(job(), source, config, gpus(1, need - 1), None, measure=False)
    assert one_gpu.mode == "streaming"
    assert choose_plan(job(split="off"), source, config, gpus(2, need - 1), None, measure=False).mode == "streaming"
    assert choose_plan(job(streaming="on"), source, config, gpus(2, 64 * GiB), None, measure=False).mode == "streaming"
    forced = choose_plan(job(split="on"), source, config, gpus(4, 64 * GiB), None, measure=False)
    assert forced.mode == "split" and forced.devices == 4


def test_split_on_needs_two_gpus_and_must_fit_them(tiny):
    source, config = tiny
    with pytest.raises(DeviceUnavailableError, match="two or more GPUs"):
        choose_plan(job(split="on"), source, config, gpus(1, 64 * GiB), None, measure=False)
    with pytest.raises(InsufficientMemoryFailure, match="split over 2 GPUs, .* the fullest of 2 GPUs"):
        choose_plan(job(split="on"), source, config, gpus(2, 2**20), None, measure=False)


def test_split_on_and_streaming_on_exclude_each_other():
    with pytest.raises(ValidationError, match="exclude each other"):
        job(split="on", streaming="on")
    assert job().model.split == "auto"


def test_the_device_setting_takes_a_list_of_gpus():
    assert Settings(device="cuda:0,cuda:1").device == "cuda:0,cuda:1"
    for bad in ("cuda:0,cpu", "gpu", "cuda:a"):
        with pytest.raises(ValidationError):
            Settings(device=bad)


def test_a_worker_without_the_gpus_it_is_set_to_fails_rather_than_use_the_cpu():
    assert job_devices(Settings(device="cpu")) == ["cpu"]
    with pytest.raises(DeviceUnavailableError, match="RESTORELCC_DEVICE=cuda:0,cuda:1"):
        job_devices(Settings(device="cuda:0,cuda:1"))


@pytest.mark.parametrize("kind", ["mistral", "qwen2"])
def test_a_split_model_re_expressed_as_llama_to_merge_keeps_its_device_map_and_hooks(kind):
    from accelerate import dispatch_model

    from tests.unit.test_restore_merge_check import logits, small_offsets, tiny_model
    from worker.restore.offsets.merge import merge_into_o_proj

    model = tiny_model(kind, torch.float32)
    adapter = DecoderAdapter(model)
    offsets = small_offsets(adapter)
    layers = len(adapter.layers)
    mapping = split_device_map(model, [0] * (layers // 2) + [1] * (layers - layers // 2), ["cpu", "cpu"])
    model = dispatch_model(model, device_map=mapping, force_hooks=True)  # hooks as on two GPUs
    merged = merge_into_o_proj(model, DecoderAdapter(model), offsets)
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert merged.hf_device_map == mapping
    assert all(hasattr(layer, "_hf_hook") for layer in DecoderAdapter(merged).layers)
    assert torch.equal(logits(merged), logits(model))
