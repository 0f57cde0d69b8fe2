"""Pack what a job holds between stages into safetensors tensors plus a JSON skeleton, and back, exactly.

Never pickle: a checkpoint is read back by a worker, so it may only describe data. The skeleton keeps the
structure and every plain value (None, bool, int, float, str; lists, tuples, dicts with any such keys); each tensor
becomes ``{"t": key}``; a dataclass becomes ``{"c": "module:Class", "v": {field: ...}}`` and is rebuilt only when
it is a dataclass of this project's worker package. Floats survive JSON exactly (shortest round-trip repr).
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

import torch

Skeleton = Any


def pack(obj: Any, copy: bool = True) -> tuple[dict[str, torch.Tensor], Skeleton]:
    """(tensors by key, skeleton). ``copy=False`` saves contiguous CPU tensors as they are (model weights, a
    method's captured activations: no second copy in memory), copying only a tensor whose storage an earlier one
    already uses (safetensors refuses shared storage); otherwise every tensor is copied."""
    tensors: dict[str, torch.Tensor] = {}
    storages: set[int] = set()

    def walk(x: Any) -> Skeleton:
        if x is None or isinstance(x, bool | int | float | str):
            return x
        if isinstance(x, torch.Tensor):
            key = str(len(tensors))
            t = x.detach().cpu()
            if not copy:
                t = t.contiguous()
                storage = t.untyped_storage().data_ptr()
                if storage in storages:
                    t = t.clone()
                storages.add(storage)
            else:
                t = t.clone(memory_format=torch.contiguous_format)
            tensors[key] = t
            return {"t": key}
        if isinstance(x, list):
            return [walk(v) for v in x]
        if isinstance(x, tuple):
            return {"u": [walk(v) for v in x]}
        if isinstance(x, dict):
            return {"d": [[walk(k), walk(v)] for k, v in x.items()]}
        if dataclasses.is_dataclass(x) and not isinstance(x, type):
            cls = type(x)
            return {"c": f"{cls.__module__}:{cls.__qualname__}",
                    "v": {f.name: walk(getattr(x, f.name)) for f in dataclasses.fields(x)}}
        raise TypeError(f"cannot checkpoint a {type(x).__module__}.{type(x).__qualname__}")

    return tensors, walk(obj)


def unpack(tensors: dict[str, torch.Tensor], skeleton: Skeleton) -> Any:
    """The object :func:`pack` was given."""

    def walk(x: Skeleton) -> Any:
        if x is None or isinstance(x, bool | int | float | str):
            return x
        if isinstance(x, list):
            return [walk(v) for v in x]
        if "t" in x:
            return tensors[x["t"]]
        if "u" in x:
            return tuple(walk(v) for v in x["u"])
        if "d" in x:
            return {_key(walk(k)): walk(v) for k, v in x["d"]}
        if "c" in x:
            return _dataclass(x["c"])(**{k: walk(v) for k, v in x["v"].items()})
        raise ValueError(f"not a packed value: {x!r}"[:200])

    return walk(skeleton)


def _key(k: Any) -> Any:
    return tuple(k) if isinstance(k, list) else k


def _dataclass(name: str) -> type:
    module, _, qualname = name.partition(":")
    if not (module == "worker" or module.startswith("worker.")):
        raise ValueError(f"a checkpoint names a class outside the worker package: {name}")
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    if not (isinstance(obj, type) and dataclasses.is_dataclass(obj)):
        raise ValueError(f"a checkpoint names something that is not a dataclass: {name}")
    return obj
