"""Failures a job can end with. Deterministic ones are never retried; each carries a stable code."""

from __future__ import annotations


class JobFailure(Exception):
    """A deterministic failure: the job ends ``failed`` with ``code`` and a message naming the problem."""

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


class EmbeddingModelError(JobFailure):
    """The sentence-embedding model that picks contrastive negatives is not installed or does not load."""

    code = "embedding_model_unavailable"


class OutOfMemoryFailure(JobFailure):
    code = "out_of_memory"


class Cancelled(Exception):
    """Raised at a checkpoint when the job was asked to stop."""


class TransientError(Exception):
    """I/O that may succeed when tried again (artifact upload, broker, database)."""

    retryable = True
