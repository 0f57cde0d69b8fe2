"""Tiny random models and a byte-level tokenizer for tests, built offline from configs."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

CORPUS = [
    "### Instruction:\nName a colour.\n\n### Response: Blue is a colour of the sky.",
    "The quick brown fox jumps over the lazy dog. Pruning removes weights from a model.",
    "Question: is water wet?\nAnswer: yes, water is wet and flows downhill to the sea.",
    "A restored model keeps every pruned zero and runs as fast as the pruned one.",
]

# kind → config kwargs. All tiny: a forward pass takes milliseconds on a CPU.
TINY_CONFIGS: dict[str, dict] = {
    # Multi-head attention: heads == kv heads, head_dim = hidden / heads.
    "llama": dict(
        model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4,
    ),
    # Grouped-query attention with an explicit head_dim ≠ hidden / heads, layers ≠ heads.
    "gqa": dict(
        model_type="llama", hidden_size=48, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=6, num_key_value_heads=2, head_dim=16,
    ),
    "mistral": dict(
        model_type="mistral", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, sliding_window=None,
    ),
    "qwen2": dict(
        model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,
    ),
    # Multi-query attention (one KV head), q/k norms, head_dim ≠ hidden / heads.
    "gemma3": dict(
        model_type="gemma3_text", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, head_dim=32, sliding_window=16,
        query_pre_attn_scalar=32,
    ),
    # Two more supported families, exercised where their differences matter (merging's config, reloading).
    "qwen3": dict(
        model_type="qwen3", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    ),
    "gemma2": dict(
        model_type="gemma2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=16, query_pre_attn_scalar=16,
    ),
    # Unsupported on purpose.
    "gpt2": dict(model_type="gpt2", n_embd=64, n_layer=2, n_head=4, n_positions=256),
}

SUPPORTED_KINDS = ("llama", "gqa", "mistral", "qwen2", "gemma3")


@lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    return tok.to_str()


def make_tokenizer() -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        eos_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        pad_token="<pad>",
    )


def make_config(kind: str, vocab_size: int = 320):
    from transformers import AutoConfig

    kw = dict(TINY_CONFIGS[kind])
    model_type = kw.pop("model_type")
    if model_type == "gpt2":
        return AutoConfig.for_model(model_type, vocab_size=vocab_size, **kw)
    return AutoConfig.for_model(
        model_type, vocab_size=vocab_size, max_position_embeddings=512, tie_word_embeddings=False,
        pad_token_id=1, bos_token_id=0, eos_token_id=0, **kw,
    )


def make_model(kind: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(make_config(kind), dtype=dtype)
    # Random init is small; widen it so heads differ measurably and pruning changes outputs.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    return model.eval()


def save_tiny(kind: str, directory: str | Path, seed: int = 0) -> Path:
    """A complete Hugging Face model directory (config, safetensors, tokenizer) for ``kind``."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    make_model(kind, seed).save_pretrained(d)
    make_tokenizer().save_pretrained(d)
    return d


def write_jsonl(path: str | Path, rows: list[dict]) -> Path:
    p = Path(path)
    p.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return p


def instruction_rows(n: int) -> list[dict]:
    topics = ["colour", "river", "planet", "number", "animal", "city", "tree", "song"]
    return [
        {
            "prompt": f"### Instruction:\nTell me about a {topics[i % len(topics)]} {i}.\n\n### Response:",
            "response": f" The {topics[(i * 3) % len(topics)]} {i} is {'big' if i % 2 else 'small'} and nice.",
        }
        for i in range(n)
    ]


def text_rows(n: int) -> list[dict]:
    return [{"text": f"{CORPUS[i % len(CORPUS)]} Sentence number {i}."} for i in range(n)]


def choice_rows(n: int) -> list[dict]:
    return [
        {"context": f"Question: is {i} even?\nAnswer:", "choices": [" no", " yes"], "label": int(i % 2 == 0)}
        for i in range(n)
    ]


def instruction_batches(n: int = 8, size: int = 4, max_len: int = 64) -> list:
    """Right-padded (prompt, response) batches of the tiny tokenizer, prompts masked out of the labels."""
    from worker.model.data import batch_pad_id, encode_pair, pad_batch

    tok = make_tokenizer()
    pad = batch_pad_id(tok)
    enc = [encode_pair(tok, r["prompt"], r["response"], max_len) for r in instruction_rows(n)]
    return [
        pad_batch([e[0] for e in enc[i : i + size]], pad, [e[1] for e in enc[i : i + size]])
        for i in range(0, n, size)
    ]


def prune_half_at_random(model, seed: int = 0):
    """Zero a seeded random half of every decoder Linear's weights in place; returns the model."""
    from worker.model.arch import DecoderAdapter

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, lin in DecoderAdapter(model).named_prunable_linears():
            lin.weight.mul_((torch.rand(lin.weight.shape, generator=g) >= 0.5).float())
    return model
