"""The public contract: the job spec and what the API returns.

Pure pydantic, imported by both the API (no torch) and the worker. Every field is documented
and validated here, so a bad spec is refused with a message naming the field before any work starts.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from datetime import datetime
from enum import StrEnum
from pathlib import PurePosixPath
from typing import Annotated, Any, Literal, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, SerializeAsAny, field_validator, model_validator

from app.fields import (
    MAX_EVAL_FILES,
    MAX_LIMITS,
    NAME_MAX_BYTES,
    FieldError,
    PathText,
    Strict,
    Text,
    check_http_url,
    check_path,
    check_s3_uri,
    looks_local,
)
from app.methods import (
    BUILT_IN_RESTORATION,
    PRUNING_METHODS,
    PruningName,
    RestorationConfig,
    restoration_config,
    restoration_method,
    restoration_methods,
)

_NM = re.compile(r"^(\d+):(\d+)$")
MAX_NM_GROUP = 1024  # the largest M of an N:M pattern

# One config model per restoration method (app.methods); the union documents the built-in ones in the OpenAPI
# schema, and validation dispatches on ``method`` through the catalogue (so a registered method validates too).
Restoration = SerializeAsAny[Annotated[Union[BUILT_IN_RESTORATION], Field(discriminator="method")]]  # noqa: UP007

def parse_nm(pattern: str) -> tuple[int, int] | None:
    """``"2:4"`` → ``(2, 4)``; ``"unstructured"`` → ``None``."""
    m = _NM.match(pattern)
    return (int(m.group(1)), int(m.group(2))) if m else None


Dtype = Literal["auto", "float32", "bfloat16", "float16"]


class ModelSpec(Strict):
    id: PathText = Field(
        description="A Hugging Face hub id, a local Hugging Face model directory, or a local .gguf file.",
    )
    revision: Text | None = Field(
        None, description="Hub revision (branch, tag or commit); hub ids only: refused with a local model.id.",
    )
    dtype: Dtype = Field(
        "auto",
        description="Compute dtype. 'auto' keeps the checkpoint's dtype (float32 for GGUF, which is dequantized).",
    )
    gguf_file: Annotated[str, Field(max_length=NAME_MAX_BYTES), AfterValidator(check_path)] | None = Field(
        None, description="File name of the .gguf inside the directory or repo given as id, if not given in id."
    )
    dense: PathText | None = Field(
        None,
        description="The dense (unpruned) reference, in the same forms as id. Needed to restore a model "
        "given already pruned (pruning.method 'none'); ignored otherwise.",
    )
    streaming: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Layer streaming: the decoder layers stay in their safetensors files and one at a time comes "
        "into memory, so a model larger than the device can be restored. 'auto' streams only when the memory plan "
        "says the whole model does not fit; 'on' always; 'off' never (a job that does not fit then fails "
        "insufficient_memory). Safetensors models only, restoration restorelcc, bias or none.",
    )
    split: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Spread the model over the worker's GPUs, a run of decoder layers on each (accelerate's device "
        "map), so a model larger than one GPU but not than all of them runs at full speed. 'auto' splits only when "
        "the memory plan says the whole model does not fit on one GPU but fits across them (before streaming is "
        "considered); 'on' always (a worker with one GPU fails it device_unavailable); 'off' never.",
    )

    @model_validator(mode="after")
    def _one_placement(self) -> ModelSpec:
        if self.split == "on" and self.streaming == "on":
            raise ValueError("model.split 'on' and model.streaming 'on' exclude each other: a split model keeps its "
                             "layers on the GPUs, a streamed one brings them in one at a time")
        return self

    @model_validator(mode="after")
    def _revision_of_a_hub_id(self) -> ModelSpec:
        if self.revision is not None and looks_local(self.id):
            raise ValueError("model.revision applies to a Hugging Face hub id only, and model.id is a local path "
                             "(absolute, ./, ../, ~ or a .gguf file): drop model.revision")
        return self

    @field_validator("gguf_file")
    @classmethod
    def _gguf_name(cls, v: str | None) -> str | None:
        if v is not None and ("/" in v or "\\" in v or not v.lower().endswith(".gguf")):
            raise ValueError("must be the name of a .gguf file inside model.id (such as 'model-q8_0.gguf'), not a path")
        return v


class PruningSpec(Strict):
    method: PruningName = Field(
        "wanda", description="Pruning method; 'none' means the given model is already pruned."
    )
    sparsity: float = Field(
        0.5,
        gt=0.0,
        lt=1.0,
        description="Fraction of weights set to zero (unstructured). For N:M it must be 1 - N/M or omitted.",
    )
    pattern: str = Field(
        "unstructured",
        max_length=32,
        description="'unstructured', or 'N:M' (at most N non-zeros in every M consecutive input weights).",
    )
    calibration_samples: int = Field(128, ge=1, le=100_000, description="Calibration sequences (Wanda, SparseGPT).")
    seq_len: int = Field(512, ge=8, le=32_768, description="Tokens per calibration sequence.")

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, v: str) -> str:
        v = v.strip().lower()
        if v == "unstructured":
            return v
        nm = parse_nm(v)
        if nm is None:
            raise ValueError("must be 'unstructured' or 'N:M' such as '2:4'")
        n, m = nm
        if not 0 < n < m:
            raise ValueError(f"N:M pattern needs 0 < N < M, got {n}:{m}")
        if m > MAX_NM_GROUP:  # 1 - N/M would round to a sparsity of 1; no weight is that wide anyway
            raise ValueError(f"N:M pattern needs M at most {MAX_NM_GROUP}, got {m}")
        return v

    @model_validator(mode="after")
    def _sparsity_matches_pattern(self) -> PruningSpec:
        nm = parse_nm(self.pattern)
        if nm is not None:
            implied = 1.0 - nm[0] / nm[1]
            if "sparsity" in self.model_fields_set and abs(self.sparsity - implied) > 1e-9:
                raise FieldError(
                    "pruning.sparsity", f"{self.sparsity} contradicts pattern {self.pattern} (which means "
                    f"{implied:g}); omit sparsity for N:M patterns"
                )
            self.sparsity = implied
        return self

    @property
    def nm(self) -> tuple[int, int] | None:
        return parse_nm(self.pattern)


class DataSpec(Strict):
    train: PathText | None = Field(
        None, description="Instruction JSONL ({prompt, response}) for probing and training."
    )
    calibration: PathText | None = Field(
        None,
        description="JSONL used for pruning calibration ({text} or {prompt, response}); defaults to data.train.",
    )


def eval_set_stem(path: str) -> str:
    """The name an evaluation file goes by in evaluation.limits (and the report): its file name without the last
    suffix, as the worker's ``Path(path).stem`` gives it."""
    return PurePosixPath(path).stem


class EvaluationSpec(Strict):
    perplexity: list[PathText] = Field(
        default_factory=list, max_length=MAX_EVAL_FILES, description="Plain-text JSONL files ({text})."
    )
    response_perplexity: list[PathText] = Field(
        default_factory=list, max_length=MAX_EVAL_FILES,
        description="Instruction JSONL files ({prompt, response}); prompt tokens masked.",
    )
    tasks: list[PathText] = Field(
        default_factory=list, max_length=MAX_EVAL_FILES,
        description="Multiple-choice JSONL files ({context, choices, label}).",
    )
    limit: int | None = Field(500, ge=1, description="Rows per set: a fixed prefix. null for all rows.")
    limits: dict[Text, Annotated[int, Field(ge=1)]] = Field(
        default_factory=dict, max_length=MAX_LIMITS,
        description="Per-set row limits keyed by file stem (e.g. 'boolq' for /data/boolq.jsonl), overriding limit. "
        "A key that is the stem of no file in perplexity, response_perplexity or tasks is refused.",
    )
    batch_size: int = Field(8, ge=1, le=4096, description="Sequences per evaluation forward pass.")
    max_seq_len: int = Field(512, ge=8, le=32_768, description="Longest evaluated sequence in tokens.")
    dense: bool = Field(True, description="Also evaluate the dense (unpruned) model for comparison.")

    @model_validator(mode="after")
    def _limits_name_files(self) -> EvaluationSpec:
        """Each key of ``limits`` is the stem of a file it limits (the worker looks limits up by file stem)."""
        stems = {eval_set_stem(p) for p in (*self.perplexity, *self.response_perplexity, *self.tasks)}
        for key in self.limits:
            if key not in stems:
                named = ", ".join(repr(s) for s in sorted(stems)[:8]) + (", ..." if len(stems) > 8 else "")
                raise FieldError(f"evaluation.limits.{key}", "names no evaluation file: the keys are the stems of the "
                                 f"files in perplexity, response_perplexity and tasks ({named or 'none given'})")
        return self


class OutputSpec(Strict):
    format: Literal["merged", "adapter"] = Field(
        "merged",
        description="Which result is the one to deploy. Both export model/ (the restoration merged in, pruned "
        "zeros kept); LoRA/DoRA jobs always also export the unmerged adapter in adapter/. 'adapter' names "
        "adapter/ (applied to the pruned model) as the primary result in report.json's output.primary; "
        "it needs a restoration.method that exports an adapter (lora or dora).",
    )
    dtype: Dtype = Field("auto", description="dtype of the exported weights; 'auto' keeps the compute dtype.")
    destination: Annotated[str, Field(max_length=1024), AfterValidator(check_s3_uri)] | None = Field(
        None,
        description="An S3 URI prefix ('s3://bucket/models/') where the finished model directory and report are "
        "copied, under <prefix>/<job id>/, with manifest.json listing every file's sha256. It must lie under one of "
        "the tenant's allowed destinations (RESTORELCC_OUTPUT_DESTINATIONS). The job's output field shows where.",
    )


class NotifySpec(Strict):
    url: Annotated[str, Field(min_length=1, max_length=2048), AfterValidator(check_http_url)] = Field(
        description="Where the service POSTs a signed JSON event on every status change of the job (header "
        "Restorelcc-Signature). Its host (and port) must be in RESTORELCC_WEBHOOK_ALLOWED_HOSTS; link-local and "
        "metadata addresses are always refused.",
    )
    stages: bool = Field(False, description="Also POST an event when the job enters a stage.")


class ResourcesSpec(Strict):
    queue: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")] | None = Field(
        None,
        description="The worker queue (a GPU class such as 'a100') the job runs on; one of the service's queues "
        "(RESTORELCC_QUEUES). Default: the smallest queue whose device memory fits the job's memory plan, else the "
        "default queue.",
    )
    priority: int = Field(5, ge=0, le=9, description="0-9: within a queue, higher priority runs first.")


class JobSpec(Strict):
    """One restoration job. The same JSON drives `restorelcc run` and `POST /v1/jobs`."""

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"model": {"id": "/models/SmolLM2-135M-Instruct"}, "pruning": {"method": "wanda", "sparsity": 0.5},
         "restoration": {"method": "restorelcc", "max_steps": 200}, "data": {"train": "/data/alpaca_train.jsonl"},
         "evaluation": {"perplexity": ["/data/wikitext.jsonl"], "limit": 200}},
        {"model": {"id": "HuggingFaceTB/SmolLM2-135M-Instruct"}, "pruning": {"method": "magnitude"},
         "restoration": {"method": "none"}},
    ]})

    model: ModelSpec
    pruning: PruningSpec = Field(default_factory=PruningSpec)
    restoration: Restoration = Field(
        default_factory=lambda: restoration_config({}),
        description="How to restore: one method's settings, picked by restoration.method (default 'restorelcc'); "
        "a setting of another method is refused.",
    )
    data: DataSpec = Field(default_factory=DataSpec)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    output: OutputSpec = Field(default_factory=OutputSpec)
    notify: NotifySpec | None = Field(None, description="Webhook notifications of this job's status changes.")
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    seed: int = Field(42, ge=0, le=2**31 - 1, description="Seed for sampling, probing and training.")

    @field_validator("restoration", mode="wrap")
    @classmethod
    def _restoration(cls, value: Any, handler: Any) -> RestorationConfig:
        if isinstance(value, dict | RestorationConfig):
            return restoration_config(value)  # errors come back located at restoration.<field>
        return handler(value)

    @model_validator(mode="after")
    def _needs_data(self) -> JobSpec:
        r = self.restoration
        if restoration_method(r.method).trains and not self.data.train:
            raise ValueError(f"data.train is required: restoration.method '{r.method}' trains on it")
        if r.needs_activations() and self.pruning.method == "none" and not self.model.dense:
            raise ValueError(
                f"model.dense is required: restoration.method '{r.method}' compares dense and pruned activations, "
                "and pruning.method 'none' means model.id is already pruned"
            )
        if r.needs_dense_targets() and self.pruning.method == "none" and not self.model.dense:
            raise ValueError(
                "model.dense is required: restoration.objective 'distill' learns from the dense model, and "
                "pruning.method 'none' means model.id is already pruned"
            )
        if self.output.format == "adapter" and not restoration_method(r.method).exports_adapter:
            adapters = " or ".join(f"'{m.name}'" for m in restoration_methods().values() if m.exports_adapter)
            raise ValueError(f"output.format 'adapter' needs a restoration.method that exports an adapter "
                             f"({adapters}); restoration.method '{r.method}' exports model/ only")
        if PRUNING_METHODS[self.pruning.method].needs_calibration and not (self.data.calibration or self.data.train):
            raise ValueError(f"pruning.method '{self.pruning.method}' needs data.calibration or data.train")
        return self

    def left_out(self, paths: Iterable[tuple[str, ...]]) -> frozenset[tuple[str, ...]]:
        """Those of ``paths`` (field names from the top) that the request did not name: they took their defaults."""
        out = set()
        for path in paths:
            node: Any = self
            for name in path:
                if not isinstance(node, BaseModel) or name not in node.model_fields_set:
                    out.add(tuple(path))
                    break
                node = getattr(node, name)
        return frozenset(out)

    def data_paths(self) -> dict[str, str]:
        """Every local data path in the spec, keyed by its field name (for path-root checks)."""
        return {fld: p for fld, p in local_paths(self.model_dump()).items() if not fld.startswith("model.")}


# The spec's fields that may name a local path (``[]``: a list of them). model.id and model.dense may also be hub ids.
PATH_FIELDS = ("model.id", "model.dense", "data.train", "data.calibration", "evaluation.perplexity[]",
               "evaluation.response_perplexity[]", "evaluation.tasks[]")


def local_paths(spec: dict[str, Any]) -> dict[str, str]:
    """The path fields that are set in a spec's JSON (validated or not), keyed by field name
    (``evaluation.tasks.0`` for list items)."""
    out: dict[str, str] = {}
    for fld in PATH_FIELDS:
        section, key = fld.removesuffix("[]").split(".")
        part = spec.get(section)
        value = part.get(key) if isinstance(part, dict) else None
        if fld.endswith("[]"):
            if isinstance(value, list):
                out.update({f"{section}.{key}.{i}": v for i, v in enumerate(value) if isinstance(v, str) and v})
        elif isinstance(value, str) and value:
            out[fld] = value
    return out


def map_local_paths(spec: dict[str, Any], fn: Callable[[str], str]) -> dict[str, Any]:
    """A copy of a spec's JSON with ``fn`` applied to every path field that is set."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in spec.items()}
    for fld, value in local_paths(spec).items():
        section, key, *index = fld.split(".")
        if index:
            items = out[section][key] = list(out[section][key])
            items[int(index[0])] = fn(value)
        else:
            out[section][key] = fn(value)
    return out


class JobStatus(StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelling = "cancelling"
    cancelled = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled)


class Stage(StrEnum):
    loading = "loading"
    pruning = "pruning"
    probing = "probing"
    extracting = "extracting"
    training = "training"
    merging = "merging"
    evaluating = "evaluating"
    exporting = "exporting"


STAGE_ORDER: tuple[Stage, ...] = tuple(Stage)


class Progress(BaseModel):
    fraction: Annotated[float, Field(ge=0, le=1)] = 0.0
    message: str = ""


class JobError(BaseModel):
    code: str
    message: str


class JobPublic(BaseModel):
    id: str
    status: JobStatus
    stage: Stage | None = None
    progress: Progress = Field(default_factory=Progress)
    spec: dict[str, Any]
    metrics: dict[str, Any] = Field(default_factory=dict)
    error: JobError | None = None
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    updated_at: datetime | None = None
    retry_of: str | None = Field(None, description="The failed or cancelled job this one retries.")
    checkpoint_bytes: int = Field(0, description="Bytes this job's checkpoints hold in the artifact store: kept "
                                             "while it may resume (running, queued again, failed), deleted when "
                                             "it succeeds, is cancelled or deleted.")
    plan: dict[str, Any] | None = Field(
        None, description="The memory plan: peak device and host bytes per stage, bytes read and written. At submit "
                          "(source 'submit', for both device kinds) when the API can read the model's config; "
                          "replaced by the plan the worker checked before loading weights (source 'worker').")


    queue: str | None = Field(None, description="The worker queue the job was sent to (resources.queue, or the one "
                                                "its memory plan chose, or the default).")
    priority: int = Field(5, description="0-9; within a queue, higher runs first.")
    held: bool = Field(False, description="Queued but held back: its tenant is at its max_running quota. It is sent "
                                          "to a worker when one of the tenant's jobs finishes.")
    output: dict[str, Any] | None = Field(
        None, description="Where the result was handed off to (output.destination): destination, manifest, files, "
                          "bytes.")


class JobList(BaseModel):
    items: list[JobPublic]
    next_cursor: str | None = None


class EventPublic(BaseModel):
    seq: int
    kind: str
    stage: Stage | None = None
    data: dict[str, Any] = Field(default_factory=dict)
    created_at: datetime


class DeliveryAttempt(BaseModel):
    at: datetime
    ok: bool
    status_code: int | None = Field(None, description="The receiver's HTTP status; null when no answer came.")
    error: str | None = Field(None, description="Why the attempt failed (status and body start, timeout, refusal).")
    duration_ms: int
    permanent: bool = Field(False, description="The failure ends the delivery (a refused URL or redirect).")


class DeliveryPublic(BaseModel):
    id: str = Field(description="The Restorelcc-Delivery header: the same on every attempt of this event.")
    event: Literal["job.status", "job.stage"]
    state: Literal["pending", "delivered", "failed"] = Field(
        description="pending (being tried, with back-off), delivered (a 2xx answer), failed (given up).")
    url: str
    created_at: datetime
    next_attempt_at: datetime | None = Field(None, description="When a pending delivery is tried next.")
    finished_at: datetime | None = None
    payload: dict[str, Any] = Field(description="The JSON body sent.")
    attempts: list[DeliveryAttempt]


class ArtifactPublic(BaseModel):
    name: str
    size: int
    sha256: str


class ErrorDetail(BaseModel):
    code: str = Field(description="Stable machine-readable code, e.g. 'invalid_spec', 'job_not_found'.")
    message: str = Field(description="What went wrong, for people.")
    field: str | None = Field(
        description="The input at fault: a dotted path into the spec ('pruning.sparsity'), a query parameter or a "
        "header; null when the error is not about one input."
    )


class ErrorBody(BaseModel):
    """Every error answer of the service."""

    error: ErrorDetail


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    status: Literal["ok", "unavailable"]
    checks: dict[str, str] = Field(description="'ok' or 'error: ...' per dependency (database, broker, artifacts).")
