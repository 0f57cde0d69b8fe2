"""The comparison: RestoreLCC vs LoRA / DoRA / bias baselines under one budget, Wanda 50% and SparseGPT 2:4.

    python -m bench compare                      # everything (hours on a CPU); resumes from stored results
    python -m bench compare --render-only        # rewrite docs/results.md and docs/results.png from the JSONs
    python -m bench compare --only wanda-50/restorelcc,wanda-50/lora --seeds 0
    python -m bench compare --quick              # smoke run (tiny limits, 3 steps) in bench/results/quality-quick/

Results under bench/results/quality/: dense.json (the dense model), <setting>/pruned/seed0.json (the pruned
model), <setting>/<method>/seed<k>.json (one restoration run), notes.md (what the runs say, by hand: the page
ends with it); runs/ keeps the pruned models and the pipeline's outputs. The bench evaluates the exported
(merged) model itself, and LoRA/DoRA also unmerged on top of the pruned model (peft).

Learning rates: RestoreLCC and the bias rows train per-head offsets initialised near zero, which need a large
step at 50 steps (1e-2 on 27 heads; with more heads a smaller one wins, see docs/search.md). LoRA/DoRA commonly
use 1e-4..2e-4 for thousands of steps; from B = 0, 50 steps at 2e-4 barely move the adapter, so the default here
is 1e-3 to give LoRA a fair chance under the same small step budget.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from bench import harness, plan

MODEL = "SmolLM2-135M-Instruct"


def add_args(ap: argparse.ArgumentParser) -> None:
    """The budget's arguments (the search shares them)."""
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
    ap.add_argument("--quick", action="store_true", help="tiny limits and 3 steps; separate results and page")


def setup(args: argparse.Namespace) -> tuple[Runner, Path]:
    """The runner (its dense model fetched only when something runs) and the folder its pages go to."""
    b = replace(plan.Budget(), **plan.QUICK) if args.quick else plan.Budget()
    given = {"steps": args.steps, "batch_size": args.batch_size, "task_limit": args.task_limit,
             "alpaca_limit": args.alpaca_limit, "wikitext_limit": args.wikitext_limit}
    seeds = tuple(int(s) for s in args.seeds.split(",") if s.strip())
    if not seeds:
        raise SystemExit("--seeds: at least one seed")
    b = replace(b, **{k: v for k, v in given.items() if v is not None}, lr_offsets=args.lr_restorelcc,
                lr_adapter=args.lr_lora, heads=args.heads, seeds=seeds, group_by_length=not args.random_batches)
    root = harness.RESULTS / ("quality-quick" if args.quick else "quality")
    dense = None if args.render_only else harness.model_path(harness.models()[0])
    return Runner(b, quality_data(), dense, harness.Store(root)), (root / "docs" if args.quick else harness.DOCS)


def quality_data() -> plan.Data:
    d = harness.data
    return plan.Data(train=d("alpaca/train.jsonl"), wikitext=d("eval/wikitext_sentences.jsonl"),
                     alpaca_valid=d("alpaca/valid.jsonl"),
                     tasks=(d("eval/boolq.jsonl"), d("eval/piqa.jsonl"), d("eval/openbookqa.jsonl")))


@dataclass
class Runner:
    """Runs the plan's jobs (each setting pruned once, its pruned model restored by every method, evaluated
    outside the pipeline), each result kept in ``store`` with its fingerprint and reused while it matches."""

    budget: plan.Budget
    data: plan.Data
    dense_dir: str | None
    store: harness.Store

    def result(self, setting: str, method: str, seed: int) -> Path:
        return self.store.root / setting / method / f"seed{seed}.json"

    def run_dir(self, setting: str, name: str) -> Path:
        return self.store.root / "runs" / setting / name

    def results(self) -> list[dict[str, Any]]:
        return [json.loads(p.read_text(encoding="utf-8")) for p in sorted(self.store.root.glob("*/*/seed*.json"))
                if not p.name.endswith(".stale.json") and p.parts[-3] not in ("runs", "search")]

    def current_results(self) -> tuple[list[dict[str, Any]], list[str]]:
        """The stored results today's plan would reuse, and ``setting/method/seed`` of those it would not (made
        with other settings, e.g. before a default changed): a page must not show those under today's labels."""
        keep, other = [], []
        for r in self.results():
            want = plan.expected_fingerprint(self.budget, self.data, r["setting"], r["method"], r["seed"])
            if want is not None and harness.normalise(r.get("fingerprint")) == harness.normalise(want):
                keep.append(r)
            else:
                other.append(f"{r['setting']}/{r['method']}/seed{r['seed']}")
        return keep, other

    def dense(self) -> dict[str, Any] | None:
        return self.store.read(self.store.root / "dense.json")

    def ensure_base(self, setting: plan.Setting) -> dict[str, Any]:
        """Dense metrics (once) and this setting's pruned metrics; prunes and keeps the pruned model."""
        ev = plan.evaluation(self.data, self.budget)
        path = self.result(setting.key, "pruned", 0)
        base_fp = plan.pruned_fingerprint(setting, self.budget, self.data, ev)
        found = self.store.load(path, base_fp)
        need_dense = self.store.load(self.store.root / "dense.json", {"evaluation": ev}) is None
        if found is not None and not need_dense:
            return found
        out = self.run_dir(setting.key, "pruned")
        job = plan.prune_job(setting, self.budget, self.data, self.dense_dir, {**ev, "dense": need_dense})
        t0 = time.perf_counter()
        report = harness.run_job(job, out, f"{setting.key}/pruned{' + dense' if need_dense else ''}")
        seconds = time.perf_counter() - t0
        (out / "pruned_by.json").write_text(json.dumps(plan.pruning_spec(setting, self.budget)) + "\n")
        env = {**harness.machine(), "threads": report["environment"]["threads"]}
        if need_dense:
            self.store.save(self.store.root / "dense.json", {
                "setting": None, "method": "dense", "seed": 0, "fingerprint": {"evaluation": ev},
                "rows": {"dense": {"metrics": report["metrics"]["dense"]}}, "environment": env,
            })
        result = {
            "setting": setting.key, "method": "pruned", "seed": 0, "fingerprint": base_fp,
            "rows": {"pruned": {"metrics": report["metrics"]["pruned"], "trainable_params": 0}},
            "info": {"sparsity": report["sparsity"]["overall"], "nm_ok": report["sparsity"].get("nm_ok"),
                     "pruning": report.get("pruning")},
            "seconds": {"total": round(seconds, 1), "stages": {k: v["seconds"] for k, v in report["stages"].items()}},
            "environment": env,
        }
        self.store.save(path, result)
        return result

    def pruned_model(self, setting: plan.Setting) -> Path:
        """The cached pruned model directory; pruned again (deterministic, no evaluation) if missing."""
        out = self.run_dir(setting.key, "pruned")
        marker = out / "pruned_by.json"
        want = harness.normalise(plan.pruning_spec(setting, self.budget))
        made = harness.normalise(json.loads(marker.read_text())) if marker.is_file() else None
        if not (out / "model" / "config.json").is_file() or made != want:
            harness.say(f"{setting.key}: pruned model missing or made otherwise, pruning again")
            job = plan.prune_job(setting, self.budget, self.data, self.dense_dir, None)
            harness.run_job(job, out, f"{setting.key}/pruned")
            marker.write_text(json.dumps(want) + "\n")
        return out / "model"

    def run_method(self, setting: plan.Setting, method: plan.Method, seed: int) -> dict[str, Any]:
        ev = plan.evaluation(self.data, self.budget)
        job = plan.restore_job(method, self.budget, self.data, "", self.dense_dir, seed)
        fp = plan.restore_fingerprint(setting, method, self.budget, self.data, seed, ev)
        return self.store.get(self.result(setting.key, method.key, seed), fp, lambda: self.restore_and_evaluate(
            setting, method, seed, job, ev, f"{method.key}-s{seed}"), f"{setting.key}/{method.key}/seed{seed}")

    def restore_and_evaluate(self, setting: plan.Setting, method: plan.Method, seed: int, job: dict[str, Any],
                             ev: dict[str, Any], run_name: str) -> dict[str, Any]:
        """Run the pipeline on the cached pruned model, then evaluate the merged (and unmerged) model."""
        pruned = self.pruned_model(setting)
        job = json.loads(json.dumps(job))
        job["model"]["id"] = str(pruned)
        out = self.run_dir(setting.key, run_name)
        if out.exists():
            shutil.rmtree(out)  # a run interrupted before its result was saved
        label = f"{setting.key}/{run_name}"
        t0 = time.perf_counter()
        report = harness.run_job(job, out, label)
        rest = report["restoration"]
        common = {"trainable_params": rest["trainable_params"], "train_seconds": rest["train_seconds"]}
        merged, eval_merged = harness.evaluate(out / "model", ev, label=label)
        seconds: dict[str, Any] = {"pipeline": report["seconds_total"], "train": rest["train_seconds"],
                                   "stages": {k: v["seconds"] for k, v in report["stages"].items()},
                                   "eval_merged": round(eval_merged, 1)}
        rows: dict[str, Any] = {}
        if method.forms == ("",):
            rows[method.key] = {"metrics": merged, **common}
        else:
            unmerged, eval_unmerged = harness.evaluate(pruned, ev, out / "adapter", f"{label} unmerged")
            seconds["eval_unmerged"] = round(eval_unmerged, 1)
            rows[plan.row_key(method.key, "unmerged")] = {"metrics": unmerged, **common}
            rows[plan.row_key(method.key, "merged")] = {"metrics": merged, **common}
        seconds["total"] = round(time.perf_counter() - t0, 1)
        shutil.rmtree(out / "model", ignore_errors=True)  # the pruned model and adapter/ or restoration stay
        keep = ("head_selection", "chosen_heads", "chosen_scores", "steps", "train_tokens", "probe_samples",
                "negatives_backend", "remasked_weights", "remask_weight_change_rel", "remask_update_lost_rel",
                "merge_remask_max_abs_logit_change", "unmerged_inference_overhead", "adapter")
        info = {k: rest[k] for k in keep if k in rest}
        curve = rest.get("loss_curve") or []
        info.update(loss_first_last=[curve[0], curve[-1]] if curve else None, checks=report.get("checks", {}))
        return {"setting": setting.key, "method": method.key, "seed": seed, "rows": rows, "info": info,
                "seconds": seconds, "environment": {**harness.machine(), "threads": report["environment"]["threads"]}}

    def run(self, only: plan.Selection) -> None:
        """Everything the selection asks for, skipping what is stored."""
        todo = plan.plan(self.budget, only)
        for setting in plan.SETTINGS:
            if any(s.key == setting.key for s, _, _ in todo) or only.wants(setting.key, "pruned"):
                self.ensure_base(setting)
            for s, method, seed in todo:
                if s.key == setting.key:
                    self.run_method(setting, method, seed)


# ── the page ─────────────────────────────────────────────────────────────────────────────────────────────

ALPACA = "valid"  # set name of alpaca/valid.jsonl in the metrics


@dataclass(frozen=True)
class Column:
    header: str
    path: tuple[str, ...]  # into a row: ("metrics", set, key) or a top-level key
    kind: str  # "ppl", "acc", "int", "sec"


COLUMNS: tuple[Column, ...] = (
    Column("WikiText ppl", ("metrics", "wikitext_sentences", "ppl"), "ppl"),
    Column("Alpaca resp. ppl", ("metrics", ALPACA, "response_ppl"), "ppl"),
    Column("BoolQ acc", ("metrics", "boolq", "acc"), "acc"),
    Column("BoolQ norm", ("metrics", "boolq", "acc_norm"), "acc"),
    Column("PIQA acc", ("metrics", "piqa", "acc"), "acc"),
    Column("PIQA norm", ("metrics", "piqa", "acc_norm"), "acc"),
    Column("OBQA acc", ("metrics", "openbookqa", "acc"), "acc"),
    Column("OBQA norm", ("metrics", "openbookqa", "acc_norm"), "acc"),
    Column("mean acc", ("metrics", "mean_acc"), "acc"),
    Column("trainable params", ("trainable_params",), "int"),
    Column("train s", ("train_seconds",), "sec"),
)
PPL, WIKI, MEAN_ACC, PARAMS = COLUMNS[1], COLUMNS[0], COLUMNS[8], COLUMNS[9]
CHECKS = [(PPL, "Alpaca response ppl", -1), (WIKI, "WikiText ppl", -1), (MEAN_ACC, "mean acc", 1)]


def row_order() -> list[tuple[str, str]]:
    """(row key, label) of every row, in the page's order."""
    rows = [("dense", "dense"), ("pruned", "pruned")]
    return rows + [(plan.row_key(m.key, f), plan.row_label(m, f)) for m in plan.METHODS for f in m.forms]


def _get(row: dict[str, Any], path: Sequence[str]) -> float | None:
    cur: Any = row
    for p in path:
        if not isinstance(cur, dict) or p not in cur:
            return None
        cur = cur[p]
    return float(cur) if isinstance(cur, int | float) else None


def _values(rows: list[dict[str, Any]], col: Column) -> list[float]:
    return [v for v in (_get(r, col.path) for r in rows) if v is not None]


def _mean(rows: list[dict[str, Any]], col: Column) -> float | None:
    vals = _values(rows, col)
    return statistics.fmean(vals) if vals else None


def collect(results: list[dict[str, Any]]) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """{setting: {row key: [row dict per seed, in seed order]}}."""
    out: dict[str, dict[str, list[tuple[int, dict[str, Any]]]]] = {}
    for r in results:
        if r.get("setting") is not None:
            for key, row in r["rows"].items():
                out.setdefault(r["setting"], {}).setdefault(key, []).append((int(r["seed"]), row))
    return {s: {k: [row for _, row in sorted(v, key=lambda t: t[0])] for k, v in rows.items()}
            for s, rows in out.items()}


def spread(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def fmt(values: Sequence[float], kind: str) -> str:
    if not values:
        return "—"
    mean, sd = spread(values)
    if kind == "int":
        return f"{mean:,.0f}"
    scale, digits = (100.0, 1) if kind == "acc" else (1.0, 2 if kind == "ppl" else 0)
    return f"{scale * mean:.{digits}f}" + ("" if sd is None else f" ± {scale * sd:.{digits}f}")


def table(rows_by_key: dict[str, list[dict[str, Any]]], dense: dict[str, Any] | None) -> str:
    """One setting's markdown table: dense, pruned, then every method row present (others shown as not run)."""
    pruned = rows_by_key.get("pruned") or []
    pruned_ppl = _get(pruned[0], PPL.path) if pruned else None
    lines = []
    for key, label in row_order():
        runs = [dense] if key == "dense" and dense else rows_by_key.get(key, [])
        if not runs:
            lines.append([label, "0", *["—"] * (len(COLUMNS) + 1)])
            continue
        cells = [label, str(len(runs))]
        cells += ["—" if key == "dense" and c.kind in ("int", "sec") else fmt(_values(runs, c), c.kind)
                  for c in COLUMNS]
        ppl = _values(runs, PPL)
        vs = pruned_ppl and ppl and key not in ("dense", "pruned")
        cells.append(f"{100 * (statistics.fmean(ppl) / pruned_ppl - 1):+.1f}%" if vs else "—")
        lines.append(cells)
    header = ["method", "seeds", *(c.header for c in COLUMNS), "resp. ppl vs pruned"]
    return harness.markdown_table(header, lines, show=str)


def head_overlap(results: list[dict[str, Any]], setting: str) -> list[tuple[str, int, int, int]]:
    """(RestoreLCC row, seed, shared heads, heads) between each RestoreLCC (probed) row and its bias-only
    ablation on the same heads, for the seeds both ran."""
    heads = {(r["method"], int(r["seed"])): {tuple(h) for h in r.get("info", {}).get("chosen_heads", [])}
             for r in results if r.get("setting") == setting}
    out = []
    for (m, seed), a in sorted(heads.items()):
        bias = plan.ABLATIONS[m][1] if m in plan.ABLATIONS else None
        if (bias, seed) in heads:
            out.append((m, seed, len(a & heads[(bias, seed)]), len(a)))
    return out


def notes(results: list[dict[str, Any]], setting: str) -> list[str]:
    """Per-setting facts worth a line: head overlap, adapter overheads, what re-masking discarded."""
    lines = [f"Heads of {plan.method_by_key(plan.ABLATIONS[ours][1]).label} vs {plan.method_by_key(ours).label}, "
             f"seed {seed}: {shared} of {n} shared." for ours, seed, shared, n in head_overlap(results, setting)]
    seen = set()
    for r in sorted(results, key=lambda r: (r["method"], r["seed"])):
        if r.get("setting") != setting or r["method"] not in ("lora", "dora") or r["method"] in seen:
            continue
        seen.add(r["method"])
        info, name = r["info"], "LoRA" if r["method"] == "lora" else "DoRA"
        o = info.get("unmerged_inference_overhead") or {}
        if o:
            rel = o.get("extra_flops_per_token_rel")
            text = (f"{name} unmerged: {o['extra_params']:,} extra parameters, {o['extra_matmuls_per_token']} extra "
                    f"matmuls and {o['extra_flops_per_token']:,} extra FLOPs per token"
                    + (f" (+{100 * rel:.2f}% of the model's linear-layer FLOPs)" if rel is not None else ""))
            if "extra_flops_per_forward" in o:
                text += f", plus {o['extra_flops_per_forward']:,} FLOPs per forward pass for the weight norm"
            lines.append(text + ".")
        if "remask_update_lost_rel" in info:
            lines.append(f"{name} merged: re-applying the mask discarded {100 * info['remask_update_lost_rel']:.1f}% "
                         f"of the update's norm ({info.get('remasked_weights', 0):,} weights), seed {r['seed']}.")
    return lines


def _show_pair(col: Column, a: float, b: float) -> tuple[str, str]:
    """Both numbers of a verdict (accuracies in %, one decimal; perplexities two), with as many more decimals (up
    to three) as it takes to tell them apart, so 'worse' never stands beside two equal-looking numbers."""
    for extra in range(4):
        shown = tuple(f"{100 * v:.{1 + extra}f}" if col.kind == "acc" else f"{v:.{2 + extra}f}" for v in (a, b))
        if a == b or shown[0] != shown[1]:
            break
    return shown


def ratio_text(r: float, target: float) -> str:
    """A ratio to LoRA with three decimals, or four where three would round it onto the target (1.0503 is
    not within 1.05×, and the page must not print 1.050 beside 'not met')."""
    short = f"{r:.3f}"
    return f"{r:.4f}" if float(short) == target and r != target else short


def _side_by_side(ours: list[dict[str, Any]], other: list[dict[str, Any]], col: Column, sign: int
                  ) -> tuple[float, float, int] | None:
    """Both means on ``col`` and how ours compares (1 better, -1 worse, 0 equal; ``sign`` -1 where lower is
    better); None when either is not measured."""
    a, b = _mean(ours, col), _mean(other, col)
    return None if a is None or b is None else (a, b, (sign * (a - b) > 0) - (sign * (a - b) < 0))


def _comparison(ours: list[dict[str, Any]], other: list[dict[str, Any]]) -> list[str]:
    """'name a vs b (better|**worse**|equal)' for each check both sides measured."""
    words = {1: "better", -1: "**worse**", 0: "equal"}
    return [f"{name} {' vs '.join(_show_pair(col, a, b))} ({words[side]})" for col, name, sign in CHECKS
            if (both := _side_by_side(ours, other, col, sign)) for a, b, side in [both]]


def _vs_lora(ours: list[dict[str, Any]], lora: list[dict[str, Any]], col: Column) -> float | None:
    """Ours ÷ unmerged LoRA on ``col`` (means over seeds); None where either is not measured (or LoRA's is 0)."""
    a, b = _mean(ours, col), _mean(lora, col)
    return a / b if a is not None and b else None


def ablations(rows_by_key: dict[str, list[dict[str, Any]]], ours: str, name: str) -> list[str]:
    """A RestoreLCC row against its two ablations at the same head count: random heads, and bias only on the
    same heads (no directions)."""
    whats = zip(plan.ABLATIONS[ours], ("random heads (the same count)", "bias only on the same heads (no directions)"),
                strict=True)
    return [f"Ablation, {name} vs {what}: " + "; ".join(parts) + "." for key, what in whats
            if (parts := _comparison(rows_by_key.get(ours) or [], rows_by_key.get(key) or []))]


def verdict(rows_by_key: dict[str, list[dict[str, Any]]], targets: dict[str, float]) -> list[str]:
    """The targets' checks for one setting, computed from the table's rows (means over seeds).

    RestoreLCC (probed heads) against the pruned model on every perplexity and on mean accuracy; its
    response perplexity against unmerged LoRA's (``ratio_vs_lora``) and its parameters against LoRA's
    (``params_vs_lora``). The service default (the searched setting) against the pruned model and against
    unmerged LoRA (``ratio_vs_lora`` with at most ``param_cap`` of its parameters). Each of the two beside its
    ablations at its own head count. A check whose rows are missing says so instead of passing.
    """
    ours, pruned = rows_by_key.get("restorelcc") or [], rows_by_key.get("pruned") or []
    lora = rows_by_key.get(plan.row_key("lora", "unmerged")) or []
    if not ours or not pruned:
        return ["RestoreLCC vs pruned: not measured yet."]
    target, params_target, cap = targets["ratio_vs_lora"], targets["params_vs_lora"], targets["param_cap"]
    lines = []
    for col, name, sign in CHECKS:
        both = _side_by_side(ours, pruned, col, sign)
        if both is None:
            lines.append(f"RestoreLCC vs pruned, {name}: not measured.")
            continue
        shown_a, shown_b = _show_pair(col, both[0], both[1])
        lines.append(f"RestoreLCC vs pruned, {name}: {shown_a} vs {shown_b} — "
                     + ("**better**." if both[2] > 0 else "**not better**."))
    if lora:
        ppl, share = _vs_lora(ours, lora, PPL), _vs_lora(ours, lora, PARAMS)
        if ppl is not None:
            lines.append(f"RestoreLCC / unmerged LoRA, Alpaca response ppl: **{ratio_text(ppl, target)}×** (target ≤ "
                         f"{target}×: " + ("met" if ppl <= target else "not met") + ").")
        if share:
            lines.append(f"RestoreLCC's trainable parameters: **{100 * share:.2f}%** of LoRA's (target ≤ "
                         f"{100 * params_target:g}%: " + ("met" if share <= params_target else "not met") + ").")
    else:
        lines.append("RestoreLCC vs LoRA: LoRA not measured yet.")
    lines += ablations(rows_by_key, "restorelcc", "RestoreLCC (probed heads)")
    default = rows_by_key.get("restorelcc-default") or []
    parts = _comparison(default, pruned)
    if parts:
        lines.append("RestoreLCC at the service default vs pruned: " + "; ".join(parts) + ".")
    lines += ablations(rows_by_key, "restorelcc-default", "RestoreLCC at the service default")
    ppl, share = _vs_lora(default, lora, PPL), _vs_lora(default, lora, PARAMS)
    if ppl is not None and share is not None:
        met = ppl <= target and share <= cap
        lines.append("RestoreLCC at the service default / unmerged LoRA, Alpaca response ppl: "
                     f"**{ratio_text(ppl, target)}×** with {100 * share:.2f}% of LoRA's parameters (target ≤ "
                     f"{target}× with ≤ {100 * cap:g}%: " + ("met" if met else "not met") + ").")
    return lines


def coverage(results: list[dict[str, Any]]) -> str:
    """How much of the full plan (every setting and method; seeds 0 and 1 for the main rows) is measured."""
    full = plan.plan(plan.Budget(), plan.Selection())
    have = {(r.get("setting"), r.get("method"), int(r.get("seed", -1))) for r in results}
    missing = [f"{s.key}/{m.key}/seed{seed}" for s, m, seed in full if (s.key, m.key, seed) not in have]
    if not missing:
        return f"**Coverage.** All {len(full)} restoration runs of the full plan are measured."
    return (f"**Coverage.** {len(full) - len(missing)} of the {len(full)} restoration runs of the full plan (every "
            "setting and method; seeds 0 and 1 for the main rows) are measured; this page is partial. Not measured "
            "yet: " + ", ".join(f"`{m}`" for m in missing) + ".")


def cpu_of(result: dict[str, Any]) -> str:
    return str((result.get("environment") or {}).get("cpu") or "?")


def _describe(env: dict[str, Any]) -> str:
    return (f"{env.get('device')} ({env.get('cpu')}, {env.get('cpus')} CPUs, {env.get('threads')} torch threads), "
            f"Python {env.get('python')}, torch {env.get('torch')}")


# Why a page that mixes CPUs says so: shared by the results page and the search page.
MIXED_CPUS = ("floating-point kernels differ between CPUs, and each machine prunes its own copy of a setting's "
              "model from the same spec and seed, so results from different CPUs are not bit-identical, and "
              "seconds compare only between runs on the same CPU")


def machines(results: list[dict[str, Any]]) -> str:
    """The machine line; runs stored over several sessions may come from different CPUs, counted per CPU."""
    envs = Counter(_describe(r["environment"]) for r in results if r.get("environment"))
    if not envs:
        return ""
    if len(envs) == 1:
        return f"**Machine.** {next(iter(envs))}."
    listed = "; ".join(f"{e}: {n} runs" for e, n in envs.most_common())
    return (f"**Machines.** These runs were measured in several sessions on {len(envs)} kinds of machine: {listed}. "
            f"{MIXED_CPUS[0].upper()}{MIXED_CPUS[1:]} (the time table names each run's CPU).")


def timings(results: list[dict[str, Any]]) -> str:
    rows = []
    for r in sorted(results, key=lambda r: (r.get("setting") or "", r["method"], r["seed"])):
        s = r.get("seconds") or {}
        if "total" in s:
            st = s.get("stages", {})
            rows.append([r.get("setting"), r["method"], r["seed"], cpu_of(r), s.get("total"), s.get("train"),
                         st["probing"] + st.get("extracting", 0) if "probing" in st else None,
                         s.get("eval_merged"), s.get("eval_unmerged")])
    header = ["setting", "method", "seed", "cpu", "total s", "train s", "probe+extract s", "eval s", "eval unmerged s"]
    return harness.markdown_table(header, rows, lambda v: "—" if v is None else f"{v:.0f}" if isinstance(v, float)
                                  else str(v))


def markdown(results: list[dict[str, Any]], dense: dict[str, Any] | None, budget: dict[str, Any], command: str,
             targets: dict[str, float], chart: str | None = "results.png", results_dir: str = "bench/results/quality",
             search: list[str] | None = None, notes_text: str | None = None) -> str:
    """The whole results page; ``notes_text`` (what the runs say, written by hand) closes it."""
    by_setting = collect(results)
    dense_row = (dense or {}).get("rows", {}).get("dense")
    b = budget
    wl = "all 1,000" if b.get("wikitext_limit") is None else f"the first {b['wikitext_limit']}"
    parts = [
        f"# Restoration quality on {MODEL}: RestoreLCC vs LoRA, DoRA and bias baselines",
        "",
        f"Produced by `{command}` (results, one JSON per setting, method and seed: `{results_dir}/`; "
        "the command resumes from them).",
        "",
        "**Settings.** One pruned model per setting (calibration "
        f"{b['calibration_samples']} × {b['calibration_seq_len']} tokens of `alpaca/train.jsonl`, pruning seed 0), "
        "restored by every method from the same saved copy. Every method gets the same budget: "
        f"{b['steps']} AdamW steps × batch {b['batch_size']} of `alpaca/train.jsonl` pairs (first "
        f"{b['train_samples']} rows, the next-token loss on response tokens (objective `sft`, the paper's recipe; "
        "RestoreLCC's default objective is now distill mixed with it, chosen in [objective.md](objective.md)), "
        f"max {b['max_seq_len']} tokens), the seed's "
        "shuffle" + (", batches of similar length (`group_by_length`)" if b.get("group_by_length") else "")
        + f". RestoreLCC and the bias rows: lr {b['lr_offsets']:g}, heads {b['heads']:g} of all, except the rows "
        f"that name their own (probing on {b['probe_samples']} pairs). LoRA/DoRA: r 8, alpha 16, q_proj and "
        f"v_proj, lr {b['lr_adapter']:g}. "
        "'merged, mask re-applied' is the model the pipeline exports (the same sparsity as the pruned model); "
        "'unmerged adapter' is the pruned model with the adapter on top (peft), which costs extra inference "
        "(below). Rows marked with more than one seed show mean ± sample standard deviation over restoration "
        "seeds (the pruned model is the same).",
        "",
        f"**Evaluation.** WikiText-103 sentences ({wl}, token perplexity); Alpaca-valid response perplexity "
        f"(rows 0..{b['alpaca_limit'] - 1}, prompt tokens not scored); BoolQ, PIQA and OpenBookQA (first "
        f"{b['task_limit']} rows each, zero-shot, lm-evaluation-harness scoring: acc, and acc_norm per "
        "character), accuracies in %; mean acc = mean of the three acc. "
        "'resp. ppl vs pruned' = change of the Alpaca response perplexity relative to the pruned model. "
        "At this model size BoolQ mostly shows which way a model leans between yes and no (63% of its first 500 "
        "rows are yes; see docs/pruning.md), and mean acc moves with it: read the accuracies beside the "
        "perplexities.",
        "",
        coverage(results),
    ]
    parts += ["", machines(results)] if machines(results) else []
    for setting in plan.SETTINGS:
        rows = by_setting.get(setting.key, {})
        parts += ["", f"## {setting.label}", ""]
        if not rows:
            parts.append("Not run yet.")
            continue
        pruned = [r for r in results if r.get("setting") == setting.key and r["method"] == "pruned"]
        if pruned and pruned[0].get("info", {}).get("sparsity") is not None:
            parts += [f"Measured sparsity of the prunable weights: {100 * pruned[0]['info']['sparsity']:.2f}%.", ""]
        parts.append(table(rows, dense_row))
        parts += ["", *(f"- {t}" for t in [*verdict(rows, targets), *notes(results, setting.key)])]
    if chart:
        parts += ["", f"![Response perplexity, WikiText perplexity and mean accuracy per method]({chart})"]
    if search:
        parts += ["", "## RestoreLCC's recommended setting", ""] + [f"- {t}" for t in search]
    parts += ["", "## Time per run", "", "Seconds on the CPU each run names (the pruning run includes the dense "
              "and pruned evaluations).", "", timings(results), ""]
    if notes_text:
        parts += [notes_text.rstrip("\n"), ""]
    return "\n".join(parts)


_PALETTE = ("C0", "C1", "C2", "C3", "C4", "C5", "C6", "C8", "C9")  # no grey: dense and pruned are grey
CHART_METRICS = ((PPL, "Alpaca response ppl ↓"), (WIKI, "WikiText ppl ↓"), (MEAN_ACC, "mean acc % ↑"))


def chart(results: list[dict[str, Any]], dense: dict[str, Any] | None, path: Path) -> Path | None:
    """Horizontal bars per method (error bars: sd over seeds), one row of panels per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_setting = collect(results)
    settings = [s for s in plan.SETTINGS if s.key in by_setting]
    if not settings:
        return None
    dense_row = (dense or {}).get("rows", {}).get("dense")
    order = row_order()
    fig, axes = plt.subplots(len(settings), len(CHART_METRICS), figsize=(15, 0.45 * len(order) * len(settings) + 1.5),
                             squeeze=False)
    for i, s in enumerate(settings):
        for j, (col, title) in enumerate(CHART_METRICS):
            ax = axes[i][j]
            means, errs, colors = [], [], []
            for n, (key, _) in enumerate(order):
                vals = _values([dense_row] if key == "dense" and dense_row else by_setting[s.key].get(key, []), col)
                scale = 100.0 if col.kind == "acc" else 1.0
                mean, sd = spread(vals) if vals else (math.nan, 0.0)
                means.append(scale * mean)
                errs.append(scale * (sd or 0.0))
                colors.append({"dense": "0.35", "pruned": "0.65"}.get(key, _PALETTE[n % len(_PALETTE)]))
            y = list(range(len(order)))
            ax.barh(y, [0 if math.isnan(m) else m for m in means], xerr=errs, color=colors, capsize=3)
            for yy, m in zip(y, means, strict=True):
                if math.isnan(m):
                    ax.text(0, yy, " not run", va="center", fontsize=7, color="0.5")
                else:
                    ax.text(m, yy, f" {m:.1f}" if col.kind == "acc" else f" {m:.2f}", va="center", fontsize=7)
            ax.set_yticks(y)
            ax.set_yticklabels([label for _, label in order] if j == 0 else [], fontsize=8)
            ax.invert_yaxis()
            ax.set_title(f"{s.label}: {title}", fontsize=9)
            finite = [m + e for m, e in zip(means, errs, strict=True) if not math.isnan(m)]
            if finite:
                ax.set_xlim(0, 1.18 * max(finite))
            ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def render(q: Runner, docs: Path, command: str, targets: dict[str, float]) -> None:
    """docs/results.md and docs/results.png from the stored results today's plan would reuse."""
    from bench import search

    results, other = q.current_results()
    for key in other:
        harness.say(f"not on the page: {key} was stored with other settings (run it again to measure it)")
    png = chart(results, q.dense(), docs / "results.png")
    searched = [f"{s.label}. {line}" for s in plan.SETTINGS if (found := search.load(q.store.root, s.key))
                for line in search.summary(found[0], targets)]
    notes = q.store.read_text("notes.md")
    harness.write_page(docs / "results.md", markdown(
        results, q.dense(), q.budget.as_dict(), command, targets, chart=png.name if png else None,
        results_dir=harness.relative(q.store.root), search=searched or None, notes_text=notes))


def main(args: argparse.Namespace, argv: list[str]) -> int:
    try:
        only = plan.parse_only(args.only)
    except ValueError as exc:
        raise SystemExit(str(exc)) from exc
    q, docs = setup(args)
    if not args.render_only:
        q.run(only)
    render(q, docs, harness.page_command("compare", argv), harness.TARGETS["compare"])
    return 0
