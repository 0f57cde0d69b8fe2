"""Choosing RestoreLCC's setting (head fraction × lr × steps) on a selection split that is never evaluated.

The selection split is a slice of ``alpaca/valid.jsonl`` that starts after the rows the results table
evaluates (rows 300..599 against rows 0..299 by default), written to ``<root>/search/alpaca_select.jsonl``.
Each grid point is one RestoreLCC run on the cached pruned model (seed 0), scored by response perplexity
on the selection rows only; one JSON per point, reused when present.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

from bench.common import markdown_table
from bench.quality import plan
from bench.quality.runner import Bench, say

SELECT_STEM = "alpaca_select"


def write_selection(source: str, root: Path, start: int, rows: int, eval_rows: int) -> Path:
    """Rows ``start .. start+rows-1`` of ``source`` as their own file; refuses to overlap the evaluated rows."""
    if start < eval_rows:
        raise ValueError(f"selection rows start at {start}, inside the evaluated rows 0..{eval_rows - 1}")
    lines = [ln for ln in Path(source).read_text(encoding="utf-8").splitlines() if ln.strip()]
    chosen = lines[start : start + rows]
    if len(chosen) < rows:
        raise ValueError(f"{source} has {len(lines)} rows; rows {start}..{start + rows - 1} do not exist")
    path = root / "search" / f"{SELECT_STEM}.jsonl"
    text = "\n".join(chosen) + "\n"
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return path


def grid(heads: list[float], lrs: list[float], steps: list[int]) -> list[dict[str, Any]]:
    return [{"heads": h, "lr": lr, "max_steps": s} for h, lr, s in itertools.product(heads, lrs, steps)]


def point_name(p: dict[str, Any]) -> str:
    return f"h{p['heads']:g}-lr{p['lr']:g}-s{p['max_steps']}"


def run_search(bench: Bench, setting: plan.Setting, points: list[dict[str, Any]], select: Path, rows: int
               ) -> tuple[list[dict[str, Any]], float]:
    """Every grid point's result, and the pruned model's response perplexity on the selection rows."""
    method = plan.method_by_key("restorelcc")
    ev = plan.evaluation(bench.data, bench.budget, alpaca=str(select), alpaca_limit=rows, tasks=False,
                         wikitext=False)
    bench.ensure_base(setting)
    pruned_path = bench.store.root / "search" / setting.key / "pruned.json"
    pruned_by = plan.pruning_spec(setting, bench.budget)
    pruned_fp = {"evaluation": ev, "pruned_by": pruned_by}
    pruned = bench.store.load(pruned_path, pruned_fp)
    if pruned is None:
        metrics, _ = bench.evaluate(bench.pruned_model(setting), ev, label=f"{setting.key}/pruned selection")
        pruned = {"fingerprint": pruned_fp, "metrics": metrics}
        bench.store.save(pruned_path, pruned)
    out = []
    for p in points:
        job = plan.restore_job(method, bench.budget, bench.data, "", bench.dense_dir, 0, overrides=p)
        fp = plan.fingerprint(job, ev, pruned_by)
        path = bench.store.root / "search" / setting.key / f"{point_name(p)}.json"
        found = bench.store.load(path, fp)
        if found is None:
            found = bench.restore_and_evaluate(setting, method, 0, job, ev, f"search-{point_name(p)}")
            found.update(fingerprint=fp, point=p)
            bench.store.save(path, found)
        else:
            say(f"search {point_name(p)}: already measured")
        out.append(found)
    return out, float(pruned["metrics"][SELECT_STEM]["response_ppl"])


def score(result: dict[str, Any]) -> float:
    return float(result["rows"]["restorelcc"]["metrics"][SELECT_STEM]["response_ppl"])


def search_markdown(results: list[dict[str, Any]], setting: plan.Setting, command: str, start: int, rows: int,
                    eval_rows: int, pruned_ppl: float | None, model: str = "SmolLM2-135M-Instruct") -> str:
    ranked = sorted(results, key=score)
    table = markdown_table(
        ["rank", "heads", "lr", "steps", "selection resp. ppl", "trainable params", "train s"],
        [[i + 1, r["point"]["heads"], r["point"]["lr"], r["point"]["max_steps"], round(score(r), 3),
          r["rows"]["restorelcc"]["trainable_params"], round(r["rows"]["restorelcc"]["train_seconds"], 1)]
         for i, r in enumerate(ranked)],
    )
    best = ranked[0]["point"] if ranked else None
    lines = [
        f"# RestoreLCC setting search ({setting.label}, {model})",
        "",
        f"Produced by `{command}`.",
        "",
        f"Selection split: rows {start}..{start + rows - 1} of `alpaca/valid.jsonl` (response perplexity). The "
        f"results table evaluates rows 0..{eval_rows - 1}, so no selection row is an evaluation row. "
        "One run per grid point, seed 0, on the same pruned model as the results table; everything else as "
        "in the results table.",
    ]
    if pruned_ppl is not None:
        lines += ["", f"Pruned model on the selection rows: response ppl {pruned_ppl:.3f}."]
    lines += ["", table, ""]
    if best:
        lines += [f"Best: heads {best['heads']:g}, lr {best['lr']:g}, {best['max_steps']} steps. To use it: "
                  f"`python -m bench.quality --heads {best['heads']:g} --lr-restorelcc {best['lr']:g} "
                  f"--steps {best['max_steps']}` (the step budget then applies to every method).", ""]
    return "\n".join(lines)
