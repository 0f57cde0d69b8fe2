"""RestoreLCC on a real model pruned by Wanda 50%: does it restore what pruning lost?

    python -m bench restore [--model smollm2-135m-instruct] [--steps 50] [--heads 0.1] [--lr 1e-2] [--probe 256]
    python -m bench restore --model gemma3-270m --heads 0.8 --directions 0.66 --lr 3e-3
    python -m bench restore --render-only [same settings]   # rewrite the page from the stored result

One run of the service's pipeline (dense → Wanda 50% → probe → extract → train → merge → evaluate → export),
its report kept as bench/results/restore/<name>.json (the model under bench/results/restore/runs/<name>/);
docs/restoration.md (the demo model) or docs/restoration-<model>.md shows dense / pruned / restored side by side
with the exactness checks. ``--model`` names a model ``restorelcc fetch-model`` knows (fetched on first use).
"""

from __future__ import annotations

import argparse
from typing import Any

from bench import harness

ROOT = harness.RESULTS / "restore"


def add_args(ap: argparse.ArgumentParser) -> None:
    demo, known = harness.models()
    ap.add_argument("--model", default=demo, choices=sorted(known), help=f"a model `restorelcc fetch-model` knows "
                    f"(default {demo})")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--heads", type=float, default=0.1)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--directions", type=float, default=None,
                    help="restoration.directions (a fraction of head_dim or a count; default: all)")
    ap.add_argument("--probe", type=int, default=256)
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--alpaca-limit", type=int, default=300)
    ap.add_argument("--group-by-length", action="store_true",
                    help="batch samples of similar length together (restoration.group_by_length)")


def run_name(args: argparse.Namespace) -> str:
    return ((f"{args.model}-" if args.model != harness.models()[0] else "")
            + f"wanda50-h{args.heads:g}-lr{args.lr:g}-s{args.steps}-b{args.batch_size}-p{args.probe}"
            + (f"-d{args.directions:g}" if args.directions is not None else "")
            + ("-grouped" if args.group_by_length else ""))


def job(args: argparse.Namespace, model_dir: str) -> dict[str, Any]:
    return {
        "model": {"id": model_dir, "dtype": "float32"},
        "pruning": {"method": "wanda", "sparsity": 0.5, "calibration_samples": 128, "seq_len": 256},
        "restoration": {
            "method": "restorelcc", "objective": "sft", "response_eos": False, "heads": args.heads,
            "head_selection": "probe", "probe_samples": args.probe,
            "max_steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "max_seq_len": args.max_len,
            "group_by_length": args.group_by_length, "directions": args.directions,
        },
        "data": {"train": harness.data("alpaca/train.jsonl")},
        "evaluation": {
            "perplexity": [harness.data("eval/wikitext_sentences.jsonl")],
            "response_perplexity": [harness.data("alpaca/valid.jsonl")],
            "limit": None, "limits": {"valid": args.alpaca_limit}, "max_seq_len": 512,
        },
        "seed": 0,
    }


def page(report: dict[str, Any], settings: dict[str, Any], command: str, results: str, asset: Any,
         target: float) -> str:
    """dense / pruned / restored, the settings, the exactness checks and the time per stage."""
    m, rest, a = report["metrics"], report["restoration"], settings
    rows = [[label, m.get(label, {}).get("wikitext_sentences", {}).get("ppl"),
             m.get(label, {}).get("valid", {}).get("response_ppl")] for label in ("dense", "pruned", "restored")]
    pr, rs = m["pruned"]["valid"]["response_ppl"], m["restored"]["valid"]["response_ppl"]
    wp, wr = m["pruned"]["wikitext_sentences"]["ppl"], m["restored"]["wikitext_sentences"]["ppl"]
    directions = (f"β over each head's top {rest['directions_per_head']} of {report['model']['arch']['head_dim']} "
                  "lost directions" if a["directions"] is not None else "β over all lost directions")
    env = report["environment"]
    stages = [[k, v["seconds"], v["peak_rss_mb"]] for k, v in report["stages"].items()]
    return f"""# RestoreLCC on {asset.upstream.split("/")[-1]} (Wanda 50% unstructured)

Produced by `{command}` (result: `{results}`).

Model: {asset.model}; licence: {asset.license}.

Settings: Wanda 50% unstructured, 128 calibration sequences × 256 tokens from `alpaca/train.jsonl`; probe
{rest.get('probe_samples')} Alpaca training pairs (negatives by {rest.get('negatives_backend')}); heads {a['heads']:g}
of all = {len(rest['chosen_heads'])} heads, {directions}; {rest['steps']} AdamW steps × batch {a['batch_size']},
lr {a['lr']:g}, max length {a['max_len']}, seed 0; {rest['trainable_params']:,} trainable parameters. Evaluation:
all 1,000 WikiText sentences and the first {a['alpaca_limit']} rows of `alpaca/valid.jsonl` (response-only
perplexity). {env['device']}, {env['threads']} threads, torch {env['torch']}.

{harness.markdown_table(["model", "WikiText-sentence ppl", "Alpaca-valid response ppl"], rows)}

- Response perplexity: restored / pruned = **{rs / pr:.3f}** ({100 * (1 - rs / pr):.1f}% lower; target ≥ \
{100 * target:g}%).
- WikiText-sentence perplexity: restored / pruned = **{wr / wp:.3f}**.
- Merged vs hooked logits, max abs diff: {report['checks']['merged_vs_hooked_max_abs_diff']:.2e};
  pruned zeros bit-identical after restoration: {report['checks']['zeros_identical']}.
- Chosen heads (layer, head): {', '.join(f'({x},{y})' for x, y in rest['chosen_heads'])}.

Time and peak resident memory per stage:

{harness.markdown_table(["stage", "seconds", "peak RSS MB"], stages)}
"""


def main(args: argparse.Namespace, argv: list[str]) -> int:
    demo, known = harness.models()
    name, store = run_name(args), harness.Store(ROOT)
    settings = {k: getattr(args, k) for k in ("model", "heads", "lr", "steps", "batch_size", "probe", "max_len",
                                              "directions", "group_by_length", "alpaca_limit")}
    spec = job(args, "")
    fp = {"job": {k: v for k, v in spec.items() if k != "model"}, "model": args.model}
    path = ROOT / f"{name}.json"
    if args.render_only:
        found = store.read(path, fp)
        if found is None:
            raise SystemExit(f"{path}: no result stored with these settings")
    else:
        def make() -> dict[str, Any]:
            report = harness.run_job(job(args, harness.model_path(args.model)), ROOT / "runs" / name, name)
            report["sparsity"].pop("modules", None)  # per-module counts: in the run folder's report.json
            return {"settings": settings, "report": report}

        found = store.get(path, fp, make, name)
    page_name = "restoration.md" if args.model == demo else f"restoration-{args.model}.md"
    text = page(found["report"], found["settings"], harness.page_command("restore", argv), harness.relative(path),
                known[args.model], harness.TARGETS["restore"]["response_ppl_cut"])
    harness.write_page(harness.DOCS / page_name, text)
    return 0
