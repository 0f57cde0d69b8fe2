"""How a failed checkpoint write or read reaches the job: a storage failure may pass when tried again (TransientError,
the job is retried); running out of memory or a bug never does (it stays itself, and the job fails ``out_of_memory``
or ``internal_error``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from boto3.exceptions import S3UploadFailedError
from botocore.exceptions import ClientError, EndpointConnectionError, ParamValidationError

from app.store.artifacts import LocalStore
from worker.errors import TransientError
from worker.run.checkpoints import CheckpointStore, io_failure


class FailingStore(LocalStore):
    def __init__(self, root: Path, error: Exception):
        super().__init__(root)
        self.error = error

    def put_file(self, *args, **kwargs):
        raise self.error

    def open_range(self, *args, **kwargs):
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


STORAGE_FAILURES = [
    OSError(28, "No space left on device"),
    ConnectionRefusedError(111, "Connection refused"),
    EndpointConnectionError(endpoint_url="http://s3.internal:9000"),
    ClientError({"Error": {"Code": "SlowDown", "Message": "Please reduce your request rate"}}, "PutObject"),
    S3UploadFailedError("Failed to upload: An error occurred (InternalError)"),
]


@pytest.mark.parametrize("error", STORAGE_FAILURES, ids=lambda e: type(e).__name__)
def test_a_storage_failure_while_checkpointing_is_transient(tmp_path, error):
    store = _checkpoints(tmp_path, error)
    for write in (lambda: store.save("training", {"step": 1}, {"state": {"w": torch.ones(3)}}),
                  lambda: store.stage("layer-0", {"w": torch.ones(3)}), store.load):
        with pytest.raises(TransientError) as info:
            write()
        assert info.value.__cause__ is error


@pytest.mark.parametrize("error", [TypeError("unsupported operand"), KeyError("step"), AttributeError("no attr"),
                                   ParamValidationError(report="Invalid type for parameter Key")],
                         ids=lambda e: type(e).__name__)
def test_a_bug_while_checkpointing_stays_itself_and_is_not_retried(tmp_path, error):
    store = _checkpoints(tmp_path, error)
    for call in (lambda: store.save("training", {"step": 1}, {"state": {"w": torch.ones(3)}}),
                 lambda: store.stage("layer-0", {"w": torch.ones(3)}), store.load):
        with pytest.raises(type(error)) as info:
            call()
        assert info.value is error


def test_a_scratch_disk_failure_reported_by_safetensors_counts_as_storage(tmp_path):
    """safetensors raises its own error type, not an OSError, for a file it cannot write."""
    from safetensors.torch import save_file

    with pytest.raises(Exception) as info:
        save_file({"w": torch.ones(3)}, str(tmp_path / "missing" / "part.safetensors"))
    assert type(info.value).__name__ == "SafetensorError"
    assert io_failure(info.value)
    assert not io_failure(type(info.value)("Error while serializing: tensor is not contiguous"))
