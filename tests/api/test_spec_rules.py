"""Spec fields that the worker would ignore are refused at submit with a 422 naming the field: an adapter output of
a method that exports none, a per-set limit that limits no file, a hub revision of a local model."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.schemas import JobSpec
from tests.conftest import Api


def _refused(api: Api, spec: dict, field: str) -> str:
    r = api.client.post("/v1/jobs", json=spec, headers=api.h())
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["field"] == field and err["code"] == "invalid_spec", err
    return err["message"]


def _train(api: Api) -> str:
    path = api.root / "data" / "train.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n')
    return str(path)


@pytest.mark.parametrize("method", ["restorelcc", "bias", "none"])
def test_an_adapter_output_needs_a_method_that_exports_one(api, method):
    spec = api.spec(restoration={"method": method}, data={"train": _train(api)}, output={"format": "adapter"})
    message = _refused(api, spec, "output.format")
    assert f"restoration.method '{method}' exports model/ only" in message and "'lora' or 'dora'" in message


def test_the_default_method_with_an_adapter_output_is_refused_too(api):
    spec = api.spec(data={"train": _train(api)}, output={"format": "adapter"})
    del spec["restoration"]  # restorelcc
    _refused(api, spec, "output.format")


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_lora_and_dora_may_name_their_adapter_the_result(api, method):
    job = api.create(restoration={"method": method}, data={"train": _train(api)}, output={"format": "adapter"})
    assert job["spec"]["output"]["format"] == "adapter" and job["spec"]["restoration"]["method"] == method


def _eval_files(api: Api) -> dict[str, list[str]]:
    data = api.root / "data"
    return {"perplexity": [str(data / "wikitext_sentences.jsonl")],
            "response_perplexity": [str(data / "alpaca" / "valid.jsonl"), str(data / "held.out.jsonl")],
            "tasks": [str(data / "boolq.jsonl"), str(data / "piqa")]}


def test_every_limit_key_that_the_worker_would_use_is_accepted(api):
    """The worker looks a set's limit up by its file's stem (worker.run.evaluate: ``Path(path).stem``): the file
    name without its last suffix, whichever list the file is in."""
    files = _eval_files(api)
    limits = {"wikitext_sentences": 300, "valid": 100, "held.out": 5, "boolq": 50, "piqa": 20}
    assert set(limits) == {Path(p).stem for paths in files.values() for p in paths}
    job = api.create(evaluation={**files, "limits": limits})
    assert job["spec"]["evaluation"]["limits"] == limits


@pytest.mark.parametrize("key", ["boolq.jsonl", "Boolq", "held", "alpaca", "valid.jsonl", "", "mean_acc"])
def test_a_limit_key_that_names_no_evaluation_file_is_422_naming_the_key(api, key):
    message = _refused(api, api.spec(evaluation={**_eval_files(api), "limits": {"boolq": 5, key: 3}}),
                       f"evaluation.limits.{key}")
    assert message.startswith(f"evaluation.limits.{key}: names no evaluation file") and "'boolq'" in message


def test_a_limit_key_without_any_evaluation_file_is_422(api):
    message = _refused(api, api.spec(evaluation={"limits": {"boolq": 3}}), "evaluation.limits.boolq")
    assert "none given" in message


@pytest.mark.parametrize("model_id", ["{root}/models/tiny", "{root}/models/tiny.gguf", "~/models/tiny",
                                      "./models/tiny", "../tiny", "org/tiny.GGUF", " /models/tiny"])
def test_a_revision_of_a_local_model_is_422_naming_model_revision(api, model_id):
    """Local by the worker's rule (worker.model.load: absolute, ./, ../, ~, or a .gguf file): it never reads a
    revision for those."""
    spec = api.spec(model={"id": model_id.format(root=api.root), "revision": "v1"})
    message = _refused(api, spec, "model.revision")
    assert "hub id only" in message


@pytest.mark.parametrize("model_id", ["org/tiny", "tiny", "org/tiny.safetensors-v2"])
def test_a_revision_of_a_hub_id_is_kept(model_id):
    spec = JobSpec.model_validate({"model": {"id": model_id, "revision": "v1"}, "restoration": {"method": "none"},
                                   "pruning": {"method": "magnitude"}})
    assert spec.model.revision == "v1"


def test_a_sequence_longer_than_the_models_context_is_422_at_submit_when_its_config_is_readable(api):
    """The API reads a local model's config.json at submit (no weights, no torch): a sequence length past its
    max_position_embeddings is refused there, naming the field, as the worker would refuse it (app.context)."""
    import json

    model = api.root / "models" / "ctx"
    model.mkdir(parents=True)
    (model / "config.json").write_text(json.dumps(
        {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
         "intermediate_size": 128, "vocab_size": 320, "max_position_embeddings": 512}))
    base = {"model": {"id": str(model)}, "data": {"train": _train(api)}}
    for field, sections in (("pruning.seq_len", {"pruning": {"method": "wanda", "seq_len": 1024}}),
                            ("restoration.max_seq_len", {"restoration": {"method": "lora", "max_seq_len": 600}})):
        message = _refused(api, api.spec(**base, **sections), field)
        assert "exceeds the model's context of 512 tokens" in message
    job = api.create(**base, pruning={"method": "magnitude", "seq_len": 1024})  # magnitude reads no calibration text
    assert job["spec"]["pruning"]["seq_len"] == 1024


def _gguf_header(path: Path, context: int, kv_heads: int | list = 4) -> Path:
    """A llama GGUF of header only (no tensors): all the API reads of one at submit."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(2)
    w.add_context_length(context)
    w.add_embedding_length(64)
    w.add_feed_forward_length(128)
    w.add_head_count(4)
    if isinstance(kv_heads, list):
        w.add_array("llama.attention.head_count_kv", kv_heads)
    else:
        w.add_head_count_kv(kv_heads)
    w.add_vocab_size(320)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("named", [False, True])
def test_a_local_gguf_is_read_at_submit_like_a_config_json(api, named):
    """A GGUF file's header gives the API the context (a 422 naming the field) and the plan it stores, as config.json
    does for a directory: given as the file itself, or as its directory and model.gguf_file."""
    models = api.root / "models" / "gguf"
    models.mkdir(parents=True)
    path = _gguf_header(models / "tiny.gguf", context=512)
    model = {"id": str(models), "gguf_file": "tiny.gguf"} if named else {"id": str(path)}
    base = {"model": model, "data": {"train": _train(api)}}
    message = _refused(api, api.spec(**base, pruning={"method": "wanda", "seq_len": 1024}), "pruning.seq_len")
    assert "exceeds the model's context of 512 tokens" in message
    job = api.create(**base, pruning={"method": "wanda", "seq_len": 256})
    plan = job["plan"]["devices"]["cpu"]
    assert job["plan"]["source"] == "submit" and plan["dtype"] == "float32"
    assert plan["read_bytes"] == path.stat().st_size


def test_a_gguf_the_api_cannot_plan_is_left_to_the_worker(api):
    """A header the API cannot read (a file cut short) or a named GGUF that is missing beside a config.json:
    accepted without a plan (the worker gives the verdict), never a 500, and never planned from the config.json the
    worker will not read. An empty per-layer array is left out, as the worker's config leaves it (kv heads =
    heads)."""
    import json

    models = api.root / "models" / "odd"
    models.mkdir(parents=True)
    _gguf_header(models / "empty-kv.gguf", context=512, kv_heads=[])
    cut = models / "cut.gguf"
    cut.write_bytes((models / "empty-kv.gguf").read_bytes()[:40])
    (models / "config.json").write_text(json.dumps(
        {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
         "intermediate_size": 128, "vocab_size": 320, "max_position_embeddings": 128}))
    train = _train(api)
    job = api.create(model={"id": str(models / "empty-kv.gguf")}, data={"train": train},
                     pruning={"method": "wanda", "seq_len": 256})
    assert job["plan"]["devices"]["cpu"]["dtype"] == "float32"
    for model in ({"id": str(cut)}, {"id": str(models), "gguf_file": "missing.gguf"}):
        job = api.create(model=model, data={"train": train}, pruning={"method": "wanda", "seq_len": 256})
        assert job["plan"] is None, model


def test_a_gguf_named_by_a_link_to_a_blob_is_accepted_and_planned(api):
    """The hub cache's snapshot/<name>.gguf links to blobs/<sha>, which has no suffix: the spec's name decides, as in
    the worker (it was refused not_a_model)."""
    blobs = api.root / "models" / "blobs"
    blobs.mkdir(parents=True)
    blob = _gguf_header(blobs / "3f2a9c", context=512)
    link = api.root / "models" / "model.gguf"
    link.symlink_to(blob)
    job = api.create(model={"id": str(link)}, data={"train": _train(api)}, pruning={"method": "wanda", "seq_len": 256})
    assert job["plan"]["devices"]["cpu"]["read_bytes"] == blob.stat().st_size


@pytest.mark.parametrize("method", ["restorelcc", "bias", "lora", "dora"])
def test_response_eos_is_on_by_default_and_left_out_of_the_idempotency_hash_there(method):
    """A request repeated after the upgrade that added restoration.response_eos hashes as it did before; naming
    false hashes differently (a different training run)."""
    from app.store.jobs import hash_view

    def spec(**extra) -> JobSpec:
        return JobSpec.model_validate({"model": {"id": "/m"}, "restoration": {"method": method, **extra},
                                       "data": {"train": "/d/train.jsonl"}})

    def restoration(**extra) -> dict:
        return hash_view(spec(**extra).model_dump(mode="json"))["restoration"]

    assert spec().restoration.response_eos is True
    assert "response_eos" not in restoration() and restoration() == restoration(response_eos=True)
    assert restoration(response_eos=False)["response_eos"] is False


def test_response_eos_is_not_a_setting_of_a_job_that_trains_nothing(api):
    spec = api.spec(restoration={"method": "none", "response_eos": False})
    assert "restoration.response_eos: not a setting of restoration.method 'none'" in _refused(
        api, spec, "restoration.response_eos")


@pytest.mark.parametrize("key", ["Foo", "lr2", "maxSteps", "foo-bar", "response eos"])
def test_an_unknown_restoration_setting_is_422_naming_it_whatever_its_spelling(api, key):
    spec = api.spec(restoration={"method": "restorelcc", key: 1}, data={"train": _train(api)})
    assert "not a setting of restoration.method 'restorelcc'" in _refused(api, spec, f"restoration.{key}")


def test_a_sparsity_that_contradicts_the_pattern_is_422_naming_pruning_sparsity(api):
    spec = api.spec(pruning={"method": "magnitude", "pattern": "2:4", "sparsity": 0.3})
    assert "contradicts pattern 2:4" in _refused(api, spec, "pruning.sparsity")


def test_an_nm_pattern_whose_sparsity_rounds_to_one_is_422(api):
    spec = api.spec(pruning={"method": "magnitude", "pattern": "1:100000000000000000000"})
    assert "M at most 1024" in _refused(api, spec, "pruning.pattern")
    assert api.client.post("/v1/jobs", json=api.spec(pruning={"method": "magnitude", "pattern": "1:1024"}),
                           headers=api.h()).status_code == 202


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded"])
def test_a_spec_not_sent_as_json_is_415_saying_so(api, content_type):
    import json

    headers = api.h() | ({"Content-Type": content_type} if content_type else {})
    r = api.client.post("/v1/jobs", content=json.dumps(api.spec()).encode(), headers=headers)
    assert r.status_code == 415, r.text
    assert r.json()["error"]["code"] == "unsupported_media_type" and "application/json" in r.json()["error"]["message"]
    as_json = api.client.post("/v1/jobs", content=json.dumps(api.spec()).encode(),
                              headers=api.h() | {"Content-Type": "application/json; charset=utf-8"})
    assert as_json.status_code == 202, as_json.text
    empty = api.client.post("/v1/jobs", headers=api.h())
    assert empty.status_code == 422 and empty.json()["error"]["message"] == "request body is required"
