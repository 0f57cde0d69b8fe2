"""The merge's update and weight norms, taken over row chunks, equal the whole-tensor ones and leave the weights
untouched (the float32 chunk is a copy even when the weights are float32)."""

from __future__ import annotations

import pytest
import torch

from worker.restore.adapters import peft as adapters


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_norms_equal_the_whole_tensors_and_change_nothing(monkeypatch, dtype):
    g = torch.Generator().manual_seed(0)
    before = torch.randn(37, 16, generator=g).to(dtype)
    merged = (before.float() + 0.01 * torch.randn(37, 16, generator=g)).to(dtype)
    kept = merged.clone()
    monkeypatch.setattr(adapters, "NORM_CHUNK", 5 * 16)  # 5 rows a chunk: 8 chunks, the last one short
    update, total = adapters._squared_norms(merged, before)
    assert torch.equal(merged, kept)
    want_update = float((merged.double() - before.double()).pow(2).sum())
    want_total = float(merged.double().pow(2).sum())
    assert update == pytest.approx(want_update, rel=1e-5) and total == pytest.approx(want_total, rel=1e-5)
