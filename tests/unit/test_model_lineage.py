"""A resumed job goes on only with the local models its checkpoint was made from (worker.run.lineage): a model
directory or GGUF file replaced or changed between a stop and the resume fails the job model_not_found naming
model.id or model.dense and how to start over, instead of putting the checkpoint's pruned Linears into another
model. The identity is cheap: weights are named, sized and dated, never read. Also the codes of the other failures
a resume or an export can end with."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from app.schemas import JobSpec
from app.store.artifacts import LocalStore
from tests.tiny import instruction_rows, make_tokenizer, prune_half_at_random, save_tiny, text_rows, write_jsonl
from worker.errors import ExportCheckError, ModelNotFoundError
from worker.model.load import ModelSource, resolve_source
from worker.reporting import NullReporter
from worker.run.checkpoints import CheckpointStore
from worker.run.lineage import START_OVER, model_changed_since, model_identities
from worker.run.resume import Resumer, local_resumer


def identities(path: Path, field: str = "model.id") -> dict[str, dict[str, Any]]:
    return model_identities([resolve_source(str(path), field=field)])


def _bump_mtime(path: Path) -> None:
    """A later modification time than the file has (set, not waited for)."""
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))


def _other_weights_same_header(path: Path) -> None:
    """Other tensor values in a safetensors file, its header, size and modification time kept."""
    st, data = path.stat(), bytearray(path.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")
    data[start:] = bytes(b ^ 0xFF for b in data[start:])
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


# ── the identity of a local model ────────────────────────────────────────────────────────────────────


def test_a_model_directory_is_identified_by_its_files_without_reading_its_weights(tmp_path):
    model = save_tiny("llama", tmp_path / "model")
    before = identities(model)
    entry = before["model.id"]
    assert entry["path"] == str(model) and entry["kind"] == "hf_dir"
    config = (model / "config.json").read_bytes()
    assert entry["files"]["config.json"] == {"bytes": len(config), "sha256": hashlib.sha256(config).hexdigest()}
    weights = model / "model.safetensors"
    assert set(entry["files"]["model.safetensors"]) == {"bytes", "header_sha256", "sample_sha256"}
    assert "tokenizer.json" in entry["files"]
    (model / "README.md").write_text("# notes\n")  # what the checkpoint was computed from is unchanged
    _bump_mtime(weights)  # the same model copied onto a worker's own disk: new times, the same bytes
    assert identities(model) == before
    assert model_changed_since(before, identities(model), "pruned") is None
    assert model_changed_since(None, identities(model), "pruned") is None  # a checkpoint that recorded none
    _other_weights_same_header(weights)  # other values of the same tensors: the sampled bytes tell
    failure = model_changed_since(before, identities(model), "pruned")
    assert failure is not None and "model.safetensors has other content)" in failure.message


def _rewrite_config(model: Path) -> str:
    config = json.loads((model / "config.json").read_text())
    config["rms_norm_eps"] = 1e-5 if config.get("rms_norm_eps") != 1e-5 else 1e-6
    (model / "config.json").write_text(json.dumps(config))
    return "config.json has other content"


def _replace_model(model: Path) -> str:
    shutil.rmtree(model)
    save_tiny("llama", model, seed=1)  # the same architecture and header, other weights
    return "model.safetensors has other content"


def _add_shard(model: Path) -> str:
    shutil.copy(model / "model.safetensors", model / "model-extra.safetensors")
    return "model-extra.safetensors is new"


def _remove_tokenizer(model: Path) -> str:
    (model / "tokenizer.json").unlink()
    return "tokenizer.json is gone"


def _resize_weights(model: Path) -> str:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(model / "model.safetensors"))
    tensors["extra.bias"] = torch.zeros(3)
    save_file(tensors, str(model / "model.safetensors"), metadata={"format": "pt"})
    return "model.safetensors has other content ("


@pytest.mark.parametrize("change", [_rewrite_config, _replace_model, _add_shard, _remove_tokenizer, _resize_weights])
def test_a_changed_model_directory_fails_the_resume_naming_the_field_and_how_to_start_over(tmp_path, change):
    model = save_tiny("llama", tmp_path / "model")
    before = identities(model)
    said = change(model)
    failure = model_changed_since(before, identities(model), "pruned")
    assert isinstance(failure, ModelNotFoundError)
    assert (failure.code, failure.field) == ("model_not_found", "model.id")
    assert f"model.id changed since this job's pruned checkpoint was written ({model}: {said}" in failure.message
    assert failure.message.endswith(f"restore it, or start over: {START_OVER}")


def test_a_gguf_model_is_identified_by_its_size_header_and_sampled_bytes(tmp_path):
    from tests.unit.test_load import write_tiny_gguf

    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path)
    before = identities(path)
    assert before["model.id"]["kind"] == "gguf" and set(before["model.id"]["files"]) == {"tiny.gguf"}
    assert model_changed_since(before, identities(path), "training") is None
    st = path.stat()
    write_tiny_gguf(path, name="tiny-gqb")  # other metadata, the same size and (set back) time
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size
    failure = model_changed_since(before, identities(path), "training")
    assert failure is not None and failure.field == "model.id" and "tiny.gguf has other content" in failure.message
    write_tiny_gguf(path)  # the very same bytes, written again (a new modification time)
    assert identities(path) == before
    assert model_changed_since(before, identities(path), "training") is None


def test_a_hub_model_is_left_to_its_commit(tmp_path):
    snapshot = save_tiny("llama", tmp_path / "snapshots" / ("a" * 40))
    hub = ModelSource("org/tiny", "hf_dir", snapshot, repo_id="org/tiny", commit="a" * 40)
    assert model_identities([hub, None]) == {}


# ── through the pipeline: recorded in the report and the checkpoint, compared on resume ──────────────


def _spec(tmp_path: Path, model: Path, **model_fields: Any) -> JobSpec:
    return JobSpec.model_validate({
        "model": {"id": str(model), **model_fields}, "pruning": {"method": "magnitude", "sparsity": 0.5},
        "restoration": {"method": "none"},
        "data": {"train": str(write_jsonl(tmp_path / "train.jsonl", instruction_rows(8)))},
        "evaluation": {"perplexity": [str(write_jsonl(tmp_path / "text.jsonl", text_rows(4)))], "limit": 4,
                       "max_seq_len": 32}})


def test_a_resumed_run_goes_on_with_its_own_model_and_fails_with_a_replaced_one(tmp_path):
    """A run's checkpoints are kept (as a stopped job's are): the next run of the spec resumes from them and, with the
    model unchanged, ends with the same bytes; with the directory replaced by another model of the same
    architecture it fails before loading anything, and goes on once the model is back."""
    from worker.run.pipeline import run_pipeline

    model = save_tiny("llama", tmp_path / "model")
    spec = _spec(tmp_path, model)
    checkpoints = tmp_path / "checkpoints"
    first = run_pipeline(spec, tmp_path / "first", NullReporter(), local_resumer(checkpoints, spec))
    assert first["model_files"] == identities(model)
    saved = local_resumer(checkpoints, spec).store.load()
    assert saved is not None and saved.meta["report"]["model_files"] == first["model_files"]
    weights = (tmp_path / "first" / "model" / "model.safetensors").read_bytes()

    again = run_pipeline(spec, tmp_path / "again", NullReporter(), local_resumer(checkpoints, spec))
    assert again["attempts"][-1]["resumed_from"]["checkpoint"] == saved.point
    assert (tmp_path / "again" / "model" / "model.safetensors").read_bytes() == weights

    model.rename(tmp_path / "kept")
    save_tiny("llama", model, seed=1)
    with pytest.raises(ModelNotFoundError) as err:
        run_pipeline(spec, tmp_path / "mixed", NullReporter(), local_resumer(checkpoints, spec))
    assert err.value.field == "model.id" and f"checkpoint was written ({model}: " in err.value.message
    assert START_OVER in err.value.message
    assert not (tmp_path / "mixed" / "model").exists()

    shutil.rmtree(model)
    (tmp_path / "kept").rename(model)  # a rename keeps the files' times: the model it was made from
    back = run_pipeline(spec, tmp_path / "back", NullReporter(), local_resumer(checkpoints, spec))
    assert back["attempts"][-1]["resumed_from"]["checkpoint"] == saved.point
    assert (tmp_path / "back" / "model" / "model.safetensors").read_bytes() == weights


def test_a_changed_dense_reference_fails_the_resume_naming_model_dense(tmp_path):
    """The dense reference of an already-pruned model is recorded and compared as model.id is."""
    from worker.run import pipeline
    from worker.run.check import check_job

    pruned, dense = save_tiny("llama", tmp_path / "pruned"), save_tiny("llama", tmp_path / "dense", seed=1)
    spec = JobSpec.model_validate({
        "model": {"id": str(pruned), "dense": str(dense)}, "pruning": {"method": "none"},
        "restoration": {"method": "restorelcc", "probe_samples": 8, "max_steps": 2, "batch_size": 4,
                        "max_seq_len": 64},
        "data": {"train": str(write_jsonl(tmp_path / "train.jsonl", instruction_rows(16)))}})
    checked = check_job(spec)

    def state(resumer: Resumer) -> pipeline.RunState:
        run = pipeline.RunState(spec=spec, out_dir=tmp_path / "out", checked=checked, resumer=resumer)
        run.report = resumer.load(NullReporter()) or {}
        return run

    first = state(Resumer(_store(tmp_path)))
    pipeline._record_inputs(first)
    assert set(first.report["model_files"]) == {"model.id", "model.dense"}
    first.resumer.save("prepared", first.report)
    pipeline._record_inputs(state(Resumer(_store(tmp_path))))  # unchanged: goes on
    _rewrite_config(dense)
    with pytest.raises(ModelNotFoundError) as err:
        pipeline._record_inputs(state(Resumer(_store(tmp_path))))
    assert err.value.field == "model.dense" and "prepared checkpoint" in err.value.message
    assert START_OVER in err.value.message


def _store(tmp_path: Path) -> CheckpointStore:
    return CheckpointStore(LocalStore(tmp_path / "artifacts"), "jobs/j1/checkpoints/", "fp", tmp_path / "scratch")


# ── the codes of a resume that does not fit and of the export checks ─────────────────────────────────


def test_a_checkpoint_without_pruned_weights_for_the_models_modules_fails_model_not_found(tmp_path):
    weights = {"model.layers.0.mlp.up_proj": torch.randn(3, 4)}
    assert _store(tmp_path).save("pruned", {"report": {}}, {"weights": weights}, copy=("weights",))
    resumer = Resumer(_store(tmp_path))
    resumer.checkpoint = resumer.store.load()
    linears = {name: torch.nn.Linear(4, 3, bias=False) for name in (*weights, "model.layers.1.mlp.up_proj")}
    with pytest.raises(ModelNotFoundError) as err:
        resumer.apply_weights(linears)
    assert (err.value.code, err.value.field) == ("model_not_found", "model.id")
    assert "no pruned weights for 1 module(s)" in err.value.message and START_OVER in err.value.message


@pytest.fixture
def exporting(tmp_path):
    """A pruned tiny model at the exporting stage, as the pipeline holds it."""
    from worker.model.arch import DecoderAdapter
    from worker.prune.measure import zero_masks
    from worker.run import pipeline
    from worker.run.check import check_job

    model_dir = save_tiny("llama", tmp_path / "model")
    spec = _spec(tmp_path, model_dir)
    checked = check_job(spec)
    model = prune_half_at_random(_load(model_dir))
    adapter = DecoderAdapter(model)
    state = pipeline.RunState(spec=spec, out_dir=tmp_path / "out", model=model, tokenizer=make_tokenizer(),
                              adapter=adapter, checked=checked, method=checked.method, report={})
    state.zero_masks = zero_masks(adapter)
    progress = pipeline.StageProgress(NullReporter(), [pipeline.Stage.exporting])
    progress.enter(pipeline.Stage.exporting)
    return pipeline, state, progress


def _load(model_dir: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir).eval()


def test_lost_pruned_zeros_fail_the_export_check(exporting):
    pipeline, state, progress = exporting
    down = state.model.model.layers[1].mlp.down_proj.weight
    with torch.no_grad():
        down[down == 0] = 0.5
    with pytest.raises(ExportCheckError) as err:
        pipeline._stage_exporting(state, progress, NullReporter())
    assert err.value.code == "export_check_failed" and "lost pruned zeros" in err.value.message
    assert state.report["checks"]["zeros_identical"] is False and not (state.out_dir / "model").exists()


def test_an_export_that_would_not_load_as_restored_fails_the_export_check(exporting):
    """A tensor the saved config.json has no place for (an o_proj bias the config does not ask for) would be dropped
    by from_pretrained without an error."""
    pipeline, state, progress = exporting
    o_proj = state.model.model.layers[0].self_attn.o_proj
    o_proj.bias = torch.nn.Parameter(torch.ones(o_proj.out_features))
    with pytest.raises(ExportCheckError) as err:
        pipeline._stage_exporting(state, progress, NullReporter())
    assert err.value.code == "export_check_failed" and "would not load as restored" in err.value.message
    assert "model.layers.0.self_attn.o_proj.bias" in err.value.message
