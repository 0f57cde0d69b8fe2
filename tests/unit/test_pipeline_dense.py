"""The dense reference's layer store is closed (its hooks removed) even when measuring the dense model fails."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from app.schemas import JobSpec
from worker.errors import Cancelled
from worker.reporting import NullReporter
from worker.run import pipeline


class FakeStore:
    adapter = None

    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True


def test_the_dense_store_is_closed_when_measuring_the_dense_model_fails(monkeypatch, tmp_path: Path) -> None:
    store = FakeStore()
    loaded: list[str] = []

    def load(state: Any, source: Any, name: str) -> tuple[Any, Any, Any]:
        loaded.append(name)
        return object(), object(), store

    def measure(*_args: Any) -> None:
        raise Cancelled("cancelled while evaluating the dense model")

    monkeypatch.setattr(pipeline, "_load", load)
    monkeypatch.setattr(pipeline, "_measure_dense", measure)
    spec = JobSpec.model_validate({"model": {"id": "/m", "dense": "/d"}, "pruning": {"method": "none"},
                                   "data": {"train": "/t.jsonl"}})
    checked = SimpleNamespace(source="/m", info=SimpleNamespace(), dense_source="/d")
    state = pipeline.RunState(spec=spec, out_dir=tmp_path, checked=checked)
    with pytest.raises(Cancelled):
        pipeline._stage_loading(state, lambda _f, _m: None, NullReporter())
    assert loaded == ["dense"] and store.closed
