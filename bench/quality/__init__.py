"""Restoration quality benchmark: RestoreLCC vs LoRA, DoRA and bias baselines (``python -m bench.quality``)."""
