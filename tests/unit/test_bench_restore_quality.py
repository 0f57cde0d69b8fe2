"""The single-run page of bench/restore_quality.py names the model and the command that made it."""

from __future__ import annotations

import argparse

from bench.restore_quality import render
from worker.assets import DEMO_MODEL, MODELS


def _report(directions: int | None) -> dict:
    metrics = {label: {"wikitext_sentences": {"ppl": ppl * 30}, "valid": {"response_ppl": ppl}}
               for label, ppl in (("dense", 6.0), ("pruned", 20.0), ("restored", 12.0))}
    rest = {"probe_samples": 256, "negatives_backend": "tfidf", "chosen_heads": [[0, 1], [2, 3]], "steps": 50,
            "trainable_params": 850}
    if directions is not None:
        rest["directions_per_head"] = directions
    return {
        "metrics": metrics, "restoration": rest, "model": {"arch": {"head_dim": 256}},
        "stages": {"training": {"seconds": 1.0, "peak_rss_mb": 10}},
        "checks": {"merged_vs_hooked_max_abs_diff": 1e-6, "zeros_identical": True},
        "environment": {"device": "cpu", "threads": 2, "torch": "2.13.0"},
    }


def _args(model: str, directions: float | None) -> argparse.Namespace:
    return argparse.Namespace(model=model, heads=0.8, lr=3e-3, steps=50, batch_size=8, probe=256, max_len=256,
                              directions=directions, group_by_length=False, alpaca_limit=300)


def test_a_second_model_gets_its_own_title_command_and_licence() -> None:
    text = render(_report(169), _args("gemma3-270m", 0.66), "run", MODELS["gemma3-270m"])
    assert text.startswith("# RestoreLCC on gemma-3-270m (Wanda 50% unstructured)")
    assert "restore_quality.py --model gemma3-270m --heads 0.8 --lr 0.003" in text and "--directions 0.66" in text
    assert "licence: Gemma Terms of Use" in text
    assert "2 heads, β over each head's top 169 of 256 lost directions" in text
    assert "restored / pruned = **0.600** (40.0% lower" in text


def test_the_demo_model_keeps_the_command_without_model_or_directions() -> None:
    text = render(_report(None), _args(DEMO_MODEL, None), "run", MODELS[DEMO_MODEL])
    assert text.startswith("# RestoreLCC on SmolLM2-135M-Instruct")
    assert "--model" not in text and "--directions" not in text and "β over all lost directions" in text
