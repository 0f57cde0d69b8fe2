"""Random-weight Llama-shaped models, for measuring how cost grows with size without downloading weights.

A model is written shard by shard straight to safetensors (one tensor in memory at a time), so a 7B shape in
bfloat16 (≈13.8 GB) is built on a machine that could not hold two copies. The tokenizer is the one given
(SmolLM2's by default: vocabulary 49,152), so every shape uses the same vocabulary and the shared data.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

VOCAB = 49_152  # SmolLM2's tokenizer
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json")


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    tied: bool = True
    vocab: int = VOCAB

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def params(self) -> int:
        h, a, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        per_layer = h * a + 2 * h * kv + a * h + 3 * h * i + 2 * h
        return self.layers * per_layer + self.vocab * h * (1 if self.tied else 2) + h

    def config(self, dtype: str) -> dict[str, Any]:
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "dtype": dtype,
            "hidden_size": self.hidden, "num_hidden_layers": self.layers, "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads, "head_dim": self.head_dim, "intermediate_size": self.intermediate,
            "vocab_size": self.vocab, "tie_word_embeddings": self.tied, "hidden_act": "silu",
            "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "attention_bias": False, "mlp_bias": False,
            "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}, "initializer_range": 0.02,
            "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, "use_cache": False,
        }


SHAPES: dict[str, Shape] = {s.name: s for s in (
    Shape("tiny", 64, 2, 4, 2, 128),  # tests and a dry run of the GPU check
    Shape("135m", 576, 30, 9, 3, 1536),  # SmolLM2-135M
    Shape("0.5b", 1024, 28, 16, 8, 4096),
    Shape("1b", 2048, 16, 32, 8, 8192),  # Llama-3.2-1B's blocks
    Shape("2b", 2048, 32, 32, 8, 8192, tied=False),
    Shape("llama2-7b", 4096, 32, 32, 32, 11008, tied=False),
    Shape("llama3-8b", 4096, 32, 32, 8, 14336, tied=False),
)}


def _tensors(shape: Shape):
    """(name, shape, kind) of every tensor, in file order; kind "normal" or "ones"."""
    h, d = shape.hidden, shape.head_dim
    a, kv, i = shape.heads * d, shape.kv_heads * d, shape.intermediate
    yield "model.embed_tokens.weight", (shape.vocab, h), "normal"
    for n in range(shape.layers):
        p = f"model.layers.{n}."
        yield p + "input_layernorm.weight", (h,), "ones"
        yield p + "self_attn.q_proj.weight", (a, h), "normal"
        yield p + "self_attn.k_proj.weight", (kv, h), "normal"
        yield p + "self_attn.v_proj.weight", (kv, h), "normal"
        yield p + "self_attn.o_proj.weight", (h, a), "normal"
        yield p + "post_attention_layernorm.weight", (h,), "ones"
        yield p + "mlp.gate_proj.weight", (i, h), "normal"
        yield p + "mlp.up_proj.weight", (i, h), "normal"
        yield p + "mlp.down_proj.weight", (h, i), "normal"
    yield "model.norm.weight", (h,), "ones"
    if not shape.tied:
        yield "lm_head.weight", (shape.vocab, h), "normal"


def build(shape: Shape, out: Path, dtype: str = "bfloat16", tokenizer_dir: Path | None = None, seed: int = 0,
          shard_bytes: int = 2 * 2**30, device: str = "cpu") -> Path:
    """Write a random-weight model of ``shape`` to ``out`` (skipped when ``out`` already holds this shape). The
    weights are drawn on ``device`` (a GPU draws a 7B model in seconds) and written from the host, a tensor at a
    time; the values depend on the device's generator, not only on ``seed``."""
    import torch
    from safetensors.torch import save_file

    out = Path(out)
    stamp = {"shape": asdict(shape), "dtype": dtype, "seed": seed, "device": device}
    marker = out / "random-model.json"
    if marker.is_file() and json.loads(marker.read_text(encoding="utf-8")) == stamp:
        return out
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    torch_dtype = getattr(torch, dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    shard: dict[str, Any] = {}
    size, files, weight_map = 0, [], {}

    def flush() -> None:
        nonlocal shard, size
        if shard:
            name = f"model-{len(files) + 1:05d}.safetensors"
            save_file(shard, str(out / name), metadata={"format": "pt"})
            files.append(name)
            weight_map.update(dict.fromkeys(shard, name))
        shard, size = {}, 0

    for name, dims, kind in _tensors(shape):
        if kind == "ones":
            t = torch.ones(dims, dtype=torch_dtype)
        else:
            t = torch.empty(dims, dtype=torch.float32, device=device).normal_(0.0, 0.02, generator=gen)
            t = t.to(torch_dtype).cpu()
        nbytes = t.numel() * t.element_size()
        if size and size + nbytes > shard_bytes:
            flush()
        shard[name] = t
        size += nbytes
    flush()
    total = sum((out / f).stat().st_size for f in files)
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1), encoding="utf-8")
    (out / "config.json").write_text(json.dumps(shape.config(dtype), indent=1), encoding="utf-8")
    if tokenizer_dir is not None:
        for f in TOKENIZER_FILES:
            if (Path(tokenizer_dir) / f).is_file():
                shutil.copy(Path(tokenizer_dir) / f, out / f)
    marker.write_text(json.dumps(stamp), encoding="utf-8")
    return out
