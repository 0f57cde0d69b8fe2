"""How a failed checkpoint write reaches the job: a storage failure may pass when tried again (TransientError, the
job is retried); running out of memory never does (it stays itself, and the job fails ``out_of_memory``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from app.store.artifacts import LocalStore
from worker.errors import TransientError
from worker.run.checkpoints import CheckpointStore


class FailingStore(LocalStore):
    def __init__(self, root: Path, error: Exception):
        super().__init__(root)
        self.error = error

    def put_file(self, *args, **kwargs):
        raise self.error


def _checkpoints(tmp_path: Path, error: Exception) -> CheckpointStore:
    return CheckpointStore(FailingStore(tmp_path / "artifacts", error), "jobs/j/", "fp", tmp_path / "scratch")


@pytest.mark.parametrize("error", [torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                                   MemoryError()])
def test_out_of_memory_while_checkpointing_is_not_made_transient(tmp_path, error):
    store = _checkpoints(tmp_path, error)
    with pytest.raises(type(error)) as info:
        store.save("training", {"step": 1}, {"state": {"w": torch.ones(3)}})
    assert info.value is error
    with pytest.raises(type(error)):
        store.stage("layer-0", {"w": torch.ones(3)})


def test_a_storage_failure_while_checkpointing_is_transient(tmp_path):
    store = _checkpoints(tmp_path, OSError(28, "No space left on device"))
    with pytest.raises(TransientError, match="No space left on device"):
        store.save("training", {"step": 1}, {"state": {"w": torch.ones(3)}})
    with pytest.raises(TransientError, match="No space left on device"):
        store.stage("layer-0", {"w": torch.ones(3)})
