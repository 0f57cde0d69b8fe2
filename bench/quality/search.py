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

from bench.common import markdown_table
from bench.quality import plan
from bench.quality.render import MIXED_CPUS, cpu_of, ratio_text
from bench.quality.runner import Bench, say
from worker.restore.train import SCHEDULES

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


def parse_point(text: str) -> dict[str, Any]:
    """``HEADS:LR:STEPS[:SCHEDULE[:WARMUP]]`` (``0.6:1e-2:100``, ``0.66:6e-3:50:cosine:5``) as a grid point.

    The schedule (constant, linear or cosine) and warm-up steps enter the point only when not the default
    (constant, none), so a point keeps the name and fingerprint it had before schedules existed."""
    parts = text.split(":")
    try:
        if not 3 <= len(parts) <= 5:
            raise ValueError
        point: dict[str, Any] = {"heads": float(parts[0]), "lr": float(parts[1]), "max_steps": int(parts[2])}
        schedule = parts[3] if len(parts) > 3 else "constant"
        warmup = int(parts[4]) if len(parts) > 4 else 0
    except ValueError:
        raise ValueError(f"grid point {text!r}: expected HEADS:LR:STEPS[:SCHEDULE[:WARMUP]], e.g. 0.6:1e-2:100 "
                         "or 0.66:6e-3:50:cosine:5") from None
    if schedule not in SCHEDULES:
        raise ValueError(f"grid point {text!r}: schedule {schedule!r} is not one of {', '.join(SCHEDULES)}")
    if warmup < 0 or warmup >= point["max_steps"]:
        raise ValueError(f"grid point {text!r}: warm-up must be at least 0 and fewer than the steps")
    if schedule != "constant":
        point["lr_schedule"] = schedule
    if warmup:
        point["warmup_steps"] = warmup
    return point


def schedule_text(p: dict[str, Any]) -> str:
    """A point's lr schedule in words: ``constant``, ``cosine``, ``cosine, 5 warm-up``."""
    name = p.get("lr_schedule", "constant")
    return f"{name}, {p['warmup_steps']} warm-up" if p.get("warmup_steps") else name


def point_name(p: dict[str, Any]) -> str:
    name = f"h{p['heads']:g}-lr{p['lr']:g}-s{p['max_steps']}"
    if p.get("lr_schedule", "constant") != "constant":
        name += f"-{p['lr_schedule']}"
    return name + (f"-w{p['warmup_steps']}" if p.get("warmup_steps") else "")


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
        job = plan.restore_job(method, bench.budget, bench.data, "", bench.dense_dir, 0, overrides=p)
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


def summary(found: Search) -> list[str]:
    """Lines for the results page: what the search chose and how it compares with LoRA there."""
    won = winner(found)
    if won is None:
        return [f"No searched setting trains at most {100 * plan.PARAM_CAP:g}% of LoRA's parameters."]
    p, vs_lora = won["point"], ratio(found, won)
    lora_ppl = row_ppl(found.lora_at[p["max_steps"]], "lora/unmerged")
    share = params(won) / params(found.lora, "lora/unmerged")
    lrs = sorted({r["point"]["lr"] for r in found.points})
    heads = sorted({r["point"]["heads"] for r in found.points})
    steps = sorted({r["point"]["max_steps"] for r in found.points})
    schedules = sorted({schedule_text(r["point"]) for r in found.points})
    return [
        f"Searched on Alpaca-valid rows that are never evaluated (docs/search.md): head fractions "
        f"{', '.join(f'{h:g}' for h in heads)}; lr {', '.join(f'{x:g}' for x in lrs)}; lr schedules "
        f"{', '.join(schedules)}; {', '.join(map(str, steps))} steps.",
        f"Winner: heads {p['heads']:g}, lr {p['lr']:g} ({schedule_text(p)}), {p['max_steps']} steps "
        f"({params(won):,} trainable "
        f"parameters, {100 * share:.2f}% of LoRA's). On the selection rows: response ppl {score(won):.3f} against "
        f"the pruned model's {found.pruned_ppl:.3f} and unmerged LoRA's {lora_ppl:.3f} at the same steps, "
        f"**{ratio_text(vs_lora)}×** LoRA (target ≤ {plan.RATIO_TARGET}×: "
        + ("met" if vs_lora <= plan.RATIO_TARGET else "**not met**") + ").",
    ]


def search_markdown(search: Search, setting: plan.Setting, command: str, start: int, rows: int,
                    eval_rows: int, model: str = "SmolLM2-135M-Instruct") -> str:
    ranked = sorted(search.points, key=lambda r: ratio(search, r))
    lora_params = params(search.lora, "lora/unmerged")
    table = markdown_table(
        ["rank", "heads", "lr", "lr schedule", "steps", "selection resp. ppl", "÷ LoRA unmerged, same steps",
         "trainable params", "% of LoRA's", "train s", "cpu"],
        [[i + 1, r["point"]["heads"], r["point"]["lr"], schedule_text(r["point"]), r["point"]["max_steps"],
          round(score(r), 3),
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
    if not won:
        lines += [f"No point trains at most {100 * plan.PARAM_CAP:g}% of LoRA's parameters, so none is "
                  "recommended.", ""]
    else:
        r, best = ratio(search, won), won["point"]
        verdict = "meets" if r <= plan.RATIO_TARGET else "does **not** meet"
        lines += [f"Winner (closest to LoRA among points with at most {100 * plan.PARAM_CAP:g}% of LoRA's "
                  f"parameters): {ratio_text(r)}× unmerged LoRA at {best['max_steps']} steps, which {verdict} the "
                  f"{plan.RATIO_TARGET}× target on the selection rows.", ""]
        fields = {"heads": best["heads"], "lr": best["lr"], **{k: best[k] for k in ("lr_schedule", "warmup_steps")
                                                               if k in best}}
        lines += [f"Best: heads {best['heads']:g}, lr {best['lr']:g} ({schedule_text(best)}), {best['max_steps']} "
                  f"steps. In a job: `\"restoration\": {json.dumps(fields)}` with `\"max_steps\": "
                  f"{best['max_steps']}`.", ""]
    return "\n".join(lines)
