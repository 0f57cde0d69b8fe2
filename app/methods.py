"""The method catalogue: what each pruning and restoration method is, needs and accepts.

Torch-free and worker-free, so the API validates a spec with it and the worker's runner plans a job with it:
neither names a method. A restoration method is one :class:`RestorationMethod` entry with its own config model
(only that method's fields: a LoRA field on a RestoreLCC job is refused, naming the field); the worker's
implementation of it lives in ``worker/restore/<method>/`` and is registered under the same name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, get_args

from pydantic import Field, field_validator, model_validator

from app.fields import MAX_LORA_TARGETS, FieldError, Strict, Text

# ── pruning ──────────────────────────────────────────────────────────────────────────────────────────────────


@dataclass(frozen=True)
class PruningMethod:
    name: str
    needs_calibration: bool  # collects statistics of each layer's inputs on calibration text
    description: str


PRUNING_METHODS: dict[str, PruningMethod] = {
    m.name: m for m in (
        PruningMethod("wanda", True, "Wanda: |weight| × input-activation norm, per output row"),
        PruningMethod("sparsegpt", True, "SparseGPT: one-shot pruning with a Hessian-based weight update"),
        PruningMethod("magnitude", False, "smallest |weight| first"),
        PruningMethod("none", False, "the given model is already pruned"),
    )
}
PruningName = Literal["wanda", "sparsegpt", "magnitude", "none"]
assert set(get_args(PruningName)) == set(PRUNING_METHODS)


# ── restoration: the settings every method's config shares ───────────────────────────────────────────────────

LrSchedule = Literal["constant", "linear", "cosine"]
SCHEDULES: tuple[str, ...] = get_args(LrSchedule)
DEFAULT_STEPS = 50  # the run length the defaults were searched and measured at (docs/search.md)
DEFAULT_HEADS = 0.8  # searched (docs/search.md)
DEFAULT_DIRECTIONS = 0.66  # searched together with DEFAULT_HEADS (docs/search.md)
Objective = Literal["sft", "distill"]
DEFAULT_OBJECTIVE: Objective = "sft"  # bias, LoRA and DoRA: the objective selection (docs/objective.md) ran RestoreLCC
# RestoreLCC's objective: distill mixed with the next-token loss, chosen by the selection on held-out rows over two
# seeds (docs/objective.md), as its other defaults were (docs/search.md)
RESTORELCC_OBJECTIVE: Objective = "distill"
RESTORELCC_SFT_WEIGHT = 0.5
# The distill-only settings and the values an sft job holds them at
DISTILL_ONLY: dict[str, Any] = {"distill_tokens": "response", "distill_top_k": 64, "sft_weight": 0.0}
OBJECTIVE_HELP = (
    "What training moves the model toward: 'sft', the training data (next-token loss on the responses, the paper's "
    "recipe); 'distill', the dense model (KL divergence from its next-token distribution on the training text, "
    f"captured while the dense model is loaded), mixed with the next-token loss by sft_weight. Default: "
    f"'{RESTORELCC_OBJECTIVE}' with sft_weight {RESTORELCC_SFT_WEIGHT} for RestoreLCC (chosen by the selection in "
    f"docs/objective.md), '{DEFAULT_OBJECTIVE}' for the other methods."
)
SFT_WEIGHT_HELP = ("distill: weight w of the next-token loss mixed in, (1 - w)·KL + w·CE per token; 0 is pure "
                   f"distillation. Default: {RESTORELCC_SFT_WEIGHT} for RestoreLCC, 0 for the other methods.")


class RestorationConfig(Strict):
    """Base of every method's restoration settings; ``method`` picks the subclass."""

    method: str

    @model_validator(mode="before")
    @classmethod
    def _own_settings(cls, data: Any) -> Any:
        """A setting of another method (or none at all) is refused with a message naming the method's own."""
        if isinstance(data, dict) and (alien := [k for k in data if k not in cls.model_fields]):
            name = cls.model_fields["method"].default
            raise FieldError(f"restoration.{alien[0]}", f"not a setting of restoration.method '{name}' "
                             f"(its settings: {', '.join(cls.model_fields)})")
        return data

    def needs_activations(self) -> bool:
        """Whether the method compares dense and pruned activations (the probing and extracting stages, and a
        dense reference when the model is given already pruned)."""
        return False

    def needs_dense_targets(self) -> bool:
        """Whether training needs the dense model's outputs (a dense reference when the model is given already
        pruned)."""
        return False


class NoRestoration(RestorationConfig):
    method: Literal["none"] = Field("none", description="Restore nothing: prune (or take the pruned model) and "
                                    "evaluate.")


class TrainingConfig(RestorationConfig):
    """Settings of every method that trains on instruction pairs."""

    train_samples: int = Field(2000, ge=1, le=10_000_000, description="Instruction samples used for training.")
    epochs: int = Field(
        1, ge=1, le=1000, description="Full passes over the training samples, used when max_steps is null. A spec "
        "that sets epochs but not max_steps runs that many epochs (max_steps becomes null).",
    )
    max_steps: int | None = Field(
        DEFAULT_STEPS, ge=1, le=10_000_000,
        description=f"Optimizer steps; null runs `epochs` full passes instead. The default, {DEFAULT_STEPS}, is the "
        "run length the default settings were searched and measured at (docs/search.md).",
    )
    lr: float | None = Field(None, gt=0, lt=10, description="AdamW learning rate; null picks the method's default "
                             "(see docs/api.md).")
    lr_schedule: LrSchedule = Field(
        "constant", description="Learning-rate schedule over the run's steps: constant, or a linear or cosine "
                                "decay to zero (after warmup_steps of linear warm-up, if any)."
    )
    warmup_steps: int = Field(0, ge=0, le=1_000_000, description="Optimizer steps of linear lr warm-up from zero.")
    weight_decay: float = Field(0.0, ge=0, lt=1, description="AdamW weight decay.")
    max_grad_norm: float | None = Field(
        None, gt=0, le=1e6, description="Clip the gradient's global L2 norm over the trained parameters to this "
        "before each optimizer step; null: no clipping (the defaults were measured without). Every step's norm "
        "before clipping is reported (restoration.grad_norm_curve).",
    )
    batch_size: int = Field(8, ge=1, le=4096, description="Sequences per optimizer step (before accumulation).")
    grad_accum: int = Field(1, ge=1, le=1024, description="Gradient accumulation steps per optimizer step.")
    group_by_length: bool = Field(
        True, description="Batch training samples of similar length together (within shuffled groups of 50 "
                           "batches): far less padding, so faster steps; every sample is still seen once per "
                           "epoch, but a batch is less varied. On by default: the defaults were measured with it."
    )
    max_seq_len: int = Field(256, ge=8, le=32_768, description="Longest training sequence in tokens.")
    response_eos: bool = Field(
        True, description="Train on the tokenizer's EOS token after each response too (unless the response text "
        "already ends with it), so the restored model learns where a response stops, as Stanford Alpaca's recipe "
        "does; a response cut by max_seq_len gets none. false trains on the response text alone (how jobs trained "
        "before this setting existed; the bench pages from then were measured so).",
    )
    objective: Objective = Field(DEFAULT_OBJECTIVE, description=OBJECTIVE_HELP)
    distill_tokens: Literal["response", "all"] = Field(
        DISTILL_ONLY["distill_tokens"], description="distill: the positions distilled — those predicting a response "
                                                    "token, or every token of the text (prompt included).")
    distill_top_k: int = Field(
        DISTILL_ONLY["distill_top_k"], ge=1, le=4096,
        description="distill: dense log-probabilities kept per position (the rest of the vocabulary is one bucket); "
                    "6·k + 8 bytes per token.")
    sft_weight: float = Field(DISTILL_ONLY["sft_weight"], ge=0, le=1, description=SFT_WEIGHT_HELP)

    @model_validator(mode="after")
    def _objective_settings(self) -> TrainingConfig:
        """An sft job holds the distill-only settings at their sft values: naming another is refused, and a
        method's distill default (RestoreLCC's sft_weight) does not show in its spec."""
        if self.objective == "sft":
            stray = [f for f, v in DISTILL_ONLY.items() if getattr(self, f) != v and f in self.model_fields_set]
            if stray:
                raise ValueError(f"restoration.{stray[0]} applies to restoration.objective 'distill' only")
            for f, v in DISTILL_ONLY.items():
                if getattr(self, f) != v:
                    setattr(self, f, v)
        return self

    def needs_dense_targets(self) -> bool:
        """Whether the loading stage captures the dense model's next-token distributions for training."""
        return self.objective == "distill"

    @model_validator(mode="after")
    def _lr_and_steps(self) -> TrainingConfig:
        if self.lr is None:
            self.lr = restoration_method(self.method).default_lr
        if "epochs" in self.model_fields_set and "max_steps" not in self.model_fields_set:
            self.max_steps = None  # asked for epochs: the default step budget must not silently cut them short
        if self.max_steps is not None and self.warmup_steps >= self.max_steps:
            raise ValueError(f"restoration.warmup_steps ({self.warmup_steps}) must be less than "
                             f"restoration.max_steps ({self.max_steps})")
        return self


class HeadConfig(TrainingConfig):
    """Settings of the methods that learn per-head constants on chosen attention heads."""

    heads: float = Field(
        DEFAULT_HEADS, gt=0,
        description="Heads to compensate: a fraction of all heads (0 < x < 1) or a count (a whole number ≥ 1, at "
        "most the model's attention heads: layers × heads). The default was chosen by the setting search in "
        "docs/search.md.",
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

    @field_validator("heads")
    @classmethod
    def _heads(cls, v: float) -> float:
        if v >= 1 and v != int(v):
            raise ValueError("a head count must be a whole number; use 0 < x < 1 for a fraction")
        return v

    def needs_activations(self) -> bool:
        return self.head_selection == "probe"


class RestoreLCCConfig(HeadConfig):
    method: Literal["restorelcc"] = Field("restorelcc", description="RestoreLCC: learned per-head compensation "
                                          "along each head's lost directions, folded into an o_proj bias.")
    objective: Objective = Field(RESTORELCC_OBJECTIVE, description=OBJECTIVE_HELP)
    sft_weight: float = Field(RESTORELCC_SFT_WEIGHT, ge=0, le=1, description=SFT_WEIGHT_HELP)
    directions: float | None = Field(
        DEFAULT_DIRECTIONS, gt=0, le=4096,
        description="Learn magnitudes β over each chosen head's top-K lost directions only (K + head_dim "
        "parameters per head, so more heads fit a parameter budget): a fraction of head_dim (0 < x < 1) or a "
        "count (a whole number, at most the model's head_dim); null: all head_dim directions, as in the paper. "
        "The default was chosen together with the default heads (docs/search.md).",
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

    @field_validator("directions")
    @classmethod
    def _directions(cls, v: float | None) -> float | None:
        if v is not None and v >= 1 and v != int(v):
            raise ValueError("a direction count must be a whole number; use 0 < x < 1 for a fraction of head_dim")
        return int(v) if v is not None and v >= 1 else v

    def needs_activations(self) -> bool:
        return True  # the lost directions come from dense and pruned activations, whatever chooses the heads


class BiasConfig(HeadConfig):
    method: Literal["bias"] = Field("bias", description="A learned constant per chosen head (RestoreLCC's "
                                    "ablation without directions), folded into an o_proj bias.")


class AdapterConfig(TrainingConfig):
    """LoRA and DoRA (peft), merged with the pruned zeros kept."""

    lora_r: int = Field(8, ge=1, le=4096, description="Adapter rank.")
    lora_alpha: float = Field(16, gt=0, description="Adapter alpha.")
    lora_targets: list[Text] = Field(
        default_factory=lambda: ["q_proj", "v_proj"], min_length=1, max_length=MAX_LORA_TARGETS,
        description="Target module names.",
    )


class LoRAConfig(AdapterConfig):
    method: Literal["lora"] = Field("lora", description="LoRA on the target modules.")


class DoRAConfig(AdapterConfig):
    method: Literal["dora"] = Field("dora", description="DoRA on the target modules.")


# ── restoration: the catalogue ───────────────────────────────────────────────────────────────────────────────


@dataclass(frozen=True)
class RestorationMethod:
    name: str
    config: type[RestorationConfig]
    description: str
    trains: bool = True  # runs the training and merging stages
    mergeable: bool = True  # folds into the model's own weights (nothing extra at inference)
    default_lr: float | None = None  # AdamW lr when the spec leaves restoration.lr unset
    streams: bool = True  # runs on a layer-streamed model (model.streaming)
    exports_adapter: bool = False  # exports an unmerged adapter (adapter/), which output.format 'adapter' names


_RESTORATION: dict[str, RestorationMethod] = {}
DEFAULT_RESTORATION = "restorelcc"


def register_restoration(method: RestorationMethod) -> RestorationMethod:
    """Add a method to the catalogue (its config's ``method`` literal must be its name)."""
    if method.config.model_fields["method"].default != method.name:
        raise ValueError(f"{method.config.__name__}.method must default to {method.name!r}")
    _RESTORATION[method.name] = method
    return method


def unregister_restoration(name: str) -> None:
    """Remove a method added at run time (built-in methods stay)."""
    if name in BUILT_IN_NAMES:
        raise ValueError(f"{name!r} is a built-in method")
    _RESTORATION.pop(name, None)


def restoration_method(name: str) -> RestorationMethod:
    try:
        return _RESTORATION[name]
    except KeyError:
        raise ValueError(f"unknown restoration.method {name!r}; known: {', '.join(_RESTORATION)}") from None


def restoration_methods() -> dict[str, RestorationMethod]:
    return dict(_RESTORATION)


# Learning rates: RestoreLCC's and bias's from the setting search; LoRA/DoRA as in the results' shared budget.
for _m in (
    RestorationMethod("restorelcc", RestoreLCCConfig, "RestoreLCC", default_lr=3e-3),
    RestorationMethod("bias", BiasConfig, "a learned bias per chosen head", default_lr=3e-3),
    RestorationMethod("lora", LoRAConfig, "LoRA, merged with the mask re-applied", default_lr=1e-3, streams=False,
                      exports_adapter=True),
    RestorationMethod("dora", DoRAConfig, "DoRA, merged with the mask re-applied", default_lr=1e-3, streams=False,
                      exports_adapter=True),
    RestorationMethod("none", NoRestoration, "no restoration", trains=False),
):
    register_restoration(_m)
BUILT_IN_RESTORATION: tuple[type[RestorationConfig], ...] = tuple(m.config for m in _RESTORATION.values())
BUILT_IN_NAMES: frozenset[str] = frozenset(_RESTORATION)


def restoration_config(value: Any) -> RestorationConfig:
    """A ``restoration`` section (a dict, or a config already made) as its method's config; a missing method is
    the default one. Errors are the config's own, located at its fields."""
    if isinstance(value, RestorationConfig):
        return value
    if not isinstance(value, dict):
        raise ValueError("restoration must be an object")
    name = value.get("method", DEFAULT_RESTORATION)
    if not isinstance(name, str) or name not in _RESTORATION:
        raise ValueError(f"restoration.method: {name!r} is not a restoration method; known: "
                         f"{', '.join(_RESTORATION)}")
    return _RESTORATION[name].config.model_validate({**value, "method": name})


def default_lr(name: str) -> float | None:
    return restoration_method(name).default_lr

