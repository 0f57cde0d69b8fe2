"""Turning stored results into the table (markdown, the paper's layout) and the chart. Pure except the PNG."""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.quality import plan

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


@dataclass(frozen=True)
class Row:
    key: str
    label: str


def row_order() -> list[Row]:
    rows = [Row("dense", "dense"), Row("pruned", "pruned")]
    for m in plan.METHODS:
        rows += [Row(plan.row_key(m.key, f), plan.row_label(m, f)) for f in m.forms]
    return rows


def _get(row: dict[str, Any], path: Sequence[str]) -> float | None:
    cur: Any = row
    for p in path:
        if not isinstance(cur, dict) or p not in cur:
            return None
        cur = cur[p]
    return float(cur) if isinstance(cur, int | float) else None


def collect(results: list[dict[str, Any]]) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """{setting: {row key: [row dict per seed, in seed order]}}."""
    out: dict[str, dict[str, list[tuple[int, dict[str, Any]]]]] = {}
    for r in results:
        if r.get("setting") is None:
            continue
        for key, row in r["rows"].items():
            out.setdefault(r["setting"], {}).setdefault(key, []).append((int(r["seed"]), row))
    return {s: {k: [row for _, row in sorted(v, key=lambda t: t[0])] for k, v in rows.items()}
            for s, rows in out.items()}


def spread(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value)."""
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


def fmt(values: Sequence[float], kind: str) -> str:
    if not values:
        return "—"
    mean, sd = spread(values)
    if kind == "int":
        return f"{mean:,.0f}"
    scale, digits = (100.0, 1) if kind == "acc" else (1.0, 2 if kind == "ppl" else 0)
    text = f"{scale * mean:.{digits}f}"
    if sd is not None:
        text += f" ± {scale * sd:.{digits}f}"
    return text


def table(rows_by_key: dict[str, list[dict[str, Any]]], dense: dict[str, Any] | None) -> str:
    """One setting's markdown table: dense, pruned, then every method row present (others shown as not run)."""
    header = ["method", "seeds", *(c.header for c in COLUMNS), "resp. ppl vs pruned"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    pruned = rows_by_key.get("pruned") or []
    pruned_ppl = _get(pruned[0], COLUMNS[1].path) if pruned else None
    for row in row_order():
        runs = [dense] if row.key == "dense" and dense else rows_by_key.get(row.key, [])
        if not runs:
            lines.append(f"| {row.label} | 0 |" + " — |" * (len(COLUMNS) + 1))
            continue
        cells = [row.label, str(len(runs))]
        for c in COLUMNS:
            vals = [v for v in (_get(r, c.path) for r in runs) if v is not None]
            cells.append("—" if row.key == "dense" and c.kind in ("int", "sec") else fmt(vals, c.kind))
        ppl = [v for v in (_get(r, COLUMNS[1].path) for r in runs) if v is not None]
        if pruned_ppl and ppl and row.key not in ("dense", "pruned"):
            cells.append(f"{100 * (statistics.fmean(ppl) / pruned_ppl - 1):+.1f}%")
        else:
            cells.append("—")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def head_overlap(results: list[dict[str, Any]], setting: str) -> list[tuple[str, int, int, int]]:
    """(RestoreLCC row, seed, shared heads, heads) between each RestoreLCC (probed) row and its bias-only
    ablation on the same heads, for the seeds both ran."""
    heads: dict[tuple[str, int], set[tuple[int, int]]] = {}
    for r in results:
        if r.get("setting") == setting:
            heads[(r["method"], int(r["seed"]))] = {tuple(h) for h in r.get("info", {}).get("chosen_heads", [])}
    out = []
    for (m, seed), a in sorted(heads.items()):
        bias = plan.ABLATIONS[m][1] if m in plan.ABLATIONS else None
        if (bias, seed) in heads:
            out.append((m, seed, len(a & heads[(bias, seed)]), len(a)))
    return out


def notes(results: list[dict[str, Any]], setting: str) -> list[str]:
    """Per-setting facts worth a line: head overlap, adapter overheads, what re-masking discarded."""
    lines = []
    for ours, seed, shared, n in head_overlap(results, setting):
        bias = plan.method_by_key(plan.ABLATIONS[ours][1])
        lines.append(f"Heads of {bias.label} vs {plan.method_by_key(ours).label}, seed {seed}: "
                     f"{shared} of {n} shared.")
    seen = set()
    for r in sorted(results, key=lambda r: (r["method"], r["seed"])):
        if r.get("setting") != setting or r["method"] not in ("lora", "dora") or r["method"] in seen:
            continue
        seen.add(r["method"])
        info = r["info"]
        o = info.get("unmerged_inference_overhead") or {}
        name = "LoRA" if r["method"] == "lora" else "DoRA"
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


def _mean(rows: list[dict[str, Any]], col: Column) -> float | None:
    vals = [v for v in (_get(r, col.path) for r in rows) if v is not None]
    return statistics.fmean(vals) if vals else None


def _show(col: Column, v: float, extra: int = 0) -> str:
    """A verdict's number: accuracies in % with one decimal, perplexities with two (``extra`` more)."""
    return f"{100 * v:.{1 + extra}f}" if col.kind == "acc" else f"{v:.{2 + extra}f}"


def _show_pair(col: Column, a: float, b: float) -> tuple[str, str]:
    """Both numbers of a verdict, with as many more decimals (up to three) as it takes to tell them apart,
    so 'worse' never stands beside two equal-looking numbers."""
    for extra in range(4):
        shown = _show(col, a, extra), _show(col, b, extra)
        if a == b or shown[0] != shown[1]:
            return shown
    return shown


def ratio_text(r: float) -> str:
    """A ratio to LoRA with three decimals, or four where three would round it onto the target (1.0503 is
    not within 1.05×, and the page must not print 1.050 beside 'not met')."""
    short = f"{r:.3f}"
    return f"{r:.4f}" if float(short) == plan.RATIO_TARGET and r != plan.RATIO_TARGET else short


def _side_by_side(ours: list[dict[str, Any]], other: list[dict[str, Any]], col: Column, sign: int
                  ) -> tuple[float, float, int] | None:
    """Both means on ``col`` and how ours compares (1 better, -1 worse, 0 equal; ``sign`` -1 where lower is
    better); None when either is not measured."""
    a, b = _mean(ours, col), _mean(other, col)
    if a is None or b is None:
        return None
    d = sign * (a - b)
    return a, b, (d > 0) - (d < 0)


def _comparison(ours: list[dict[str, Any]], other: list[dict[str, Any]], checks: list[tuple[Column, str, int]]
                ) -> list[str]:
    """'name a vs b (better|**worse**|equal)' for each check both sides measured."""
    parts = []
    for col, name, sign in checks:
        both = _side_by_side(ours, other, col, sign)
        if both is not None:
            a, b, side = both
            word = {1: "better", -1: "**worse**", 0: "equal"}[side]
            shown_a, shown_b = _show_pair(col, a, b)
            parts.append(f"{name} {shown_a} vs {shown_b} ({word})")
    return parts


def _vs_lora(ours: list[dict[str, Any]], lora: list[dict[str, Any]]) -> tuple[float | None, float | None]:
    """Ours ÷ unmerged LoRA: response perplexity and trainable parameters (means over seeds); None where
    either side is not measured (or LoRA's value is zero)."""
    def ratio(col: Column) -> float | None:
        a, b = _mean(ours, col), _mean(lora, col)
        return a / b if a is not None and b else None

    return ratio(COLUMNS[1]), ratio(COLUMNS[9])


def ablations(rows_by_key: dict[str, list[dict[str, Any]]], ours: str, name: str,
              checks: list[tuple[Column, str, int]]) -> list[str]:
    """A RestoreLCC row against its two ablations at the same head count: random heads, and bias only on the
    same heads (no directions)."""
    random_heads, bias = plan.ABLATIONS[ours]
    lines = []
    for key, what in ((random_heads, "random heads (the same count)"),
                      (bias, "bias only on the same heads (no directions)")):
        parts = _comparison(rows_by_key.get(ours) or [], rows_by_key.get(key) or [], checks)
        if parts:
            lines.append(f"Ablation, {name} vs {what}: " + "; ".join(parts) + ".")
    return lines


def verdict(rows_by_key: dict[str, list[dict[str, Any]]]) -> list[str]:
    """The issue's checks for one setting, computed from the table's rows (means over seeds).

    RestoreLCC (probed heads) against the pruned model on every perplexity and on mean accuracy; its
    response perplexity against unmerged LoRA's (target ≤ 1.05×) and its parameters against LoRA's
    (≤ 2%). The service default (the searched setting) against the pruned model and against unmerged LoRA
    (≤ 1.05× with ≤ 5% of its parameters). Each of the two beside its ablations at its own head count.
    A check whose rows are missing says so instead of passing.
    """
    ours, pruned = rows_by_key.get("restorelcc") or [], rows_by_key.get("pruned") or []
    lora = rows_by_key.get(plan.row_key("lora", "unmerged")) or []
    if not ours or not pruned:
        return ["RestoreLCC vs pruned: not measured yet."]
    lines = []
    checks = [(COLUMNS[1], "Alpaca response ppl", -1), (COLUMNS[0], "WikiText ppl", -1), (COLUMNS[8], "mean acc", 1)]
    for col, name, sign in checks:
        both = _side_by_side(ours, pruned, col, sign)
        if both is None:
            lines.append(f"RestoreLCC vs pruned, {name}: not measured.")
            continue
        a, b, side = both
        shown_a, shown_b = _show_pair(col, a, b)
        lines.append(f"RestoreLCC vs pruned, {name}: {shown_a} vs {shown_b} — "
                     + ("**better**." if side > 0 else "**not better**."))
    if lora:
        ppl, share = _vs_lora(ours, lora)
        if ppl is not None:
            lines.append(f"RestoreLCC / unmerged LoRA, Alpaca response ppl: **{ratio_text(ppl)}×** (target ≤ "
                         f"{plan.RATIO_TARGET}×: " + ("met" if ppl <= plan.RATIO_TARGET else "not met") + ").")
        if share:
            lines.append(f"RestoreLCC's trainable parameters: **{100 * share:.2f}%** of LoRA's (target ≤ "
                         f"{100 * plan.PARAMS_VS_LORA:g}%: " + ("met" if share <= plan.PARAMS_VS_LORA else "not met")
                         + ").")
    else:
        lines.append("RestoreLCC vs LoRA: LoRA not measured yet.")
    lines += ablations(rows_by_key, "restorelcc", "RestoreLCC (probed heads)", checks)
    default = rows_by_key.get("restorelcc-default") or []
    parts = _comparison(default, pruned, checks)
    if parts:
        lines.append("RestoreLCC at the service default vs pruned: " + "; ".join(parts) + ".")
    lines += ablations(rows_by_key, "restorelcc-default", "RestoreLCC at the service default", checks)
    ppl, share = _vs_lora(default, lora)
    if ppl is not None and share is not None:
        met = ppl <= plan.RATIO_TARGET and share <= plan.PARAM_CAP
        lines.append("RestoreLCC at the service default / unmerged LoRA, Alpaca response ppl: "
                     f"**{ratio_text(ppl)}×** with {100 * share:.2f}% of LoRA's parameters (target ≤ "
                     f"{plan.RATIO_TARGET}× with ≤ {100 * plan.PARAM_CAP:g}%: " + ("met" if met else "not met") + ").")
    return lines


def coverage(results: list[dict[str, Any]]) -> str:
    """How much of the full plan (every setting and method; seeds 0 and 1 for the main rows) is measured."""
    full = plan.plan(plan.Budget(), plan.Selection())
    have = {(r.get("setting"), r.get("method"), int(r.get("seed", -1))) for r in results}
    missing = [f"{s.key}/{m.key}/seed{seed}" for s, m, seed in full if (s.key, m.key, seed) not in have]
    done = len(full) - len(missing)
    if not missing:
        return f"**Coverage.** All {len(full)} restoration runs of the full plan are measured."
    return (f"**Coverage.** {done} of the {len(full)} restoration runs of the full plan (every setting and method; "
            f"seeds 0 and 1 for the main rows) are measured; this page is partial. Not measured yet: "
            + ", ".join(f"`{m}`" for m in missing) + ".")


def cpu_of(result: dict[str, Any]) -> str:
    return str((result.get("environment") or {}).get("cpu") or "?")


def _describe(env: dict[str, Any]) -> str:
    return (f"{env.get('device')} ({env.get('cpu')}, {env.get('cpus')} CPUs, {env.get('threads')} torch threads), "
            f"Python {env.get('python')}, torch {env.get('torch')}")


# Why a page that mixes CPUs says so: shared by the results page and the search page.
MIXED_CPUS = ("floating-point kernels differ between CPUs, and each machine prunes its own copy of a setting's "
              "model from the same spec and seed, so results from different CPUs are not bit-identical, and "
              "seconds compare only between runs on the same CPU")


def machines(results: list[dict[str, Any]], fallback: dict[str, Any] | None = None) -> str:
    """The machine line; runs stored over several sessions may come from different CPUs, counted per CPU."""
    envs = Counter(_describe(r["environment"]) for r in results if r.get("environment"))
    if not envs:
        return f"**Machine.** {_describe(fallback)}." if fallback else ""
    if len(envs) == 1:
        return f"**Machine.** {next(iter(envs))}."
    listed = "; ".join(f"{e}: {n} runs" for e, n in envs.most_common())
    return (f"**Machines.** These runs were measured in several sessions on {len(envs)} kinds of machine: {listed}. "
            f"{MIXED_CPUS[0].upper()}{MIXED_CPUS[1:]} (the time table names each run's CPU).")


def timings(results: list[dict[str, Any]]) -> str:
    rows = []
    for r in sorted(results, key=lambda r: (r.get("setting") or "", r["method"], r["seed"])):
        s = r.get("seconds") or {}
        if "total" not in s:
            continue
        st = s.get("stages", {})
        rows.append([r.get("setting"), r["method"], r["seed"], cpu_of(r), s.get("total"), s.get("train"),
                     st["probing"] + st.get("extracting", 0) if "probing" in st else None,
                     s.get("eval_merged"), s.get("eval_unmerged")])
    header = ["setting", "method", "seed", "cpu", "total s", "train s", "probe+extract s", "eval s", "eval unmerged s"]

    def cell(v: Any) -> str:
        if v is None:
            return "—"
        return f"{v:.0f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def markdown(results: list[dict[str, Any]], dense: dict[str, Any] | None, budget: dict[str, Any],
             command: str, env: dict[str, Any] | None, chart: str | None = "results.png",
             results_dir: str = "bench/results/quality", model: str = "SmolLM2-135M-Instruct",
             search: list[str] | None = None) -> str:
    """The whole results page."""
    by_setting = collect(results)
    dense_row = (dense or {}).get("rows", {}).get("dense")
    b = budget
    wl = "all 1,000" if b.get("wikitext_limit") is None else f"the first {b['wikitext_limit']}"
    parts = [
        f"# Restoration quality on {model}: RestoreLCC vs LoRA, DoRA and bias baselines",
        "",
        f"Produced by `{command}` (results, one JSON per setting, method and seed: `{results_dir}/`; "
        "the command resumes from them).",
        "",
        "**Settings.** One pruned model per setting (calibration "
        f"{b['calibration_samples']} × {b['calibration_seq_len']} tokens of `alpaca/train.jsonl`, pruning seed 0), "
        "restored by every method from the same saved copy. Every method gets the same budget: "
        f"{b['steps']} AdamW steps × batch {b['batch_size']} of `alpaca/train.jsonl` pairs (first "
        f"{b['train_samples']} rows, loss on response tokens, max {b['max_seq_len']} tokens), the seed's "
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
    ]
    parts += ["", coverage(results)]
    machine_line = machines(results, env)
    if machine_line:
        parts += ["", machine_line]
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
        parts += [""] + [f"- {t}" for t in verdict(rows)]
        extra = notes(results, setting.key)
        if extra:
            parts += [f"- {t}" for t in extra]
    if chart:
        parts += ["", f"![Response perplexity, WikiText perplexity and mean accuracy per method]({chart})"]
    if search:
        parts += ["", "## RestoreLCC's recommended setting", ""] + [f"- {t}" for t in search]
    parts += ["", "## Time per run", "", "Seconds on the CPU each run names (the pruning run includes the dense "
              "and pruned evaluations).", "",
              timings(results), ""]
    return "\n".join(parts)


_PALETTE = ("C0", "C1", "C2", "C3", "C4", "C5", "C6", "C8", "C9")  # no grey: dense and pruned are grey
CHART_METRICS = ((COLUMNS[1], "Alpaca response ppl ↓"), (COLUMNS[0], "WikiText ppl ↓"), (COLUMNS[8], "mean acc % ↑"))


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
        rows = by_setting[s.key]
        for j, (col, title) in enumerate(CHART_METRICS):
            ax = axes[i][j]
            labels, means, errs, colors = [], [], [], []
            for row in order:
                runs = [dense_row] if row.key == "dense" and dense_row else rows.get(row.key, [])
                vals = [v for v in (_get(r, col.path) for r in runs) if v is not None]
                labels.append(row.label)
                if not vals:
                    means.append(math.nan)
                    errs.append(0.0)
                else:
                    scale = 100.0 if col.kind == "acc" else 1.0
                    mean, sd = spread(vals)
                    means.append(scale * mean)
                    errs.append(scale * (sd or 0.0))
                own = _PALETTE[order.index(row) % len(_PALETTE)]
                colors.append({"dense": "0.35", "pruned": "0.65"}.get(row.key, own))
            y = list(range(len(labels)))
            ax.barh(y, [0 if math.isnan(m) else m for m in means], xerr=errs, color=colors, capsize=3)
            for yy, m in zip(y, means, strict=True):
                if math.isnan(m):
                    ax.text(0, yy, " not run", va="center", fontsize=7, color="0.5")
                else:
                    ax.text(m, yy, f" {m:.1f}" if col.kind == "acc" else f" {m:.2f}", va="center", fontsize=7)
            ax.set_yticks(y)
            ax.set_yticklabels(labels if j == 0 else [], fontsize=8)
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
