"""The public contract: the job spec and what the API returns.

Pure pydantic, imported by both the API (no torch) and the worker. Every field is documented
and validated here, so a bad spec is refused with a message naming the field before any work starts.
"""

from __future__ import annotations

import re
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal, get_args

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

_NM = re.compile(r"^(\d+):(\d+)$")

# Caps on what a spec may hold. Paths follow the OS (Linux PATH_MAX counts the final NUL; NAME_MAX per name);
# the list caps are far above any real job and keep validating the largest accepted spec to milliseconds.
PATH_MAX_BYTES = 4095
NAME_MAX_BYTES = 255
MAX_EVAL_FILES = 32  # per evaluation list
MAX_LIMITS = 96
MAX_LORA_TARGETS = 64
MAX_NAME_CHARS = 255  # revisions, module names, evaluation-set stems
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_MAYBE_LONG_NAME = re.compile(f"[^/]{{{NAME_MAX_BYTES // 4 + 1},}}")  # shorter names fit in UTF-8's 4 bytes a char


def _text(v: str) -> str:
    """Printable Unicode only: a NUL, newline or unpaired surrogate breaks paths, logs and the job store."""
    if not v.isprintable() and _CONTROL.search(v):  # isprintable: a fast pass for almost every string
        raise ValueError("must not contain control characters (NUL, newline, tab, ...)")
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text (it holds an unpaired surrogate)") from None
    return v


def _path(v: str) -> str:
    """A path (or hub id) the OS can take: at most PATH_MAX bytes, each name at most NAME_MAX bytes."""
    _text(v)
    size = len(v.encode("utf-8"))
    if size > PATH_MAX_BYTES:
        raise ValueError(f"path is {size} bytes long; the limit is {PATH_MAX_BYTES} bytes")
    for name in _MAYBE_LONG_NAME.findall(v):
        if (n := len(name.encode("utf-8"))) > NAME_MAX_BYTES:
            raise ValueError(f"a name in the path is {n} bytes long; the limit is {NAME_MAX_BYTES} bytes per name")
    return v


Text = Annotated[str, Field(max_length=MAX_NAME_CHARS), AfterValidator(_text)]
PathText = Annotated[str, Field(min_length=1, max_length=PATH_MAX_BYTES), AfterValidator(_path)]


class _Strict(BaseModel):
    # No inf/nan (JSON's 1e999): stored as JSON they would come back as null.
    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)


def parse_nm(pattern: str) -> tuple[int, int] | None:
    """``"2:4"`` → ``(2, 4)``; ``"unstructured"`` → ``None``."""
    m = _NM.match(pattern)
    return (int(m.group(1)), int(m.group(2))) if m else None


Dtype = Literal["auto", "float32", "bfloat16", "float16"]


class ModelSpec(_Strict):
    id: PathText = Field(
        description="A Hugging Face hub id, a local Hugging Face model directory, or a local .gguf file.",
    )
    revision: Text | None = Field(None, description="Hub revision (branch, tag or commit); hub ids only.")
    dtype: Dtype = Field(
        "auto",
        description="Compute dtype. 'auto' keeps the checkpoint's dtype (float32 for GGUF, which is dequantized).",
    )
    gguf_file: Annotated[str, Field(max_length=NAME_MAX_BYTES), AfterValidator(_path)] | None = Field(
        None, description="File name of the .gguf inside the directory or repo given as id, if not given in id."
    )
    dense: PathText | None = Field(
        None,
        description="The dense (unpruned) reference, in the same forms as id. Needed to restore a model "
        "given already pruned (pruning.method 'none'); ignored otherwise.",
    )

    @field_validator("gguf_file")
    @classmethod
    def _gguf_name(cls, v: str | None) -> str | None:
        if v is not None and ("/" in v or "\\" in v or not v.lower().endswith(".gguf")):
            raise ValueError("must be the name of a .gguf file inside model.id (such as 'model-q8_0.gguf'), not a path")
        return v


class PruningSpec(_Strict):
    method: Literal["wanda", "sparsegpt", "magnitude", "none"] = Field(
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
        return v

    @model_validator(mode="after")
    def _sparsity_matches_pattern(self) -> PruningSpec:
        nm = parse_nm(self.pattern)
        if nm is not None:
            implied = 1.0 - nm[0] / nm[1]
            if "sparsity" in self.model_fields_set and abs(self.sparsity - implied) > 1e-9:
                raise ValueError(
                    f"sparsity {self.sparsity} contradicts pattern {self.pattern} (which means {implied:g}); "
                    "omit sparsity for N:M patterns"
                )
            self.sparsity = implied
        return self

    @property
    def nm(self) -> tuple[int, int] | None:
        return parse_nm(self.pattern)


# The recommended setting: chosen by `python -m bench.quality --search` on Alpaca-valid rows that are never
# evaluated (docs/search.md: the best response perplexity within 5% of LoRA r=8's parameters). More heads
# helped at every learning rate of 1e-2 or less; with all head_dim directions 0.66 of the heads is the most that
# fits under that cap on SmolLM2-135M, so the default learns β over each head's top directions only (a fraction
# of head_dim: 42 of SmolLM2's 64), which lets 0.8 of the heads fit (0.9 with 30 directions, and all heads with
# 21, scored worse).
LrSchedule = Literal["constant", "linear", "cosine"]
SCHEDULES: tuple[str, ...] = get_args(LrSchedule)
DEFAULT_HEADS = 0.8
DEFAULT_DIRECTIONS = 0.66
# The run length and batching of that search (and of every number in docs/results.md): the default is the
# measured setting as a whole, not its head count and lr under another step budget.
DEFAULT_STEPS = 50
# Learning rates used when a spec leaves restoration.lr unset: RestoreLCC's and bias's from the same search (a
# bias on all heads: 9.46 response ppl on the selection rows at 3e-3, 10.24 at 1e-2); LoRA/DoRA as in the
# results table's shared budget (see docs/results.md and docs/search.md).
DEFAULT_LR: dict[str, float] = {"restorelcc": 3e-3, "bias": 3e-3, "lora": 1e-3, "dora": 1e-3}


class RestorationSpec(_Strict):
    method: Literal["restorelcc", "bias", "lora", "dora", "none"] = Field(
        "restorelcc", description="How to restore: RestoreLCC, a per-head bias, LoRA, DoRA, or nothing."
    )
    heads: float = Field(
        DEFAULT_HEADS,
        gt=0,
        description="Heads to compensate: a fraction of all heads (0 < x < 1) or a count (a whole number ≥ 1). "
        f"The default, {DEFAULT_HEADS:g}, won the setting search in docs/search.md.",
    )
    head_selection: Literal["probe", "random", "all"] = Field(
        "probe", description="How heads are chosen: contrastive probing, at random (seeded), or all heads."
    )
    probe_samples: int = Field(256, ge=4, le=100_000, description="Instruction samples used for probing.")
    negatives: Literal["minilm", "tfidf"] = Field(
        "minilm",
        description="How each probe pair's contrastive negative (the most similar other response) is found: "
        "'minilm', the method's sentence embeddings (all-MiniLM-L6-v2, shipped with the worker); 'tfidf', TF-IDF "
        "vectors, a cheaper stand-in that must be asked for. A worker that cannot load the embedding model fails "
        "the job with 'embedding_model_unavailable'.",
    )
    directions: float | None = Field(
        DEFAULT_DIRECTIONS, gt=0, le=4096,
        description="RestoreLCC: learn magnitudes β over each chosen head's top-K lost directions only "
        "(K + head_dim parameters per head, so more heads fit a parameter budget): a fraction of head_dim "
        "(0 < x < 1) or a count (a whole number, at most the model's head_dim); null: all head_dim directions, "
        f"as in the paper. The default, {DEFAULT_DIRECTIONS:g}, won the setting search in docs/search.md "
        "together with the default heads. Ignored by other methods.",
    )
    train_samples: int = Field(2000, ge=1, le=10_000_000, description="Instruction samples used for training.")
    epochs: int = Field(
        1, ge=1, le=1000, description="Full passes over the training samples, used when max_steps is null. A spec "
        "that sets epochs but not max_steps runs that many epochs (max_steps becomes null).",
    )
    max_steps: int | None = Field(
        DEFAULT_STEPS, ge=1, le=10_000_000,
        description=f"Optimizer steps; null runs `epochs` full passes instead. The default, {DEFAULT_STEPS}, is the "
        "run length the default heads, directions and lr were searched and measured at (docs/search.md).",
    )
    lr: float | None = Field(
        None, gt=0, lt=10, description="AdamW learning rate; null picks the method's default (RestoreLCC "
        f"{DEFAULT_LR['restorelcc']:g}, searched with the default heads; bias {DEFAULT_LR['bias']:g}, from the "
        f"same search; LoRA and DoRA {DEFAULT_LR['lora']:g}).",
    )
    lr_schedule: LrSchedule = Field(
        "constant", description="Learning-rate schedule over the run's steps: constant, or a linear or cosine "
                                "decay to zero (after warmup_steps of linear warm-up, if any)."
    )
    warmup_steps: int = Field(0, ge=0, le=1_000_000, description="Optimizer steps of linear lr warm-up from zero.")
    weight_decay: float = Field(0.0, ge=0, lt=1, description="AdamW weight decay.")
    batch_size: int = Field(8, ge=1, le=4096, description="Sequences per optimizer step (before accumulation).")
    grad_accum: int = Field(1, ge=1, le=1024, description="Gradient accumulation steps per optimizer step.")
    group_by_length: bool = Field(
        True, description="Batch training samples of similar length together (within shuffled groups of 50 "
                           "batches): far less padding, so faster steps (about 1.7x fewer tokens on Alpaca); every "
                           "sample is still seen once per epoch, but a batch is less varied, which can cost "
                           "quality at a small step budget. On by default: the default setting was searched "
                           "and measured with it."
    )
    max_seq_len: int = Field(256, ge=8, le=32_768, description="Longest training sequence in tokens.")
    lora_r: int = Field(8, ge=1, le=4096, description="LoRA/DoRA rank.")
    lora_alpha: float = Field(16, gt=0, description="LoRA/DoRA alpha.")
    lora_targets: list[Text] = Field(
        default_factory=lambda: ["q_proj", "v_proj"], min_length=1, max_length=MAX_LORA_TARGETS,
        description="LoRA/DoRA target module names.",
    )

    @model_validator(mode="before")
    @classmethod
    def _removed_fields(cls, data: Any) -> Any:
        if isinstance(data, dict) and "components" in data:
            raise ValueError(
                "restoration.components was removed: the probe standardises every feature, which cancels the "
                "summary component c (a constant added to all samples) exactly, so no value of it could change a "
                "head's score; drop the field"
            )
        return data

    @model_validator(mode="after")
    def _method_lr(self) -> RestorationSpec:
        if self.lr is None and self.method != "none":
            self.lr = DEFAULT_LR[self.method]
        if "epochs" in self.model_fields_set and "max_steps" not in self.model_fields_set:
            self.max_steps = None  # asked for epochs: the default step budget must not silently cut them short
        if self.max_steps is not None and self.warmup_steps >= self.max_steps:
            raise ValueError(f"restoration.warmup_steps ({self.warmup_steps}) must be less than "
                             f"restoration.max_steps ({self.max_steps})")
        return self

    @field_validator("heads")
    @classmethod
    def _heads(cls, v: float) -> float:
        if v >= 1 and v != int(v):
            raise ValueError("a head count must be a whole number; use 0 < x < 1 for a fraction")
        return v

    @field_validator("directions")
    @classmethod
    def _directions(cls, v: float | None) -> float | None:
        if v is not None and v >= 1 and v != int(v):
            raise ValueError("a direction count must be a whole number; use 0 < x < 1 for a fraction of head_dim")
        return int(v) if v is not None and v >= 1 else v


class DataSpec(_Strict):
    train: PathText | None = Field(
        None, description="Instruction JSONL ({prompt, response}) for probing and training."
    )
    calibration: PathText | None = Field(
        None,
        description="JSONL used for pruning calibration ({text} or {prompt, response}); defaults to data.train.",
    )


class EvaluationSpec(_Strict):
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
        description="Per-set row limits keyed by file stem (e.g. 'boolq'), overriding limit.",
    )
    batch_size: int = Field(8, ge=1, le=4096, description="Sequences per evaluation forward pass.")
    max_seq_len: int = Field(512, ge=8, le=32_768, description="Longest evaluated sequence in tokens.")
    dense: bool = Field(True, description="Also evaluate the dense (unpruned) model for comparison.")


class OutputSpec(_Strict):
    format: Literal["merged", "adapter"] = Field(
        "merged",
        description="Which result is the one to deploy. Both export model/ (the restoration merged in, pruned "
        "zeros kept); LoRA/DoRA jobs always also export the unmerged adapter in adapter/. 'adapter' names "
        "adapter/ (applied to the pruned model) as the primary result in report.json's output.primary.",
    )
    dtype: Dtype = Field("auto", description="dtype of the exported weights; 'auto' keeps the compute dtype.")


class JobSpec(_Strict):
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
    restoration: RestorationSpec = Field(default_factory=RestorationSpec)
    data: DataSpec = Field(default_factory=DataSpec)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    output: OutputSpec = Field(default_factory=OutputSpec)
    seed: int = Field(42, ge=0, le=2**31 - 1, description="Seed for sampling, probing and training.")

    @model_validator(mode="after")
    def _needs_data(self) -> JobSpec:
        if self.restoration.method != "none" and not self.data.train:
            raise ValueError("data.train is required unless restoration.method is 'none'")
        r = self.restoration
        needs_dense = r.method == "restorelcc" or (r.method == "bias" and r.head_selection == "probe")
        if needs_dense and self.pruning.method == "none" and not self.model.dense:
            raise ValueError(
                f"model.dense is required: restoration.method '{r.method}' compares dense and pruned activations, "
                "and pruning.method 'none' means model.id is already pruned"
            )
        if self.pruning.method in ("wanda", "sparsegpt") and not (self.data.calibration or self.data.train):
            raise ValueError(f"pruning.method '{self.pruning.method}' needs data.calibration or data.train")
        return self

    def data_paths(self) -> dict[str, str]:
        """Every local data path in the spec, keyed by its field name (for path-root checks)."""
        out: dict[str, str] = {}
        if self.data.train:
            out["data.train"] = self.data.train
        if self.data.calibration:
            out["data.calibration"] = self.data.calibration
        for key in ("perplexity", "response_perplexity", "tasks"):
            for i, p in enumerate(getattr(self.evaluation, key)):
                out[f"evaluation.{key}.{i}"] = p
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


class JobList(BaseModel):
    items: list[JobPublic]
    next_cursor: str | None = None


class EventPublic(BaseModel):
    seq: int
    kind: str
    stage: Stage | None = None
    data: dict[str, Any] = Field(default_factory=dict)
    created_at: datetime


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
