"""Failures a job can end with. Deterministic ones are never retried; each carries a stable code.

Which code a bad input gets: anything wrong with what the user named is a :class:`JobFailure` naming the
field, never ``internal_error`` (kept for the worker's own bugs):

- a model location that holds no model we can open (missing, a name the OS refuses, not a file or directory,
  no config.json or .gguf, unreadable, not a GGUF file) → ``model_not_found``;
- model files that open but cannot be used (a config or GGUF header that is not valid, corrupt or truncated
  weights, a missing tokenizer, an architecture or geometry the pipeline cannot restore) → ``unsupported_model``;
- a data file that cannot be opened, read, decoded or parsed, or rows of the wrong shape → ``invalid_data``.

A resumed job whose inputs are no longer those its checkpoints were made from fails the same way, naming the field
and how to start over: a data file with other content → ``invalid_data``; a model that is no longer the one (a local
directory or GGUF file changed, a hub commit gone, a checkpoint without pruned weights for the model's modules) →
``model_not_found``.

Every code here, and in the other JobFailure subclasses, is in docs/api.md's table of codes; JobFailure itself is never
raised (tests/unit/test_error_codes.py checks both).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Literal


class JobFailure(Exception):
    """A deterministic failure: the job ends ``failed`` with ``code`` and a message naming the problem. Only its
    subclasses are raised, each with a documented code (``job_failed`` is no code a user can look up)."""

    code = "job_failed"
    retryable = False

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.message = message
        self.field = field


class SpecError(JobFailure):
    code = "invalid_spec"


class ModelNotFoundError(JobFailure):
    code = "model_not_found"


class UnsupportedModelError(JobFailure):
    code = "unsupported_model"


class DataError(JobFailure):
    code = "invalid_data"


class ExportCheckError(JobFailure):
    """The finished model failed a check made before it is exported (pruned zeros lost, saved files that would not
    load back as restored): a bug or a fault of the worker's environment, never the user's input; reported rather
    than shipped."""

    code = "export_check_failed"


class EmbeddingModelError(JobFailure):
    """The sentence-embedding model that picks contrastive negatives is not installed or does not load."""

    code = "embedding_model_unavailable"


class TrainingDiverged(JobFailure):
    """Training's loss or gradients stopped being finite (a learning rate too high, float16 overflowing); stopped
    before that step changes anything, so no checkpoint holds the broken state."""

    code = "training_diverged"


class OutOfMemoryFailure(JobFailure):
    code = "out_of_memory"


class InsufficientMemoryFailure(JobFailure):
    """The job's memory plan does not fit this worker's device or host; refused before any weight loads."""

    code = "insufficient_memory"


class DeviceUnavailableError(JobFailure):
    """The worker was configured for a device it does not have (RESTORELCC_DEVICE=cuda without a GPU)."""

    code = "device_unavailable"


class Cancelled(Exception):
    """Raised at a checkpoint when the job was asked to stop."""


class TransientError(Exception):
    """I/O that may succeed when tried again (artifact upload, broker, database)."""

    retryable = True


def is_out_of_memory(e: BaseException) -> bool:
    """Host or accelerator memory ran out (torch reports some of these as a plain RuntimeError)."""
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


MISSING = "does not exist"


def path_problem(path: str | Path, want: Literal["file", "dir", "any"]) -> str | None:
    """Why ``path`` cannot be used as ``want`` (a regular file, a directory, or either), or None if it can.

    Never raises: a name or path too long for the OS, a NUL byte, a symlink loop or an unreadable parent are
    reasons like any other. A FIFO, socket or device is refused too, so that nothing blocks opening it.
    The words follow the path in a message ("model path /x does not exist").
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return f"{MISSING} (a dangling symbolic link)" if os.path.islink(path) else MISSING
    except NotADirectoryError:
        return f"{MISSING} (a parent is not a directory)"
    except OSError as exc:  # ENAMETOOLONG, ELOOP, EACCES, EIO ...
        return f"cannot be opened: {(exc.strerror or str(exc)).lower()}"
    except ValueError:  # embedded NUL
        return "is not a valid path (it contains a NUL byte)"
    if stat.S_ISREG(mode):
        return "is a file, not a directory" if want == "dir" else None
    if stat.S_ISDIR(mode):
        return "is a directory, not a file" if want == "file" else None
    return "is not a regular file or directory (a FIFO, socket or device)"
