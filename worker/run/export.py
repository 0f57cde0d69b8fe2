"""Writing results: the Hugging Face model directory and the pictures in the report folder."""

from __future__ import annotations

import functools
import json
import logging
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger("restorelcc.export")

_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}
MAX_SHARD_SIZE = "50GB"  # transformers 5's save_pretrained default, passed to it too: every export path shards alike


def export_model(model: Any, tokenizer: Any, directory: Path, dtype: str = "auto",
                 max_shard_size: int | str = MAX_SHARD_SIZE) -> Path:
    """Save ``model`` (safetensors) and ``tokenizer`` so plain ``from_pretrained(directory)`` loads them.

    A requested dtype is applied to the saved tensors only (the live model is not converted), one tensor at a time
    on the host: a cast copy of the whole model would need a second model's memory on its device(s). The saved
    config turns the KV cache back on, as generation elsewhere expects.
    """
    import torch

    directory.mkdir(parents=True, exist_ok=True)
    original = next(model.parameters()).dtype
    target = getattr(torch, _DTYPES[dtype]) if dtype in _DTYPES else original
    if target == original:
        with _saving(model.config, target):
            model.save_pretrained(directory, safe_serialization=True, max_shard_size=max_shard_size)
    else:
        model.config.architectures = [type(model).__name__]  # as save_pretrained records it
        _write_model(model, model.config, directory, target, lambda name, t: (lambda: t), max_shard_size)
    tokenizer.save_pretrained(directory)
    return directory


@contextmanager
def _saving(config: Any, dtype: Any) -> Iterator[None]:
    """``config`` as a saved model has it: the KV cache on (generation expects it) and ``dtype``; restored after."""
    saved_flags = (config.use_cache, getattr(config, "dtype", None))
    try:
        config.use_cache = True
        config.dtype = dtype
        yield
    finally:
        config.use_cache, config.dtype = saved_flags


def export_streamed(model: Any, store: Any, tokenizer: Any, directory: Path, dtype: str = "auto",
                    config: Any = None, max_shard_size: int | str = MAX_SHARD_SIZE) -> Path:
    """:func:`export_model` for a layer-streamed model (worker.model.streaming): the same tensors, byte for byte,
    and the same config and generation config, written one tensor at a time from the layers' files (sharded, a
    tensor may fall in another shard than save_pretrained puts it; the index says where). ``config``: the one to
    save (default the model's)."""
    import torch

    directory.mkdir(parents=True, exist_ok=True)
    target = getattr(torch, _DTYPES[dtype]) if dtype in _DTYPES else store.dtype
    layer_names = {name for i in range(len(store.adapter.layers)) for name in store.names(i)}

    def source(name: str, t: Any) -> Any:
        return functools.partial(store.state_tensor, name) if name in layer_names else (lambda: t)

    _write_model(model, config if config is not None else model.config, directory, target, source, max_shard_size)
    tokenizer.save_pretrained(directory)
    return directory


def _write_model(model: Any, config: Any, directory: Path, target: Any, source: Any,
                 max_shard_size: int | str = MAX_SHARD_SIZE) -> None:
    """The files ``save_pretrained`` writes (the safetensors files, sharded as it shards them with an index beside
    them, the config, the generation config), each tensor read by ``source(name, tensor)()`` only when its turn
    comes, cast to ``target`` (floating point) on the host."""
    import torch
    from huggingface_hub import split_torch_state_dict_into_shards

    from worker.model.arch import text_config
    from worker.model.safetensors_stream import Entry, write_safetensors

    text = text_config(config)
    tied = bool(getattr(text, "tie_word_embeddings", False) or getattr(config, "tie_word_embeddings", False))
    entries = []
    for name, t in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        cast = target if t.is_floating_point() else t.dtype
        entries.append(Entry(name, cast, tuple(t.shape), functools.partial(_cast, source(name, t), cast)))
    split = split_torch_state_dict_into_shards(
        {e.name: torch.empty(e.shape, dtype=e.dtype, device="meta") for e in entries},
        filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size)
    by_name = {e.name: e for e in entries}
    for filename, names in split.filename_to_tensors.items():
        write_safetensors(directory / filename, [by_name[n] for n in names], {"format": "pt"})
    if split.is_sharded:
        params = sum(torch.Size(e.shape).numel() for e in entries)
        index = {"metadata": {"total_parameters": params, **split.metadata}, "weight_map": split.tensor_to_filename}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n",
                                                               encoding="utf-8")
    with _saving(config, target):
        config.save_pretrained(directory)
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(directory)


def copy_files(source: Path, directory: Path, names: Iterable[str], keep: bool = False) -> list[str]:
    """Copy the regular files ``names`` of ``source`` into ``directory`` (``keep``: not over one it holds already),
    leaving out any that cannot be read or written (logged); returns the names copied."""
    from worker.errors import path_problem

    copied = []
    for name in names:
        if path_problem(source / name, "file") is not None or (keep and (directory / name).exists()):
            continue
        try:
            shutil.copyfile(source / name, directory / name)
        except OSError as exc:  # unreadable, or no room: the export is whole without it
            log.warning("%s not copied into the export: %s", name, exc)
            continue
        copied.append(name)
    return copied


def copy_tokenizer_files(source: Path, directory: Path) -> list[str]:
    """Copy into ``directory`` the tokenizer files of the model in ``source`` that ``save_pretrained`` does not write
    (SentencePiece's tokenizer.model, a tiktoken vocabulary): transformers loads the export without them, tools such as
    llama.cpp's converter read them. Returns the names copied."""
    names = [f.name for pattern in ("tokenizer.model", "*.tiktoken") for f in sorted(source.glob(pattern))]
    return copy_files(source, directory, names, keep=True)  # never over a file the export wrote


def _cast(read: Any, dtype: Any) -> Any:
    return read().detach().to("cpu").to(dtype)


def reload_problem(directory: Path) -> str | None:
    """What plain ``from_pretrained`` would not load of the saved model, or None: built from the saved config.json
    (on the meta device: no memory), the model must have a place for every saved tensor and find every tensor it
    has. A merged o_proj bias whose config does not ask for one would otherwise be dropped at load, without an
    error, and the restoration with it."""
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    saved: set[str] = set()
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as fh:
            saved.update(fh.keys())
    config = AutoConfig.from_pretrained(directory)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    persistent = set(skeleton.state_dict())
    expected = dict(skeleton.named_parameters())  # tied weights once, under the name saved
    expected.update((n, b) for n, b in skeleton.named_buffers() if n in persistent)
    unplaced = sorted(saved - persistent)
    if unplaced:
        return f"{len(unplaced)} saved tensor(s) have no place in the model config.json describes (e.g. {unplaced[0]})"
    missing = sorted(set(expected) - saved)
    if missing:
        return f"{len(missing)} tensor(s) of the model config.json describes are not saved (e.g. {missing[0]})"
    return None


def write_plots(report: dict[str, Any], out_dir: Path) -> list[Path]:
    """A loss curve and a head-score heat map when the report has them; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[Path] = []
    restoration = report.get("restoration") or {}
    curve = restoration.get("loss_curve")
    if curve:
        fig, ax = plt.subplots(figsize=(6, 3.2))
        ax.plot(range(1, len(curve) + 1), curve, lw=1.5)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("response loss")
        ax.set_title(f"training loss ({restoration.get('method', '')})")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = out_dir / "loss_curve.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    scores = restoration.get("head_scores")
    if scores:
        fig, ax = plt.subplots(figsize=(6, max(2.5, 0.14 * len(scores))))
        im = ax.imshow(scores, aspect="auto", cmap="viridis")
        chosen = restoration.get("chosen_heads") or []
        if chosen:
            ax.scatter([h for _, h in chosen], [lyr for lyr, _ in chosen], marker="s", s=12,
                       facecolors="none", edgecolors="red", linewidths=0.8, label="chosen")
            ax.legend(loc="upper right", fontsize=7)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_title("probe accuracy per head")
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        path = out_dir / "head_scores.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
