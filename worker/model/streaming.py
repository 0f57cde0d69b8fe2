"""Layer streaming: a model whose decoder layers stay in their safetensors files until a computation needs them.

The embeddings, final norm and LM head are loaded; every decoder layer's parameters are placeholders (meta tensors)
until the layer is called. A forward pre-hook reads the layer's tensors from their file (memory-mapped by
safetensors: the page cache holds them, not the process) onto the compute device, and a forward hook drops them
again, so one layer at a time occupies memory — on the host for a CPU job, on the device for a GPU one. A layer
whose weights a stage changes (pruning, merging) is held with :meth:`LayerStore.resident` and written to a scratch
file when released; from then on that file is where the layer is read from.

Training needs nothing more: with per-layer activation checkpointing the forward keeps only each layer's input,
and the backward recomputes each layer from it — the pre-hook brings the layer back for the recomputation. The
trained parameters (per-head constants, adapters) live outside the streamed weights and stay resident.

Every number is the one the whole model computes: the same kernels run on the same tensors, one layer at a time.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from worker.model.arch import DecoderAdapter


def weight_files(model_dir: Path) -> dict[str, Path]:
    """Tensor name → the safetensors file that holds it (a single file or an index of shards)."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return {name: model_dir / file for name, file in weight_map.items()}
    from safetensors import safe_open

    single = model_dir / "model.safetensors"
    with safe_open(str(single), framework="pt") as fh:
        return dict.fromkeys(fh.keys(), single)  # noqa: SIM118 (safe_open is not a mapping)


def _read(files: dict[str, Path], names: list[str]) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    by_file: dict[Path, list[str]] = {}
    for name in names:
        by_file.setdefault(files[name], []).append(name)
    out: dict[str, torch.Tensor] = {}
    for file, keys in by_file.items():
        with safe_open(str(file), framework="pt") as fh:
            for key in keys:
                out[key] = fh.get_tensor(key)
    return out


class LayerStore:
    """Where each decoder layer's tensors are, and the hooks that bring one layer in at a time."""

    def __init__(self, model: nn.Module, adapter: DecoderAdapter, files: dict[str, Path], scratch: Path,
                 device: torch.device | str, dtype: torch.dtype):
        self.model, self.adapter = model, adapter
        self.files = dict(files)
        self.scratch = Path(scratch)
        self.scratch.mkdir(parents=True, exist_ok=True)
        self.device, self.dtype = torch.device(device), dtype
        self.prefix = adapter._layers_prefix()
        self._held: dict[int, bool] = {}  # layer → dirty, for layers held resident
        self._loaded: set[int] = set()
        self.most_loaded = 0  # the most layers ever in memory at once
        self._writes: dict[int, int] = {}
        self._handles = []
        for i, layer in enumerate(adapter.layers):
            self._handles.append(layer.register_forward_pre_hook(self._pre_hook(i)))
            self._handles.append(layer.register_forward_hook(self._post_hook(i)))

    def names(self, layer: int) -> dict[str, str]:
        """Tensor name in the files → parameter name inside the layer."""
        p = f"{self.prefix}.{layer}."
        return {p + n: n for n, _ in self.adapter.layers[layer].named_parameters()}

    @property
    def loaded(self) -> set[int]:
        return set(self._loaded)

    def load(self, layer: int) -> None:
        if layer in self._loaded:
            return
        names = self.names(layer)
        tensors = _read(self.files, list(names))
        module = self.adapter.layers[layer]
        for key, rel in names.items():
            owner_name, _, attr = rel.rpartition(".")
            owner = module.get_submodule(owner_name) if owner_name else module
            old = getattr(owner, attr)
            t = tensors[key].to(device=self.device, dtype=self.dtype)
            setattr(owner, attr, nn.Parameter(t, requires_grad=old.requires_grad))
        self._loaded.add(layer)
        self.most_loaded = max(self.most_loaded, len(self._loaded))

    def unload(self, layer: int, write: bool = False) -> None:
        """Drop the layer's tensors; with ``write``, first save them to a scratch file that replaces their source."""
        if layer not in self._loaded:
            return
        module = self.adapter.layers[layer]
        names = self.names(layer)
        if write:
            from safetensors.torch import save_file

            version = self._writes.get(layer, 0) + 1
            path = self.scratch / f"layer-{layer:04d}-{version}.safetensors"
            params = dict(module.named_parameters())
            save_file({key: params[rel].detach().to("cpu").contiguous() for key, rel in names.items()}, str(path))
            old = {self.files[key] for key in names if key in self.files}  # new tensors (a merged bias) have none
            self.files.update(dict.fromkeys(names, path))
            self._writes[layer] = version
            for stale in old:  # an earlier scratch file of this layer: nothing points at it any more
                if stale.parent == self.scratch and stale not in self.files.values():
                    stale.unlink(missing_ok=True)
        for rel in names.values():
            owner_name, _, attr = rel.rpartition(".")
            owner = module.get_submodule(owner_name) if owner_name else module
            old = getattr(owner, attr)
            setattr(owner, attr, nn.Parameter(torch.empty(old.shape, dtype=old.dtype, device="meta"),
                                              requires_grad=old.requires_grad))
        self._loaded.discard(layer)

    @contextmanager
    def resident(self, layer: int, write: bool = False) -> Iterator[nn.Module]:
        """Layer ``layer`` in memory for the whole block (its calls do not drop it); ``write``: its tensors changed,
        save them when the block ends (not when it ends in an error)."""
        self.load(layer)
        self._held[layer] = write
        try:
            yield self.adapter.layers[layer]
        except BaseException:
            # A layer the block left half-changed is not saved (its files stay the last good state), and a failing
            # write cannot hide the error that ended the block.
            self._held.pop(layer)
            self.unload(layer, write=False)
            raise
        dirty = self._held.pop(layer)
        self.unload(layer, write=dirty)

    def _pre_hook(self, layer: int):
        def hook(module: nn.Module, args: Any) -> None:
            self.load(layer)

        return hook

    def _post_hook(self, layer: int):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if layer not in self._held:
                self.unload(layer)

        return hook

    def close(self) -> None:
        """Remove the hooks (the layers stay placeholders where not loaded)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def written(self, layer: int) -> Path:
        """The scratch file a stage wrote ``layer`` to (all of its tensors are read from there now)."""
        paths = {self.files[key] for key in self.names(layer) if key in self.files}
        if len(paths) != 1 or next(iter(paths)).parent != self.scratch:
            raise ValueError(f"layer {layer} has not been written to scratch")
        return next(iter(paths))

    def read_from(self, files: list[Path]) -> None:
        """Read the tensors these safetensors files hold (a checkpoint's saved layers) from them from now on."""
        from safetensors import safe_open

        for file in files:
            with safe_open(str(file), framework="pt") as fh:
                self.files.update(dict.fromkeys(fh.keys(), Path(file)))  # noqa: SIM118 (not a mapping)

    def state_tensor(self, name: str) -> torch.Tensor:
        """One stored tensor by its name in the files (CPU, stored dtype)."""
        return _read(self.files, [name])[name]


@contextmanager
def checkpointed_layers(store: LayerStore) -> Iterator[None]:
    """Activation checkpointing per decoder layer, for training a streamed model: the forward keeps each layer's
    input only, and the backward recomputes the layer (brought back from its file for the purpose) before going
    through it. Restores the layers' own ``forward`` on exit."""
    from torch.utils.checkpoint import checkpoint

    layers = store.adapter.layers
    originals = []
    for i, layer in enumerate(layers):
        forward = layer.forward
        originals.append(forward)

        def run(*args: Any, _i: int = i, _forward: Any = forward, **kwargs: Any) -> Any:
            with store.resident(_i):
                return _forward(*args, **kwargs)

        def wrapped(*args: Any, _run: Any = run, **kwargs: Any) -> Any:
            return checkpoint(_run, *args, use_reentrant=False, **kwargs)

        layer.forward = wrapped
    try:
        yield
    finally:
        for layer in layers:
            layer.__dict__.pop("forward", None)


def _generation_config(model_dir: Path, config: Any) -> Any:
    """The generation config ``from_pretrained`` would give the model: the model's own file (its stop tokens and
    sampling settings, which an exported model must keep), else one made from ``config``."""
    from transformers import GenerationConfig

    if (model_dir / "generation_config.json").is_file():
        return GenerationConfig.from_pretrained(model_dir)
    return GenerationConfig.from_model_config(config)


def load_streamed(model_dir: Path, dtype: torch.dtype, device: torch.device | str, scratch: Path
                  ) -> tuple[nn.Module, LayerStore]:
    """A causal LM from ``model_dir`` with its decoder layers left in the files (see the module docstring)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    generation = _generation_config(Path(model_dir), config)  # before the KV cache is turned off in the config
    config.use_cache = False
    with init_empty_weights():  # parameters on meta; buffers (rotary frequencies) real
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.generation_config = generation
    model.requires_grad_(False)  # a streamed model's own weights are never trained
    adapter = DecoderAdapter(model)
    files = weight_files(Path(model_dir))
    prefix = adapter._layers_prefix() + "."
    resident = [n for n in files if not n.startswith(prefix)]
    tensors = _read(files, resident)
    params = dict(model.named_parameters())
    for name, t in tensors.items():
        if name not in params:  # a tensor the model does not have (tied lm_head saved anyway)
            continue
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        setattr(owner, attr, nn.Parameter(t.to(device=device, dtype=dtype), requires_grad=False))
    model.tie_weights()
    for name, buf in list(model.named_buffers()):
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        owner.register_buffer(attr, buf.to(device), persistent=attr not in owner._non_persistent_buffers_set)
    missing = [n for n, p in model.named_parameters() if p.is_meta and not n.startswith(prefix)]
    if missing:
        raise ValueError(f"{model_dir}: no weights for {missing[:3]}")
    model.eval()
    return model, LayerStore(model, adapter, files, scratch, device, dtype)
