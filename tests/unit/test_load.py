"""Model resolution, preflight and loading: HF directories, GGUF files (written here), hub ids offline."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from app.schemas import JobSpec
from tests.tiny import make_model, make_tokenizer, save_tiny
from worker.errors import ModelNotFoundError, SpecError, UnsupportedModelError
from worker.model.arch import arch_info
from worker.model.load import (
    _plain_model,
    gguf_config,
    load_model,
    preflight,
    read_gguf_header,
    resolve_source,
)

IDS = torch.tensor([[0, 5, 9, 200, 31, 77, 150, 3]])


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order (rotary halves interleaved per head); transformers undoes it on load."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: Path, quant: gguf.GGMLQuantizationType | None = None, seed: int = 0,
                    name: str = "tiny-gqa", extra: dict[str, np.ndarray] | None = None):
    """A llama-architecture GGUF of tests.tiny's "gqa" model with its BPE tokenizer (``extra``: more tensors);
    returns the source model."""
    model, tok = make_model("gqa", seed), make_tokenizer()
    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(name)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(0)
    spec = json.loads(tok.backend_tokenizer.to_str())
    tokens = [""] * len(spec["model"]["vocab"])
    for t, i in spec["model"]["vocab"].items():
        tokens[i] = t
    special = {a["content"] for a in spec["added_tokens"]}
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in special else 1 for t in tokens])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    w.add_add_bos_token(False)

    def add(name: str, t: torch.Tensor | np.ndarray) -> None:
        a = t.detach().float().numpy() if isinstance(t, torch.Tensor) else t
        if quant is not None and a.ndim == 2 and a.shape[1] % 32 == 0:
            w.add_tensor(name, gguf.quants.quantize(a, quant), raw_dtype=quant)
        else:
            w.add_tensor(name, a)

    sd = model.state_dict()
    nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    for extra_name, t in (extra or {}).items():
        add(extra_name, t)
    add("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        add(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        add(f"blk.{i}.attn_q.weight", _permute(sd[p + "self_attn.q_proj.weight"].numpy(), nh))
        add(f"blk.{i}.attn_k.weight", _permute(sd[p + "self_attn.k_proj.weight"].numpy(), nkv))
        add(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        add(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        add(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        add(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        add(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        add(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    add("output_norm.weight", sd["model.norm.weight"])
    add("output.weight", sd["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model


@pytest.fixture(scope="module")
def gguf_dir(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    d = tmp_path_factory.mktemp("gguf")
    model = write_tiny_gguf(d / "tiny.gguf")
    (d / "q8").mkdir()
    write_tiny_gguf(d / "q8" / "tiny-q8.gguf", gguf.GGMLQuantizationType.Q8_0)
    return d, model


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def _spec(model_id: str, pattern: str = "unstructured") -> JobSpec:
    return JobSpec.model_validate(
        {"model": {"id": model_id}, "pruning": {"method": "magnitude", "pattern": pattern},
         "restoration": {"method": "none"}}
    )


def test_hf_dir_resolves_and_loads(tmp_path):
    d = save_tiny("llama", tmp_path / "m")
    src = resolve_source(str(d))
    assert src.kind == "hf_dir" and src.path == d and src.repo_id is None
    model, tok = load_model(src)
    assert not model.training and model.config.use_cache is False
    assert tok.pad_token == AutoTokenizer.from_pretrained(d).pad_token  # the tokenizer as the model ships it
    torch.testing.assert_close(_logits(model), _logits(make_model("llama")))
    m16, _ = load_model(src, dtype="bfloat16")
    assert m16.dtype == torch.bfloat16


def _header_only_copy(src: Path, dst: Path) -> Path:
    """The GGUF file cut where its tensor data begins: reading it proves no tensor byte is needed."""
    start = min(int(t.data_offset) for t in gguf.GGUFReader(src).tensors)
    dst.write_bytes(src.read_bytes()[:start])
    assert dst.stat().st_size < src.stat().st_size
    return dst


def test_gguf_header_reads_no_tensor_data_and_matches_transformers(gguf_dir, tmp_path):
    d, model = gguf_dir
    header_only = _header_only_copy(d / "tiny.gguf", tmp_path / "tiny.gguf")
    meta, tensors = read_gguf_header(header_only)
    cfg = gguf_config(header_only)
    assert meta["general.architecture"] == "llama" and meta["tokenizer.ggml.tokens"] == 320
    assert "output.weight" in tensors and cfg.tie_word_embeddings is False
    full = AutoConfig.from_pretrained(d, gguf_file="tiny.gguf")
    assert arch_info(cfg) == arch_info(full) == arch_info(model.config)


@pytest.mark.parametrize("how", ["file", "dir", "dir+name"])
def test_gguf_resolves(gguf_dir, how):
    d, _ = gguf_dir
    src = {
        "file": lambda: resolve_source(str(d / "tiny.gguf")),
        "dir": lambda: resolve_source(str(d / "q8")),
        "dir+name": lambda: resolve_source(str(d), gguf_file="tiny.gguf"),
    }[how]()
    assert src.kind == "gguf" and src.path.is_file() and src.path.suffix == ".gguf"


@pytest.mark.parametrize("how", ["file", "dir", "dir+name"])
def test_the_api_plans_the_gguf_the_worker_loads_as_the_worker_does(gguf_dir, how):
    """At submit the API reads the GGUF header itself (app.gguf: no torch, no transformers): the file the worker
    resolves, with the geometry and context the worker reads, so the plan it stores and routes the job by is the
    worker's own."""
    from app.plan import read_local_model, submit_plan
    from worker.run.device import plan_job

    d, _ = gguf_dir
    ref, name = {"file": (d / "tiny.gguf", None), "dir": (d / "q8", None), "dir+name": (d, "tiny.gguf")}[how]
    spec = JobSpec.model_validate({"model": {"id": str(ref), "gguf_file": name}, "data": {"train": "t.jsonl"}})
    source = resolve_source(str(ref), gguf_file=name)
    local = read_local_model(str(ref), name)
    assert local is not None and local.gguf and local.file_bytes == source.path.stat().st_size
    config = gguf_config(source.path)
    assert local.config["max_position_embeddings"] == config.max_position_embeddings
    made = submit_plan(spec, local)
    assert made is not None
    for device in ("cpu", "cuda"):
        assert made["devices"][device] == plan_job(spec, source, config, device, measure=False).to_dict()
    assert made["devices"]["cpu"]["dtype"] == "float32"  # a GGUF is dequantized to float32


def test_gguf_loads_saves_and_reloads_identically(gguf_dir, tmp_path):
    d, source_model = gguf_dir
    model, tok = load_model(resolve_source(str(d / "tiny.gguf")))
    assert model.dtype == torch.float32 and not model.training and model.config.use_cache is False
    assert tok("hello world")["input_ids"]
    # F32 GGUF: the q/k permutation round-trips exactly, so the logits are the source model's.
    torch.testing.assert_close(_logits(model), _logits(source_model), rtol=1e-5, atol=1e-5)
    model.save_pretrained(tmp_path / "out")
    tok.save_pretrained(tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in saved
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert torch.equal(_logits(again), _logits(model))


def test_quantized_gguf_state_is_cleared_for_saving(gguf_dir, tmp_path):
    d, source_model = gguf_dir
    q8 = d / "q8"
    # transformers' default GGUF load keeps its quantizer, and then refuses to save.
    raw = AutoModelForCausalLM.from_pretrained(q8, gguf_file="tiny-q8.gguf").eval()
    assert raw.hf_quantizer is not None
    with pytest.raises(ValueError, match="not serializable"):
        raw.save_pretrained(tmp_path / "refused")
    plain = _plain_model(raw).eval()
    assert getattr(plain, "hf_quantizer", None) is None
    assert getattr(plain.config, "quantization_config", None) is None
    assert torch.equal(_logits(plain), _logits(raw))
    plain.save_pretrained(tmp_path / "ok")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "ok").eval()
    assert torch.equal(_logits(again), _logits(plain))
    # Q8_0 is close to, not equal to, the float weights.
    diff = (_logits(plain) - _logits(source_model)).abs().max().item()
    assert 0 < diff < 0.1

    model, _ = load_model(resolve_source(str(q8)), dtype="bfloat16")
    assert model.dtype == torch.bfloat16 and getattr(model, "hf_quantizer", None) is None
    model.save_pretrained(tmp_path / "bf16")


@pytest.mark.parametrize("bad", ["./no/such/model", "/no/such/dir", "missing.gguf", "~/no-such-model-dir"])
def test_missing_path_is_named(bad):
    with pytest.raises(ModelNotFoundError, match="does not exist") as err:
        resolve_source(bad)
    assert bad in err.value.message and err.value.field == "model.id"


def test_dir_without_model(tmp_path):
    with pytest.raises(ModelNotFoundError, match="neither config.json nor a .gguf"):
        resolve_source(str(tmp_path))


def test_offline_unknown_hub_id(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError) as err:
        resolve_source("nobody-here/no-such-model-xyz", cache_dir=tmp_path)
    msg = err.value.message
    assert "nobody-here/no-such-model-xyz" in msg and "HF_HUB_OFFLINE" in msg and "cache" in msg


def test_offline_cached_hub_id_loads(monkeypatch, tmp_path):
    """A model in the Hugging Face cache layout resolves and loads with HF_HUB_OFFLINE set."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--tiny-org--tiny-llama"
    save_tiny("llama", repo / "snapshots" / sha)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    src = resolve_source("tiny-org/tiny-llama", cache_dir=tmp_path)
    assert src.kind == "hf_dir" and src.repo_id == "tiny-org/tiny-llama"
    assert preflight(src, _spec("tiny-org/tiny-llama")).num_heads == 4
    model, _ = load_model(src)
    torch.testing.assert_close(_logits(model), _logits(make_model("llama")))


def test_a_gguf_named_mistral_is_the_model_type_transformers_loads(tmp_path):
    """llama.cpp files Mistral under the llama architecture and transformers loads such a file as Llama: the
    header's config says the same (a Mistral config would add a sliding window the loaded model does not have, and
    the head methods would be refused for it)."""
    write_tiny_gguf(tmp_path / "m.gguf", name="Mistral-7B-Instruct-v0.3")
    loaded = AutoConfig.from_pretrained(tmp_path, gguf_file="m.gguf")
    assert gguf_config(tmp_path / "m.gguf").model_type == loaded.model_type == "llama"


def test_a_gguf_with_llama3_rope_frequencies_is_refused_by_name(tmp_path):
    """Llama 3.1+ GGUFs carry their RoPE scaling as rope_freqs.weight, which transformers' GGUF loader drops: the
    model would run with plain RoPE, wrong at every position. Refused before any weight loads, naming the tensor."""
    write_tiny_gguf(tmp_path / "m.gguf", extra={"rope_freqs.weight": np.ones(8, dtype=np.float32)})
    with pytest.raises(UnsupportedModelError) as err:
        preflight(resolve_source(str(tmp_path / "m.gguf")), _spec(str(tmp_path / "m.gguf")))
    assert "rope_freqs.weight" in err.value.message and "safetensors" in err.value.message
    assert err.value.field == "model.id"


def test_a_hub_model_loads_at_the_commit_its_config_was_read_at(monkeypatch, tmp_path):
    """The branch moving between reading the config and fetching the weights (a push to main while a job queues)
    cannot mix two versions: the source keeps the commit it resolved to, and its weights and tokenizer come from
    there; the commit also reads on as a revision of its own (what a resumed job pins)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    first, second = "1" * 40, "2" * 40
    repo = tmp_path / "models--tiny-org--tiny-llama"
    save_tiny("llama", repo / "snapshots" / first, seed=0)
    save_tiny("llama", repo / "snapshots" / second, seed=1)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(first)
    src = resolve_source("tiny-org/tiny-llama", cache_dir=tmp_path)
    assert src.commit == first and src.revision is None
    (repo / "refs" / "main").write_text(second)  # main moves on
    model, _ = load_model(src)
    torch.testing.assert_close(_logits(model), _logits(make_model("llama", seed=0)))
    assert resolve_source("tiny-org/tiny-llama", cache_dir=tmp_path).commit == second
    pinned = resolve_source("tiny-org/tiny-llama", revision=first, cache_dir=tmp_path)
    assert pinned.commit == first and pinned.path == repo / "snapshots" / first


def test_a_hub_gguf_file_in_a_folder_names_its_snapshot_commit(monkeypatch, tmp_path, gguf_dir):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    sha = "3" * 40
    repo = tmp_path / "models--tiny-org--tiny-gguf"
    (repo / "snapshots" / sha / "q8").mkdir(parents=True)
    shutil.copy(gguf_dir[0] / "q8" / "tiny-q8.gguf", repo / "snapshots" / sha / "q8" / "tiny-q8.gguf")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    src = resolve_source("tiny-org/tiny-gguf", gguf_file="q8/tiny-q8.gguf", cache_dir=tmp_path)
    assert src.kind == "gguf" and src.commit == sha


def test_a_hub_models_card_and_licence_are_fetched_and_mistrals_second_copy_is_not():
    """What a hub model's snapshot fetches: the card and licence files the export carries (README.md, LICENSE,
    USE_POLICY.md, NOTICE), never the consolidated.safetensors copy of the weights Mistral's repos add."""
    from huggingface_hub.utils import filter_repo_objects

    from worker.model.load import _HUB_IGNORED, _HUB_PATTERNS

    repo = ["config.json", "model-00001-of-00002.safetensors", "model.safetensors.index.json", "tokenizer.model",
            "README.md", "LICENSE", "USE_POLICY.md", "NOTICE", "consolidated.safetensors",
            "original/consolidated.00.pth", "params.json", "generation_config.json", "chat_template.jinja",
            "License.md", "notice.md", "Gemma_Terms_of_Use.md"]
    fetched = set(filter_repo_objects(repo, allow_patterns=_HUB_PATTERNS, ignore_patterns=_HUB_IGNORED))
    assert fetched == set(repo) - {"consolidated.safetensors", "original/consolidated.00.pth"}


def test_unsupported_architecture_fails_before_any_weight_is_read(tmp_path):
    d = save_tiny("gpt2", tmp_path / "gpt2")
    weights = list(d.glob("*.safetensors"))
    assert weights
    for f in weights:
        f.unlink()  # preflight must refuse from the config alone
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel") as err:
        preflight(resolve_source(str(d)), _spec(str(d)))
    assert "supported" in err.value.message


def test_preflight_geometry_and_nm(tmp_path, gguf_dir):
    d = save_tiny("gqa", tmp_path / "gqa")
    info = preflight(resolve_source(str(d)), _spec(str(d), "2:4"))
    assert (info.num_heads, info.num_kv_heads, info.head_dim, info.num_layers) == (6, 2, 16, 3)
    with pytest.raises(SpecError) as err:
        preflight(resolve_source(str(d)), _spec(str(d), "1:5"))
    assert err.value.field == "pruning.pattern" and "M=5" in err.value.message
    g, _ = gguf_dir
    header_only = _header_only_copy(g / "tiny.gguf", tmp_path / "tiny.gguf")
    assert preflight(resolve_source(str(header_only)), _spec("x", "2:4")) == info
