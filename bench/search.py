"""The setting search: RestoreLCC's heads × lr × steps (and more) on selection rows that are never evaluated.

    python -m bench search --grid-heads 0.1,0.2 --grid-lr 3e-3,1e-2 --grid-steps 25,50 [--grid-extra POINT ...]
    python -m bench search --render-only         # rewrite docs/search.md from the stored points

The selection rows are a slice of ``alpaca/valid.jsonl`` after the rows the comparison evaluates (rows 300..599
against 0..299 by default), written to ``<root>/search/alpaca_select.jsonl``. Each point is one run on the
setting's cached pruned model (seed 0), scored by response perplexity on the selection rows; one JSON per point
under ``<root>/search/<setting>/``, with ``manifest.json`` naming the points of the latest search and the command
that ran it. LoRA (the comparison's setting, seed 0) is scored on the same rows at every step count of the grid,
and the winner is the point with the best ratio to unmerged LoRA at the same steps within the parameter cap
(``param_cap`` in targets.json).
"""

from __future__ import annotations

import argparse
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import compare, harness, plan
from bench.compare import MIXED_CPUS, cpu_of, ratio_text

SELECT_STEM = "alpaca_select"


def add_args(ap: argparse.ArgumentParser) -> None:
    compare.add_args(ap)
    ap.add_argument("--search-setting", default="wanda-50")
    ap.add_argument("--grid-heads", default=None, help="head fractions (default 0.1,0.2)")
    ap.add_argument("--grid-lr", default=None, help="learning rates (default 3e-3,1e-2)")
    ap.add_argument("--grid-steps", default=None, help="step budgets (default 25,50)")
    ap.add_argument("--grid-extra", action="append", default=[], metavar="POINT",
                    help="one more point outside the product grid (repeatable): HEADS:LR:STEPS[:SCHEDULE[:WARMUP]], "
                         "e.g. 0.6:1e-2:100 or 0.66:6e-3:50:cosine, or key=value pairs with heads, lr, steps and "
                         "optionally schedule, warmup, directions, method (restorelcc or bias), e.g. "
                         "heads=0.9,lr=3e-3,steps=50,directions=30 or heads=all,lr=3e-3,steps=50,method=bias")
    ap.add_argument("--select-start", type=int, default=300, help="first alpaca/valid selection row (default 300)")
    ap.add_argument("--select-rows", type=int, default=None, help="selection rows (default 300)")


def write_selection(source: str, root: Path, start: int, rows: int, eval_rows: int) -> Path:
    """Rows ``start .. start+rows-1`` of ``source`` as their own file; refuses to overlap the evaluated rows."""
    path = root / "search" / f"{SELECT_STEM}.jsonl"
    existed = path.is_file()
    if harness.write_rows(source, path, start, rows, eval_rows) and existed:
        for old in path.parent.glob("*/*.json"):  # other selection rows: every score made on the old ones is set aside
            if not old.name.endswith(".stale.json"):
                old.rename(old.with_suffix(".stale.json"))
    return path


def grid(heads: list[float], lrs: list[float], steps: list[int]) -> list[dict[str, Any]]:
    return [{"heads": h, "lr": lr, "max_steps": s} for h, lr, s in itertools.product(heads, lrs, steps)]


_KEYS = {"heads": "heads", "lr": "lr", "steps": "max_steps", "schedule": "lr_schedule", "warmup": "warmup_steps",
         "directions": "directions", "method": "method"}
_FORMS = ("HEADS:LR:STEPS[:SCHEDULE[:WARMUP]] (0.6:1e-2:100) or key=value pairs "
          "(heads=0.9,lr=3e-3,steps=50,directions=30)")


def parse_point(text: str) -> dict[str, Any]:
    """A grid point from ``HEADS:LR:STEPS[:SCHEDULE[:WARMUP]]`` or ``key=value,...`` (heads, lr, steps, and
    optionally schedule, warmup, directions, method; heads may be ``all``; method ``restorelcc`` or ``bias``).

    Settings at their defaults (constant schedule, no warm-up, all directions, RestoreLCC) stay out of the
    point, so a point keeps the name and fingerprint it had before those settings existed."""
    try:
        if "=" in text:
            given = dict(kv.split("=", 1) for kv in text.split(","))
            if set(given) - set(_KEYS) or not {"heads", "lr", "steps"} <= set(given):
                raise ValueError
        else:
            parts = text.split(":")
            if not 3 <= len(parts) <= 5:
                raise ValueError
            given = dict(zip(["heads", "lr", "steps", "schedule", "warmup"], parts, strict=False))
        raw = {_KEYS[k]: v.strip() for k, v in given.items()}
        point: dict[str, Any] = {"heads": "all" if raw["heads"] == "all" else float(raw["heads"]),
                                 "lr": float(raw["lr"]), "max_steps": int(raw["max_steps"])}
        schedule, warmup = raw.get("lr_schedule", "constant"), int(raw.get("warmup_steps", 0))
        directions = int(raw["directions"]) if "directions" in raw else None
        method = raw.get("method", "restorelcc")
    except ValueError:
        raise ValueError(f"grid point {text!r}: expected {_FORMS}") from None
    schedules = plan.contract()["schedules"]
    if schedule not in schedules:
        raise ValueError(f"grid point {text!r}: schedule {schedule!r} is not one of {', '.join(schedules)}")
    if warmup < 0 or warmup >= point["max_steps"]:
        raise ValueError(f"grid point {text!r}: warm-up must be at least 0 and fewer than the steps")
    if method not in ("restorelcc", "bias") or (method == "bias" and directions is not None):
        raise ValueError(f"grid point {text!r}: method is restorelcc or bias (a bias has no directions)")
    if directions is not None and directions < 1:
        raise ValueError(f"grid point {text!r}: directions must be at least 1")
    extra = {"lr_schedule": schedule if schedule != "constant" else None, "warmup_steps": warmup or None,
             "directions": directions, "method": method if method != "restorelcc" else None}
    return point | {k: v for k, v in extra.items() if v is not None}


def point_overrides(p: dict[str, Any]) -> dict[str, Any]:
    """The restoration fields a point sets (``heads: all`` is ``head_selection: all``)."""
    out = dict(p)
    if p["heads"] == "all":
        del out["heads"]
        out["head_selection"] = "all"
    return out


def heads_text(p: dict[str, Any]) -> str:
    return "all" if p["heads"] == "all" else f"{p['heads']:g}"


def schedule_text(p: dict[str, Any]) -> str:
    """A point's lr schedule in words: ``constant``, ``cosine``, ``cosine, 5 warm-up``."""
    name = p.get("lr_schedule", "constant")
    return f"{name}, {p['warmup_steps']} warm-up" if p.get("warmup_steps") else name


def directions_text(p: dict[str, Any]) -> str:
    """What each head learns besides its bias: ``all`` directions, the top ``K``, or ``none`` (bias only)."""
    if p.get("method") == "bias":
        return "none (bias only)"
    return str(p["directions"]) if "directions" in p else "all"


def point_name(p: dict[str, Any]) -> str:
    name = ("bias-" if p.get("method") == "bias" else "") + f"h{heads_text(p)}-lr{p['lr']:g}-s{p['max_steps']}"
    if "lr_schedule" in p:  # parse_point keeps only settings away from their defaults
        name += f"-{p['lr_schedule']}"
    name += f"-w{p['warmup_steps']}" if p.get("warmup_steps") else ""
    return name + (f"-d{p['directions']}" if "directions" in p else "")


def lora_name(steps: int, budget_steps: int) -> str:
    return "lora.json" if steps == budget_steps else f"lora-s{steps}.json"


@dataclass
class Search:
    points: list[dict[str, Any]]  # one result per grid point
    pruned_ppl: float  # the pruned model on the selection rows
    lora_at: dict[int, dict[str, Any]]  # steps -> LoRA's result on the selection rows (lora/unmerged, lora/merged)
    steps: int  # the results table's step budget

    @property
    def lora(self) -> dict[str, Any]:
        """LoRA at the results table's step budget."""
        return self.lora_at[self.steps]


def run_search(q: compare.Runner, setting: plan.Setting, points: list[dict[str, Any]], select: Path, rows: int,
               command: str) -> None:
    """Every grid point's result, the pruned model's and LoRA's scores on the selection rows; the manifest."""
    ev = plan.evaluation(q.data, q.budget, alpaca=str(select), alpaca_limit=rows, tasks=False, wikitext=False)
    q.ensure_base(setting)
    folder = q.store.root / "search" / setting.key

    q.store.get(folder / "pruned.json", {"evaluation": ev, "pruned_by": plan.pruning_spec(setting, q.budget)},
                lambda: {"metrics": harness.evaluate(q.pruned_model(setting), ev, None, "pruned selection")[0]},
                "search: the pruned model")

    def one(method: plan.Method, overrides: dict[str, Any], file: str, run: str, **extra: Any) -> None:
        job = plan.restore_job(method, q.budget, q.data, "", q.dense_dir, 0, overrides=overrides)
        fp = plan.restore_fingerprint(setting, method, q.budget, q.data, 0, ev, overrides)
        q.store.get(folder / file, fp, lambda: q.restore_and_evaluate(setting, method, 0, job, ev, f"search-{run}"),
                    f"search {run}", **extra)

    for p in points:
        one(plan.method_by_key("restorelcc"), point_overrides(p), f"{point_name(p)}.json", point_name(p), point=p)
    steps = sorted({q.budget.steps} | {p["max_steps"] for p in points})
    for n in steps:  # LoRA (the results table's setting, seed 0) trained as long as each point
        one(plan.method_by_key("lora"), {"max_steps": n}, lora_name(n, q.budget.steps), f"lora-s{n}")
    # What the latest search covered: its page reads these points only, never leftovers of another grid or
    # budget that share the folder.
    q.store.save(folder / "manifest.json", {"points": [f"{point_name(p)}.json" for p in points],
                                            "lora": {str(n): lora_name(n, q.budget.steps) for n in steps},
                                            "steps": q.budget.steps, "command": command})


def load(root: Path, setting: str) -> tuple[Search, str | None] | None:
    """A finished search of ``setting`` as stored under ``root`` and the command that ran it (None when it has
    not run)."""
    folder = Path(root) / "search" / setting

    def read(name: str) -> dict[str, Any]:
        return json.loads((folder / name).read_text(encoding="utf-8"))

    if not all((folder / n).is_file() for n in ("manifest.json", "lora.json", "pruned.json")):
        return None
    manifest = read("manifest.json")
    names = manifest["points"]
    if not names or not all((folder / n).is_file() for n in [*names, *manifest["lora"].values()]):
        return None
    lora_at = {int(n): read(f) for n, f in manifest["lora"].items()}
    found = Search([read(n) for n in names], float(read("pruned.json")["metrics"][SELECT_STEM]["response_ppl"]),
                   lora_at, int(manifest["steps"]))
    return found, manifest.get("command")


def row_ppl(result: dict[str, Any], row: str) -> float:
    return float(result["rows"][row]["metrics"][SELECT_STEM]["response_ppl"])


def score(result: dict[str, Any]) -> float:
    return row_ppl(result, "restorelcc")


def params(result: dict[str, Any], row: str = "restorelcc") -> int:
    return int(result["rows"][row]["trainable_params"])


def ratio(search: Search, result: dict[str, Any]) -> float:
    """A point's selection response perplexity over unmerged LoRA's at the same step count."""
    return score(result) / row_ppl(search.lora_at[result["point"]["max_steps"]], "lora/unmerged")


def winner(search: Search, cap: float) -> dict[str, Any] | None:
    """The point closest to LoRA (lowest ratio) among those training at most ``cap`` of its parameters."""
    within = [r for r in search.points if params(r) <= cap * params(search.lora, "lora/unmerged")]
    return min(within, key=lambda r: ratio(search, r)) if within else None


def _described(p: dict[str, Any]) -> str:
    """``heads 0.66, lr 0.003 (constant), 50 steps``, naming the directions and method when not the default."""
    more = "" if "directions" not in p and "method" not in p else f", directions {directions_text(p)}"
    return f"heads {heads_text(p)}{more}, lr {p['lr']:g} ({schedule_text(p)}), {p['max_steps']} steps"


def summary(found: Search, targets: dict[str, float]) -> list[str]:
    """Lines for the results page: what the search chose and how it compares with LoRA there."""
    target, cap = targets["ratio_vs_lora"], targets["param_cap"]
    won = winner(found, cap)
    if won is None:
        return [f"No searched setting trains at most {100 * cap:g}% of LoRA's parameters."]
    p, vs_lora = won["point"], ratio(found, won)
    lora_ppl = row_ppl(found.lora_at[p["max_steps"]], "lora/unmerged")
    share = params(won) / params(found.lora, "lora/unmerged")

    def listed(text: Any, key: Any = None) -> str:
        return ", ".join(sorted({text(r["point"]) for r in found.points}, key=key))

    return [
        "Searched on Alpaca-valid rows that are never evaluated (docs/search.md): head fractions "
        f"{listed(heads_text, lambda h: (h == 'all', h))}; lr {listed(lambda p: format(p['lr'], 'g'), float)}; "
        f"lr schedules {listed(schedule_text)}; directions per head {listed(directions_text)}; "
        f"{listed(lambda p: str(p['max_steps']), int)} steps.",
        f"Winner: {_described(p)} ({params(won):,} trainable parameters, {100 * share:.2f}% of LoRA's). On the "
        f"selection rows: response ppl {score(won):.3f} against the pruned model's {found.pruned_ppl:.3f} and "
        f"unmerged LoRA's {lora_ppl:.3f} at the same steps, **{ratio_text(vs_lora, target)}×** LoRA (target ≤ "
        f"{target}×: " + ("met" if vs_lora <= target else "**not met**") + ").",
    ]


BIAS_ROWS = ("Rows with directions 'none (bias only)' learn each chosen head's constant directly (`method: bias`). "
             "On all heads that is every constant the heads can add, the same set of models RestoreLCC on all heads "
             "with all directions can reach (only the parameterisation, and so the optimiser's steps, differ): "
             "those rows show how far the constants go at this step budget when learned directly.")


def search_markdown(search: Search, setting: plan.Setting, command: str, start: int, rows: int, eval_rows: int,
                    targets: dict[str, float]) -> str:
    target, cap = targets["ratio_vs_lora"], targets["param_cap"]
    ranked = sorted(search.points, key=lambda r: ratio(search, r))
    lora_params = params(search.lora, "lora/unmerged")
    table = harness.markdown_table(
        ["rank", "heads", "directions", "lr", "lr schedule", "steps", "selection resp. ppl",
         "÷ LoRA unmerged, same steps", "trainable params", "% of LoRA's", "train s", "cpu"],
        [[i + 1, heads_text(r["point"]), directions_text(r["point"]), r["point"]["lr"], schedule_text(r["point"]),
          r["point"]["max_steps"], round(score(r), 3), ratio_text(ratio(search, r), target), params(r),
          f"{100 * params(r) / lora_params:.2f}", round(r["rows"]["restorelcc"]["train_seconds"], 1), cpu_of(r)]
         for i, r in enumerate(ranked)],
    )
    cpus = {cpu_of(r) for r in [*search.points, *search.lora_at.values()]}
    won = winner(search, cap)
    lines = [
        f"# RestoreLCC setting search ({setting.label}, {compare.MODEL})",
        "",
        f"Produced by `{command}`.",
        "",
        f"Selection split: rows {start}..{start + rows - 1} of `alpaca/valid.jsonl` (response perplexity). The "
        f"results table evaluates rows 0..{eval_rows - 1}, so no selection row is an evaluation row. "
        "One run per grid point, seed 0, on the setting's pruned model (the results table's spec and seed); "
        "everything else as in the results table.",
    ]
    if len(cpus) > 1:
        lines += ["", f"The points were measured in several sessions on {len(cpus)} CPUs (column cpu; "
                  f"{', '.join(sorted(cpus))}): {MIXED_CPUS}."]
    lines += [
        "",
        f"On the selection rows: pruned model response ppl {search.pruned_ppl:.3f}; LoRA r=8 q,v (lr "
        f"{search.lora['fingerprint']['job']['restoration']['lr']:g}, seed 0, the results table's setting, "
        f"{lora_params:,} trainable parameters), trained for each step count of the grid:",
        "",
    ]
    lines += [f"- {n} steps: {row_ppl(ref, 'lora/unmerged'):.3f} unmerged, {row_ppl(ref, 'lora/merged'):.3f} "
              f"merged with the mask re-applied (cpu: {cpu_of(ref)})" for n, ref in sorted(search.lora_at.items())]
    lines += ["", "Each point is compared with LoRA trained for as many steps.", "", table, ""]
    if any(r["point"].get("method") == "bias" for r in search.points):
        lines += [BIAS_ROWS, ""]
    if not won:
        lines += [f"No point trains at most {100 * cap:g}% of LoRA's parameters, so none is recommended.", ""]
    else:
        r, best = ratio(search, won), won["point"]
        lines += [f"Winner (closest to LoRA among points with at most {100 * cap:g}% of LoRA's parameters): "
                  f"{ratio_text(r, target)}× unmerged LoRA at {best['max_steps']} steps, which "
                  f"{'meets' if r <= target else 'does **not** meet'} the {target}× target on the selection rows.", ""]
        fields = {k: v for k, v in point_overrides(best).items() if k != "max_steps"}
        lines += [f"Best: {_described(best)}. In a job: `\"restoration\": {json.dumps(fields)}` with "
                  f"`\"max_steps\": {best['max_steps']}`.", ""]
    return "\n".join(lines)


def points_of(args: argparse.Namespace, budget_steps: int) -> list[dict[str, Any]]:
    """The grid the arguments ask for: the product of --grid-heads, --grid-lr and --grid-steps, then each
    --grid-extra point."""
    def floats(text: str | None, default: list[float]) -> list[float]:
        return [float(x) for x in text.split(",")] if text else default

    quick = args.quick
    heads = floats(args.grid_heads, [0.1] if quick else [0.1, 0.2])
    lrs = floats(args.grid_lr, [1e-2, 3e-2] if quick else [3e-3, 1e-2])
    steps = [int(x) for x in floats(args.grid_steps, [float(budget_steps)] if quick else [25.0, 50.0])]
    return grid(heads, lrs, steps) + [parse_point(p) for p in args.grid_extra]


def main(args: argparse.Namespace, argv: list[str]) -> int:
    q, docs = compare.setup(args)
    setting = plan.setting_by_key(args.search_setting)
    rows = args.select_rows or (8 if args.quick else 300)
    command = harness.page_command("search", argv)
    if not args.render_only:
        try:
            points = points_of(args, q.budget.steps)
        except ValueError as exc:
            raise SystemExit(f"--grid-extra: {exc}") from exc
        select = write_selection(q.data.alpaca_valid, q.store.root, args.select_start, rows, q.budget.alpaca_limit)
        run_search(q, setting, points, select, rows, command)
    render(q, docs, setting, args.select_start, rows, command)
    return 0


def render(q: compare.Runner, docs: Path, setting: plan.Setting, start: int, rows: int, command: str) -> None:
    """docs/search.md from the latest stored search; the page names the command the manifest says ran it."""
    loaded = load(q.store.root, setting.key)
    if loaded is None:
        raise SystemExit(f"no finished search of {setting.key} under {q.store.root / 'search'}")
    found, ran = loaded
    harness.write_page(docs / "search.md", search_markdown(found, setting, ran or command, start, rows,
                                                           q.budget.alpaca_limit, harness.TARGETS["compare"]))
