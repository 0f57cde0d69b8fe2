"""RestoreLCC vs LoRA / DoRA / bias baselines on SmolLM2-135M-Instruct (or --model), Wanda 50% and SparseGPT 2:4.

    python -m bench.quality                      # everything (hours on a CPU); resumes from stored results
    python -m bench.quality --quick              # smoke run: tiny limits, 3 steps, results and docs under
                                                 # bench/results/quality-quick/
    python -m bench.quality --only wanda-50/restorelcc,wanda-50/lora --seeds 0
    python -m bench.quality --render-only        # rewrite docs/results.md and docs/results.png from the JSONs
    python -m bench.quality --search             # RestoreLCC head fraction × lr × steps on a selection split
    python -m bench.quality --model gemma3-270m  # another architecture: results under bench/results/
                                                 # quality-gemma3-270m/, docs/results-gemma3-270m.md

Each (setting, method, seed) is one pipeline run on the setting's cached pruned model, kept as one JSON
under bench/results/quality/; a run whose JSON exists with the same settings is skipped. RestoreLCC,
LoRA, bias (all heads) and the service default run every seed in --seeds, the other rows the first seed.

Learning rates: RestoreLCC and the bias rows train per-head offset vectors initialised near zero, which
need a large step at 50 steps (1e-2 on 27 heads; with more heads a smaller one wins, see docs/search.md).
LoRA/DoRA commonly use 1e-4..2e-4 for thousands of steps; from B = 0, 50 steps at 2e-4 barely move the
adapter, so the default here is 1e-3 to give LoRA a fair chance under the same small step budget
(change it with --lr-lora; --search only tunes RestoreLCC).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from bench.common import REPO, RESULTS, data
from bench.quality import plan, render
from bench.quality.runner import Bench, Store, machine, run, say
from worker.assets import DEMO_MODEL, MODELS, model_dir


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per method (default 50)")
    ap.add_argument("--batch-size", type=int, default=None, help="sequences per step (default 8)")
    ap.add_argument("--lr-restorelcc", type=float, default=1e-2, help="RestoreLCC and bias rows (default 1e-2)")
    ap.add_argument("--lr-lora", type=float, default=1e-3, help="LoRA and DoRA (default 1e-3)")
    ap.add_argument("--heads", type=float, default=0.1, help="head fraction (or count) for RestoreLCC/bias")
    ap.add_argument("--task-limit", type=int, default=None, help="rows of BoolQ, PIQA, OpenBookQA (default 500)")
    ap.add_argument("--alpaca-limit", type=int, default=None, help="rows 0..N-1 of alpaca/valid (default 300)")
    ap.add_argument("--wikitext-limit", type=int, default=None, help="WikiText sentences (default all 1,000)")
    ap.add_argument("--random-batches", action="store_true",
                    help="batches of random lengths (default: similar lengths together, for every method)")
    ap.add_argument("--seeds", default="0,1", help="restoration seeds, comma-separated (default 0,1)")
    ap.add_argument("--only", action="append", help="SETTING or SETTING/METHOD (wildcards, commas); repeatable. "
                    f"Settings: {', '.join(s.key for s in plan.SETTINGS)}; methods: "
                    f"{', '.join(m.key for m in plan.METHODS)}")
    ap.add_argument("--model", default=DEMO_MODEL, choices=sorted(MODELS),
                    help=f"fetchable model to restore (default {DEMO_MODEL}; fetched on first use)")
    ap.add_argument("--quick", action="store_true", help="tiny limits and 3 steps; separate results and docs")
    ap.add_argument("--render-only", action="store_true", help="only rewrite the docs from stored results")
    ap.add_argument("--keep-models", action="store_true", help="keep every restored model directory")
    ap.add_argument("--out", default=None, help="results root (default bench/results/quality[-quick])")
    ap.add_argument("--docs-dir", default=None, help="where results.md/.png and search.md go "
                    "(default docs/, or <out>/docs with --quick)")
    g = ap.add_argument_group("search")
    g.add_argument("--search", action="store_true", help="grid search RestoreLCC's setting; writes search.md")
    g.add_argument("--search-setting", default="wanda-50")
    g.add_argument("--grid-heads", default=None, help="head fractions (default 0.1,0.2)")
    g.add_argument("--grid-lr", default=None, help="learning rates (default 3e-3,1e-2)")
    g.add_argument("--grid-steps", default=None, help="step budgets (default 25,50)")
    g.add_argument("--grid-extra", action="append", default=[], metavar="POINT",
                   help="one more point outside the product grid (repeatable): HEADS:LR:STEPS[:SCHEDULE[:WARMUP]], "
                        "e.g. 0.6:1e-2:100 or 0.66:6e-3:50:cosine, or key=value pairs with heads, lr, steps and "
                        "optionally schedule, warmup, directions, method (restorelcc or bias), e.g. "
                        "heads=0.9,lr=3e-3,steps=50,directions=30 or heads=all,lr=3e-3,steps=50,method=bias")
    g.add_argument("--select-start", type=int, default=300, help="first alpaca/valid selection row (default 300)")
    g.add_argument("--select-rows", type=int, default=None, help="selection rows (default 300)")
    return ap.parse_args(argv)


def budget_from(args: argparse.Namespace) -> plan.Budget:
    b = plan.Budget()
    if args.quick:
        b = replace(b, **plan.QUICK)
    fields = {
        "steps": args.steps, "batch_size": args.batch_size, "task_limit": args.task_limit,
        "alpaca_limit": args.alpaca_limit, "wikitext_limit": args.wikitext_limit,
    }
    b = replace(b, **{k: v for k, v in fields.items() if v is not None})
    seeds = tuple(int(s) for s in args.seeds.split(",") if s.strip())
    if not seeds:
        raise SystemExit("--seeds: at least one seed")
    return replace(b, lr_offsets=args.lr_restorelcc, lr_adapter=args.lr_lora,
                   heads=args.heads, seeds=seeds, group_by_length=not args.random_batches)


def _floats(text: str | None, default: list[float]) -> list[float]:
    return [float(x) for x in text.split(",")] if text else default


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        only = plan.parse_only(args.only)
    except ValueError as exc:
        raise SystemExit(str(exc)) from exc
    budget = budget_from(args)
    suffix = "" if args.model == DEMO_MODEL else f"-{args.model}"
    root = Path(args.out) if args.out else RESULTS / (f"quality{suffix}" + ("-quick" if args.quick else ""))
    docs = Path(args.docs_dir) if args.docs_dir else (root / "docs" if args.quick else REPO / "docs")
    names = Names(model=MODELS[args.model].upstream.split("/")[-1], suffix=suffix)
    d = plan.Data(
        train=data("alpaca/train.jsonl"),
        wikitext=data("eval/wikitext_sentences.jsonl"),
        alpaca_valid=data("alpaca/valid.jsonl"),
        tasks=(data("eval/boolq.jsonl"), data("eval/piqa.jsonl"), data("eval/openbookqa.jsonl")),
    )
    store = Store(root)
    command = docs_command(argv if argv is not None else sys.argv[1:])
    if args.search:
        return _search(args, budget, d, store, docs, command, names)
    if not args.render_only:
        bench = Bench(budget, d, str(model_dir(args.model)), store, keep_models=args.keep_models)
        timings = run(bench, only)
        for name, seconds in timings:
            say(f"took {seconds:7.0f}s  {name}")
    write_docs(store, budget, d, docs, command, names)
    return 0


@dataclass(frozen=True)
class Names:
    """The model's name in titles, and the suffix of its docs files (empty for the demo model)."""

    model: str
    suffix: str = ""


def docs_command(argv: list[str]) -> str:
    """The command line as the docs show it: without --only and --render-only (they do not change results)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--only":
            skip = True
            continue
        if a.startswith("--only=") or a == "--render-only":
            continue
        out.append(shlex.quote(a))
    return " ".join(["python -m bench.quality", *out])


def write_docs(store: Store, budget: plan.Budget, d: plan.Data, docs: Path, command: str, names: Names) -> None:
    results, other = store.current_results(budget, d)
    for key in other:
        say(f"not on the page: {key} was stored with other settings (run it again to measure it)")
    dense = store.dense_result()
    env = None if any(r.get("environment") for r in results) else machine()  # runs name their own machines
    docs.mkdir(parents=True, exist_ok=True)
    png = render.chart(results, dense, docs / f"results{names.suffix}.png")
    try:
        where = str(store.root.resolve().relative_to(REPO))
    except ValueError:
        where = str(store.root)
    from bench.quality import search

    searched = []
    for setting in plan.SETTINGS:
        found = search.load(store.root, setting.key)
        if found is not None:
            searched += [f"{setting.label}. {line}" for line in search.summary(found)]
    text = render.markdown(results, dense, budget.as_dict(), command, env, chart=png.name if png else None,
                           results_dir=where, model=names.model, search=searched or None)
    md = docs / f"results{names.suffix}.md"
    md.write_text(text, encoding="utf-8")
    say(f"wrote {md}" + (f" and {png}" if png else ""))


def _search(args, budget: plan.Budget, d: plan.Data, store: Store, docs: Path, command: str, names: Names) -> int:
    from bench.quality import search

    setting = plan.setting_by_key(args.search_setting)
    quick = args.quick
    heads = _floats(args.grid_heads, [0.1] if quick else [0.1, 0.2])
    lrs = _floats(args.grid_lr, [1e-2, 3e-2] if quick else [3e-3, 1e-2])
    steps = [int(x) for x in _floats(args.grid_steps, [float(budget.steps)] if quick else [25.0, 50.0])]
    rows = args.select_rows or (8 if quick else 300)
    select = search.write_selection(d.alpaca_valid, store.root, args.select_start, rows, budget.alpaca_limit)
    bench = Bench(budget, d, str(model_dir(args.model)), store, keep_models=args.keep_models)
    try:
        points = search.grid(heads, lrs, steps) + [search.parse_point(p) for p in args.grid_extra]
    except ValueError as exc:
        raise SystemExit(f"--grid-extra: {exc}") from exc
    found = search.run_search(bench, setting, points, select, rows)
    text = search.search_markdown(found, setting, command, args.select_start, rows, budget.alpaca_limit,
                                  model=names.model)
    docs.mkdir(parents=True, exist_ok=True)
    md = docs / f"search{names.suffix}.md"
    md.write_text(text, encoding="utf-8")
    say(f"wrote {md}")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
