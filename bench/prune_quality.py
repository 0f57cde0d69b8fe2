"""Pruning quality on SmolLM2-135M-Instruct: magnitude vs Wanda vs SparseGPT, 50% unstructured and 2:4.

    python bench/prune_quality.py [--calibration 128] [--limit 500] [--quick]

Each setting runs the real pipeline (`run_pipeline`, restoration none) and keeps its report under
bench/results/prune/<setting>/; a setting whose report exists is not run again. The dense model is
evaluated once, in the first setting. Writes docs/pruning.md with the table and the settings.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import REPO, RESULTS, data, demo_model, eval_spec, markdown_table  # noqa: E402

SETTINGS = [
    ("magnitude-50%", {"method": "magnitude", "sparsity": 0.5}),
    ("wanda-50%", {"method": "wanda", "sparsity": 0.5}),
    ("sparsegpt-50%", {"method": "sparsegpt", "sparsity": 0.5}),
    ("sparsegpt-2:4", {"method": "sparsegpt", "pattern": "2:4"}),
    ("wanda-2:4", {"method": "wanda", "pattern": "2:4"}),
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calibration", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--limit", type=int, default=500, help="rows of BoolQ / PIQA / OpenBookQA")
    ap.add_argument("--alpaca-limit", type=int, default=300, help="rows of Alpaca valid")
    ap.add_argument("--out", default=None, help="results folder (default bench/results/prune[-ppl])")
    ap.add_argument("--only", default=None, help="comma-separated setting names (default: all)")
    ap.add_argument("--no-tasks", action="store_true", help="perplexities only (no BoolQ / PIQA / OpenBookQA)")
    args = ap.parse_args()

    from app.schemas import JobSpec
    from worker.pipeline import run_pipeline
    from worker.reporting import ConsoleReporter

    model = demo_model()
    out_root = Path(args.out or RESULTS / ("prune-ppl" if args.no_tasks else "prune"))
    reports: dict[str, dict] = {}
    wanted = set(args.only.split(",")) if args.only else None
    for i, (name, pruning) in enumerate(SETTINGS):
        if wanted is not None and name not in wanted:
            continue
        out = out_root / name
        if (out / "report.json").is_file():
            reports[name] = json.loads((out / "report.json").read_text())
            print(f"{name}: already measured ({out / 'report.json'})")
            continue
        ev = eval_spec(args.limit, args.alpaca_limit, tasks=not args.no_tasks)
        ev["dense"] = i == 0 or not any("dense" in r.get("metrics", {}) for r in reports.values())
        spec = JobSpec.model_validate({
            "model": {"id": model, "dtype": "float32"},
            "pruning": {**pruning, "calibration_samples": args.calibration, "seq_len": args.seq_len},
            "restoration": {"method": "none"},
            "data": {"calibration": data("alpaca/train.jsonl")},
            "evaluation": ev,
            "seed": 0,
        })
        print(f"\n=== {name}")
        reports[name] = run_pipeline(spec, out, ConsoleReporter())
    write_markdown(reports, args)
    return 0


def _row(label: str, m: dict, sparsity: float | None, seconds: float | None) -> list:
    def get(set_name: str, key: str):
        return (m.get(set_name) or {}).get(key)

    return [
        label,
        None if sparsity is None else f"{100 * sparsity:.2f}%",
        get("wikitext_sentences", "ppl"),
        get("valid", "response_ppl"),
        get("boolq", "acc"),
        get("piqa", "acc"),
        get("piqa", "acc_norm"),
        get("openbookqa", "acc"),
        get("openbookqa", "acc_norm"),
        m.get("mean_acc"),
        seconds,
    ]


def write_markdown(reports: dict[str, dict], args: argparse.Namespace) -> None:
    dense = next((r["metrics"]["dense"] for r in reports.values() if "dense" in r.get("metrics", {})), {})
    rows = [_row("dense", dense, None, None)]
    for name, r in reports.items():
        seconds = (r.get("pruning") or {}).get("seconds")  # pruning alone (the stage also evaluates)
        rows.append(_row(name, r["metrics"].get("pruned", {}), r["sparsity"]["overall"],
                         None if seconds is None else round(seconds, 1)))
    header = ["model", "sparsity", "WikiText ppl", "Alpaca resp. ppl", "BoolQ acc", "PIQA acc", "PIQA acc_n",
              "OBQA acc", "OBQA acc_n", "mean acc", "pruning s"]
    mag = reports.get("magnitude-50%", {}).get("metrics", {}).get("pruned", {})
    ratio_lines = []
    for name in ("wanda-50%", "sparsegpt-50%"):
        m = reports.get(name, {}).get("metrics", {}).get("pruned", {})
        if mag and m:
            r = m["wikitext_sentences"]["ppl"] / mag["wikitext_sentences"]["ppl"]
            ratio_lines.append(f"- {name} WikiText ppl / magnitude-50%'s = **{r:.3f}** (target ≤ 0.25)")
    nm_lines = []
    for name, r in reports.items():
        if "2:4" in name:
            nm_lines.append(f"- {name}: every pruned Linear has the exact 2:4 pattern: "
                            f"**{r['sparsity'].get('nm_ok')}**")
    boolq_lines = []
    if not args.no_tasks:
        labels = [json.loads(x)["label"] for x in Path(data("eval/boolq.jsonl")).read_text().splitlines() if x]
        labels = labels[: args.limit]
        yes = sum(labels) / len(labels)
        boolq_lines.append(
            f"- BoolQ: the answer is \"yes\" in {100 * yes:.0f}% of these {len(labels)} rows, so a model that always "
            f"answers \"yes\" scores {yes:.3f} and one that always answers \"no\" {1 - yes:.3f}. At this model size "
            "BoolQ accuracy mostly shows which way a model leans, and moves the mean accuracy with it: read it "
            "beside the perplexities, not alone.")
    env = next(iter(reports.values()))["environment"] if reports else {}
    tasks_text = (" — perplexities only (`--no-tasks`)" if args.no_tasks else
                  f", and the first {args.limit} rows of BoolQ, PIQA and OpenBookQA (zero-shot, `acc_norm` "
                  "normalised by the choice's length in characters)")
    only = f" --only '{args.only}'" if args.only else ""
    text = f"""# Pruning quality: SmolLM2-135M-Instruct

Produced by `python bench/prune_quality.py{" --no-tasks" if args.no_tasks else ""}{only}` (do not edit by hand).

Settings: {args.calibration} calibration sequences of {args.seq_len} tokens cut from
`alpaca/train.jsonl`; evaluation on WikiText sentences (all 1,000 rows, token-weighted perplexity), the first
{args.alpaca_limit} rows of `alpaca/valid.jsonl` (response-only perplexity){tasks_text}. float32 on
{env.get('device', '?')} ({platform.processor() or env.get('machine', '?')}, {env.get('threads', '?')} threads),
torch {env.get('torch', '?')}, transformers {env.get('transformers', '?')}.

{markdown_table(header, rows)}

{chr(10).join(ratio_lines)}
{chr(10).join(nm_lines)}
{chr(10).join(boolq_lines)}
"""
    path = REPO / "docs" / "pruning.md"
    path.write_text(text, encoding="utf-8")
    print(text)
    print(f"written: {path}")


if __name__ == "__main__":
    sys.exit(main())
