"""bfloat16 against float32 on SmolLM2-135M-Instruct: the same job end to end in both dtypes, over seeds.

    python -m bench precision [--fp32-seeds 1,2,3] [--bf16-seeds 1,2] [--steps 40] [--probe 64] [--eval-limit 100]
    python -m bench precision --render-only

Wanda 50%, then RestoreLCC at the service default (probe, steps and evaluation rows cut down), run by the service's
own pipeline with ``model.dtype`` float32 or bfloat16. Per run the page shows the response perplexity (held-out
Alpaca) and WikiText perplexity of the pruned and restored model, whether the zeros stayed bit-identical and how
far the merged model's o_proj outputs are from the float64 reference (the merge check). bf16 passes when each of its
restored response perplexities lies within the float32 seeds' spread (mean ± 2 standard deviations). Results are
kept in bench/results/precision-<dtype>-<seed>.json; written to its part of docs/scaling.md.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path
from typing import Any

from bench import harness

PAGE = harness.DOCS / "scaling.md"


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--fp32-seeds", default="1,2,3")
    ap.add_argument("--bf16-seeds", default="1,2")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--probe", type=int, default=64)
    ap.add_argument("--eval-limit", type=int, default=100)


def job(model: str, dtype: str, seed: int, a: dict[str, Any]) -> dict[str, Any]:
    return {
        "model": {"id": model, "dtype": dtype},
        "pruning": {"method": "wanda", "sparsity": 0.5, "calibration_samples": 32, "seq_len": 256},
        "restoration": {"method": "restorelcc", "objective": "sft", "response_eos": False, "probe_samples": a["probe"],
                        "max_steps": a["steps"]},  # measured with sft, before the mix was the default
        "data": {"train": harness.data("alpaca/train.jsonl")},
        "evaluation": {"perplexity": [harness.data("eval/wikitext_sentences.jsonl")],
                       "response_perplexity": [harness.data("alpaca/valid.jsonl")], "limit": a["eval_limit"],
                       "dense": False},
        "seed": seed,
    }


def measure(dtype: str, seed: int, a: dict[str, Any]) -> dict[str, Any]:
    model = harness.model_path(harness.models()[0])
    with tempfile.TemporaryDirectory(prefix="precision-") as tmp:
        report = harness.run_job(job(model, dtype, seed, a), Path(tmp), f"{dtype} seed {seed}")
    return {"dtype": dtype, "seed": seed, "metrics": report["metrics"], "checks": report.get("checks", {}),
            "seconds": report["seconds_total"], "machine": harness.machine()}


def _ppl(r: dict[str, Any], which: str, key: str) -> float:
    """Perplexity of set ``key`` (response perplexity for instruction sets) of the ``which`` model."""
    got = r["metrics"][which][key]
    return got["response_ppl"] if "response_ppl" in got else got["ppl"]


def render(results: list[dict[str, Any]], command: str) -> str:
    rows = []
    for r in sorted(results, key=lambda r: (r["dtype"] != "float32", r["seed"])):
        c = r["checks"]
        rows.append([r["dtype"], r["seed"], f"{_ppl(r, 'pruned', 'valid'):.2f}", f"{_ppl(r, 'restored', 'valid'):.2f}",
                     f"{_ppl(r, 'pruned', 'wikitext_sentences'):.1f}",
                     f"{_ppl(r, 'restored', 'wikitext_sentences'):.1f}",
                     "yes" if c.get("zeros_identical") else "**no**", f"{c.get('merge_o_proj_max_rel_err', 0):.2g}",
                     f"{c.get('merge_rel_tolerance', 0):.2g}", f"{r['seconds']:.0f}"])
    fp32 = [_ppl(r, "restored", "valid") for r in results if r["dtype"] == "float32"]
    bf16 = [_ppl(r, "restored", "valid") for r in results if r["dtype"] == "bfloat16"]
    verdict = "Not measured yet."
    if len(fp32) >= 2 and bf16:
        mean, sd = statistics.mean(fp32), statistics.stdev(fp32)
        inside = all(abs(x - mean) <= 2 * sd for x in bf16)
        verdict = (f"float32 restored response perplexity over {len(fp32)} seeds: {mean:.2f} ± {sd:.2f}; bfloat16: "
                   f"{', '.join(f'{x:.2f}' for x in bf16)} — **{'within' if inside else 'outside'}** the float32 "
                   "spread (mean ± 2 sd).")
    return "\n".join([
        "## bfloat16 against float32 (SmolLM2-135M-Instruct, real weights)", "",
        f"Made by `{command}`: Wanda 50% then RestoreLCC at the service default with objective sft (fewer probe "
        "pairs and steps), the "
        "same job in each dtype. Zeros are compared bit for bit; the merge check compares every o_proj's output with a "
        "float64 reference (relative error, and the tolerance of one rounding in the model's dtype).", "",
        verdict, "",
        harness.markdown_table(["dtype", "seed", "pruned resp. ppl", "restored resp. ppl", "pruned WikiText",
                                "restored WikiText", "zeros identical", "merge rel. err", "tolerance", "seconds"],
                               rows), ""])


def main(args: argparse.Namespace, argv: list[str]) -> int:
    store = harness.Store(harness.RESULTS)
    a = {"steps": args.steps, "probe": args.probe, "eval_limit": args.eval_limit}
    runs = [("float32", int(s)) for s in args.fp32_seeds.split(",")] + \
           [("bfloat16", int(s)) for s in args.bf16_seeds.split(",")]
    results = []
    for dtype, seed in runs:
        path = harness.RESULTS / f"precision-{dtype}-{seed}.json"
        if args.render_only:
            found = store.read(path, a | {"dtype": dtype, "seed": seed})
            if found is not None:
                results.append(found)
            continue
        results.append(store.get(path, a | {"dtype": dtype, "seed": seed}, lambda d=dtype, s=seed: measure(d, s, a),
                                 f"{dtype} seed {seed}"))
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in a.items()]
    harness.write_part(PAGE, "precision", render(results, harness.page_command("precision", flags)))
    return 0
