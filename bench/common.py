"""Shared pieces of the real-model benchmarks: where the data and the demo model are, table printing."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("RESTORELCC_SHARED_DATA", REPO.parent / "shared" / "data"))
RESULTS = REPO / "bench" / "results"


def data(path: str) -> str:
    p = SHARED_DATA / path
    if not p.is_file():
        raise SystemExit(f"benchmark data not found: {p} (set RESTORELCC_SHARED_DATA)")
    return str(p)


def demo_model() -> str:
    from worker.assets import demo_model_dir

    return str(demo_model_dir())


def eval_spec(limit_tasks: int = 500, limit_alpaca: int = 300, tasks: bool = True) -> dict[str, Any]:
    return {
        "perplexity": [data("eval/wikitext_sentences.jsonl")],
        "response_perplexity": [data("alpaca/valid.jsonl")],
        "tasks": [data("eval/boolq.jsonl"), data("eval/piqa.jsonl"), data("eval/openbookqa.jsonl")]
        if tasks
        else [],
        "limit": None,
        "limits": {"valid": limit_alpaca, "boolq": limit_tasks, "piqa": limit_tasks, "openbookqa": limit_tasks},
    }


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1000 else f"{v:,.0f}"
        if isinstance(v, int):
            return f"{v:,}"
        return "—" if v is None else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def save_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
