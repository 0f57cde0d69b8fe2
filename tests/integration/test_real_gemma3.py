"""The second real model, Gemma 3 270M (fetched like the demo model): slow tier (`scripts/test.sh -m slow`).

Magnitude 2:4 on every decoder Linear must give the exact pattern, and the saved model must reload with plain
transformers to identical logits.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


def test_gemma3_270m_magnitude_2_4_reloads_identical(tmp_path):
    from app.schemas import PruningSpec
    from worker.assets.models import model_dir
    from worker.model.arch import DecoderAdapter
    from worker.model.load import load_model, resolve_source
    from worker.prune.measure import measure_sparsity
    from worker.prune.runner import prune_model

    model, tok = load_model(resolve_source(str(model_dir("gemma3-270m"))), "float32")
    assert type(model).__name__ == "Gemma3ForCausalLM" and model.config.num_hidden_layers == 18
    adapter = DecoderAdapter(model)
    summary = prune_model(model, adapter, PruningSpec(method="magnitude", pattern="2:4"), None)
    assert summary["modules"] == 18 * 7
    measured = measure_sparsity(adapter, (2, 4))
    assert measured["nm_ok"] and 0.5 <= measured["overall"] < 0.501  # the Q4_K_M weights hold a few zeros already
    model.save_pretrained(tmp_path / "pruned")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned", dtype=torch.float32).eval()
    ids = tok(["The capital of France is Paris, and the capital of Italy is"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model.eval()(ids).logits)
