"""What a plan needs from a decoder-only model's config: its layer count and widths, its vocabulary, whether the
LM head is tied to the embeddings, and the weights' dtype."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class PlanError(ValueError):
    """The config lacks what the plan needs."""


@dataclass(frozen=True)
class Shapes:
    """What the plan needs from a decoder-only config."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    dtype: str  # the checkpoint's own dtype
    qkv_bias: bool = False  # Qwen2's q/k/v biases
    norms_per_layer: int = 2  # Gemma's four
    qk_norm: bool = False  # Qwen3's and Gemma 3's per-head q/k norms
    logit_softcap: bool = False  # Gemma 2's final_logit_softcapping: tanh(logits / cap) · cap, copies of the logits
    eager_attention: bool = False  # Gemma 2: transformers attends eagerly (softcapped scores), holding seq² scores

    @classmethod
    def from_config(cls, config: dict[str, Any], stored: str | None = None) -> Shapes:
        """``stored``: the weights' own dtype (:func:`stored_dtype`), what loading picks when the config names
        none."""
        text = config.get("text_config") or config
        try:
            hidden, heads = int(text["hidden_size"]), int(text["num_attention_heads"])
            kind = str(text.get("model_type", ""))
            head_dim = int(text.get("head_dim") or hidden // heads)
            return cls(
                layers=int(text["num_hidden_layers"]), hidden=hidden, heads=heads,
                kv_heads=int(text.get("num_key_value_heads") or heads), head_dim=head_dim,
                intermediate=int(text["intermediate_size"]), vocab=int(text["vocab_size"]),
                tied=bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings",
                                                                    "gemma" in str(text.get("model_type"))))),
                dtype=str(config.get("dtype") or config.get("torch_dtype") or text.get("dtype")
                          or text.get("torch_dtype") or stored or "float32"),
                qkv_bias=bool(text.get("attention_bias", False)) or kind == "qwen2",
                norms_per_layer=4 if kind.startswith("gemma") else 2,
                qk_norm=kind in ("qwen3", "gemma3_text", "gemma3"),
                # Gemma 2's config class defaults the cap to 30 when config.json leaves it out
                logit_softcap=text.get("final_logit_softcapping", 30.0 if kind == "gemma2" else None) is not None,
                eager_attention=kind == "gemma2",
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise PlanError(f"the model's config lacks a usable {exc}") from exc

    @property
    def attn(self) -> int:
        return self.heads * self.head_dim

    def linear_shapes(self) -> list[tuple[int, int]]:
        """(out, in) of the prunable Linears of one layer."""
        h, a, kv, i = self.hidden, self.attn, self.kv_heads * self.head_dim, self.intermediate
        return [(a, h), (kv, h), (kv, h), (h, a), (i, h), (i, h), (h, i)]

    def linear_params(self) -> int:
        return self.layers * sum(o * i for o, i in self.linear_shapes())

    def layer_params(self) -> int:
        """Parameters of one decoder layer."""
        per_layer = self.norms_per_layer * self.hidden + (2 * self.head_dim if self.qk_norm else 0)
        if self.qkv_bias:
            per_layer += self.attn + 2 * self.kv_heads * self.head_dim
        return sum(o * i for o, i in self.linear_shapes()) + per_layer

    def params(self) -> int:
        return self.layers * self.layer_params() + self.resident_params()

    def resident_params(self) -> int:
        """Parameters outside the decoder layers: embeddings, LM head (unless tied), final norm."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden
