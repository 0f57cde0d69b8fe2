"""Choosing RestoreLCC's setting (head fraction × lr × steps) on a selection split that is never evaluated.

The selection split is a slice of ``alpaca/valid.jsonl`` that starts after the rows the results table
evaluates (rows 300..599 against rows 0..299 by default), written to ``<root>/search/alpaca_select.jsonl``.
Each grid point is one RestoreLCC run on the cached pruned model (seed 0), scored by response perplexity
on the selection rows only; one JSON per point, reused when present. LoRA (the results table's setting,
seed 0) is scored on the same rows at every step count of the grid, so every point's ratio to unmerged
LoRA at the same step budget is read off the selection split too, and the winner is the point with the
best ratio within the parameter cap (5% of LoRA's).
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.schemas import SCHEDULES
from bench.common import markdown_table
from bench.quality import plan
from bench.quality.render import MIXED_CPUS, cpu_of, ratio_text
from bench.quality.runner import Bench, say

SELECT_STEM = "alpaca_select"


def write_selection(source: str, root: Path, start: int, rows: int, eval_rows: int) -> Path:
    """Rows ``start .. start+rows-1`` of ``source`` as their own file; refuses to overlap the evaluated rows."""
    if start < eval_rows:
        raise ValueError(f"selection rows start at {start}, inside the evaluated rows 0..{eval_rows - 1}")
    lines = [ln for ln in Path(source).read_text(encoding="utf-8").splitlines() if ln.strip()]
    chosen = lines[start : start + rows]
    if len(chosen) < rows:
        raise ValueError(f"{source} has {len(lines)} rows; rows {start}..{start + rows - 1} do not exist")
    path = root / "search" / f"{SELECT_STEM}.jsonl"
    text = "\n".join(chosen) + "\n"
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        if path.is_file():  # other selection rows: every score made on the old ones is set aside
            for old in path.parent.glob("*/*.json"):
                if not old.name.endswith(".stale.json"):
                    old.rename(old.with_suffix(".stale.json"))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
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
    if schedule not in SCHEDULES:
        raise ValueError(f"grid point {text!r}: schedule {schedule!r} is not one of {', '.join(SCHEDULES)}")
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


def run_search(bench: Bench, setting: plan.Setting, points: list[dict[str, Any]], select: Path, rows: int
               ) -> Search:
    """Every grid point's result, the pruned model's and LoRA's scores on the selection rows."""
    method = plan.method_by_key("restorelcc")
    ev = plan.evaluation(bench.data, bench.budget, alpaca=str(select), alpaca_limit=rows, tasks=False,
                         wikitext=False)
    bench.ensure_base(setting)
    pruned_path = bench.store.root / "search" / setting.key / "pruned.json"
    pruned_by = plan.pruning_spec(setting, bench.budget)
    pruned_fp = {"evaluation": ev, "pruned_by": pruned_by}
    pruned = bench.store.load(pruned_path, pruned_fp)
    if pruned is None:
        metrics, _ = bench.evaluate(bench.pruned_model(setting), ev, label=f"{setting.key}/pruned selection")
        pruned = {"fingerprint": pruned_fp, "metrics": metrics}
        bench.store.save(pruned_path, pruned)
    out = []
    for p in points:
        job = plan.restore_job(method, bench.budget, bench.data, "", bench.dense_dir, 0,
                               overrides=point_overrides(p))
        fp = plan.fingerprint(job, ev, pruned_by)
        path = bench.store.root / "search" / setting.key / f"{point_name(p)}.json"
        found = bench.store.load(path, fp)
        if found is None:
            found = bench.restore_and_evaluate(setting, method, 0, job, ev, f"search-{point_name(p)}")
            found.update(fingerprint=fp, point=p)
            bench.store.save(path, found)
        else:
            say(f"search {point_name(p)}: already measured")
        out.append(found)
    steps = sorted({bench.budget.steps} | {p["max_steps"] for p in points})
    lora_at = {n: _reference(bench, setting, ev, pruned_by, n) for n in steps}
    # What the latest search covered: the results page reads these points only, never leftovers of
    # another grid or budget that share the folder.
    manifest = bench.store.root / "search" / setting.key / "manifest.json"
    bench.store.save(manifest, {"points": [f"{point_name(p)}.json" for p in points],
                                "lora": {str(n): lora_name(n, bench.budget.steps) for n in steps},
                                "steps": bench.budget.steps})
    return Search(out, float(pruned["metrics"][SELECT_STEM]["response_ppl"]), lora_at, bench.budget.steps)


def lora_name(steps: int, budget_steps: int) -> str:
    return "lora.json" if steps == budget_steps else f"lora-s{steps}.json"


def _reference(bench: Bench, setting: plan.Setting, ev: dict[str, Any], pruned_by: dict[str, Any], steps: int
               ) -> dict[str, Any]:
    """LoRA (the results table's setting, seed 0) trained for ``steps`` and scored on the selection rows."""
    method = plan.method_by_key("lora")
    job = plan.restore_job(method, bench.budget, bench.data, "", bench.dense_dir, 0, overrides={"max_steps": steps})
    fp = plan.fingerprint(job, ev, pruned_by)
    path = bench.store.root / "search" / setting.key / lora_name(steps, bench.budget.steps)
    found = bench.store.load(path, fp)
    if found is None:
        found = bench.restore_and_evaluate(setting, method, 0, job, ev, f"search-lora-s{steps}")
        found["fingerprint"] = fp
        bench.store.save(path, found)
    else:
        say(f"search lora, {steps} steps: already measured")
    return found


def row_ppl(result: dict[str, Any], row: str) -> float:
    return float(result["rows"][row]["metrics"][SELECT_STEM]["response_ppl"])


def score(result: dict[str, Any]) -> float:
    return row_ppl(result, "restorelcc")


def params(result: dict[str, Any], row: str = "restorelcc") -> int:
    return int(result["rows"][row]["trainable_params"])


def ratio(search: Search, result: dict[str, Any]) -> float:
    """A point's selection response perplexity over unmerged LoRA's at the same step count."""
    return score(result) / row_ppl(search.lora_at[result["point"]["max_steps"]], "lora/unmerged")


def winner(search: Search) -> dict[str, Any] | None:
    """The point closest to LoRA (lowest ratio) among those training at most PARAM_CAP of its parameters."""
    cap = plan.PARAM_CAP * params(search.lora, "lora/unmerged")
    within = [r for r in search.points if params(r) <= cap]
    return min(within, key=lambda r: ratio(search, r)) if within else None


def load(root: Path, setting: str) -> Search | None:
    """A finished search of ``setting`` as stored under ``root`` (None when it has not run)."""
    folder = Path(root) / "search" / setting

    def read(name: str) -> dict[str, Any]:
        return json.loads((folder / name).read_text(encoding="utf-8"))

    if not all((folder / n).is_file() for n in ("manifest.json", "lora.json", "pruned.json")):
        return None
    manifest = read("manifest.json")
    names = manifest["points"]
    if "lora" not in manifest:  # written before LoRA was scored at every step count of the grid
        steps = int(read("lora.json")["fingerprint"]["job"]["restoration"]["max_steps"])
        manifest.update(lora={str(steps): "lora.json"}, steps=steps)
    files = [*names, *manifest["lora"].values()]
    if not names or not all((folder / n).is_file() for n in files):
        return None
    lora_at = {int(n): read(f) for n, f in manifest["lora"].items()}
    pruned = read("pruned.json")
    return Search([read(n) for n in names], float(pruned["metrics"][SELECT_STEM]["response_ppl"]), lora_at,
                  int(manifest["steps"]))


def _described(p: dict[str, Any]) -> str:
    """``heads 0.66, lr 0.003 (constant), 50 steps``, naming the directions and method when not the default."""
    more = "" if "directions" not in p and "method" not in p else f", directions {directions_text(p)}"
    return f"heads {heads_text(p)}{more}, lr {p['lr']:g} ({schedule_text(p)}), {p['max_steps']} steps"


def summary(found: Search) -> list[str]:
    """Lines for the results page: what the search chose and how it compares with LoRA there."""
    won = winner(found)
    if won is None:
        return [f"No searched setting trains at most {100 * plan.PARAM_CAP:g}% of LoRA's parameters."]
    p, vs_lora = won["point"], ratio(found, won)
    lora_ppl = row_ppl(found.lora_at[p["max_steps"]], "lora/unmerged")
    share = params(won) / params(found.lora, "lora/unmerged")
    lrs = sorted({r["point"]["lr"] for r in found.points})
    heads = sorted({heads_text(r["point"]) for r in found.points}, key=lambda h: (h == "all", h))
    steps = sorted({r["point"]["max_steps"] for r in found.points})
    schedules = sorted({schedule_text(r["point"]) for r in found.points})
    directions = sorted({directions_text(r["point"]) for r in found.points})
    return [
        f"Searched on Alpaca-valid rows that are never evaluated (docs/search.md): head fractions "
        f"{', '.join(heads)}; lr {', '.join(f'{x:g}' for x in lrs)}; lr schedules {', '.join(schedules)}; "
        f"directions per head {', '.join(directions)}; {', '.join(map(str, steps))} steps.",
        f"Winner: {_described(p)} "
        f"({params(won):,} trainable "
        f"parameters, {100 * share:.2f}% of LoRA's). On the selection rows: response ppl {score(won):.3f} against "
        f"the pruned model's {found.pruned_ppl:.3f} and unmerged LoRA's {lora_ppl:.3f} at the same steps, "
        f"**{ratio_text(vs_lora)}×** LoRA (target ≤ {plan.RATIO_TARGET}×: "
        + ("met" if vs_lora <= plan.RATIO_TARGET else "**not met**") + ").",
    ]


BIAS_ROWS = ("Rows with directions 'none (bias only)' learn each chosen head's constant directly (`method: bias`). "
             "On all heads that is every constant the heads can add, the same set of models RestoreLCC on all heads "
             "with all directions can reach (only the parameterisation, and so the optimiser's steps, differ): "
             "those rows show how far the constants go at this step budget when learned directly.")


def search_markdown(search: Search, setting: plan.Setting, command: str, start: int, rows: int,
                    eval_rows: int, model: str = "SmolLM2-135M-Instruct") -> str:
    ranked = sorted(search.points, key=lambda r: ratio(search, r))
    lora_params = params(search.lora, "lora/unmerged")
    table = markdown_table(
        ["rank", "heads", "directions", "lr", "lr schedule", "steps", "selection resp. ppl",
         "÷ LoRA unmerged, same steps", "trainable params", "% of LoRA's", "train s", "cpu"],
        [[i + 1, heads_text(r["point"]), directions_text(r["point"]), r["point"]["lr"], schedule_text(r["point"]),
          r["point"]["max_steps"], round(score(r), 3),
          ratio_text(ratio(search, r)), params(r), f"{100 * params(r) / lora_params:.2f}",
          round(r["rows"]["restorelcc"]["train_seconds"], 1), cpu_of(r)]
         for i, r in enumerate(ranked)],
    )
    cpus = {cpu_of(r) for r in [*search.points, *search.lora_at.values()]}
    won = winner(search)
    lines = [
        f"# RestoreLCC setting search ({setting.label}, {model})",
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
        lines += [f"No point trains at most {100 * plan.PARAM_CAP:g}% of LoRA's parameters, so none is "
                  "recommended.", ""]
    else:
        r, best = ratio(search, won), won["point"]
        verdict = "meets" if r <= plan.RATIO_TARGET else "does **not** meet"
        lines += [f"Winner (closest to LoRA among points with at most {100 * plan.PARAM_CAP:g}% of LoRA's "
                  f"parameters): {ratio_text(r)}× unmerged LoRA at {best['max_steps']} steps, which {verdict} the "
                  f"{plan.RATIO_TARGET}× target on the selection rows.", ""]
        fields = {k: v for k, v in point_overrides(best).items() if k != "max_steps"}
        lines += [f"Best: {_described(best)}. In a job: `\"restoration\": {json.dumps(fields)}` with "
                  f"`\"max_steps\": {best['max_steps']}`.", ""]
    return "\n".join(lines)
