"""`restorelcc run` end to end on tiny models, and its early, clear failures on bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.tiny import choice_rows, instruction_rows, save_tiny, text_rows, write_jsonl

ENV = {**{k: v for k, v in os.environ.items() if k != "RESTORELCC_FAILPOINTS"},  # armed only where a test says
       "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", *args],
        capture_output=True, text=True, timeout=timeout, env=ENV, cwd=Path(__file__).parents[2],
    )


def assert_refused_before_any_stage(proc: subprocess.CompletedProcess) -> None:
    """The job check refused the spec before the first stage (loading) began: nothing was loaded or trained.
    Checked on the stage lines the CLI prints, not on wall time, which depends on the machine's load."""
    out = proc.stdout + proc.stderr
    assert "── " not in out, out


def write_job_data(d: Path) -> Path:
    """The data files :func:`make_spec` names, under ``d``."""
    write_jsonl(d / "train.jsonl", instruction_rows(48))
    write_jsonl(d / "valid.jsonl", instruction_rows(60)[48:])
    write_jsonl(d / "text.jsonl", text_rows(12))
    write_jsonl(d / "boolq.jsonl", choice_rows(10))
    return d


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_job_data(tmp_path_factory.mktemp("data"))


def make_spec(model: str, data: Path, **overrides) -> dict:
    spec = {
        "model": {"id": model},
        "pruning": {"method": "wanda", "sparsity": 0.5, "calibration_samples": 8, "seq_len": 32},
        "restoration": {"method": "none"},
        "data": {"train": str(data / "train.jsonl")},
        "evaluation": {
            "perplexity": [str(data / "text.jsonl")],
            "response_perplexity": [str(data / "valid.jsonl")],
            "tasks": [str(data / "boolq.jsonl")],
            "limit": 8,
            "max_seq_len": 64,
        },
    }
    for key, value in overrides.items():
        section, _, name = key.partition("__")
        if name:
            spec[section][name] = value
        else:
            spec[section] = value
    return spec


def test_run_prunes_evaluates_and_exports(tmp_path, data_dir):
    model_dir = save_tiny("gqa", tmp_path / "model")
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(make_spec(str(model_dir), data_dir)))
    proc = run_cli("run", str(spec_path), "--out", str(tmp_path / "out"), "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]

    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["spec"]["pruning"]["method"] == "wanda"
    for stage in ("loading", "pruning", "evaluating", "exporting"):
        assert report["stages"][stage]["seconds"] >= 0
        assert report["stages"][stage]["peak_rss_mb"] > 0
    assert abs(report["sparsity"]["overall"] - 0.5) < 1e-3
    for model_name in ("dense", "pruned"):
        m = report["metrics"][model_name]
        assert m["text"]["ppl"] > 1
        assert m["valid"]["response_ppl"] > 1
        assert 0 <= m["boolq"]["acc"] <= 1
    assert report["metrics"]["pruned"]["text"]["ppl"] != report["metrics"]["dense"]["text"]["ppl"]

    # The exported model loads with plain transformers and is exactly as sparse as reported.
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "model")
    for name, fraction in report["sparsity"]["modules"].items():
        weight = reloaded.get_submodule(name).weight
        assert abs((weight == 0).float().mean().item() - fraction) < 1e-9


BAD_CASES = {
    "sparsity_out_of_range": ({"pruning__sparsity": 1.5}, "pruning.sparsity"),
    "pattern_n_not_below_m": ({"pruning__pattern": "5:4"}, "pruning.pattern"),
    "unknown_field": ({"pruning__colour": "blue"}, "pruning.colour"),
    "nm_not_dividing_width": ({"pruning__pattern": "2:3"}, "does not divide"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_spec_fails_fast_and_clearly(tmp_path, data_dir, case):
    overrides, needle = BAD_CASES[case]
    model_dir = save_tiny("llama", tmp_path / "model")
    spec = make_spec(str(model_dir), data_dir, **overrides)
    if case == "nm_not_dividing_width":
        spec["pruning"].pop("sparsity")
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(spec))
    proc = run_cli("run", str(spec_path), "--out", str(tmp_path / "out"))
    assert proc.returncode != 0
    assert needle in proc.stderr, proc.stderr
    assert_refused_before_any_stage(proc)
    assert not (tmp_path / "out" / "model").exists()


def test_unsupported_architecture_fails_before_loading(tmp_path, data_dir):
    model_dir = save_tiny("gpt2", tmp_path / "gpt2")
    # Weights that cannot load prove the check ran on the config alone.
    for f in model_dir.glob("*.safetensors"):
        f.write_bytes(b"not weights")
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(make_spec(str(model_dir), data_dir)))
    proc = run_cli("run", str(spec_path), "--out", str(tmp_path / "out"))
    assert proc.returncode != 0
    assert "unsupported architecture" in proc.stderr and "GPT2" in proc.stderr, proc.stderr
    assert_refused_before_any_stage(proc)


def test_missing_model_path_fails_clearly(tmp_path, data_dir):
    missing = tmp_path / "no" / "such" / "model"
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(make_spec(str(missing), data_dir)))
    proc = run_cli("run", str(spec_path), "--out", str(tmp_path / "out"))
    assert proc.returncode != 0
    assert str(missing) in proc.stderr, proc.stderr
    assert_refused_before_any_stage(proc)


def test_missing_data_file_fails_clearly(tmp_path, data_dir):
    model_dir = save_tiny("llama", tmp_path / "model")
    spec = make_spec(str(model_dir), data_dir)
    spec["evaluation"]["tasks"] = [str(tmp_path / "absent.jsonl")]
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(spec))
    proc = run_cli("run", str(spec_path), "--out", str(tmp_path / "out"))
    assert proc.returncode != 0
    assert "evaluation.tasks.0" in proc.stderr and "absent.jsonl" in proc.stderr, proc.stderr
    assert_refused_before_any_stage(proc)


def test_spec_with_unknown_field_is_rejected_without_torch(tmp_path):
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps({"model": {"id": "x"}, "restoration": {"method": "none"}, "extra": 1}))
    code = (
        "import sys; from worker.cli.main import main\n"
        "try:\n    main(['run', sys.argv[1], '--out', sys.argv[2]])\n"
        "except SystemExit as e:\n    print(e)\n"
        "print('torch' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(spec_path), str(tmp_path / "o")],
                          capture_output=True, text=True, env=ENV, timeout=60)
    assert "extra" in proc.stdout
    assert proc.stdout.strip().endswith("False")


def test_exported_logits_match_in_memory(tmp_path, data_dir):
    """The model directory is exactly the model the report's metrics were computed with."""
    model_dir = save_tiny("qwen2", tmp_path / "model")
    spec = make_spec(str(model_dir), data_dir, pruning={"method": "magnitude", "pattern": "2:4"})
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(spec))
    proc = run_cli("run", str(spec_path), "--out", str(tmp_path / "out"), "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["sparsity"]["nm_ok"] is True and abs(report["sparsity"]["overall"] - 0.5) < 1e-9
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "model").eval()
    from worker.model.data import read_texts
    from worker.model.load import load_model, resolve_source
    from worker.run.evaluate import perplexity

    _, tok = load_model(resolve_source(str(tmp_path / "out" / "model")), "float32")
    texts = read_texts(data_dir / "text.jsonl", limit=8)
    with torch.no_grad():
        ppl = perplexity(reloaded, tok, texts, batch_size=8, max_len=64)["ppl"]
    assert abs(ppl - report["metrics"]["pruned"]["text"]["ppl"]) < 1e-4 * ppl


@pytest.mark.parametrize("kind, directions", [("llama", None), ("gemma3", None), ("qwen2", None), ("llama", 5)])
def test_restorelcc_pipeline_end_to_end(tmp_path, data_dir, kind, directions):
    """The whole pipeline: the exported model equals pruned + restoration file, keeps every zero, loads plainly."""
    from app.schemas import JobSpec
    from worker.model.arch import DecoderAdapter
    from worker.reporting import NullReporter
    from worker.restore.offsets.heads import inject
    from worker.restore.offsets.merge import load_restoration
    from worker.run.pipeline import run_pipeline

    model_dir = save_tiny(kind, tmp_path / "model")
    spec = make_spec(str(model_dir), data_dir, restoration={
        "method": "restorelcc", "heads": 0.25, "probe_samples": 24, "max_steps": 6, "batch_size": 4,
        "max_seq_len": 64, "directions": directions,
    })
    spec["pruning"] = {"method": "magnitude", "sparsity": 0.5}
    report = run_pipeline(JobSpec.model_validate(spec), tmp_path / "out", NullReporter())

    info = DecoderAdapter(AutoModelForCausalLM.from_pretrained(model_dir)).info
    rest = report["restoration"]
    n_heads = max(1, round(0.25 * info.total_heads))
    assert len(rest["chosen_heads"]) == n_heads == len(rest["chosen_scores"])
    assert rest["trainable_params"] == n_heads * ((directions or info.head_dim) + info.head_dim)
    assert rest["directions_per_head"] == (directions or info.head_dim)
    assert len(rest["loss_curve"]) == 6 and rest["negatives_backend"] == "minilm"
    assert len(rest["grad_norm_curve"]) == 6 and min(rest["grad_norm_curve"]) > 0 and rest["clipped_steps"] == 0
    assert report["checks"]["zeros_identical"] is True
    assert report["checks"]["merged_vs_hooked_max_abs_diff"] <= 1e-5
    assert set(report["metrics"]) == {"dense", "pruned", "restored"}
    assert list(report["stages"]) == ["loading", "pruning", "probing", "extracting", "training", "merging",
                                      "evaluating", "exporting"]

    # Re-apply restoration.safetensors to the pruned model (zeros of the exported one, biases dropped).
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "model").eval()
    pruned = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        for name, module in pruned.named_modules():
            if isinstance(module, torch.nn.Linear) and ".layers." in name:
                w = exported.get_submodule(name).weight
                module.weight.copy_(w)
                assert torch.equal(w == 0, module.weight == 0)
    ids = torch.randint(0, 300, (2, 12))
    offsets = load_restoration(tmp_path / "out" / "restoration.safetensors")
    real = (offsets.directions.abs().amax(dim=-1) > 0).sum(dim=-1)  # directions that are not zero padding
    assert rest["nonzero_directions_per_head_min"] == int(real.min()) <= rest["directions_per_head"]
    with torch.no_grad(), inject(DecoderAdapter(pruned), offsets):
        hooked = pruned(ids).logits
    with torch.no_grad():
        merged = exported(ids).logits
        plain = pruned(ids).logits
    assert (hooked - merged).abs().max() <= 1e-5
    assert (plain - merged).abs().max() > 1e-4


def test_already_pruned_model_restored_with_random_head_bias_needs_no_dense(tmp_path, data_dir):
    from app.schemas import JobSpec
    from worker.reporting import NullReporter
    from worker.run.pipeline import run_pipeline

    model_dir = save_tiny("llama", tmp_path / "model")
    spec = make_spec(str(model_dir), data_dir, pruning={"method": "none"}, restoration={
        "method": "bias", "head_selection": "random", "heads": 2, "max_steps": 2, "batch_size": 4})
    report = run_pipeline(JobSpec.model_validate(spec), tmp_path / "out", NullReporter())
    assert report["restoration"]["trainable_params"] == 2 * 16
    assert report["checks"]["zeros_identical"] is True


def test_probing_an_already_pruned_model_requires_the_dense_reference():
    from pydantic import ValidationError

    from app.schemas import JobSpec

    base = {"model": {"id": "/m"}, "pruning": {"method": "none"}, "data": {"train": "/t.jsonl"}}
    for restoration in ({"method": "restorelcc"}, {"method": "bias", "head_selection": "probe"}):
        with pytest.raises(ValidationError, match="model.dense is required"):
            JobSpec.model_validate({**base, "restoration": restoration})
    JobSpec.model_validate({**base, "restoration": {"method": "lora"}})


def test_malformed_training_data_fails_before_loading_and_names_the_field(tmp_path, data_dir):
    model_dir = save_tiny("llama", tmp_path / "model")
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p"}, {"text": "t"}])
    spec = make_spec(str(model_dir), data_dir)
    spec["data"]["train"] = str(bad)
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(spec))
    proc = run_cli("run", str(spec_path), "--out", str(tmp_path / "out"))
    assert proc.returncode != 0 and "data.train" in proc.stderr and "response" in proc.stderr, proc.stderr
    assert_refused_before_any_stage(proc)


def test_multimodal_wrappers_are_refused_from_the_config():
    from transformers import AutoConfig

    from worker.model.arch import UnsupportedArchitectureError, arch_info

    with pytest.raises(UnsupportedArchitectureError, match="gemma3"):
        arch_info(AutoConfig.for_model("gemma3"))


def test_a_bare_relative_name_is_a_hub_id_not_a_local_directory(tmp_path, monkeypatch):
    """In the service, `org/name` must never load a directory that happens to exist under the worker's cwd."""
    from worker.errors import ModelNotFoundError
    from worker.model.load import resolve_source

    save_tiny("llama", tmp_path / "org" / "name")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelNotFoundError, match="Hugging Face cache"):
        resolve_source("org/name")
    assert resolve_source("./org/name").kind == "hf_dir"
