"""Architecture adapter: where the decoder layers, attention blocks and ``o_proj`` live, and head geometry.

Supported: decoder-only models whose attention output projection is a ``Linear`` named ``o_proj``
fed by the concatenated query heads (``num_attention_heads * head_dim`` inputs). The check runs on the
config alone, so an unsupported model fails before any weights load.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

# model_type → a short family note (for messages and docs).
SUPPORTED_MODEL_TYPES: dict[str, str] = {
    "llama": "Llama",
    "mistral": "Mistral",
    "qwen2": "Qwen2",
    "qwen3": "Qwen3",
    "gemma2": "Gemma 2",
    "gemma3_text": "Gemma 3 (text)",
}

# Linear modules inside one decoder layer that pruning touches, by relative name.
PRUNABLE_LINEARS: tuple[str, ...] = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


class UnsupportedArchitectureError(ValueError):
    """The model's architecture is not one this service can restore."""


def supported_summary() -> str:
    return ", ".join(f"{v} ({k})" for k, v in SUPPORTED_MODEL_TYPES.items())


@dataclass(frozen=True)
class ArchInfo:
    model_type: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    intermediate_size: int

    @property
    def total_heads(self) -> int:
        return self.num_layers * self.num_heads

    @property
    def attn_width(self) -> int:
        """Width of ``o_proj``'s input: the concatenated query heads."""
        return self.num_heads * self.head_dim

    def linear_in_features(self) -> dict[str, int]:
        """Input width of every prunable Linear in a layer (used to check N:M before loading weights)."""
        h, a, i = self.hidden_size, self.attn_width, self.intermediate_size
        return {
            "self_attn.q_proj": h,
            "self_attn.k_proj": h,
            "self_attn.v_proj": h,
            "self_attn.o_proj": a,
            "mlp.gate_proj": h,
            "mlp.up_proj": h,
            "mlp.down_proj": i,
        }


def text_config(config: Any) -> Any:
    """The text model's config (a multimodal config's ``text_config``), else the config itself."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def arch_info(config: Any) -> ArchInfo:
    """Head geometry from a transformers config; raises UnsupportedArchitectureError naming the problem."""
    cfg = text_config(config)
    model_type = getattr(cfg, "model_type", None) or "unknown"
    top_type = getattr(config, "model_type", None) or model_type
    if top_type != model_type:  # a multimodal wrapper (e.g. Gemma 3 4B+): its CausalLM is not a plain decoder
        model_type = top_type
    if model_type not in SUPPORTED_MODEL_TYPES:
        archs = getattr(config, "architectures", None) or [model_type]
        raise UnsupportedArchitectureError(
            f"unsupported architecture {archs[0]} (model_type '{model_type}'); "
            f"supported: {supported_summary()} — decoder-only models with a Linear o_proj fed by the heads"
        )
    num_heads = int(cfg.num_attention_heads)
    num_kv = int(getattr(cfg, "num_key_value_heads", None) or num_heads)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // num_heads
    if num_heads % num_kv:
        raise UnsupportedArchitectureError(
            f"num_attention_heads ({num_heads}) is not a multiple of num_key_value_heads ({num_kv})"
        )
    return ArchInfo(
        model_type=model_type,
        num_layers=int(cfg.num_hidden_layers),
        num_heads=num_heads,
        num_kv_heads=num_kv,
        head_dim=int(head_dim),
        hidden_size=int(cfg.hidden_size),
        intermediate_size=int(cfg.intermediate_size),
    )


def check_nm_fits(info: ArchInfo, m: int) -> None:
    """N:M groups run along each row's inputs, so M must divide every prunable Linear's input width."""
    bad = {name: w for name, w in info.linear_in_features().items() if w % m}
    if bad:
        name, width = next(iter(bad.items()))
        raise ValueError(
            f"pruning.pattern: M={m} does not divide the input width {width} of {name} "
            f"(and {len(bad) - 1} other module kinds)"
            if len(bad) > 1
            else f"pruning.pattern: M={m} does not divide the input width {width} of {name}"
        )


class DecoderAdapter:
    """Uniform access to a supported causal LM's decoder blocks."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.info = arch_info(model.config)
        base = getattr(model, "model", None)
        layers = getattr(base, "layers", None)
        if layers is None:
            raise UnsupportedArchitectureError(
                f"{type(model).__name__} has no model.layers; expected a *ForCausalLM decoder"
            )
        self.layers: nn.ModuleList = layers
        for idx in range(len(layers)):
            o = self.o_proj(idx)
            if not isinstance(o, nn.Linear) or o.in_features != self.info.attn_width:
                raise UnsupportedArchitectureError(
                    f"layer {idx}: self_attn.o_proj must be a Linear with {self.info.attn_width} inputs"
                )

    @property
    def base(self) -> nn.Module:
        """The decoder stack (``model.model``): embeddings, layers, final norm."""
        return self.model.model

    def attention(self, layer: int) -> nn.Module:
        return self.layers[layer].self_attn

    def o_proj(self, layer: int) -> nn.Linear:
        return self.layers[layer].self_attn.o_proj

    def prunable_linears(self, layer: int) -> dict[str, nn.Linear]:
        """Every Linear inside decoder layer ``layer``, by name relative to the layer."""
        return {
            name: mod
            for name, mod in self.layers[layer].named_modules()
            if isinstance(mod, nn.Linear)
        }

    def layer_linears(self, layer: int) -> dict[str, nn.Linear]:
        """:meth:`prunable_linears` of ``layer`` by full module name."""
        prefix = self._layers_prefix()
        return {f"{prefix}.{layer}.{name}": mod for name, mod in self.prunable_linears(layer).items()}

    def named_prunable_linears(self) -> Iterator[tuple[str, nn.Linear]]:
        """(full module name, Linear) for every Linear in every decoder layer; embeddings and lm_head excluded."""
        for idx in range(len(self.layers)):
            yield from self.layer_linears(idx).items()

    def _layers_prefix(self) -> str:
        for name, mod in self.model.named_modules():
            if mod is self.layers:
                return name
        return "model.layers"


def output_device(model: nn.Module) -> torch.device:
    """The LM head's device: where the final hidden states are when ``logits_to_keep`` picks positions from them (the
    last GPU of a model split over several, the only device otherwise). The logits come back on the input's."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return head.weight.device if head is not None else next(model.parameters()).device
