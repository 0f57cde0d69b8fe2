"""Training with the EOS after each response, or without it: whether the restored model stops where a response ends.

    python -m bench stop [--seeds 0,1]
    python -m bench stop --render-only

SmolLM2-135M-Instruct, the comparison's Wanda 50% model (bench/results/quality/runs), RestoreLCC at the service
default (its default objective, 50 steps × batch 8) trained on Alpaca with ``restoration.response_eos`` true (the
default) and false (how every run on the earlier pages trained). Scored: held-out responses of Alpaca (valid rows) and
of the demo's Wikipedia passages (response perplexity, and at the end of each response the EOS token's mean NLL,
``stop_nll``, and the share of responses after which it is the model's most likely next token, ``stop_top1``), and
WikiText sentences (perplexity). Results: bench/results/stop/<setting>/eos-<on|off>/seed<k>.json; page:
docs/stopping.md.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

from bench import harness, objective, plan
from bench.compare import _get

PAGE = harness.DOCS / "stopping.md"
SETTING = "wanda-50"
RESPONSES = 100  # rows of each response set
WIKITEXT = 200
# (label, set stem, metric, how it prints)
COLUMNS = (("Alpaca resp. ppl", "valid", "response_ppl", "{:.2f}"), ("Alpaca stop NLL", "valid", "stop_nll", "{:.2f}"),
           ("Alpaca stops first", "valid", "stop_top1", "{:.0%}"),
           ("Wikipedia resp. ppl", "wikipedia_heldout", "response_ppl", "{:.2f}"),
           ("Wikipedia stop NLL", "wikipedia_heldout", "stop_nll", "{:.2f}"),
           ("Wikipedia stops first", "wikipedia_heldout", "stop_top1", "{:.0%}"),
           ("WikiText ppl", "wikitext_sentences", "ppl", "{:.2f}"))


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--seeds", default="0,1", help="restoration seeds (default 0,1)")


def evaluation() -> dict[str, Any]:
    from worker.assets.datasets import demo_data_dir

    responses = [harness.data("alpaca/valid.jsonl"),
                 str(demo_data_dir() / "instructions" / "wikipedia_heldout.jsonl")]
    wiki = harness.data("eval/wikitext_sentences.jsonl")
    return {"perplexity": [wiki], "response_perplexity": responses, "tasks": [], "limit": None,
            "limits": {**{Path(p).stem: RESPONSES for p in responses}, Path(wiki).stem: WIKITEXT},
            "batch_size": 8, "max_seq_len": 512, "dense": False}


def run_path(store: harness.Store, eos: bool, seed: int) -> Path:
    return store.root / SETTING / f"eos-{'on' if eos else 'off'}" / f"seed{seed}.json"


def run(store: harness.Store, seeds: list[int]) -> None:
    """Dense, pruned, and RestoreLCC with and without the EOS, each seed; what is stored already is reused."""
    runner = objective.Runner(argparse.Namespace(wikitext_limit=WIKITEXT, response_limit=RESPONSES, task_limit=0,
                                                 seeds="0", only=None, render_only=False))
    runner.store = store  # its dense/pruned/restore steps, with this benchmark's results
    base = runner._base()
    ev = evaluation()
    setting = plan.setting_by_key(SETTING)
    store.get(store.root / "dense.json", {"evaluation": ev, "model": "SmolLM2-135M-Instruct"},
              lambda: runner._evaluate(Path(base.dense_dir), ev, "dense"), "dense")
    runner._pruned(base, setting, ev)
    method = plan.method_by_key("restorelcc-default")
    for seed in seeds:
        for eos in (True, False):
            job = plan.restore_job(method, base.budget, plan.Data(harness.data("alpaca/train.jsonl"), "", "", ()), "",
                                   base.dense_dir or "", seed)
            job["restoration"] = {**objective.restoration(method, base.budget, objective.service_default()),
                                  "response_eos": eos}
            key = f"restorelcc-eos-{'on' if eos else 'off'}"
            store.get(run_path(store, eos, seed), {"job": {**job, "model": None}, "evaluation": ev},
                      lambda j=job, k=key, sd=seed: runner._restore(base, setting, j, k, sd, ev),
                      f"{SETTING}/{key}/seed{seed}")


def _cells(runs: list[dict[str, Any]]) -> list[str]:
    """Each column: the mean over the runs, and each run's value after it when there are several."""
    out = []
    for _, stem, metric, fmt in COLUMNS:
        values = [_get(r["metrics"], (stem, metric)) for r in runs]
        if any(v is None for v in values):
            out.append("—")
            continue
        text = fmt.format(statistics.mean(values))
        out.append(text + (f" ({' / '.join(fmt.format(v) for v in values)})" if len(values) > 1 else ""))
    return out


def render(store: harness.Store, seeds: list[int], command: str) -> str:
    dense, pruned = store.read(store.root / "dense.json"), store.read(store.root / SETTING / "pruned.json")
    lines = ["# Stopping: training on the EOS after each response", "",
             f"Made by `{command}` (bench/stop.py). SmolLM2-135M-Instruct pruned with Wanda 50%; RestoreLCC at the "
             "service default (its default objective, 50 steps × batch 8, Alpaca training rows) with "
             "`restoration.response_eos` true — the default: the tokenizer's EOS follows each training response and "
             "is trained like a response token, as Stanford Alpaca's recipe does — and false, how every run on the "
             "other pages trained. Scored on held-out rows: "
             f"{RESPONSES} Alpaca valid rows and {RESPONSES} of the demo's held-out Wikipedia passages (response "
             "perplexity of the response's own tokens, unchanged by the EOS; *stop NLL*: the EOS token's mean NLL "
             "right after the response; *stops first*: the share of responses after which the EOS is the model's "
             f"most likely next token), and {WIKITEXT} WikiText sentences. Mean over seeds, each seed in brackets.", ""]
    if dense is None or pruned is None:
        return "\n".join([*lines, "Not run yet.", ""])
    rows = [["dense", *_cells([dense])], ["pruned", *_cells([pruned])]]
    for eos in (True, False):
        runs = [r for s in seeds if (r := store.read(run_path(store, eos, s))) is not None]
        if runs:
            label = f"restored, response_eos {'true' if eos else 'false'}"
            rows.append([f"{label} (seeds {', '.join(str(r['seed']) for r in runs)})", *_cells(runs)])
    lines += [harness.markdown_table(["model", *(c[0] for c in COLUMNS)], rows, str), ""]
    notes = store.read_text("notes.md")
    if notes:
        lines += ["## What the runs say", "", notes.strip(), ""]
    env = dense.get("environment") or {}
    lines += [f"Measured on {env.get('cpu', 'CPU')} ({env.get('torch', '')}), float32.", ""]
    return "\n".join(lines)


def main(args: argparse.Namespace, argv: list[str]) -> int:
    store = harness.Store(harness.RESULTS / "stop")
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if not args.render_only:
        run(store, seeds)
    harness.write_page(PAGE, render(store, seeds, harness.page_command("stop", [f"--seeds={args.seeds}"])))
    return 0
