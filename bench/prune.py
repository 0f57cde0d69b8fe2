"""Pruning quality on SmolLM2-135M-Instruct: magnitude vs Wanda vs SparseGPT, 50% unstructured and 2:4.

    python -m bench prune [--calibration 128] [--limit 500] [--only wanda-50,sparsegpt-2-4]
    python -m bench prune --render-only          # rewrite docs/pruning.md from the stored results

Each setting is one run of the service's pipeline (restoration none) on the comparison's runner, its metrics kept
as bench/results/prune/<setting>/pruned/seed0.json and the dense model's as bench/results/prune/dense.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import replace
from pathlib import Path

from bench import compare, harness, plan

SETTINGS: tuple[plan.Setting, ...] = (
    plan.Setting("magnitude-50", "magnitude-50%", {"method": "magnitude", "sparsity": 0.5}),
    plan.Setting("wanda-50", "wanda-50%", {"method": "wanda", "sparsity": 0.5}),
    plan.Setting("sparsegpt-50", "sparsegpt-50%", {"method": "sparsegpt", "sparsity": 0.5}),
    plan.Setting("sparsegpt-2-4", "sparsegpt-2:4", {"method": "sparsegpt", "pattern": "2:4"}),
    plan.Setting("wanda-2-4", "wanda-2:4", {"method": "wanda", "pattern": "2:4"}),
)
ROOT = harness.RESULTS / "prune"


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--calibration", type=int, default=128, help="calibration sequences (default 128)")
    ap.add_argument("--seq-len", type=int, default=256, help="tokens per calibration sequence (default 256)")
    ap.add_argument("--limit", type=int, default=500, help="rows of BoolQ / PIQA / OpenBookQA (default 500)")
    ap.add_argument("--alpaca-limit", type=int, default=300, help="rows of Alpaca valid (default 300)")
    ap.add_argument("--only", default=None, help=f"comma-separated settings (default all: "
                                                  f"{', '.join(s.key for s in SETTINGS)})")


def _row(label: str, m: dict, sparsity: float | None, seconds: float | None) -> list:
    def get(set_name: str, key: str):
        return (m.get(set_name) or {}).get(key)

    return [label, None if sparsity is None else f"{100 * sparsity:.2f}%", get("wikitext_sentences", "ppl"),
            get("valid", "response_ppl"), get("boolq", "acc"), get("piqa", "acc"), get("piqa", "acc_norm"),
            get("openbookqa", "acc"), get("openbookqa", "acc_norm"), m.get("mean_acc"), seconds]


def page(results: dict[str, dict], dense: dict | None, b: plan.Budget, command: str, boolq_labels: list[int],
         targets: dict[str, float], results_dir: str = "bench/results/prune") -> str:
    """The page: one row per stored setting (``results`` by setting label), the targets' checks, BoolQ's lean."""
    rows = [_row("dense", (dense or {}).get("rows", {}).get("dense", {}).get("metrics", {}), None, None)]
    for label, r in results.items():
        seconds = (r["info"].get("pruning") or {}).get("seconds")  # pruning alone (the stage also evaluates)
        rows.append(_row(label, r["rows"]["pruned"]["metrics"], r["info"]["sparsity"],
                         None if seconds is None else round(seconds, 1)))
    header = ["model", "sparsity", "WikiText ppl", "Alpaca resp. ppl", "BoolQ acc", "PIQA acc", "PIQA acc_n",
              "OBQA acc", "OBQA acc_n", "mean acc", "pruning s"]
    checks = []
    mag = results.get("magnitude-50%")
    for label in ("wanda-50%", "sparsegpt-50%"):
        if mag and label in results:
            r = (results[label]["rows"]["pruned"]["metrics"]["wikitext_sentences"]["ppl"]
                 / mag["rows"]["pruned"]["metrics"]["wikitext_sentences"]["ppl"])
            checks.append(f"- {label} WikiText ppl / magnitude-50%'s = **{r:.3f}** "
                          f"(target ≤ {targets['wikitext_vs_magnitude']:g})")
    checks += [f"- {label}: every pruned Linear has the exact 2:4 pattern: **{r['info'].get('nm_ok')}**"
               for label, r in results.items() if "2:4" in label]
    if boolq_labels:
        yes = sum(boolq_labels) / len(boolq_labels)
        checks.append(
            f"- BoolQ: the answer is \"yes\" in {100 * yes:.0f}% of these {len(boolq_labels)} rows, so a model that "
            f"always answers \"yes\" scores {yes:.3f} and one that always answers \"no\" {1 - yes:.3f}. At this model "
            "size BoolQ accuracy mostly shows which way a model leans, and moves the mean accuracy with it: read it "
            "beside the perplexities, not alone.")
    machine = compare.machines([*results.values(), *([dense] if dense else [])])
    return f"""# Pruning quality: SmolLM2-135M-Instruct

Produced by `{command}` (results: `{results_dir}/`; do not edit by hand).

Settings: {b.calibration_samples} calibration sequences of {b.calibration_seq_len} tokens cut from
`alpaca/train.jsonl`, pruning seed 0; evaluation on WikiText sentences (all 1,000 rows, token-weighted perplexity),
the first {b.alpaca_limit} rows of `alpaca/valid.jsonl` (response-only perplexity), and the first {b.task_limit} rows
of BoolQ, PIQA and OpenBookQA (zero-shot, `acc_norm` normalised by the choice's length in characters); float32.

{machine}

{harness.markdown_table(header, rows)}

{chr(10).join(checks)}
"""


def main(args: argparse.Namespace, argv: list[str]) -> int:
    wanted = set(args.only.split(",")) if args.only else {s.key for s in SETTINGS}
    if wanted - {s.key for s in SETTINGS}:
        raise SystemExit(f"--only: unknown settings {', '.join(sorted(wanted - {s.key for s in SETTINGS}))}")
    b = replace(plan.Budget(), calibration_samples=args.calibration, calibration_seq_len=args.seq_len,
                task_limit=args.limit, alpaca_limit=args.alpaca_limit)
    dense_dir = None if args.render_only else harness.model_path(harness.models()[0])
    q = compare.Runner(b, compare.quality_data(), dense_dir, harness.Store(ROOT))
    ev = plan.evaluation(q.data, b)
    for s in SETTINGS:
        if not args.render_only and s.key in wanted:
            q.ensure_base(s)
            shutil.rmtree(q.run_dir(s.key, "pruned") / "model", ignore_errors=True)
    results = {s.label: r for s in SETTINGS
               if (r := q.store.read(q.result(s.key, "pruned", 0), plan.pruned_fingerprint(s, b, q.data, ev)))}
    if not results:
        raise SystemExit(f"nothing stored under {ROOT} with these settings: the page is left as it is")
    labels = [json.loads(x)["label"] for x in Path(harness.data("eval/boolq.jsonl")).read_text().splitlines() if x]
    text = page(results, q.store.read(ROOT / "dense.json", {"evaluation": ev}), b, harness.page_command("prune", argv),
                labels[: b.task_limit], harness.TARGETS["prune"], harness.relative(ROOT))
    harness.write_page(harness.DOCS / "pruning.md", text)
    return 0
