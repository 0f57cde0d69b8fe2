"""Everything about a job that can be checked before any weight loads: its data files parse, its model is where the
spec says and of a supported shape, N:M fits, a dense reference matches, and the restoration method's preflight."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from app.context import config_context
from app.context import context_problem as app_context_problem
from app.methods import restoration_method
from app.schemas import JobSpec
from worker.errors import DataError, SpecError


@dataclass(frozen=True)
class CheckedJob:
    source: Any  # ModelSource
    info: Any  # ArchInfo
    dense_source: Any  # ModelSource of model.dense, when restoring an already-pruned model
    method: Any  # the job's RestoreMethod, preflighted
    config: Any = None  # the model's transformers config (what the memory plan reads)


def check_job(spec: JobSpec, on_config: Callable[[CheckedJob], None] | None = None,
              pins: Mapping[str, str] | None = None) -> CheckedJob:
    """Everything that can be checked without weights: data files, the model's location and architecture,
    N:M fit, the dense reference's shape, the restoration method's own checks. Raises a JobFailure naming the
    field. ``on_config`` sees the job once its config is read, before the method's preflight (which imports
    transformers): the memory plan, so that a job that cannot fit is refused in seconds. ``pins``: field → the hub
    commit a resumed job's checkpoints were made from (:func:`hub_commits`), read at that commit whatever its
    revision resolves to now."""
    from worker.model.load import checked_config

    pins = pins or {}
    rows = check_data_files(spec)
    source = _resolve(spec.model.id, spec.model.revision, spec.model.gguf_file, "model.id", pins.get("model.id"))
    info, config = checked_config(source, spec)
    too_long = context_problem(spec, config)
    if too_long is not None:
        raise too_long
    dense_source = None
    if spec.pruning.method == "none" and spec.model.dense and restoration_method(spec.restoration.method).trains:
        dense_source = _resolve(spec.model.dense, None, None, "model.dense", pins.get("model.dense"))
        dense_info, dense_config = checked_config(dense_source, spec)
        if dense_info != info:
            raise SpecError(f"model.dense has another shape than model.id ({dense_info} vs {info})",
                            field="model.dense")
        vocab, dense_vocab = _vocab_size(config), _vocab_size(dense_config)
        if vocab != dense_vocab:  # its logits (distill targets, probe captures) would index other tokens
            raise SpecError(f"model.dense has a vocabulary of {dense_vocab} tokens, model.id {vocab}: give the dense "
                            "model the pruned one was made from", field="model.dense")
    if spec.model.streaming == "on":
        problem = streaming_problem(spec, source, dense_source)
        if problem is not None:
            raise SpecError(f"model.streaming 'on': {problem}", field="model.streaming")
    if on_config is not None:
        on_config(CheckedJob(source, info, dense_source, None, config))
    from worker.restore.method import Preflight  # torch: only once the cheap checks have passed
    from worker.restore.registry import method_for

    method = method_for(spec)
    method.preflight(Preflight(info, config, rows.get("data.train")))
    return CheckedJob(source, info, dense_source, method, config)


def _resolve(model_id: str, revision: str | None, gguf_file: str | None, field: str, pin: str | None) -> Any:
    """The ModelSource of ``field``; with ``pin``, at that commit (a resumed job's), failing with how to start over
    when that commit can no longer be read."""
    from worker.errors import ModelNotFoundError
    from worker.model.load import resolve_source
    from worker.run.lineage import START_OVER

    if pin is None:
        return resolve_source(model_id, revision=revision, gguf_file=gguf_file, field=field)
    try:  # read at the pinned commit, the spec's revision kept as the source's (the report shows both)
        return replace(resolve_source(model_id, revision=pin, gguf_file=gguf_file, field=field), revision=revision)
    except ModelNotFoundError as exc:
        raise ModelNotFoundError(f"this job's checkpoints were made from commit {pin} of {field}, which cannot be "
                                 f"read now ({exc.message}); start over: {START_OVER}", field=field) from exc


def hub_commits(checked: CheckedJob) -> dict[str, str]:
    """Field → the hub commit its model was read at (hub models only): what the report keeps and a resumed run
    pins (``check_job``'s ``pins``)."""
    sources = {"model.id": checked.source, "model.dense": checked.dense_source}
    return {f: s.commit for f, s in sources.items() if getattr(s, "commit", None)}  # a hub ModelSource


def _vocab_size(config: Any) -> Any:
    from worker.model.arch import text_config

    return getattr(text_config(config), "vocab_size", None)


def context_problem(spec: JobSpec, config: Any) -> SpecError | None:
    """A sequence length past the model's context (app.context), as the failure naming its field."""
    from worker.model.arch import text_config

    problem = app_context_problem(spec, config_context(
        {"max_position_embeddings": getattr(text_config(config), "max_position_embeddings", None)}))
    return SpecError(problem[1], field=problem[0]) if problem is not None else None


def streaming_problem(spec: JobSpec, source: Any, dense_source: Any) -> str | None:
    """Why this job cannot run layer-streamed, or None when it can."""
    if not restoration_method(spec.restoration.method).streams:
        return f"restoration.method '{spec.restoration.method}' does not run on a streamed model"
    for src in (source, dense_source):
        if src is None:
            continue
        if src.kind == "gguf":
            return f"{src.field} is a GGUF file; streaming reads safetensors (convert the model first)"
        if src.repo_id:  # a hub model's weights arrive when it loads; a repo without safetensors fails there
            continue
        path = src.path
        if not (path / "model.safetensors").is_file() and not (path / "model.safetensors.index.json").is_file():
            return f"{src.field} has no safetensors weights to stream from"
    return None


def check_data_files(spec: JobSpec) -> dict[str, int]:
    """Every data file exists and parses in its format, before any weights load; rows per field."""
    from worker.model.data import (
        DataFormatError,
        read_calibration_texts,
        read_choices,
        read_instructions,
        read_texts,
    )

    readers = {"data.train": read_instructions, "data.calibration": read_calibration_texts,
               "evaluation.perplexity": read_texts, "evaluation.response_perplexity": read_instructions,
               "evaluation.tasks": read_choices}
    counts: dict[str, int] = {}
    for fld, path in spec.data_paths().items():
        try:  # the readers refuse a path that is no regular file before opening it (a FIFO would block)
            counts[fld] = len(readers[fld.rsplit(".", 1)[0] if fld.startswith("evaluation.") else fld](path))
        except DataFormatError as exc:
            raise DataError(f"{fld}: {exc.message}", field=fld) from exc
    return counts


def data_field(spec: JobSpec, path: str | None) -> str | None:
    """The spec field that names data file ``path`` (the first, if several do)."""
    if path is None:
        return None
    return next((fld for fld, p in spec.data_paths().items() if Path(p) == Path(path)), None)


