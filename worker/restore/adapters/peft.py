"""LoRA and DoRA restoration baselines (peft), trained like the head offsets and merged with the sparsity kept.

The adapter layers are injected into the model in place (peft), trained with the shared loop of
worker.restore.train (completion-only loss, AdamW on the adapter alone, base frozen), and either kept
unmerged — sparse base weights plus a dense low-rank path, at an inference cost reported by
:func:`inference_overhead` — or merged: W' = W + s·B·A (LoRA) or m ⊙ (W + s·B·A) / ‖W + s·B·A‖_row (DoRA),
then ``W'[mask] = 0`` so the zero pattern is exactly the pruned model's. Re-masking discards the part of
the update that falls on pruned positions; :func:`merge_adapter` measures how much.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import save_file
from torch import nn

from app.methods import AdapterConfig
from worker.chunks import row_chunks
from worker.errors import SpecError
from worker.restore.train import BatchSource, SaveHook, TrainProgress, TrainState, frozen, train_parameters

ADAPTER_NAME = "default"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass
class AdapterBaseline:
    """A LoRA/DoRA adapter living inside ``model`` (until merged), with what is needed to save it."""

    method: str  # "lora" or "dora"
    model: nn.Module  # the transformers model carrying the adapter layers
    peft_model: PeftModel | None  # None once merged
    targets: dict[str, tuple[int, int]]  # full module name → (in_features, out_features)
    model_linear_params: int  # weights of every Linear of the model before injection (FLOPs per token / 2)
    had_input_grad_hook: bool
    peft_trainable_params: int  # peft's own count right after injection (base frozen)
    saved_config: LoraConfig | None = None  # snapshots taken when merging, for save_adapter
    saved_state: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def config(self) -> LoraConfig:
        if self.peft_model is not None:
            return self.peft_model.peft_config[ADAPTER_NAME]  # type: ignore[return-value]
        assert self.saved_config is not None
        return self.saved_config

    @property
    def merged(self) -> bool:
        return self.peft_model is None

    def trainable_parameters(self) -> list[nn.Parameter]:
        if self.peft_model is None:
            return []
        return [p for n, p in self.model.named_parameters() if p.requires_grad and "lora_" in n]

    def num_trainable(self) -> int:
        """r·(in+out) per target module, plus out for DoRA's magnitude vector."""
        dora = self.method == "dora"
        r = self.config.r
        return sum(r * (i + o) + (o if dora else 0) for i, o in self.targets.values())

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """peft's adapter weights (names as PeftModel.save_pretrained writes them), on the CPU."""
        if self.peft_model is None:
            return self.saved_state
        state = get_peft_model_state_dict(self.peft_model, adapter_name=ADAPTER_NAME)
        return {k: v.detach().cpu().clone().contiguous() for k, v in state.items()}


def lora_config(r: AdapterConfig) -> LoraConfig:
    if r.method not in ("lora", "dora"):
        raise ValueError(f"not an adapter method: {r.method}")
    return LoraConfig(
        r=r.lora_r,
        lora_alpha=r.lora_alpha,
        target_modules=list(r.lora_targets),
        lora_dropout=0.0,
        use_dora=r.method == "dora",
        bias="none",
    )


def inference_overhead(targets: Mapping[str, tuple[int, int]], r: int, dora: bool, model_linear_params: int) -> dict:
    """Cost of running the adapter unmerged, on top of the sparse base model.

    Per target module and token: two extra matmuls (A: r·in, B: r·out multiply-adds), i.e. 2·r·(in+out)
    FLOPs; DoRA adds a per-output rescale (2·out) and, every forward pass, B·A and the row norms of
    W + s·B·A (2·r·in·out + 3·in·out FLOPs, independent of the token count).
    """
    per_token = sum(2 * r * (i + o) + (2 * o if dora else 0) for i, o in targets.values())
    out: dict[str, Any] = {
        "extra_params": sum(r * (i + o) + (o if dora else 0) for i, o in targets.values()),
        "extra_matmuls_per_token": 2 * len(targets),
        "extra_flops_per_token": per_token,
        "extra_flops_per_token_rel": per_token / (2 * model_linear_params) if model_linear_params else None,
        "formula": "2·r·(in+out) FLOPs per token per target module"
        + (" + 2·out (DoRA rescale); per forward pass 2·r·in·out + 3·in·out (DoRA weight norm)" if dora else ""),
    }
    if dora:
        out["extra_flops_per_forward"] = sum(2 * r * i * o + 3 * i * o for i, o in targets.values())
    return out


def check_targets(targets: Sequence[str], modules: Iterable[tuple[str, nn.Module]]) -> None:
    """Every entry of ``restoration.lora_targets`` names at least one module, matched as peft matches a list (the
    module's full name, or its last dotted parts): peft itself refuses only a list that matches nothing at all."""
    modules = list(modules)
    missing = [t for t in targets if not any(_names(n, t) for n, _ in modules)]
    if missing:
        linears = sorted({n.rsplit(".", 1)[-1] for n, m in modules if isinstance(m, nn.Linear)})
        raise SpecError(f"restoration.lora_targets: {', '.join(map(repr, missing))} names no module of the model "
                        f"(its Linear layers: {', '.join(linears)})", field="restoration.lora_targets")
    owners: dict[int, list[str]] = {}  # a weight → the modules holding it (tied embeddings: two)
    for n, m in modules:
        weight = getattr(m, "weight", None)
        if isinstance(weight, nn.Parameter):
            owners.setdefault(id(weight), []).append(n)
    for t in targets:
        for n, m in modules:
            shared = [o for o in owners.get(id(getattr(m, "weight", None)), []) if o != n]
            if shared and _names(n, t):
                raise SpecError(
                    f"restoration.lora_targets: {t!r} ({n}) shares its weight with {shared[0]} (tied embeddings): "
                    "merging an adapter into it would change that module too; leave it out",
                    field="restoration.lora_targets")


def _names(module: str, target: str) -> bool:
    """Whether a lora_targets entry names the module, as peft matches a list: its full name or its last dotted parts."""
    return module == target or module.endswith(f".{target}")


def _adapter_layers(model: nn.Module) -> dict[str, LoraLayer]:
    return {name: mod for name, mod in model.named_modules() if isinstance(mod, LoraLayer)}


def attach_adapter(model: nn.Module, r: AdapterConfig, seed: int = 0) -> AdapterBaseline:
    """Inject a freshly initialised LoRA/DoRA adapter (seeded; B = 0, so the model's outputs are unchanged)."""
    if hasattr(model, "peft_config") or any(isinstance(m, BaseTunerLayer) for m in model.modules()):
        raise ValueError("the model already carries a peft adapter")
    check_targets(r.lora_targets, model.named_modules())
    linear_params = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    had_hook = hasattr(model, "_require_grads_hook")
    device = next(model.parameters()).device
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.manual_seed(seed)
        try:
            peft_model = get_peft_model(model, lora_config(r), adapter_name=ADAPTER_NAME)
        except ValueError as exc:
            raise SpecError(f"LoRA/DoRA targets: {exc}", field="restoration.lora_targets") from exc
    layers = _adapter_layers(model)
    baseline = AdapterBaseline(
        method=r.method,
        model=model,
        peft_model=peft_model,
        targets={n: (m.in_features, m.out_features) for n, m in layers.items()},
        model_linear_params=linear_params,
        had_input_grad_hook=had_hook,
        peft_trainable_params=peft_model.get_nb_trainable_parameters()[0],
    )
    bad = [n for n, m in layers.items() if not isinstance(m.get_base_layer(), nn.Linear)]
    if bad:
        detach_adapter(baseline)
        raise SpecError(f"LoRA/DoRA targets must be Linear layers: {bad[:3]}", field="restoration.lora_targets")
    if r.method == "dora":
        _magnitudes_as_the_forward_computes(layers.values())
    if baseline.peft_trainable_params != baseline.num_trainable():
        detach_adapter(baseline)
        raise RuntimeError(
            f"adapter size {baseline.peft_trainable_params} differs from r·(in+out) count {baseline.num_trainable()}"
        )
    return baseline


@torch.no_grad()
def _magnitudes_as_the_forward_computes(layers: Iterable[nn.Module]) -> None:
    """Start each DoRA magnitude at the weight norm its forward divides by. peft takes it in the model's dtype at
    attach, the forward in the adapter's (float32): on a bfloat16 model their ratio is off 1 by up to 2^-8 per output
    row, which rescaled every target layer before any training (logits 0.03 off on a tiny model); now it is 1."""
    for layer in layers:
        magnitude = layer.lora_magnitude_vector[ADAPTER_NAME]
        weight = layer.get_base_layer().weight
        magnitude.weight.copy_(torch.linalg.norm(weight.to(magnitude.weight.dtype), dim=1))


def _drop_peft_state(baseline: AdapterBaseline) -> None:
    model = baseline.model
    if not baseline.had_input_grad_hook and hasattr(model, "_require_grads_hook"):
        model.disable_input_require_grads()
    if hasattr(model, "peft_config"):
        del model.peft_config
    baseline.peft_model = None


def detach_adapter(baseline: AdapterBaseline) -> nn.Module:
    """Remove the adapter without merging: the model is exactly as before :func:`attach_adapter`."""
    if baseline.peft_model is not None:
        baseline.peft_model.unload()
    _drop_peft_state(baseline)
    return baseline.model


def train_adapter(
    model: nn.Module,
    batches: BatchSource,
    r: AdapterConfig,
    *,
    seed: int = 0,
    progress: TrainProgress | None = None,
    should_stop: Callable[[], bool] | None = None,
    checkpoint_every: int = 1,
    resume: TrainState | None = None,
    save: SaveHook | None = None,
    objective: Any = None,
    max_grad_norm: float | None = None,
) -> tuple[AdapterBaseline, dict[str, Any]]:
    """Attach a LoRA (``r.method == "lora"``) or DoRA adapter to ``model`` and train it; base weights frozen.

    Hyper-parameters come from ``r`` (lora_r, lora_alpha, lora_targets, lr, lr_schedule, warmup_steps,
    weight_decay, epochs, max_steps, grad_accum); ``resume``, ``save`` and ``max_grad_norm`` as
    train_parameters'. The adapter stays in the model (unmerged) for :func:`merge_adapter`; on any failure, Cancelled
    included, it is removed again. Returns the baseline and the stats of worker.restore.train.train_parameters.
    """
    with frozen(model):  # restores the base weights' requires_grad and the train/eval mode afterwards
        baseline = attach_adapter(model, r, seed)
        try:
            params = baseline.trainable_parameters()
            stats = train_parameters(
                model, params, batches, lr=r.lr, schedule=r.lr_schedule, warmup_steps=r.warmup_steps,
                weight_decay=r.weight_decay, epochs=r.epochs, max_steps=r.max_steps, grad_accum=r.grad_accum,
                seed=seed, progress=progress,
                should_stop=should_stop, checkpoint_every=checkpoint_every, resume=resume, save=save,
                objective=objective, max_grad_norm=max_grad_norm,
            )
        except BaseException:
            detach_adapter(baseline)
            raise
    return baseline, stats


NORM_CHUNK = 2**24  # elements per float32 chunk the merge's norms are taken over (64 MiB)


def _squared_norms(merged: torch.Tensor, before: torch.Tensor) -> tuple[float, float]:
    """(‖merged − before‖², ‖merged‖²) in float32 over row chunks: a 70B model's down projection in float32 whole
    would be a few GB more, several times over, on a device sized for the weights."""
    update = total = 0.0
    for rows, old in zip(row_chunks(merged, NORM_CHUNK), row_chunks(before, NORM_CHUNK), strict=True):
        now = rows.to(torch.float32, copy=True)  # a copy even in float32: changed in place below
        total += float(now.pow(2).sum())
        update += float(now.sub_(old).pow_(2).sum())
    return update, total


# What a kept weight that merges to exactly 0 becomes: float16's smallest normal number, which every dtype a model is
# computed or exported in holds (the model dtype's own smallest normal, 1e-38 in bfloat16, became 0 in a float16
# export, which then refused the whole job for a pruned-pattern change).
COLLISION_VALUE = torch.finfo(torch.float16).tiny


@torch.no_grad()
def merge_adapter(
    model: nn.Module, baseline: AdapterBaseline, zero_masks: Mapping[str, torch.Tensor] | None
) -> tuple[nn.Module, dict[str, Any]]:
    """Merge the adapter into the weights, re-apply the pruning masks and unwrap the model.

    ``zero_masks``: {full module name: bool tensor, True = pruned zero} (worker.prune.measure.zero_masks).
    Returns the plain transformers model (the same object, no peft layers left) and report fields,
    including how much of the merged update re-masking discarded. A merged weight that lands exactly on
    0 at an unpruned position is set to :data:`COLLISION_VALUE` so the zero pattern stays exactly the pruned one
    (counted in ``merge_zero_collisions``).
    """
    if baseline.peft_model is None:
        raise ValueError("the adapter is already merged")
    if baseline.model is not model:
        raise ValueError("the adapter belongs to another model")
    masks: Mapping[str, torch.Tensor] = zero_masks if zero_masks is not None else {}
    baseline.saved_state = baseline.adapter_state_dict()
    baseline.saved_config = copy.deepcopy(baseline.config)
    overhead = inference_overhead(
        baseline.targets, baseline.config.r, baseline.method == "dora", baseline.model_linear_params
    )
    remasked = collisions = 0
    lost_sq = merged_sq = update_sq = 0.0
    for name, layer in _adapter_layers(model).items():
        weight = layer.get_base_layer().weight
        before = weight.detach().clone()
        layer.merge(safe_merge=True, adapter_names=[ADAPTER_NAME])
        w = weight.data
        update, merged = _squared_norms(w, before)
        update_sq, merged_sq = update_sq + update, merged_sq + merged
        del before
        mask = masks.get(name)
        if mask is None:
            continue
        mask = mask.to(w.device)
        lost = w[mask]
        lost_sq += float(lost.float().pow(2).sum())
        remasked += int((lost != 0).sum())
        w[mask] = 0
        hit = (w == 0) & ~mask
        collisions += int(hit.sum())
        w[hit] = COLLISION_VALUE
    baseline.peft_model.unload()  # merged weights stay in the base layers
    _drop_peft_state(baseline)
    for name, mask in masks.items():  # modules the adapter did not touch: a no-op unless something is off
        if name in baseline.targets:
            continue
        w = model.get_submodule(name).weight.data
        mask = mask.to(w.device)
        remasked += int((w[mask] != 0).sum())
        w[mask] = 0
    left = [n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    if left:
        raise RuntimeError(f"peft layers left after merging: {left[:3]}")
    label = "LoRA" if baseline.method == "lora" else "DoRA"
    info: dict[str, Any] = {
        "merged": f"{label} update merged into the weights with the pruning mask re-applied",
        "unmerged_adapter": "adapter/",
        "adapter": {
            "method": baseline.method,
            "r": baseline.config.r,
            "alpha": baseline.config.lora_alpha,
            "target_modules": len(baseline.targets),
            "trainable_params": baseline.num_trainable(),
        },
        "remasked_weights": remasked,
        "remask_weight_change_rel": math.sqrt(lost_sq / merged_sq) if merged_sq else 0.0,
        "remask_update_lost_rel": math.sqrt(lost_sq / update_sq) if update_sq else 0.0,
        "merge_zero_collisions": collisions,
        "unmerged_inference_overhead": overhead,
    }
    return model, info


def save_adapter(baseline: AdapterBaseline, directory: str | Path) -> Path:
    """Write the unmerged adapter (adapter_config.json, adapter_model.safetensors), before or after merging.

    Loadable with ``PeftModel.from_pretrained(pruned_model, directory)``. It names no base model: the one peft would
    record is the worker's path of the model loaded, a path nowhere else, and the dense model's at that (the adapter
    belongs on the pruned one), which ``AutoPeftModel`` would load it onto without a word.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(baseline.config)
    config.inference_mode = True
    config.base_model_name_or_path = None
    config.save_pretrained(str(d))
    save_file(baseline.adapter_state_dict(), str(d / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return d
