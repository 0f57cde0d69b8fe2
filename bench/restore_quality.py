"""RestoreLCC on a real model pruned by Wanda 50%: does it restore what pruning lost?

    python bench/restore_quality.py [--model smollm2] [--steps 50] [--heads 0.1] [--lr 1e-2] [--probe 256]
    python bench/restore_quality.py --model gemma3-270m --heads 0.8 --directions 0.66 --lr 3e-3 --docs

Runs the real pipeline once (dense → Wanda 50% → probe → extract → train → merge → evaluate → export)
and prints dense / pruned / restored side by side with the exactness checks. The report and the model
stay under bench/results/restore/<name>/; with --docs, docs/restoration.md (SmolLM2) or
docs/restoration-<model>.md gets the table and the settings. ``--model`` names a model ``restorelcc
fetch-model`` knows (fetched on first use).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import REPO, RESULTS, data, markdown_table  # noqa: E402
from worker.assets import DEMO_MODEL as DEMO  # noqa: E402
from worker.assets import MODELS, ModelAsset, model_dir  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEMO, help=f"a model `restorelcc fetch-model` knows (default {DEMO})")
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
    ap.add_argument("--name", default=None, help="results folder name (default from the settings)")
    ap.add_argument("--docs", action="store_true", help="write docs/restoration.md")
    args = ap.parse_args()

    from app.schemas import JobSpec
    from worker.pipeline import run_pipeline
    from worker.reporting import ConsoleReporter

    if args.model not in MODELS:
        ap.error(f"--model: unknown model {args.model!r}; known: {', '.join(MODELS)}")
    name = args.name or ((f"{args.model}-" if args.model != DEMO else "")
                         + f"wanda50-h{args.heads:g}-lr{args.lr:g}-s{args.steps}-b{args.batch_size}-p{args.probe}"
                         + (f"-d{args.directions:g}" if args.directions is not None else "")
                         + ("-grouped" if args.group_by_length else ""))
    out = RESULTS / "restore" / name
    spec = JobSpec.model_validate({
        "model": {"id": str(model_dir(args.model)), "dtype": "float32"},
        "pruning": {"method": "wanda", "sparsity": 0.5, "calibration_samples": 128, "seq_len": 256},
        "restoration": {
            "method": "restorelcc", "heads": args.heads, "head_selection": "probe", "probe_samples": args.probe,
            "max_steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "max_seq_len": args.max_len,
            "group_by_length": args.group_by_length, "directions": args.directions,
        },
        "data": {"train": data("alpaca/train.jsonl")},
        "evaluation": {
            "perplexity": [data("eval/wikitext_sentences.jsonl")],
            "response_perplexity": [data("alpaca/valid.jsonl")],
            "limit": None,
            "limits": {"valid": args.alpaca_limit},
            "max_seq_len": 512,
        },
        "seed": 0,
    })
    if (out / "report.json").is_file():
        report = json.loads((out / "report.json").read_text())
        print(f"already measured: {out / 'report.json'}")
    else:
        report = run_pipeline(spec, out, ConsoleReporter())
    text = render(report, args, name, MODELS[args.model])
    print(text)
    if args.docs:
        page = "restoration.md" if args.model == DEMO else f"restoration-{args.model}.md"
        (REPO / "docs" / page).write_text(text, encoding="utf-8")
    return 0


def render(report: dict, args: argparse.Namespace, name: str, asset: ModelAsset) -> str:
    """The page: the model, settings, dense / pruned / restored, exactness checks and time per stage."""
    m = report["metrics"]
    rest = report["restoration"]
    rows = []
    for label in ("dense", "pruned", "restored"):
        mm = m.get(label, {})
        rows.append([label, mm.get("wikitext_sentences", {}).get("ppl"), mm.get("valid", {}).get("response_ppl")])
    pr, rs = m["pruned"]["valid"]["response_ppl"], m["restored"]["valid"]["response_ppl"]
    wp, wr = m["pruned"]["wikitext_sentences"]["ppl"], m["restored"]["wikitext_sentences"]["ppl"]
    st = report["stages"]
    stage_rows = [[k, v["seconds"], v["peak_rss_mb"]] for k, v in st.items()]
    model_flag = f"--model {args.model} " if args.model != DEMO else ""
    directions_flag = f" --directions {args.directions:g}" if args.directions is not None else ""
    head_dim = report["model"]["arch"]["head_dim"]
    directions = (f"β over each head's top {rest['directions_per_head']} of {head_dim} lost directions"
                  if args.directions is not None else "β over all lost directions")
    return f"""# RestoreLCC on {asset.upstream.split("/")[-1]} (Wanda 50% unstructured)

Produced by `python bench/restore_quality.py {model_flag}--heads {args.heads:g} --lr {args.lr:g} \
--steps {args.steps} --batch-size {args.batch_size} --probe {args.probe} --max-len {args.max_len}{directions_flag}\
{" --group-by-length" if args.group_by_length else ""} --docs`
(results: `bench/results/restore/{name}/`).

Model: {asset.model}; licence: {asset.license}.

Settings: Wanda 50% unstructured, 128 calibration sequences × 256 tokens from `alpaca/train.jsonl`; probe
{rest.get('probe_samples')} Alpaca training pairs (negatives by {rest.get('negatives_backend')}); heads {args.heads:g}
of all = {len(rest['chosen_heads'])} heads, {directions}; {rest['steps']} AdamW steps × batch {args.batch_size},
lr {args.lr:g}, max length {args.max_len}, seed 0; {rest['trainable_params']:,} trainable parameters. Evaluation:
all 1,000 WikiText sentences and the first {args.alpaca_limit} rows of `alpaca/valid.jsonl` (response-only perplexity).
{report['environment']['device']}, {report['environment']['threads']} threads, torch {report['environment']['torch']}.

{markdown_table(["model", "WikiText-sentence ppl", "Alpaca-valid response ppl"], rows)}

- Response perplexity: restored / pruned = **{rs / pr:.3f}** ({100 * (1 - rs / pr):.1f}% lower; target ≥ 25%).
- WikiText-sentence perplexity: restored / pruned = **{wr / wp:.3f}**.
- Merged vs hooked logits, max abs diff: {report['checks']['merged_vs_hooked_max_abs_diff']:.2e};
  pruned zeros bit-identical after restoration: {report['checks']['zeros_identical']}.
- Chosen heads (layer, head): {', '.join(f'({a},{b})' for a, b in rest['chosen_heads'])}.

Time and peak resident memory per stage:

{markdown_table(["stage", "seconds", "peak RSS MB"], stage_rows)}
"""


if __name__ == "__main__":
    sys.exit(main())
