"""The memory plan (app.plan): shapes read from configs as transformers builds the models, and what each stage's
prediction is made of; the device budget's settings; packed zero masks."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from pydantic import ValidationError
from transformers import AutoModelForCausalLM

from app.config import Settings, parse_size
from app.plan import GiB, PlanError, Shapes, attention_scores, make_plan, planned_stages, read_local_model, submit_plan
from app.schemas import JobSpec
from tests.memory import LiveBytes
from tests.tiny import SUPPORTED_KINDS, make_config, make_model, save_tiny
from worker.errors import InsufficientMemoryFailure
from worker.model.arch import DecoderAdapter
from worker.prune.measure import ZeroMasks, pack_bits, unpack_bits, zero_masks
from worker.run.device import DeviceBudget, check_plan

LLAMA_7B = {"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
            "num_key_value_heads": 32, "intermediate_size": 11008, "vocab_size": 32000, "dtype": "bfloat16",
            "tie_word_embeddings": False}


def spec(**parts) -> JobSpec:
    base = {"model": {"id": "/m"}, "data": {"train": "/t.jsonl"},
            "evaluation": {"perplexity": ["/p.jsonl"], "batch_size": 4, "max_seq_len": 128}}
    return JobSpec.model_validate(base | parts)


@pytest.mark.parametrize("kind", SUPPORTED_KINDS)
def test_parameter_count_matches_the_model_transformers_builds(kind):
    config = make_config(kind)
    model = make_model(kind)
    assert Shapes.from_config(config.to_dict()).params() == sum(p.numel() for p in model.parameters())


def test_llama_2_7b_shape_is_6_7b_parameters():
    assert Shapes.from_config(LLAMA_7B).params() == 6_738_415_616  # Llama-2-7B's published count


def test_a_config_without_its_geometry_is_refused_by_name():
    with pytest.raises(PlanError, match="hidden_size"):
        Shapes.from_config({"model_type": "llama"})


def test_every_planned_stage_holds_the_weights_and_training_the_most():
    plan = make_plan(spec(), Shapes.from_config(LLAMA_7B), "cpu")
    assert list(plan.stages) == [s.value for s in planned_stages(spec())]
    weights = 6_738_415_616 * 2
    assert plan.weight_bytes == weights
    assert all(s.device_bytes > weights for s in plan.stages.values())
    assert plan.peak("device")[0] == "training"
    assert plan.read_bytes == plan.write_bytes == weights  # bf16 in, bf16 out


def test_on_a_gpu_the_weights_are_on_the_device_and_not_on_the_host():
    plan = make_plan(spec(), Shapes.from_config(LLAMA_7B), "cuda")
    assert plan.stages["pruning"].device_bytes > plan.weight_bytes
    assert plan.stages["pruning"].host_bytes < plan.weight_bytes / 4


def test_the_probe_captures_are_planned_on_the_host_from_loading_to_extracting():
    shapes = Shapes.from_config(LLAMA_7B)
    capture = 1000 * 32 * 32 * 128 * 4  # a float32 capture of 1000 probe rows: N × layers × heads × head_dim

    def grows(selection: str) -> dict[str, float]:
        """Host bytes 1000 more probe rows add to each stage, in captures."""
        plans = [make_plan(spec(restoration={"probe_samples": n, "head_selection": selection}), shapes, "cuda")
                 for n in (1000, 2000)]
        return {stage: (plans[1].stages[stage].host_bytes - p.host_bytes) / capture
                for stage, p in plans[0].stages.items()}

    # the dense prompt, response and negative from loading; the pruned prompt from probing; the probe's features
    assert grows("probe") == {"loading": 3, "pruning": 3, "probing": 4, "extracting": 8, "training": 0,
                              "merging": 0, "evaluating": 0, "exporting": 0}
    assert grows("random") == {"loading": 1, "pruning": 1, "probing": 2, "extracting": 6, "training": 0,
                               "merging": 0, "evaluating": 0, "exporting": 0}


def test_what_grows_each_prediction():
    shapes = Shapes.from_config(LLAMA_7B)
    wanda = make_plan(spec(), shapes, "cuda").stages["pruning"].device_bytes
    sparsegpt = make_plan(spec(pruning={"method": "sparsegpt"}), shapes, "cuda").stages["pruning"].device_bytes
    assert sparsegpt == wanda + 3 * 11008**2 * 4  # the down projection's Hessian, its factor and the inverse's
    small = make_plan(spec(restoration={"batch_size": 2}), shapes, "cuda").stages["training"].device_bytes
    large = make_plan(spec(restoration={"batch_size": 16}), shapes, "cuda").stages["training"].device_bytes
    assert large > 4 * (small - make_plan(spec(), shapes, "cuda").weight_bytes)
    fp32 = make_plan(spec(model={"id": "/m", "dtype": "float32"}), shapes, "cuda")
    assert fp32.weight_bytes == 2 * make_plan(spec(), shapes, "cuda").weight_bytes
    none = make_plan(spec(restoration={"method": "none"}), shapes, "cpu")
    assert "training" not in none.stages and "probing" not in none.stages


def test_dense_targets_are_planned_for_the_samples_training_sees():
    """The distill objective (RestoreLCC's default) keeps dense targets for the samples its max_steps batches use:
    a training set a hundred times larger plans the same memory; epochs use every sample."""
    shapes = Shapes.from_config(LLAMA_7B)

    def host(**restoration) -> int:
        return make_plan(spec(restoration=restoration), shapes, "cpu").stages["training"].host_bytes

    used = 50 * 8  # the default max_steps × batch_size
    assert host(train_samples=used) == host(train_samples=100 * used)
    per_sample = 256 * (6 * 64 + 8)  # max_seq_len tokens of top-64 targets
    assert host(train_samples=used) - host(train_samples=used, objective="sft") >= used * per_sample
    all_of_them = host(train_samples=100 * used, max_steps=None, epochs=1)
    assert all_of_them - host(train_samples=used) >= 99 * used * per_sample


def test_check_names_the_stage_and_the_numbers():
    plan = make_plan(spec(), Shapes.from_config(LLAMA_7B), "cuda")
    check_plan(plan, DeviceBudget("cuda:0", "a GPU", 80 * GiB, 200 * GiB))
    with pytest.raises(InsufficientMemoryFailure, match=r"training stage needs about \d+\.\d\d GiB on cuda:0"):
        check_plan(plan, DeviceBudget("cuda:0", "a GPU", 12 * GiB, 200 * GiB))
    with pytest.raises(InsufficientMemoryFailure, match="of host memory"):
        check_plan(plan, DeviceBudget("cuda:0", "a GPU", 80 * GiB, GiB))


def test_submit_plan_reads_a_local_directory_and_nothing_else(tmp_path):
    model = save_tiny("llama", tmp_path / "m")
    made = submit_plan(spec(model={"id": str(model)}), read_local_model(str(model)))
    assert made is not None and made["source"] == "submit" and set(made["devices"]) == {"cpu", "cuda"}
    assert made["devices"]["cpu"]["params"] == sum(p.numel() for p in make_model("llama").parameters())
    assert made["devices"]["cpu"]["read_bytes"] == (model / "model.safetensors").stat().st_size
    assert read_local_model(str(tmp_path / "missing")) is None and submit_plan(spec(), None) is None
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text('{"model_type": "llama"}')
    assert submit_plan(spec(), read_local_model(str(tmp_path / "bad"))) is None


@pytest.mark.parametrize(("text", "value"), [("40GiB", 40 * 2**30), ("512 MiB", 512 * 2**20), ("2e9", 2 * 10**9),
                                             ("1.5gb", 1_500_000_000), (1024, 1024)])
def test_sizes_in_settings(text, value):
    assert parse_size(text) == value


def test_bad_device_settings_are_refused(monkeypatch):
    monkeypatch.setenv("RESTORELCC_DEVICE", "tpu")
    with pytest.raises(ValidationError, match="device"):
        Settings()
    monkeypatch.setenv("RESTORELCC_DEVICE", "cuda:1")
    monkeypatch.setenv("RESTORELCC_MAX_DEVICE_MEMORY", "lots")
    with pytest.raises(ValidationError, match="not a size"):
        Settings()
    monkeypatch.setenv("RESTORELCC_MAX_DEVICE_MEMORY", "8GiB")
    assert Settings().max_device_memory == 8 * 2**30 and Settings().device == "cuda:1"


@pytest.mark.parametrize("shape", [(3, 5), (8, 8), (1, 1), (7, 13)])
def test_packed_bits_round_trip(shape):
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(0)) < 0.5
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-mask.numel() // 8)
    assert torch.equal(unpack_bits(packed, mask.shape), mask)


def test_zero_masks_are_an_eighth_and_notice_one_changed_zero():
    model = make_model("llama")
    adapter = DecoderAdapter(model)
    with torch.no_grad():
        for _, lin in adapter.named_prunable_linears():
            lin.weight[:, ::2] = 0
    masks = zero_masks(adapter)
    assert isinstance(masks, ZeroMasks)
    bools = sum(lin.weight.numel() for _, lin in adapter.named_prunable_linears())
    assert masks.nbytes() * 8 - bools < 8 * len(masks)
    name, lin = next(iter(adapter.named_prunable_linears()))
    assert torch.equal(masks[name], lin.weight == 0) and masks.differs(adapter) == []
    with torch.no_grad():
        lin.weight[0, 0] = 1.0
    assert masks.differs(adapter) == [name]


def test_a_config_without_a_dtype_is_planned_in_the_weights_own(tmp_path):
    """Loading with dtype "auto" takes the stored weights' dtype when the config names none; so does the plan (read
    from the safetensors headers, no torch), for one file and for shards behind an index."""
    import json

    from app.plan import stored_dtype

    d = save_tiny("llama", tmp_path / "bf16")
    make_model("llama").to(torch.bfloat16).save_pretrained(d, max_shard_size="40KB")  # shards behind an index
    (d / "model.safetensors").unlink(missing_ok=True)
    assert (d / "model.safetensors.index.json").is_file()
    config = json.loads((d / "config.json").read_text())
    for key in ("dtype", "torch_dtype"):
        config.pop(key, None)
    (d / "config.json").write_text(json.dumps(config))
    assert stored_dtype(d) == "bfloat16"
    plan = submit_plan(JobSpec.model_validate({"model": {"id": str(d)}, "data": {"train": "t.jsonl"}}),
                       read_local_model(str(d)))
    shapes = Shapes.from_config(config)
    assert plan["devices"]["cpu"]["dtype"] == "bfloat16"
    assert plan["devices"]["cpu"]["weight_bytes"] == shapes.params() * 2
    single = save_tiny("llama", tmp_path / "fp32")
    assert stored_dtype(single) == "float32"
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "model.safetensors").write_bytes(b"\xff" * 16)
    assert stored_dtype(tmp_path / "broken") is None and stored_dtype(tmp_path / "nothing") is None


def test_an_adapters_merge_plans_three_copies_of_the_largest_weight_and_scoring_one_row_in_float32():
    shapes = Shapes.from_config(LLAMA_7B)
    largest = 11008 * 4096 * 2  # a bf16 MLP projection
    lora = make_plan(spec(restoration={"method": "lora"}), shapes, "cuda").stages["merging"].device_bytes
    bias = make_plan(spec(restoration={"method": "bias"}), shapes, "cuda").stages["merging"].device_bytes
    assert lora - bias == 3 * largest
    batch, seq, vocab = 4, 128, 32000  # spec()'s evaluation
    evaluating = make_plan(spec(), shapes, "cuda").stages["evaluating"].device_bytes
    weights = 6_738_415_616 * 2
    assert evaluating - (weights + 600 * 2**20) == batch * seq * vocab * 2 + 2 * seq * vocab * 4


def test_a_logit_soft_cap_plans_another_copy_of_the_logits():
    gemma2 = {"model_type": "gemma2", "hidden_size": 2304, "num_hidden_layers": 26, "num_attention_heads": 8,
              "num_key_value_heads": 4, "head_dim": 256, "intermediate_size": 9216, "vocab_size": 256000,
              "dtype": "bfloat16"}
    capped, uncapped = Shapes.from_config(gemma2), Shapes.from_config(gemma2 | {"final_logit_softcapping": None})
    assert capped.logit_softcap and not uncapped.logit_softcap  # Gemma 2's default cap applies when left out
    assert not Shapes.from_config(LLAMA_7B).logit_softcap
    a, b = (make_plan(spec(), s, "cuda").stages for s in (capped, uncapped))
    assert a["evaluating"].device_bytes - b["evaluating"].device_bytes == 4 * 128 * 256000 * 2  # spec()'s batch
    assert a["training"].device_bytes > b["training"].device_bytes


def _scores_kept_for_backward(model, ids) -> int:
    """Bytes of the seq × seq tensors (attention scores) autograd keeps in a training forward, each once."""
    seq = ids.shape[1]
    kept: dict[int, int] = {}

    def pack(t):
        if t.shape[-2:] == (seq, seq):
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    embeddings = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.model(inputs_embeds=embeddings)
    return sum(kept.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eager_attention_scores_are_planned_as_measured(dtype):
    """Gemma 2 attends eagerly: a training forward keeps every layer's batch × heads × seq² scores and a forward
    computes one layer's at a time. The plan's bytes per score element are those measured here, and the SDPA
    models plan none."""
    config = make_config("gemma2")
    shapes, b = Shapes.from_config(config.to_dict()), torch.finfo(dtype).bits // 8
    assert shapes.eager_attention and not Shapes.from_config(LLAMA_7B).eager_attention
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).train().requires_grad_(False)
    batch, seq = 2, 256
    ids = torch.randint(0, config.vocab_size, (batch, seq))
    kept = _scores_kept_for_backward(model, ids)
    kept_per_layer = attention_scores(shapes, batch, seq, b, kept_layers=1) - attention_scores(shapes, batch, seq, b)
    assert 0.9 * shapes.layers * kept_per_layer <= kept <= shapes.layers * kept_per_layer

    seq = 1024  # the scores dwarf everything else a forward holds at this length and width
    live = LiveBytes()
    with torch.no_grad(), live:
        model.model(torch.randint(0, config.vocab_size, (batch, seq)))
    planned = attention_scores(shapes, batch, seq, b)
    assert 0.75 * planned <= live.peak <= planned


def test_a_model_that_attends_eagerly_plans_its_scores_in_every_stage_that_runs_a_forward():
    gemma2 = {"model_type": "gemma2", "hidden_size": 3584, "num_hidden_layers": 42, "num_attention_heads": 16,
              "num_key_value_heads": 8, "head_dim": 256, "intermediate_size": 14336, "vocab_size": 256000,
              "dtype": "bfloat16"}
    eager = Shapes.from_config(gemma2)
    sdpa = dataclasses.replace(eager, eager_attention=False)
    job = spec(restoration={"method": "restorelcc", "batch_size": 8, "max_seq_len": 1024})
    a, b = (make_plan(job, s, "cuda").stages for s in (eager, sdpa))
    assert attention_scores(sdpa, 8, 1024, 2) == 0
    assert a["training"].device_bytes - b["training"].device_bytes == attention_scores(eager, 8, 1024, 2,
                                                                                      kept_layers=42)
    assert a["training"].device_bytes - b["training"].device_bytes > 40 * 2**30  # 42 layers of 16 × 1024² scores
    assert a["evaluating"].device_bytes - b["evaluating"].device_bytes == attention_scores(eager, 4, 128, 2)
    for stage in ("pruning", "probing"):
        assert a[stage].device_bytes > b[stage].device_bytes


def test_the_bytes_loading_reads_are_the_indexed_shards_only(tmp_path):
    """Mistral's repos hold a second copy of the weights (consolidated.safetensors) beside the shards the index
    names: the plan's read time counts what loading reads."""
    import json as jsonlib

    from app.plan import safetensors_bytes

    d = tmp_path / "sharded"
    d.mkdir()
    for name, size in (("model-00001-of-00002.safetensors", 300), ("model-00002-of-00002.safetensors", 200),
                       ("consolidated.safetensors", 500)):
        (d / name).write_bytes(b"\0" * size)
    (d / "model.safetensors.index.json").write_text(jsonlib.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors",
        "c": "model-00002-of-00002.safetensors"}}))
    assert safetensors_bytes(d) == 500
    single = tmp_path / "single"
    single.mkdir()
    (single / "model.safetensors").write_bytes(b"\0" * 70)
    assert safetensors_bytes(single) == 70
    (tmp_path / "outside.safetensors").write_bytes(b"\0" * 900)  # an index naming a file outside is not followed
    (d / "model.safetensors.index.json").write_text(jsonlib.dumps({"weight_map": {"a": "../outside.safetensors"}}))
    assert safetensors_bytes(d) is None
    (d / "model.safetensors.index.json").write_text("not json")
    assert safetensors_bytes(d) is None and safetensors_bytes(tmp_path) is None


def test_calibration_batches_hold_a_bounded_number_of_tokens():
    """Long calibration sequences run fewer at a time (a batch's MLP activations grow with its tokens), and the plan
    counts the batch the worker runs."""
    from app.plan import CALIBRATION_BATCH_TOKENS, calibration_batch

    assert calibration_batch(128, 256) == 8 and calibration_batch(3, 256) == 3
    assert calibration_batch(128, 8192) == CALIBRATION_BATCH_TOKENS // 8192 == 2
    assert calibration_batch(128, 32768) == 1
    shapes = Shapes.from_config(LLAMA_7B)
    short, long = (make_plan(spec(pruning={"method": "wanda", "seq_len": n, "calibration_samples": 16}), shapes,
                             "cuda").stages["pruning"].device_bytes for n in (2048, 4096))
    # twice as long, only the calibration sequences' layer inputs and outputs grow: a batch holds 8 × 2048 tokens
    # at the one length and 4 × 4096 at the other, so its MLP activations stay the same
    assert long - short == 2 * 16 * 2048 * 4096 * 2
