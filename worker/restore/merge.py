"""Fold learned head offsets into ``o_proj`` biases, and save / load the restoration parameters.

W_O (z + c) = W_O z + W_O c: per layer the bias W_O · concat_h(c_h) (zeros for unchosen heads) joins
o_proj's bias. Only biases are added; every weight stays bit-identical, so sparsity is unchanged.
The config is adjusted so that plain ``AutoModelForCausalLM.from_pretrained(dir)`` rebuilds it:

- llama, qwen3, gemma2, gemma3_text build q/k/v/o biases from ``config.attention_bias``: set it and add
  zero q/k/v biases (and zero o_proj biases on layers without chosen heads).
- mistral and qwen2 have no o_proj bias option: the model is re-expressed as ``LlamaForCausalLM`` with
  ``attention_bias=True`` (same weights and maths; Qwen2 keeps its q/k/v biases, Mistral gets zeros).
  A sliding window Llama cannot express is refused.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from worker.errors import UnsupportedModelError
from worker.model.arch import DecoderAdapter
from worker.restore.heads import HeadOffsets, check_compatible

BIAS_BY_CONFIG = ("llama", "qwen3", "gemma2", "gemma3_text")
AS_LLAMA = ("mistral", "qwen2")
_QKV = ("q_proj", "k_proj", "v_proj")
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
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
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


@torch.no_grad()
def add_o_proj_biases(adapter: DecoderAdapter, offsets: HeadOffsets) -> None:
    """In place: o_proj.bias += W_O · concat_h(c_h) on every layer with chosen heads."""
    check_compatible(adapter, offsets)
    consts = offsets.constants().detach().float()
    for layer in offsets.layers:
        o = adapter.o_proj(layer)
        vec = offsets.layer_vector(layer, consts).to(o.weight.device)
        add = o.weight.float() @ vec
        if o.bias is None:
            o.bias = nn.Parameter(add.to(o.weight.dtype), requires_grad=False)
        else:
            o.bias.copy_((o.bias.float() + add).to(o.bias.dtype))


def _as_llama(model: nn.Module) -> nn.Module:
    """A LlamaForCausalLM sharing ``model``'s tensors (biases already on every q/k/v/o_proj)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    src = model.config
    kw = {k: v for k, v in src.to_dict().items() if k not in _DROP_FOR_LLAMA}
    kw.update(attention_bias=True, mlp_bias=False)
    cfg = LlamaConfig(**kw)
    cfg.architectures = ["LlamaForCausalLM"]
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
    return new.eval()


@torch.no_grad()
def merge_into_o_proj(model: nn.Module, adapter: DecoderAdapter, offsets: HeadOffsets) -> nn.Module:
    """Merge ``offsets`` into o_proj biases; return the model to save.

    ``model`` is modified in place (biases added). The return value is ``model`` itself for
    llama/qwen3/gemma2/gemma3_text, and a LlamaForCausalLM sharing the same tensors for mistral/qwen2.
    """
    check_mergeable(model.config)
    add_o_proj_biases(adapter, offsets)
    for layer in range(adapter.info.num_layers):
        attn = adapter.attention(layer)
        for name in (*_QKV, "o_proj"):
            _zero_bias(getattr(attn, name))
    if model.config.model_type in BIAS_BY_CONFIG:
        model.config.attention_bias = True
        return model
    return _as_llama(model)


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
