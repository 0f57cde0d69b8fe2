"""Write a safetensors file one tensor at a time, laid out byte for byte as ``safetensors.torch.save_file`` lays out
the same tensors — without holding them all in memory (save_file serialises every tensor first).

The layout: an 8-byte little-endian header length, a JSON header (``__metadata__`` first, then every tensor's dtype,
shape and data offsets, compact, padded with spaces to a multiple of 8), then the tensors' bytes back to back, in the
order safetensors sorts them: by dtype (its declaration order, the wider first) then by name.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

# safetensors' Dtype enum, in declaration order (the sort compares these ranks).
_ORDER = ("BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "I16", "U16", "F16",
          "BF16", "I32", "U32", "F32", "F64", "I64", "U64")
_NAMES = {torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.float16: "F16",
          torch.bfloat16: "BF16", torch.int32: "I32", torch.float32: "F32", torch.float64: "F64",
          torch.int64: "I64"}


@dataclass(frozen=True)
class Entry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    read: Callable[[], torch.Tensor]  # the tensor, when its turn comes

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()


def write_safetensors(path: Path, entries: Sequence[Entry], metadata: dict[str, str] | None = None) -> int:
    """Write ``entries`` to ``path``; returns the file's size."""
    ordered = sorted(entries, key=lambda e: (-_ORDER.index(_NAMES[e.dtype]), e.name))
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    for e in ordered:
        header[e.name] = {"dtype": _NAMES[e.dtype], "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * ((-len(text)) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(text)))
        fh.write(text)
        for e in ordered:
            t = e.read()
            if t.dtype != e.dtype or tuple(t.shape) != e.shape:
                raise ValueError(f"{e.name}: got {t.dtype} {tuple(t.shape)}, announced {e.dtype} {e.shape}")
            fh.write(t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return 8 + len(text) + offset
