"""A GGUF file's header — metadata and tensor names, read directly — and the model geometry it gives, in
config.json's terms. Pure Python (no torch, no gguf package): the API reads it at submit (the context check, the
plan that routes the job to a queue) and the worker before it loads any weights."""

from __future__ import annotations

import mmap
import os
import struct
from pathlib import Path
from typing import Any

from app.paths import DIR_SCAN_MAX

_FIXED = {0: "<B", 1: "<b", 7: "<?", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_SMALL_ARRAY = 256  # longer arrays (vocabularies, merges) are returned as their length only

# GGUF architecture → transformers model_type, for the families the service supports.
MODEL_TYPES = {
    "llama": "llama",
    "mistral": "mistral",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma2": "gemma2",
    "gemma3": "gemma3_text",
}


class GgufError(Exception):
    """A GGUF header that cannot be used. ``unreadable``: the file cannot be read or is no GGUF at all (else it is
    a GGUF this reader refuses: an unknown version or value type, a truncated or corrupt header)."""

    def __init__(self, message: str, unreadable: bool = False):
        super().__init__(message)
        self.message = message
        self.unreadable = unreadable


class _Corrupt(Exception):
    """Lengths that run past the end of the file."""


def read_header(path: str | Path) -> tuple[dict[str, Any], list[str]]:
    """(metadata, tensor names) of a GGUF file, reading only its header.

    Long arrays such as the vocabulary are skipped and reported as their length (a Llama-3-sized header, 128k
    tokens and 280k merges, takes about a third of a second).
    """
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
            if magic != b"GGUF":
                why = "it is empty" if not magic else "bad magic bytes"
                raise GgufError(f"{path} is not a GGUF file ({why})", unreadable=True)
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _parse(buf, path)
    except OSError as exc:
        raise GgufError(f"{path} cannot be read: {(exc.strerror or str(exc)).lower()}", unreadable=True) from exc
    except (_Corrupt, struct.error, OverflowError, RecursionError) as exc:
        raise GgufError(f"{path}: truncated or corrupt GGUF header ({exc})") from exc


def _parse(buf: mmap.mmap, path: str | Path) -> tuple[dict[str, Any], list[str]]:
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
    if version not in (2, 3):
        raise GgufError(f"{path}: GGUF version {version} is not supported (2 or 3)")
    pos = 24

    def string(pos: int) -> tuple[str, int]:
        (n,) = struct.unpack_from("<Q", buf, pos)
        pos += 8
        if pos + n > len(buf):
            raise _Corrupt(f"a string of {n} bytes at byte {pos} runs past the end of the file")
        return buf[pos : pos + n].decode("utf-8", "replace"), pos + n

    def value(kind: int, pos: int) -> tuple[Any, int]:
        if kind in _FIXED:
            fmt = _FIXED[kind]
            return struct.unpack_from(fmt, buf, pos)[0], pos + struct.calcsize(fmt)
        if kind == _STRING:
            return string(pos)
        if kind == _ARRAY:
            item, n = struct.unpack_from("<IQ", buf, pos)
            pos += 12
            if n > _SMALL_ARRAY:
                if item in _FIXED:
                    return n, pos + n * struct.calcsize(_FIXED[item])
                for _ in range(n):
                    _, pos = value(item, pos)
                return n, pos
            out = []
            for _ in range(n):
                v, pos = value(item, pos)
                out.append(v)
            return out, pos
        raise GgufError(f"{path}: unknown GGUF value type {kind}")

    meta: dict[str, Any] = {}
    for _ in range(n_kv):
        key, pos = string(pos)
        (kind,) = struct.unpack_from("<I", buf, pos)
        meta[key], pos = value(kind, pos + 4)
    names = []
    for _ in range(n_tensors):
        name, pos = string(pos)
        (dims,) = struct.unpack_from("<I", buf, pos)
        pos += 4 + 8 * dims + 12
        names.append(name)
    return meta, names


def model_type(meta: dict[str, Any]) -> tuple[str, str]:
    """(the GGUF architecture, the transformers model_type it is)."""
    arch = str(meta.get("general.architecture", "unknown"))
    return arch, MODEL_TYPES.get(arch, arch)  # a Mistral filed under llama loads as Llama in transformers too


def config_fields(meta: dict[str, Any], tensors: list[str]) -> dict[str, Any]:
    """The geometry of the header's model as config.json fields (those the header has), ``model_type`` included."""
    arch, kind = model_type(meta)

    def key(name: str, default: Any = None) -> Any:
        return meta.get(f"{arch}.{name}", default)

    fields: dict[str, Any] = {
        "model_type": kind,
        "num_hidden_layers": key("block_count"),
        "hidden_size": key("embedding_length"),
        "intermediate_size": key("feed_forward_length"),
        "num_attention_heads": key("attention.head_count"),
        "num_key_value_heads": key("attention.head_count_kv"),
        "max_position_embeddings": key("context_length"),
        "tie_word_embeddings": "output.weight" not in tensors,
    }
    head_dim = key("attention.key_length") or (key("rope.dimension_count") if arch == "llama" else None)
    if head_dim:
        fields["head_dim"] = head_dim
    vocab = key("vocab_size") or meta.get("tokenizer.ggml.tokens")
    if isinstance(vocab, list):
        vocab = len(vocab)
    if vocab:
        fields["vocab_size"] = vocab
    kv = fields["num_key_value_heads"]
    if isinstance(kv, list):  # per-layer counts in some files
        counts = [c for c in kv if isinstance(c, int) and not isinstance(c, bool)]
        fields["num_key_value_heads"] = max(counts) if counts else None
    return {k: v for k, v in fields.items() if v is not None}


def local_gguf(path: str, gguf_file: str | None) -> Path | None:
    """The GGUF file a local model reference names, by the worker's rules (a file, which the spec names as a
    ``.gguf``; a directory and ``model.gguf_file``; a directory without config.json holding exactly one ``.gguf``);
    None when it names none or the directory cannot be listed here."""
    p = Path(path)
    try:
        if p.is_file():  # named as a .gguf (app.paths); a link's target may have no suffix (the hub cache's blobs)
            return p
        if not p.is_dir():
            return None
        if gguf_file:
            return p / gguf_file if (p / gguf_file).is_file() else None
        if (p / "config.json").is_file() or (p / "config.json").is_symlink():
            return None  # a Hugging Face directory (a dangling config.json the worker refuses)
        found: list[Path] = []
        with os.scandir(p) as entries:
            for i, entry in enumerate(entries):
                if i >= DIR_SCAN_MAX or len(found) > 1:
                    return None
                if entry.name.endswith(".gguf") and entry.is_file():
                    found.append(Path(entry.path))
    except OSError:
        return None
    return found[0] if len(found) == 1 else None
