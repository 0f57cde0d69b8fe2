"""Fold learned head offsets into ``o_proj`` biases, and save / load the restoration parameters.

W_O (z + c) = W_O z + W_O c: per layer the bias W_O · concat_h(c_h) (zeros for unchosen heads) joins
o_proj's bias. Only biases are added; every weight stays bit-identical, so sparsity is unchanged.
The config is adjusted so that plain ``AutoModelForCausalLM.from_pretrained(dir)`` rebuilds it:

- llama, qwen3, gemma2, gemma3_text build q/k/v/o biases from ``config.attention_bias``: set it and add
  zero q/k/v biases (and zero o_proj biases on layers without chosen heads).
- mistral and qwen2 have no o_proj bias option: the model is re-expressed as ``LlamaForCausalLM`` with
  ``attention_bias=True`` (same weights and maths; Qwen2 keeps its q/k/v biases, Mistral gets zeros).
  A sliding window Llama cannot express is refused.

The bias is computed in float64 and rounded once to the model dtype, so :func:`check_merge` can hold the
merged model to that single rounding in every dtype (see :func:`merge_reference`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from worker.chunks import row_chunks
from worker.errors import JobFailure, UnsupportedModelError
from worker.model.arch import DecoderAdapter, text_config
from worker.restore.offsets.heads import HeadOffsets, check_compatible

BIAS_BY_CONFIG = ("llama", "qwen3", "gemma2", "gemma3_text")
AS_LLAMA = ("mistral", "qwen2")
_QKV = ("q_proj", "k_proj", "v_proj")
# A streamed model's layers are in memory only inside ``layer_scope(layer, write)`` (worker.model.streaming).
LayerScope = Callable[[int, bool], AbstractContextManager[Any]]


def _scope(layer_scope: LayerScope | None, layer: int, write: bool = False) -> AbstractContextManager[Any]:
    return layer_scope(layer, write) if layer_scope is not None else nullcontext()
# Keys of a Mistral/Qwen2 config that have no meaning for Llama (checked by check_mergeable first).
_DROP_FOR_LLAMA = {
    "model_type", "architectures", "transformers_version", "auto_map",
    "sliding_window", "use_sliding_window", "max_window_layers", "layer_types",
}


def _sliding_window_active(config: Any) -> bool:
    window = getattr(config, "sliding_window", None)
    if window is None:
        return False
    layer_types = getattr(config, "layer_types", None) or []
    if config.model_type == "qwen2" and "sliding_attention" not in layer_types:
        return False
    max_pos = getattr(config, "max_position_embeddings", None)
    return max_pos is None or window < max_pos


def check_mergeable(config: Any) -> None:
    """Raise UnsupportedModelError before any work when the merged model could not be exported."""
    cfg = text_config(config)
    mt = cfg.model_type
    if mt in BIAS_BY_CONFIG:
        return
    if mt not in AS_LLAMA:
        raise UnsupportedModelError(f"merging head offsets into {mt} models is not supported")
    if _sliding_window_active(cfg):
        raise UnsupportedModelError(
            f"{mt} with an active sliding window ({cfg.sliding_window} tokens) cannot be exported: "
            "its o_proj has no bias option and Llama, which has one, has no sliding window"
        )
    if cfg.hidden_size % cfg.num_attention_heads:
        raise UnsupportedModelError(
            f"{mt}: hidden_size {cfg.hidden_size} is not a multiple of num_attention_heads "
            f"{cfg.num_attention_heads}, which the Llama config used for export requires"
        )


def _zero_bias(linear: nn.Linear) -> None:
    if linear.bias is None:
        w = linear.weight
        linear.bias = nn.Parameter(torch.zeros(linear.out_features, dtype=w.dtype, device=w.device),
                                   requires_grad=False)


_CHUNK_ELEMENTS = 1 << 22  # weight elements upcast to float64 at a time (32 MiB)


def _matmul64(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """float64 ``weight @ x`` (x: (in,) or (in, k), on weight's device), upcasting a few rows of weight at a time."""
    x64 = x.to(device=weight.device, dtype=torch.float64)
    return torch.cat([w.double() @ x64 for w in row_chunks(weight, _CHUNK_ELEMENTS)])


def _row_abs_sums(weight: torch.Tensor) -> torch.Tensor:
    """float64 Σ_j |W_ij| per row, upcasting a few rows at a time."""
    return torch.cat([w.double().abs().sum(dim=1) for w in row_chunks(weight, _CHUNK_ELEMENTS)])


@torch.no_grad()
def add_o_proj_biases(adapter: DecoderAdapter, offsets: HeadOffsets, layer_scope: LayerScope | None = None,
                      zero_biases: bool = False) -> None:
    """In place: o_proj.bias += W_O · concat_h(c_h) on every layer with chosen heads; with ``zero_biases``, every
    layer's q/k/v/o_proj gets a zero bias where it has none (what ``attention_bias=True`` builds).

    Summed in float64 and rounded once to the bias dtype: the stored bias is the exact one up to that rounding.
    """
    check_compatible(adapter, offsets)
    consts = offsets.constants().detach().double()
    chosen = set(offsets.layers)
    for layer in range(adapter.info.num_layers):
        if layer not in chosen and not zero_biases:
            continue
        with _scope(layer_scope, layer, write=True):
            o = adapter.o_proj(layer)
            if layer in chosen:
                total = _matmul64(o.weight, offsets.layer_vector(layer, consts))
                if o.bias is None:
                    o.bias = nn.Parameter(total.to(o.weight.dtype), requires_grad=False)
                else:
                    o.bias.copy_((o.bias.double() + total).to(o.bias.dtype))
            if zero_biases:
                attn = adapter.attention(layer)
                for name in (*_QKV, "o_proj"):
                    _zero_bias(getattr(attn, name))


def _llama_config(src: Any) -> Any:
    from transformers import LlamaConfig

    kw = {k: v for k, v in src.to_dict().items() if k not in _DROP_FOR_LLAMA}
    kw.update(attention_bias=True, mlp_bias=False)
    cfg = LlamaConfig(**kw)
    cfg.architectures = ["LlamaForCausalLM"]
    return cfg


def _as_llama(model: nn.Module) -> nn.Module:
    """A LlamaForCausalLM sharing ``model``'s tensors (biases already on every q/k/v/o_proj)."""
    from transformers import LlamaForCausalLM

    src = model.config
    cfg = _llama_config(src)
    with torch.device("meta"):
        new = LlamaForCausalLM(cfg)
    missing, unexpected = new.load_state_dict(model.state_dict(), strict=False, assign=True)
    if unexpected or [k for k in missing if k != "lm_head.weight" or not cfg.tie_word_embeddings]:
        raise RuntimeError(f"re-expressing as Llama: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, buf in model.named_buffers():  # non-persistent buffers (rotary frequencies)
        mod_name, _, attr = name.rpartition(".")
        target = new.get_submodule(mod_name) if mod_name else new
        if hasattr(target, attr):
            setattr(target, attr, buf)
    if cfg.tie_word_embeddings:
        new.lm_head.weight = new.model.embed_tokens.weight
    left = [n for n, t in [*new.named_parameters(), *new.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"re-expressing as Llama left tensors unset: {left[:5]}")
    new.generation_config = getattr(model, "generation_config", new.generation_config)
    new.config._name_or_path = getattr(src, "_name_or_path", "")
    new.config.dtype = getattr(src, "dtype", None)
    placed = getattr(model, "hf_device_map", None)
    if placed and getattr(model, "_hf_hook", None) is not None:  # split over GPUs: the same modules, map and hooks
        from accelerate import dispatch_model

        new = dispatch_model(new, device_map=dict(placed), force_hooks=True)
    return new.eval()


@torch.no_grad()
def merge_into_o_proj(model: nn.Module, adapter: DecoderAdapter, offsets: HeadOffsets,
                      layer_scope: LayerScope | None = None) -> nn.Module:
    """Merge ``offsets`` into o_proj biases; return the model to save.

    ``model`` is modified in place (biases added). The return value is ``model`` itself for
    llama/qwen3/gemma2/gemma3_text, and a LlamaForCausalLM sharing the same tensors for mistral/qwen2 — except for a
    streamed model (``layer_scope`` given), which stays what it is (it computes the same with its new biases) and
    is written out with :func:`export_config`.
    """
    check_mergeable(model.config)
    add_o_proj_biases(adapter, offsets, layer_scope, zero_biases=True)
    if model.config.model_type in BIAS_BY_CONFIG:
        model.config.attention_bias = True
        return model
    return model if layer_scope is not None else _as_llama(model)


def export_config(config: Any) -> Any:
    """The config a merged model is saved with: its own (attention_bias set) or, for mistral/qwen2, Llama's."""
    if config.model_type in BIAS_BY_CONFIG:
        return config
    return _llama_config(config)


# ── merge check ────────────────────────────────────────────────────────────────────────────────
#
# Before the merge, :func:`merge_reference` computes in float64, from the original weights and the offsets'
# fp32 master constants, what every o_proj must become: bias_l = b0_l + Σ_{chosen (l, h)} W_O[:, h·d:(h+1)·d] c_h
# (each head placed on its own column slice, independently of ``HeadOffsets.layer_vector``) and, on a few real
# o_proj inputs z, the hooked output W_O (z + c) + b0. After the merge, :func:`check_merge` reads the merged
# weights and biases back in float64. A correct merge differs from the reference only by the single rounding of
# the bias to its dtype: |merged − expected| ≤ u·|expected| + slack per element, u = eps(dtype)/2 (plus float32's
# eps/2 below 32 bits: see _unit) and slack the float64 accumulation bound (≈1e-16 · width · Σ|terms|). Errors are
# reported relative, as |merged − expected| / (|expected bias| + slack/u), which is ≤ u exactly when that bound
# holds (the outputs too are measured against the bias: W z is the same on both sides, only the bias may differ).

CHECK_ROWS = 8  # o_proj inputs kept per layer for the hooked-vs-merged output check
TOKEN_EPS_HALF = 16  # end-to-end logit tolerance per token, in eps of bfloat16/float16 (see token_rel_tolerance)
TOKEN_EPS_FLOAT32 = 128  # … and of float32
TOKEN_EPS_LAYERS = 30  # … for up to this many decoder layers (the depth they were measured at); more, in proportion


class MergeCheckError(JobFailure):
    """The merged model does not compute what the hooked one did (a bug, never the user's input)."""

    code = "merge_check_failed"


@dataclass(frozen=True)
class LayerReference:
    """Float64 expectations for one layer's merged o_proj (computed before the merge)."""

    bias: torch.Tensor  # (out,) the merged bias, exactly
    bias_slack: torch.Tensor  # (out,) float64 accumulation bound of ``bias``
    inputs: torch.Tensor | None  # (rows, in) real o_proj inputs z, model dtype; None when none were captured
    outputs: torch.Tensor | None  # (rows, out) hooked o_proj(z + c), exactly
    output_slack: torch.Tensor | None  # (rows, out) float64 accumulation bound of ``outputs``


@dataclass(frozen=True)
class MergeCheck:
    """Measured merge errors, relative per element (see the section comment); a correct merge keeps them ≤ tolerance."""

    bias_max_rel_err: float
    output_max_rel_err: float
    tolerance: float  # u of the merged biases' dtype (see _unit)


def _unit(dtype: torch.dtype) -> float:
    """Largest relative error of rounding a float64 to ``dtype``: eps/2, plus float32's eps/2 for narrower types
    (PyTorch converts float64 to bfloat16/float16 through float32, and the two roundings can add up)."""
    single = torch.finfo(dtype).eps / 2
    return single + (torch.finfo(torch.float32).eps / 2 if torch.finfo(dtype).bits < 32 else 0.0)


def _gamma(terms: int) -> float:
    """Bound on the relative error of a float64 sum of ``terms`` products (Higham's γ_n, doubled for safety)."""
    return 2 * terms * torch.finfo(torch.float64).eps


def _head_columns(offsets: HeadOffsets, layer: int) -> list[tuple[slice, int]]:
    """(column slice of o_proj's input, row of ``offsets.constants()``) for each chosen head of ``layer``."""
    d = offsets.head_dim
    return [(slice(h * d, (h + 1) * d), j) for j, (lay, h) in enumerate(offsets.heads) if lay == layer]


def _expected_bias(
    weight: torch.Tensor, bias: torch.Tensor | None, consts: torch.Tensor, heads: list[tuple[slice, int]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(b0 + Σ_h W[:, slice_h] c_h, its float64 accumulation bound), float64 on weight's device."""
    out = weight.shape[0]
    expected = torch.zeros(out, dtype=torch.float64, device=weight.device) if bias is None else bias.double()
    magnitude = expected.abs()
    for cols, j in heads:
        c = consts[j]
        expected = expected + _matmul64(weight[:, cols], c)
        magnitude = magnitude + _matmul64(weight[:, cols].abs(), c.abs())
    return expected, _gamma(weight.shape[1] + 2) * magnitude


def _hooked_outputs(
    weight: torch.Tensor, bias: torch.Tensor | None, consts: torch.Tensor, heads: list[tuple[slice, int]],
    inputs: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(o_proj(z + c) for each row z of ``inputs``, its float64 accumulation bound), float64."""
    z = inputs.to(device=weight.device, dtype=torch.float64)
    x = z.clone()
    for cols, j in heads:
        x[:, cols] += consts[j].to(x.device)
    out = _matmul64(weight, x.T).T
    # bounds |W|·|z + c| here and |W|·|z| in the merged model's W z: (row sums of |W|) · (max|z + c| + max|z|),
    # loose, but float64's γ keeps it far below any dtype's rounding
    largest = x.abs().amax(dim=1, keepdim=True) + z.abs().amax(dim=1, keepdim=True)
    magnitude = _row_abs_sums(weight)[None, :] * largest
    if bias is not None:
        out = out + bias.double()
        magnitude = magnitude + bias.double().abs()
    return out, _gamma(weight.shape[1] + 2) * magnitude


@torch.no_grad()
def merge_reference(
    adapter: DecoderAdapter, offsets: HeadOffsets, inputs: dict[int, torch.Tensor] | None = None,
    layer_scope: LayerScope | None = None,
) -> list[LayerReference]:
    """Per layer, what the merged o_proj must compute (call before merging; ``inputs``: layer → o_proj inputs z)."""
    check_compatible(adapter, offsets)
    consts = offsets.constants().detach().double()
    refs = []
    for layer in range(adapter.info.num_layers):
        with _scope(layer_scope, layer):
            refs.append(_layer_reference(adapter.o_proj(layer), offsets, consts, layer, inputs))
    return refs


def _layer_reference(o: nn.Linear, offsets: HeadOffsets, consts: torch.Tensor, layer: int,
                     inputs: dict[int, torch.Tensor] | None) -> LayerReference:
    heads = _head_columns(offsets, layer)
    c = consts.to(o.weight.device)
    bias, bias_slack = _expected_bias(o.weight, o.bias, c, heads)
    z = (inputs or {}).get(layer)
    outputs = output_slack = None
    if z is not None:
        z = z.detach().reshape(-1, o.in_features).clone()
        outputs, output_slack = _hooked_outputs(o.weight, o.bias, c, heads, z)
    return LayerReference(bias, bias_slack, z, outputs, output_slack)


def _rel_err(got: torch.Tensor, expected: torch.Tensor, scale: torch.Tensor, slack: torch.Tensor, unit: float) -> float:
    """max |got − expected| / (scale + slack/unit): ≤ unit iff |got − expected| ≤ unit·scale + slack everywhere."""
    err = (got.double() - expected).abs()
    return float((err / (scale + slack / unit)).max())


def _layer_errors(o: nn.Linear, ref: LayerReference, layer: int) -> tuple[float, float, float]:
    """(bias rel err, output rel err, allowed) for one merged o_proj."""
    if o.bias is None or o.bias.shape != ref.bias.shape:
        raise MergeCheckError(f"internal check failed: layer {layer}: merged o_proj has no bias of shape "
                              f"{tuple(ref.bias.shape)}")
    unit = _unit(o.bias.dtype)
    slack = ref.bias_slack + unit * torch.finfo(o.bias.dtype).tiny  # subnormal results round absolutely
    scale = ref.bias.abs()
    bias_err = _rel_err(o.bias, ref.bias, scale, slack, unit)
    out_err = 0.0
    if ref.inputs is not None:
        got = _matmul64(o.weight, ref.inputs.T).T + o.bias.double()
        # W z is computed alike on both sides, so the only allowed difference is again the bias's rounding
        # (relative to the bias), plus both float64 accumulations
        out_err = _rel_err(got, ref.outputs, scale, 2 * (slack + ref.output_slack), unit)
    return bias_err, out_err, unit


@torch.no_grad()
def check_merge(adapter: DecoderAdapter, refs: Sequence[LayerReference], layer_scope: LayerScope | None = None
                ) -> MergeCheck:
    """Compare the merged model's o_proj biases and outputs with ``refs``; raise MergeCheckError naming the layer."""
    if len(refs) != adapter.info.num_layers:
        raise MergeCheckError(f"internal check failed: the merge reference has {len(refs)} layers, "
                              f"the merged model {adapter.info.num_layers}")
    bias_max = out_max = 0.0
    allowed = 1.0
    for layer, ref in enumerate(refs):
        with _scope(layer_scope, layer):
            o = adapter.o_proj(layer)
            bias_err, out_err, unit = _layer_errors(o, ref, layer)
            dtype = str(o.bias.dtype).removeprefix("torch.")
        for what, err in (("bias", bias_err), ("output on real inputs", out_err)):
            if not err <= unit:
                raise MergeCheckError(
                    f"internal check failed: layer {layer}: the merged o_proj {what} is off by {err:.3g} relative "
                    f"to the float64 reference (original weights, fp32 head constants); allowed {unit:.3g}, "
                    f"one rounding to {dtype}"
                )
        bias_max, out_max, allowed = max(bias_max, bias_err), max(out_max, out_err), min(allowed, unit)
    return MergeCheck(bias_max, out_max, allowed)


def token_rel_tolerance(dtype: torch.dtype, layers: int = TOKEN_EPS_LAYERS) -> float:
    """Allowed merged-vs-hooked logit difference per token, relative to that token's largest |logit|.

    W(z + c) and Wz + Wc round differently, and the difference travels through every later layer: measured on
    SmolLM2-135M (30 layers, random half pruned, 20% of heads with random constants) up to 5.4 eps in
    bfloat16/float16 and 19 eps in float32 (more eps, as a float32 eps is tiny next to the model's own noise).
    Each layer adds its own rounding to what reaches it, so a deeper model (80 layers at 70B) is allowed
    proportionally more: a false failure would throw a whole job away at its end. The margin is wide: the tight
    check is :func:`check_merge`; this one catches what a forward pass adds.
    """
    eps = (TOKEN_EPS_FLOAT32 if torch.finfo(dtype).bits >= 32 else TOKEN_EPS_HALF) * torch.finfo(dtype).eps
    return eps * max(1.0, layers / TOKEN_EPS_LAYERS)


def logit_differences(hooked: torch.Tensor, merged: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    """(max |merged − hooked| over all positions, max over real tokens of that token's max |difference| divided by
    its largest |hooked logit| (at least 1)). ``hooked``/``merged``: (B, T, V); ``mask``: (B, T), nonzero = real."""
    diff = (merged.float() - hooked.float()).abs().amax(dim=-1)
    scale = hooked.float().abs().amax(dim=-1).clamp_min(1.0)
    real = mask.to(diff.device).bool()
    rel = (diff / scale)[real]
    return float(diff.max()), (float(rel.max()) if rel.numel() else 0.0)


@contextmanager
def capture_o_proj_inputs(
    adapter: DecoderAdapter, rows: int = CHECK_ROWS
) -> Iterator[dict[int, torch.Tensor]]:
    """Keep ``rows`` evenly spaced o_proj inputs per layer from the next forward, before any other pre-hook
    (so before ``inject`` adds the constants). Hooks are always removed."""
    captured: dict[int, torch.Tensor] = {}

    def make_hook(layer: int):
        def hook(_module: nn.Module, args: tuple) -> None:
            if layer not in captured:
                x = args[0].detach().reshape(-1, args[0].shape[-1])
                idx = torch.linspace(0, x.shape[0] - 1, min(rows, x.shape[0]), device=x.device).round().long()
                captured[layer] = x[idx].clone()

        return hook

    handles = []
    try:
        for layer in range(adapter.info.num_layers):
            handles.append(adapter.o_proj(layer).register_forward_pre_hook(make_hook(layer), prepend=True))
        yield captured
    finally:
        for h in handles:
            h.remove()


# ── restoration.safetensors ────────────────────────────────────────────────────────────────────


def save_restoration(
    path: str | Path,
    offsets: HeadOffsets,
    scores: torch.Tensor | Sequence[float] | None = None,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Write the learned parameters, directions, chosen heads and their scores.

    ``scores``: the full (L, H) score map (stored whole and per chosen head) or one score per chosen head.
    ``meta`` must include ``model_type`` (anything JSON-serialisable may follow).
    """
    meta = dict(meta or {})
    tensors: dict[str, torch.Tensor] = {
        "heads": torch.tensor(offsets.heads, dtype=torch.int64).reshape(-1, 2),
        "b": offsets.b.detach().float().cpu().contiguous(),
    }
    if offsets.beta is not None:
        tensors["beta"] = offsets.beta.detach().float().cpu().contiguous()
        tensors["directions"] = offsets.directions.float().cpu().contiguous()
    if scores is not None:
        s = torch.as_tensor(scores, dtype=torch.float32).cpu()
        if s.dim() == 2:
            tensors["score_map"] = s.contiguous()
            idx = torch.tensor(offsets.heads)
            s = s[idx[:, 0], idx[:, 1]]
        if s.shape != (len(offsets.heads),):
            raise ValueError(f"scores: expected (L, H) or ({len(offsets.heads)},), got {tuple(s.shape)}")
        tensors["scores"] = s.contiguous()
    header = {
        "format": "restorelcc-restoration/1",
        "mode": offsets.mode,
        "head_dim": str(offsets.head_dim),
        "num_heads": str(offsets.num_heads),
        "model_type": str(meta.pop("model_type", "")),
        "meta": json.dumps(meta, default=str),
    }
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(p), metadata=header)
    return p


def restoration_info(path: str | Path) -> dict[str, Any]:
    """Header and scores of a restoration file (no module built)."""
    with safe_open(str(path), framework="pt") as fh:
        header = fh.metadata() or {}
        keys = set(fh.keys())
        heads = fh.get_tensor("heads").tolist()
        scores = fh.get_tensor("scores").tolist() if "scores" in keys else None
    return {
        "mode": header.get("mode"),
        "head_dim": int(header["head_dim"]),
        "num_heads": int(header["num_heads"]),
        "model_type": header.get("model_type"),
        "meta": json.loads(header.get("meta") or "{}"),
        "heads": [tuple(h) for h in heads],
        "scores": scores,
    }


def load_restoration(path: str | Path) -> HeadOffsets:
    """Rebuild the HeadOffsets saved by :func:`save_restoration` (apply with ``inject`` or merge)."""
    info = restoration_info(path)
    t = load_file(str(path))
    offsets = HeadOffsets(
        info["heads"], info["num_heads"], info["head_dim"], directions=t.get("directions"), init_std=0.0
    )
    with torch.no_grad():
        offsets.b.copy_(t["b"])
        if offsets.beta is not None:
            offsets.beta.copy_(t["beta"])
    return offsets
