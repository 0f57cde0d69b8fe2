"""Find, check and load a model: a local Hugging Face directory, a local ``.gguf`` file, or a hub id.

``resolve_source`` and ``preflight`` never read weights (a GGUF's geometry comes from its header,
parsed directly), so a missing or unsupported model fails in well under a second. ``load_model``
returns a plain transformers model: a GGUF is dequantized into ordinary Linear layers, so the
result saves with ``save_pretrained`` and reloads with ``from_pretrained``.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

from app import gguf as gguf_header
from app.fields import looks_local
from app.schemas import JobSpec
from worker.errors import (
    MISSING,
    ModelNotFoundError,
    SpecError,
    TransientError,
    UnsupportedModelError,
    is_out_of_memory,
    path_problem,
)
from worker.model.arch import ArchInfo, UnsupportedArchitectureError, arch_info, check_nm_fits

SourceKind = Literal["hf_dir", "gguf"]
DtypeName = Literal["auto", "float32", "bfloat16", "float16"]

# Files fetched from the hub for a Hugging Face model (weights in safetensors; .bin only as a fallback).
# A hub model's files a job reads: config, weights, tokenizer, chat template, and its card and licence files (the
# exported model's card and licence come from them)
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken", "README.md",
                 # worker.run.model_card.is_licence_file's names, in any case
                 "[Ll][Ii][Cc][Ee][Nn][SsCc][Ee]*", "[Nn][Oo][Tt][Ii][Cc][Ee]*",
                 "[Uu][Ss][Ee]_[Pp][Oo][Ll][Ii][Cc][Yy]*", "*[Tt][Ee][Rr][Mm][Ss]*"]
_TOKENIZER_PATTERNS = ["*.json", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
# Mistral's own format ships beside the transformers weights a second whole copy, never read here
_HUB_IGNORED = ["consolidated*.safetensors"]


@dataclass(frozen=True)
class ModelSource:
    """Where a model lives. ``path`` is a directory (``hf_dir``) or the ``.gguf`` file itself (``gguf``).

    For a hub id, ``path`` is the snapshot directory in the local Hugging Face cache (weights may
    still be missing there until ``load_model`` fetches them), ``repo_id`` is set and ``commit`` is the commit
    ``revision`` resolved to when the config was read: the weights and tokenizer are fetched at that commit, so a
    branch that moves meanwhile cannot mix two versions. ``field`` is the spec field it came from ("model.id" or
    "model.dense"), named by every failure to read or load it.
    """

    model_id: str
    kind: SourceKind
    path: Path
    repo_id: str | None = None
    revision: str | None = None
    field: str = dataclass_field(default="model.id", compare=False, repr=False)
    commit: str | None = None

    @property
    def name(self) -> str:
        return self.model_id


# ---------------------------------------------------------------------------------------------
# resolution


def _offline() -> bool:
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().lower()
    return flag in ("1", "true", "yes", "on") or bool(constants.HF_HUB_OFFLINE)


def _local_source(model_id: str, path: Path, gguf_file: str | None, field: str) -> ModelSource:
    """The model in ``path``, which exists and is a regular file or a directory."""
    gguf_field = "model.gguf_file" if field == "model.id" else field  # model.gguf_file applies to model.id only
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelNotFoundError(f"model file {model_id} is not a .gguf file", field=field)
        return ModelSource(model_id, "gguf", path, field=field)
    if gguf_file:
        f = path / gguf_file
        problem = path_problem(f, "file")
        if problem:
            raise ModelNotFoundError(f"GGUF file {gguf_file} in {model_id} {problem}", field=gguf_field)
        return ModelSource(model_id, "gguf", f, field=field)
    problem = path_problem(path / "config.json", "file")
    if problem is None:
        return ModelSource(model_id, "hf_dir", path, field=field)
    if problem != MISSING:
        raise ModelNotFoundError(f"config.json in {model_id} {problem}", field=field)
    ggufs = [g for g in sorted(path.glob("*.gguf")) if path_problem(g, "file") is None]  # never open a FIFO
    if len(ggufs) == 1:
        return ModelSource(model_id, "gguf", ggufs[0], field=field)
    if ggufs:
        names = ", ".join(g.name for g in ggufs[:5])
        raise ModelNotFoundError(
            f"{model_id} holds several .gguf files ({names}); name one with model.gguf_file", field=gguf_field
        )
    raise ModelNotFoundError(
        f"{model_id} is a directory with neither config.json nor a .gguf file", field=field
    )


def _hub_source(repo_id: str, revision: str | None, gguf_file: str | None,
                cache_dir: str | Path | None, field: str = "model.id") -> ModelSource:
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    filename = gguf_file or "config.json"
    name_field = "model.gguf_file" if gguf_file else field
    try:
        cached = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir, revision=revision)
    except HFValidationError as exc:
        raise ModelNotFoundError(
            f"model {repo_id} is neither an existing local path nor a valid hub id ({exc})", field=field
        ) from exc
    except ValueError as exc:  # a file name the hub refuses, such as "../x.gguf"
        raise ModelNotFoundError(f"{filename} is not a valid file name in {repo_id} ({exc})", name_field) from exc
    if isinstance(cached, str):
        return _hub_file_source(repo_id, Path(cached), gguf_file, revision, field)
    if _offline():
        what = f"{repo_id} ({gguf_file})" if gguf_file else repo_id
        if revision and isinstance(try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir), str):
            raise ModelNotFoundError(
                f"revision {revision} of {what} is not in the local Hugging Face cache (other revisions are) and "
                "HF_HUB_OFFLINE is set", field="model.revision"
            )
        raise ModelNotFoundError(
            f"model {what} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set", field=field
        )
    try:
        got = hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir)
    except GatedRepoError as exc:
        raise ModelNotFoundError(f"model {repo_id} is gated: log in and accept its licence", field) from exc
    except RepositoryNotFoundError as exc:
        raise ModelNotFoundError(f"model {repo_id} not found on the Hugging Face Hub", field) from exc
    except RevisionNotFoundError as exc:
        raise ModelNotFoundError(f"revision {revision} of {repo_id} not found", "model.revision") from exc
    except EntryNotFoundError as exc:
        raise ModelNotFoundError(f"{repo_id} has no {filename}", name_field) from exc
    except (LocalEntryNotFoundError, OSError) as exc:
        raise TransientError(f"could not reach the Hugging Face Hub for {repo_id}: {exc}") from exc
    except ValueError as exc:  # a repo id, revision or file name the hub client refuses
        raise ModelNotFoundError(f"{repo_id}: {exc}", name_field) from exc
    return _hub_file_source(repo_id, Path(got), gguf_file, revision, field)


def _hub_file_source(repo_id: str, file: Path, gguf_file: str | None, revision: str | None,
                     field: str = "model.id") -> ModelSource:
    """The source of hub file ``file`` (``<cache>/models--org--name/snapshots/<commit>/<name>``)."""
    name = gguf_file or "config.json"
    commit = file.parents[len(Path(name).parts) - 1].name  # the snapshot directory is named by its commit
    if gguf_file:
        return ModelSource(repo_id, "gguf", file, repo_id, revision, field=field, commit=commit)
    return ModelSource(repo_id, "hf_dir", file.parent, repo_id, revision, field=field, commit=commit)


def resolve_source(model_id: str, revision: str | None = None, gguf_file: str | None = None,
                   cache_dir: str | Path | None = None, field: str = "model.id") -> ModelSource:
    """Where ``model_id`` lives, without loading weights. Raises ModelNotFoundError naming the id or path,
    and ``field`` (the spec field ``model_id`` came from), or model.gguf_file / model.revision when at fault.

    A hub id is looked up in the local Hugging Face cache first; only ``config.json`` (or the named
    GGUF file) is fetched here, the weights are fetched by ``load_model``.
    """
    model_id = model_id.strip()
    if looks_local(model_id):
        path = Path(os.path.expanduser(model_id))  # unlike Path.expanduser, leaves "~nobody/x" as it is
        problem = path_problem(path, "any")
        if problem:
            raise ModelNotFoundError(f"model path {model_id} {problem}", field=field)
        return _local_source(model_id, path, gguf_file, field)
    return _hub_source(model_id, revision, gguf_file, cache_dir, field)


# ---------------------------------------------------------------------------------------------
# GGUF header (metadata only)


def read_gguf_header(path: str | Path, field: str = "model.id") -> tuple[dict[str, Any], list[str]]:
    """(metadata, tensor names) of a GGUF file, reading only its header (app.gguf). A file that cannot be read or
    is no GGUF raises ModelNotFoundError; a GGUF the reader refuses UnsupportedModelError (both naming ``field``).
    """
    try:
        return gguf_header.read_header(path)
    except gguf_header.GgufError as exc:
        raise (ModelNotFoundError if exc.unreadable else UnsupportedModelError)(exc.message, field) from exc


def _config_errors() -> tuple[type[Exception], ...]:
    """What transformers raises for config values it refuses (a strict-dataclass error in recent versions)."""
    try:
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:
        return (TypeError, ValueError)
    return (TypeError, ValueError, StrictDataclassError)


def _transformers_config(model_type: str, fields: dict[str, Any]) -> Any:
    from transformers import CONFIG_MAPPING, AutoConfig, PretrainedConfig

    if model_type in CONFIG_MAPPING:
        return AutoConfig.for_model(model_type, **fields)
    config = PretrainedConfig(**fields)  # a model_type transformers does not know: still report it by name
    config.model_type = model_type
    return config


def gguf_config(path: str | Path, field: str = "model.id") -> Any:
    """A transformers config with the model's geometry, from the GGUF header alone.

    Enough for the architecture and N:M checks; ``load_model`` returns the complete config that
    transformers builds from the file (which parses the whole vocabulary and takes seconds).
    """
    meta, tensors = read_gguf_header(path, field)
    arch, model_type = gguf_header.model_type(meta)
    if "rope_freqs.weight" in tensors:
        raise UnsupportedModelError(
            f"{path}: the GGUF scales its RoPE with a rope_freqs.weight tensor (Llama 3.1 and later), which "
            "transformers' GGUF loader drops: the model would run with plain RoPE; give the model's safetensors "
            "checkpoint (a Hugging Face directory or hub id) instead", field)
    try:
        fields = {k: v for k, v in gguf_header.config_fields(meta, tensors).items() if k != "model_type"}
        config = _transformers_config(model_type, fields)
    except _config_errors() as exc:
        raise UnsupportedModelError(f"{path}: the GGUF metadata is not a valid {model_type} geometry "
                                    f"({_first_lines(exc)})", field) from exc
    if model_type not in gguf_header.MODEL_TYPES.values():
        config.architectures = [f"{arch} (GGUF)"]
    return config


# ---------------------------------------------------------------------------------------------
# config and preflight


def load_config(source: ModelSource) -> Any:
    """The model's transformers config, without weights (for GGUF: the geometry from the header)."""
    if source.kind == "gguf":
        return gguf_config(source.path, source.field)
    # config.json read directly: the geometry is all preflight needs, and importing transformers would
    # cost seconds before a bad spec or an unsupported model could be refused.
    try:
        data = (Path(source.path) / "config.json").read_bytes()
    except OSError as exc:
        raise ModelNotFoundError(f"the config.json of {source.model_id} cannot be read: {exc}", source.field) from exc
    try:
        raw = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # not UTF-8, not JSON
        raise UnsupportedModelError(f"cannot read the config of {source.model_id}: {exc}", source.field) from exc
    if not isinstance(raw, dict):
        raise UnsupportedModelError(f"cannot read the config of {source.model_id}: not a JSON object", source.field)
    return SimpleNamespace(**raw)


def transformers_config(config: Any) -> Any:
    """``config`` as transformers builds it, with the defaults its class fills in (a config.json read directly lacks
    them: a Mistral file without ``sliding_window`` has transformers' 4096)."""
    if not isinstance(config, SimpleNamespace):
        return config
    fields = {k: v for k, v in vars(config).items() if k != "model_type"}
    try:
        return _transformers_config(config.model_type, fields)
    except _config_errors() as exc:
        raise UnsupportedModelError(f"the model's config is not a valid {config.model_type} config "
                                    f"({_first_lines(exc)})") from exc


def preflight(source: ModelSource, spec: JobSpec) -> ArchInfo:
    """Check the architecture and the pruning pattern against the config only (no weights)."""
    return checked_config(source, spec)[0]


def checked_config(source: ModelSource, spec: JobSpec) -> tuple[ArchInfo, Any]:
    """:func:`preflight`'s checks; returns the geometry and the transformers config they were read from."""
    config = load_config(source)
    try:
        info = arch_info(config)
    except UnsupportedArchitectureError as exc:
        raise UnsupportedModelError(f"{source.model_id}: {exc}", field=source.field) from exc
    except (AttributeError, TypeError, ValueError, ArithmeticError) as exc:  # keys missing, or of the wrong type
        raise UnsupportedModelError(
            f"{source.model_id}: the config's geometry is missing or invalid ({type(exc).__name__}: {exc})",
            field=source.field,
        ) from exc
    nm = spec.pruning.nm
    if nm is not None and spec.pruning.method != "none":
        try:
            check_nm_fits(info, nm[1])
        except ValueError as exc:
            raise SpecError(str(exc), field="pruning.pattern") from exc
    return info, config


# ---------------------------------------------------------------------------------------------
# loading

_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def _torch_dtype(name: str) -> Any:
    import torch

    return getattr(torch, _DTYPES[name])


def _ensure_hub_weights(source: ModelSource) -> Path:
    """Fetch a hub model's weights into the cache (or find them there when offline)."""
    got = _hub_snapshot(source, _HUB_PATTERNS, "weights")
    if not any(got.glob("*.safetensors")):
        got = _hub_snapshot(source, [*_HUB_PATTERNS, "*.bin"], "weights")
    return got


def _hub_snapshot(source: ModelSource, patterns: list[str], what: str) -> Path:
    """The files of a hub model matching ``patterns``, fetched into the cache (or found there when offline)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    offline = _offline()
    cache_dir = source.path.parent.parent.parent  # <cache>/models--org--name/snapshots/<sha>
    try:
        return Path(snapshot_download(source.repo_id, revision=source.commit or source.revision,
                                      cache_dir=cache_dir, allow_patterns=patterns, ignore_patterns=_HUB_IGNORED,
                                      local_files_only=offline))
    except LocalEntryNotFoundError as exc:
        if offline:
            raise ModelNotFoundError(
                f"the {what} of {source.repo_id} are not in the local Hugging Face cache and HF_HUB_OFFLINE is set",
                field=source.field,
            ) from exc
        raise TransientError(f"could not fetch {source.repo_id} from the Hugging Face Hub: {exc}") from exc


def _plain_model(model: Any, field: str = "model.id") -> Any:
    """A model that ``save_pretrained`` accepts and ``from_pretrained`` reloads with no GGUF file.

    transformers refuses to save a model that still carries its GGUF quantizer ("The model is
    quantized with gguf and is not serializable") and would write ``quantization_config`` into
    config.json. When any of that state is present, rebuild a fresh model of the same class from a
    clean config and move the (already dequantized) tensors into it without copying.
    """
    import torch

    config = model.config
    if getattr(model, "hf_quantizer", None) is None and getattr(config, "quantization_config", None) is None:
        return model
    packed = [n for n, m in model.named_modules() if "gguf" in type(m).__name__.lower()]
    if packed:
        raise UnsupportedModelError(f"GGUF weights were left packed ({packed[0]}, ...); cannot dequantize", field)
    clean = config.__class__.from_dict({k: v for k, v in config.to_dict().items() if k != "quantization_config"})
    state = model.state_dict()
    with torch.device("meta"):
        fresh = type(model)(clean)
    fresh.load_state_dict(state, assign=True, strict=True)
    old_buffers = dict(model.named_buffers())
    for name, _ in list(fresh.named_buffers()):
        owner_name, _, attr = name.rpartition(".")
        owner = fresh.get_submodule(owner_name) if owner_name else fresh
        src = old_buffers[name]
        persistent = attr not in getattr(owner, "_non_persistent_buffers_set", set())
        owner.register_buffer(attr, src, persistent=persistent)
    fresh.tie_weights()
    if getattr(model, "generation_config", None) is not None:
        fresh.generation_config = model.generation_config
    return fresh


def _load_errors() -> tuple[type[Exception], ...]:
    """What reading a model's files raises when they are corrupt, truncated or inconsistent (besides OSError)."""
    errors: tuple[type[Exception], ...] = (*_config_errors(), RuntimeError, struct.error, EOFError)
    try:
        from safetensors import SafetensorError
    except ImportError:
        return errors
    return (*errors, SafetensorError)


@contextmanager
def _reading(source: ModelSource, what: str) -> Iterator[None]:
    """transformers reading the user's files for ``what`` ("weights", "tokenizer"): a file it cannot open is
    ModelNotFoundError, one it cannot use UnsupportedModelError, both naming the source's field. Running out
    of memory stays out of memory, and other exceptions (bugs, here or in transformers) stay internal."""
    try:
        yield
    except OSError as exc:
        raise ModelNotFoundError(f"{source.model_id}: cannot read its {what}: {_first_lines(exc)}",
                                 source.field) from exc
    except _load_errors() as exc:
        if is_out_of_memory(exc):
            raise
        raise UnsupportedModelError(f"{source.model_id}: cannot load its {what}: {type(exc).__name__}: "
                                    f"{_first_lines(exc)}", source.field) from exc


def _first_lines(exc: BaseException, limit: int = 600) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_model(source: ModelSource, dtype: DtypeName = "auto", device: str = "cpu",
               device_map: dict[str, str] | None = None) -> tuple[Any, Any]:
    """(model, tokenizer): model in eval mode with ``use_cache`` off; the tokenizer as the model ships it.
    ``device_map``: the model split over several GPUs (worker.model.placement), each module loaded straight onto
    its own.

    ``dtype='auto'`` keeps a checkpoint's own dtype; a GGUF is dequantized to float32 for 'auto'.
    Files that cannot be read or used fail as ModelNotFoundError / UnsupportedModelError naming ``source.field``.
    """
    from transformers import AutoModelForCausalLM

    if source.kind == "gguf":
        kwargs: dict[str, Any] = {"gguf_file": source.path.name}
        try:
            from transformers import GgufConfig

            kwargs["quantization_config"] = GgufConfig(dequantize=True)
        except ImportError:  # older transformers always dequantize
            pass
        torch_dtype = _torch_dtype("float32" if dtype == "auto" else dtype)
        with _reading(source, "weights"):
            model = AutoModelForCausalLM.from_pretrained(source.path.parent, dtype=torch_dtype, **kwargs)
        model = _plain_model(model, source.field)
        if device_map:  # dequantized on the host, then spread over the GPUs
            from accelerate import dispatch_model

            model = dispatch_model(model, device_map)
        tokenizer = load_tokenizer(source)
    else:
        path = _ensure_hub_weights(source) if source.repo_id else source.path
        with _reading(source, "weights"):
            # On an accelerator the weights go straight there: the host never holds a second copy.
            placed = {"device_map": device_map} if device_map else {} if device == "cpu" else {"device_map": device}
            model = AutoModelForCausalLM.from_pretrained(path, dtype="auto" if dtype == "auto" else _torch_dtype(dtype),
                                                         **placed)
        tokenizer = load_tokenizer(source, path)
    model.config.use_cache = False
    if not device_map:
        model.to(device)
    model.eval()
    return model, tokenizer


def load_streamed_model(source: ModelSource, dtype: DtypeName, device: str, scratch: Path) -> tuple[Any, Any, Any]:
    """(model, tokenizer, LayerStore): the model with its decoder layers left in their safetensors files, read one
    at a time as computations need them (worker.model.streaming); changed layers go to ``scratch``."""
    import torch

    from worker.model.streaming import load_streamed

    if source.kind == "gguf":
        raise UnsupportedModelError(f"{source.model_id}: a GGUF model cannot be streamed", source.field)
    path = _ensure_hub_weights(source) if source.repo_id else source.path
    if dtype == "auto":  # what from_pretrained(dtype="auto") picks: the config's, else the weights' own
        config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
        text = config.get("text_config") or {}
        name = config.get("dtype") or config.get("torch_dtype") or text.get("dtype") or text.get("torch_dtype")
        torch_dtype = getattr(torch, _DTYPES[name]) if name in _DTYPES else _stored_dtype(Path(path))
    else:
        torch_dtype = _torch_dtype(dtype)
    with _reading(source, "weights"):
        model, store = load_streamed(Path(path), torch_dtype, device, scratch)
    return model, load_tokenizer(source, Path(path)), store


def load_tokenizer(source: ModelSource, path: Path | None = None) -> Any:
    """The tokenizer as the model ships it. ``path``: the model's directory when the caller has it (else a hub
    model's tokenizer files, and only those, are fetched here)."""
    from transformers import AutoTokenizer

    with _reading(source, "tokenizer"):
        if source.kind == "gguf":
            return AutoTokenizer.from_pretrained(source.path.parent, gguf_file=source.path.name)
        if path is None:
            path = _hub_snapshot(source, _TOKENIZER_PATTERNS, "tokenizer files") if source.repo_id else source.path
        return AutoTokenizer.from_pretrained(path)


def vocabulary_difference(tokenizer: Any, other: Any, names: tuple[str, str] = ("model.id", "model.dense")
                          ) -> str | None:
    """How ``other`` maps tokens to ids differently from ``tokenizer`` (one example), or None when they agree: a
    model's logits over one vocabulary are no targets for a model that reads ids in the other. ``names``: what the
    message calls the two."""
    mine, theirs = tokenizer.get_vocab(), other.get_vocab()
    if mine == theirs:
        return None
    sizes = f"{len(mine)} tokens in {names[0]}'s, {len(theirs)} in {names[1]}'s"
    for token, i in sorted(mine.items(), key=lambda kv: kv[1]):
        if theirs.get(token) != i:
            there = theirs.get(token)
            return (f"token {token!r} is id {i} in {names[0]}'s and "
                    + ("missing" if there is None else f"id {there}") + f" in {names[1]}'s ({sizes})")
    extra = min((i, t) for t, i in theirs.items() if t not in mine)
    return f"token {extra[1]!r} (id {extra[0]}) is only in {names[1]}'s ({sizes})"


def _stored_dtype(model_dir: Path) -> Any:
    """The torch dtype of the first floating-point weight stored in ``model_dir``'s safetensors (app.plan)."""
    import torch

    from app.plan import stored_dtype

    return getattr(torch, stored_dtype(model_dir) or "float32")
