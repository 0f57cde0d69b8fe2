"""The objective as an axis: each method trained toward the training data (sft) or toward the dense model
(distill), on two training sets, and how much of the pruned→dense gap each closes.

    python -m bench objective                                 # every run of the plan; resumes from stored results
    python -m bench objective --only wanda-50/restorelcc-default --seeds 0
    python -m bench objective --select                        # choose the default objective on selection rows
    python -m bench objective --render-only                   # rewrite docs/objective.md from the JSONs

SmolLM2-135M-Instruct, the comparison's pruned models (Wanda 50% and SparseGPT 2:4, bench/results/quality/runs),
the service default's budget (50 steps × batch 8; RestoreLCC at its default heads, directions and lr; bias on all
heads and LoRA r 8 at the comparison's settings). Training sets: Alpaca (alpaca/train.jsonl) and the demo's
instruction set (continuing Wikipedia passages, worker.assets.datasets). Every model is scored on WikiText
sentences, on held-out responses of both training sources (Alpaca valid rows, the demo's held-out passages) and
of a third source (Multi-LexSum summaries), and on BoolQ, PIQA and OpenBookQA (mean accuracy), each a fixed prefix.
Results: bench/results/objective/<setting>/<method>-<objective>-<train>/seed<k>.json, with their fingerprints.

``--select`` chooses the service's default objective the way the other defaults were chosen (docs/search.md): on
selection rows no page scores — Alpaca-valid rows 300..599 (response perplexity) and WikiText sentences 200..999 —
RestoreLCC at the service default, Wanda 50% (the search's setting), Alpaca training, each objective with each seed
(``--seeds``, default 0 and 1); a run's metrics are averaged over its seeds.
The winner closes the larger share of the worse of its two gaps (the aim is the dense model on both kinds of text);
on a tie the incumbent stays. Results: bench/results/objective/select/.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import compare, harness, plan
from bench.compare import _get

OBJECTIVES = ("sft", "distill", "mixed")  # mixed: distill with sft_weight MIXED_WEIGHT
MIXED_WEIGHT = 0.5
METHOD_KEYS = ("restorelcc-default", "bias-all", "lora")
TOP_K = 64  # the service default's distill_top_k
MIN_ACC_GAP = 0.02  # a dense−pruned accuracy gap smaller than this is inside the sampling noise of the task rows
SELECT_SETTING = "wanda-50"  # where the setting search chose the other defaults
# (source, first row, rows). WikiText sentences are short: 800 of them are ~7k tokens (200 were 1.8k, too few to
# separate the objectives).
SELECT_ROWS = {"alpaca": ("alpaca/valid.jsonl", 300, 300), "wikitext": ("eval/wikitext_sentences.jsonl", 200, 800)}
INCUMBENT = "sft"  # the default objective before the selection ran


@dataclass(frozen=True)
class Limits:
    wikitext: int = 200
    responses: int = 100
    tasks: int = 100


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--seeds", default="0,1", help="restoration seeds (default 0,1)")
    ap.add_argument("--only", action="append", help="SETTING[/METHOD[-OBJECTIVE[-TRAIN]]] patterns (wildcards); "
                    f"settings {', '.join(s.key for s in plan.SETTINGS)}; methods {', '.join(METHOD_KEYS)}; "
                    f"objectives {', '.join(OBJECTIVES)}; training sets alpaca, wikipedia")
    ap.add_argument("--select", action="store_true",
                    help="only the selection runs that choose the default objective (see the module docstring)")
    ap.add_argument("--wikitext-limit", type=int, default=Limits.wikitext)
    ap.add_argument("--response-limit", type=int, default=Limits.responses)
    ap.add_argument("--task-limit", type=int, default=Limits.tasks)


def training_sets() -> dict[str, str]:
    from worker.assets.datasets import demo_data_dir

    demo = demo_data_dir()
    return {"alpaca": harness.data("alpaca/train.jsonl"), "wikipedia": str(demo / "instructions" / "train.jsonl")}


def evaluation(limits: Limits) -> dict[str, Any]:
    from worker.assets.datasets import demo_data_dir

    demo = demo_data_dir()
    responses = [harness.data("alpaca/valid.jsonl"), str(demo / "instructions" / "wikipedia_heldout.jsonl"),
                 str(demo / "eval" / "multilexsum.jsonl")]
    tasks = [harness.data(f"eval/{t}.jsonl") for t in ("boolq", "piqa", "openbookqa")]
    wiki = harness.data("eval/wikitext_sentences.jsonl")
    sets = {Path(p).stem: limits.responses for p in responses} | {Path(t).stem: limits.tasks for t in tasks}
    return {"perplexity": [wiki], "response_perplexity": responses, "tasks": tasks, "limit": None,
            "limits": {**sets, Path(wiki).stem: limits.wikitext}, "batch_size": 8, "max_seq_len": 512,
            "dense": False}


def run_key(method: str, objective: str, train: str) -> str:
    return f"{method}-{objective}-{train}"


def restoration(method: plan.Method, budget: plan.Budget, objective: str) -> dict[str, Any]:
    r = plan.restoration_spec(method, budget)
    r["objective"] = "sft" if objective == "sft" else "distill"
    if objective != "sft":  # every distill setting named: a method's defaults (RestoreLCC's mix) play no part
        r["distill_top_k"] = TOP_K
        r["sft_weight"] = MIXED_WEIGHT if objective == "mixed" else 0.0
    return r


class Runner:
    def __init__(self, args: argparse.Namespace):
        self.limits = Limits(args.wikitext_limit, args.response_limit, args.task_limit)
        self.seeds = tuple(int(s) for s in args.seeds.split(",") if s.strip())
        self.store = harness.Store(harness.RESULTS / "objective")
        self.only = args.only or ["*"]
        self.render_only = args.render_only

    def wanted(self, setting: str, key: str) -> bool:
        import fnmatch

        return any(fnmatch.fnmatch(f"{setting}/{key}", p) or fnmatch.fnmatch(setting, p) for p in self.only)

    def _base(self) -> compare.Runner:
        """The comparison's pruned models, budget and dense model."""
        cmp_args = argparse.Namespace(quick=False, steps=None, batch_size=None, task_limit=None, alpaca_limit=None,
                                      wikitext_limit=None, lr_restorelcc=1e-2, lr_lora=1e-3, heads=0.1,
                                      random_batches=False, seeds="0", only=None, render_only=False)
        return compare.setup(cmp_args)[0]

    def run_selection(self) -> None:
        """Dense, pruned and RestoreLCC at the service default with each objective and seed, on the selection rows."""
        base = self._base()
        ev = selection_evaluation(self.store.root)
        setting = plan.setting_by_key(SELECT_SETTING)
        folder = self.store.root / "select"
        self.store.get(folder / "dense.json", {"evaluation": ev, "model": "SmolLM2-135M-Instruct"},
                       lambda: self._evaluate(Path(base.dense_dir), ev, "select/dense"), "select/dense")
        self.store.get(folder / setting.key / "pruned.json",
                       {"evaluation": ev, "pruning": plan.pruning_spec(setting, base.budget)},
                       lambda: self._evaluate(base.pruned_model(setting), ev, f"select/{setting.key}/pruned"),
                       f"select/{setting.key}/pruned")
        method = plan.method_by_key("restorelcc-default")
        for seed in self.seeds:
            for objective in OBJECTIVES:
                key = run_key(method.key, objective, "alpaca")
                job = plan.restore_job(method, base.budget, plan.Data(harness.data("alpaca/train.jsonl"), "", "", ()),
                                       "", base.dense_dir or "", seed)
                job["restoration"] = restoration(method, base.budget, objective)
                self.store.get(folder / setting.key / key / f"seed{seed}.json",
                               {"job": {**job, "model": None}, "evaluation": ev},
                               lambda j=job, k=key, sd=seed: self._restore(base, setting, j, f"select-{k}", sd, ev,
                                                                           keep=True),
                               f"select/{setting.key}/{key}/seed{seed}")

    def run(self) -> None:
        base = self._base()
        ev = evaluation(self.limits)
        sets = training_sets()
        methods = {m.key: m for m in plan.METHODS}
        dense_fp = {"evaluation": ev, "model": "SmolLM2-135M-Instruct"}
        self.store.get(self.store.root / "dense.json", dense_fp, lambda: self._evaluate(Path(base.dense_dir), ev,
                                                                                          "dense"), "dense")
        for train, train_path in sets.items():  # Alpaca in both settings first: the default's own data
            for setting in plan.SETTINGS:
                for seed in self.seeds:
                    for mkey in METHOD_KEYS:
                        for objective in OBJECTIVES:
                            key = run_key(mkey, objective, train)
                            if not self.wanted(setting.key, key):
                                continue
                            self._pruned(base, setting, ev)
                            method = methods[mkey]
                            job = plan.restore_job(method, base.budget, plan.Data(train_path, "", "", ()), "",
                                                   base.dense_dir or "", seed)
                            job["restoration"] = restoration(method, base.budget, objective)
                            fp = {"job": {**job, "model": None}, "evaluation": ev}
                            self.store.get(self.store.root / setting.key / key / f"seed{seed}.json", fp,
                                           lambda s=setting, j=job, k=key, sd=seed: self._restore(base, s, j, k, sd,
                                                                                                  ev),
                                           f"{setting.key}/{key}/seed{seed}")

    def _pruned(self, base: compare.Runner, setting: plan.Setting, ev: dict[str, Any]) -> None:
        fp = {"evaluation": ev, "pruning": plan.pruning_spec(setting, base.budget)}
        self.store.get(self.store.root / setting.key / "pruned.json", fp,
                       lambda: self._evaluate(base.pruned_model(setting), ev, f"{setting.key}/pruned"),
                       f"{setting.key}/pruned")

    def _evaluate(self, model_dir: Path, ev: dict[str, Any], label: str) -> dict[str, Any]:
        metrics, seconds = harness.evaluate(model_dir, ev, label=label)
        return {"metrics": metrics, "seconds": round(seconds, 1), "environment": harness.machine()}

    def _restore(self, base: compare.Runner, setting: plan.Setting, job: dict[str, Any], key: str, seed: int,
                 ev: dict[str, Any], keep: bool = False) -> dict[str, Any]:
        """One run and its scores; the model is deleted afterwards unless ``keep`` (under runs/, never committed:
        kept models can be scored on other rows without training again)."""
        import shutil

        job = json.loads(json.dumps(job))
        job["model"]["id"] = str(base.pruned_model(setting))
        out = self.store.root / "runs" / setting.key / f"{key}-s{seed}"
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        report = harness.run_job(job, out, f"{setting.key}/{key}/s{seed}")
        metrics, eval_s = harness.evaluate(out / "model", ev, label=f"{setting.key}/{key}")
        rest = report["restoration"]
        stages = {k: v["seconds"] for k, v in report["stages"].items()}
        peaks = {k: v.get("peak_rss_mb") for k, v in report["stages"].items()}
        if not keep:
            shutil.rmtree(out, ignore_errors=True)
        return {"setting": setting.key, "run": key, "seed": seed, "metrics": metrics,
                "trainable_params": rest["trainable_params"], "objective": rest.get("objective"),
                "loss_first_last": [rest["loss_curve"][0], rest["loss_curve"][-1]],
                "dense_targets": report.get("dense_targets"),
                "seconds": {"stages": stages, "train": rest["train_seconds"], "eval": round(eval_s, 1),
                            "total": round(time.perf_counter() - t0, 1)},
                "peak_rss_mb": peaks, "plan": report.get("plan"),
                "environment": harness.machine()}


# ── choosing the default objective ────────────────────────────────────────────────────────────────────────


def selection_files(root: Path) -> dict[str, str]:
    """The selection rows as files of their own under ``root/select``; refuses rows the page scores."""
    scored = {"alpaca": Limits.responses, "wikitext": Limits.wikitext}
    out = {}
    for name, (source, start, rows) in SELECT_ROWS.items():
        path = root / "select" / f"{select_stem(name)}.jsonl"  # the rows in its name: other rows, other results
        harness.write_rows(harness.data(source), path, start, rows, scored[name], "scored")
        out[name] = str(path)
    return out


def select_range(name: str) -> str:
    """``300..599``: the selection rows of ``name``."""
    _, start, rows = SELECT_ROWS[name]
    return f"{start}..{start + rows - 1}"


def select_stem(name: str) -> str:
    return f"{name}_select_{select_range(name).replace('..', '-')}"


def selection_evaluation(root: Path) -> dict[str, Any]:
    files = selection_files(root)
    return {"perplexity": [files["wikitext"]], "response_perplexity": [files["alpaca"]], "tasks": [], "limit": None,
            "batch_size": 8, "max_seq_len": 512, "dense": False}


SELECT_METRICS = {"alpaca": (select_stem("alpaca"), "response_ppl"), "wikitext": (select_stem("wikitext"), "ppl")}


def selection_shares(run: dict[str, Any], pruned: dict[str, Any], dense: dict[str, Any]) -> dict[str, float]:
    """The share of each selection gap a run closes (log scale)."""
    shares = {}
    for name, path in SELECT_METRICS.items():
        g = gap_closed(_get(run["metrics"], path), _get(pruned["metrics"], path), _get(dense["metrics"], path))
        assert g is not None, f"the pruned and dense models score the same on the {name} selection rows"
        shares[name] = g
    return shares


def choose_objective(shares: dict[str, dict[str, float]]) -> str:
    """The objective whose worse share is largest; the incumbent on a tie."""
    def worse(obj: str) -> float:
        return min(shares[obj].values())

    best = max(shares, key=lambda o: (worse(o), o == INCUMBENT))
    return INCUMBENT if INCUMBENT in shares and worse(INCUMBENT) >= worse(best) else best


def service_default() -> str:
    """The objective a job gets when its spec names none, in this page's words (sft, distill or mixed)."""
    from app.methods import restoration_config

    r = restoration_config({})
    if r.objective == "sft":
        return "sft"
    return "mixed" if r.sft_weight == MIXED_WEIGHT else "distill" if r.sft_weight == 0 else f"distill+{r.sft_weight}"


def selection_runs(folder: Path) -> dict[str, list[dict[str, Any]]]:
    """Each objective's selection results, one per seed run (objectives not run yet left out)."""
    runs = {o: [json.loads(p.read_text()) for p in
                sorted((folder / run_key("restorelcc-default", o, "alpaca")).glob("seed*.json"))] for o in OBJECTIVES}
    return {o: r for o, r in runs.items() if r}


def mean_metrics(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The selection metrics averaged over seeds, shaped like one run's ``metrics``."""
    out: dict[str, Any] = {}
    for stem, field in SELECT_METRICS.values():
        out.setdefault(stem, {})[field] = statistics.mean(_get(r["metrics"], (stem, field)) for r in runs)
    return out


def render_selection(store: harness.Store) -> list[str]:
    folder = store.root / "select"
    dense, pruned = store.read(folder / "dense.json"), store.read(folder / SELECT_SETTING / "pruned.json")
    runs = selection_runs(folder / SELECT_SETTING)
    lines = ["## Choosing the default objective", "",
             "Like the other defaults (docs/search.md), on rows no table here scores: Alpaca-valid rows "
             f"{select_range('alpaca')} (response perplexity) and WikiText sentences {select_range('wikitext')}; "
             "RestoreLCC at the service default, Wanda 50%, Alpaca training, each objective with each seed run "
             "(metrics averaged over its seeds). The winner closes the larger share of the worse of its two gaps; on "
             "a tie the incumbent (sft, the default when the selection ran) stays. `python -m bench objective "
             "--select`.", ""]
    if dense is None or pruned is None or not runs:
        return lines + ["Not run yet.", ""]
    means = {o: {"metrics": mean_metrics(r)} for o, r in runs.items()}
    shares = {o: selection_shares(m, pruned, dense) for o, m in means.items()}

    def ppls(result: dict[str, Any]) -> list[Any]:
        return [_get(result["metrics"], SELECT_METRICS[name]) for name in ("alpaca", "wikitext")]

    def worse_by_seed(o: str) -> str:
        return " / ".join(f"{100 * min(selection_shares(r, pruned, dense).values()):.0f}%" for r in runs[o])

    rows = [["dense", "—", *ppls(dense), "—", "—", "—", "—"], ["pruned", "—", *ppls(pruned), "—", "—", "—", "—"]]
    for o in runs:
        sh = shares[o]
        rows.append([o, ", ".join(str(r["seed"]) for r in runs[o]), *ppls(means[o]), f"{100 * sh['alpaca']:.0f}%",
                     f"{100 * sh['wikitext']:.0f}%", f"{100 * min(sh.values()):.0f}%", worse_by_seed(o)])
    lines += [harness.markdown_table(["objective", "seeds", "Alpaca-select resp. ppl", "WikiText-select ppl",
                                      "gap closed: Alpaca", "gap closed: WikiText", "worse of the two",
                                      "worse of the two, each seed"], rows, _show), ""]
    if len(runs) < len(OBJECTIVES) or len({len(r) for r in runs.values()}) > 1:
        return lines + ["Not every objective has run with every seed yet: no choice yet.", ""]
    chosen, current = choose_objective(shares), service_default()
    lines += [f"Chosen: **{chosen}**. The service default is **{current}**"
              + (" — they agree." if chosen == current else " — **they disagree**: the default has not followed the "
                 "selection (why: \"What the runs say\" below)."), ""]
    return lines


# ── the page ─────────────────────────────────────────────────────────────────────────────────────────────

PPL_COLUMNS = (("WikiText ppl", ("wikitext_sentences", "ppl")), ("Alpaca resp. ppl", ("valid", "response_ppl")),
               ("Wikipedia resp. ppl", ("wikipedia_heldout", "response_ppl")),
               ("Multi-LexSum resp. ppl", ("multilexsum", "response_ppl")))
ACC = ("mean acc", ("mean_acc",))
METHOD_LABELS = {"restorelcc-default": "RestoreLCC (service default)", "bias-all": "bias (all heads)",
                 "lora": "LoRA r=8 q,v (merged)"}


def _show(v: Any) -> str:
    return f"{100 * v:.1f}%" if isinstance(v, float) and 0 <= v <= 1 else harness.cell(v)


def gap_closed(restored: float, pruned: float, dense: float, higher_better: bool = False) -> float | None:
    """The share of the pruned→dense gap closed: 1 at the dense value, 0 at the pruned one, above 1 past dense,
    negative when worse than pruned. Perplexities on a log scale (a ratio gap)."""
    import math

    if higher_better:
        return None if dense == pruned else (restored - pruned) / (dense - pruned)
    lp, ld, lr = math.log(pruned), math.log(dense), math.log(restored)
    return None if ld == lp else (lp - lr) / (lp - ld)


def gap_cell(col: tuple[str, tuple[str, ...]], mean: float | None, per_seed: list[float | None],
             dense: float | None, pruned: float | None) -> str:
    """The gap closed by the mean over seeds, and with two seeds or more the range the single seeds span."""
    if col is ACC and None not in (dense, pruned) and abs(dense - pruned) < MIN_ACC_GAP:
        return f"n/a (dense − pruned {100 * (dense - pruned):+.1f} points)"
    if None in (mean, dense, pruned) or (g := gap_closed(mean, pruned, dense, col is ACC)) is None:
        return "—"
    seeds = [gap_closed(v, pruned, dense, col is ACC) for v in per_seed if v is not None]
    spread = f" ({round(100 * min(seeds))} to {round(100 * max(seeds))})" if len(seeds) >= 2 else ""
    return f"{round(100 * g)}%{spread}"  # round(): never a "-0"


def render(store: harness.Store, command: str) -> str:
    dense = store.read(store.root / "dense.json")
    lines = ["# Restoring toward the dense model: sft vs distill", "",
             f"Produced by `{command}` (results: `bench/results/objective/`; the command resumes from them).", "",
             (__doc__ or "").split("\n\n", 2)[2].split("Results:")[0].strip().replace("\n", " "), "",
             "'gap closed' = the share of the pruned→dense gap a restored model closes (perplexities on a log "
             "scale): 100% is the dense model, 0% the pruned one, negative is worse than pruned, above 100% past "
             "the dense model (the model moved toward something else). Values are means over the seeds run; with two "
             "seeds or more, the gap each single seed closed follows in brackets (lowest to highest). "
             f"Objective 'mixed' is distill with sft_weight {MIXED_WEIGHT}: (1 − w)·KL + w·CE per token.", ""]
    if dense is None:
        return "\n".join(lines + ["Nothing measured yet."]) + "\n"
    limits = dense.get("fingerprint", {}).get("evaluation", {}).get("limits", {})
    lines += ["Rows scored: " + ", ".join(f"{k} {v}" for k, v in sorted(limits.items())) + " (the first rows of "
              "each set; with 100 task rows an accuracy moves about ±5 points by chance). Measured on "
              f"{dense['environment']['cpu']} ({dense['environment']['threads']} torch threads).", ""]
    cols = (*PPL_COLUMNS, ACC)
    for setting in plan.SETTINGS:
        pruned = store.read(store.root / setting.key / "pruned.json")
        if pruned is None:
            continue
        lines += [f"## {setting.label}", ""]
        header = ["model", "train", "objective", "seeds"] + [c[0] for c in cols] + \
                 [f"gap closed: {c[0]}" for c in cols]
        rows = [["dense", "—", "—", 1] + [_get(dense["metrics"], c[1]) for c in cols] + ["—"] * len(cols),
                ["pruned", "—", "—", 1] + [_get(pruned["metrics"], c[1]) for c in cols] + ["—"] * len(cols)]
        for train in ("alpaca", "wikipedia"):
            for mkey in METHOD_KEYS:
                for objective in OBJECTIVES:
                    runs = [json.loads(p.read_text()) for p in
                            sorted((store.root / setting.key / run_key(mkey, objective, train)).glob("seed*.json"))]
                    if not runs:
                        continue
                    values = [statistics.mean(v) if (v := [x for r in runs if (x := _get(r["metrics"], c[1]))
                                                             is not None]) else None for c in cols]
                    gaps = [gap_cell(c, v, [_get(r["metrics"], c[1]) for r in runs], _get(dense["metrics"], c[1]),
                                     _get(pruned["metrics"], c[1])) for c, v in zip(cols, values, strict=True)]
                    rows.append([METHOD_LABELS[mkey], train, objective, len(runs), *values, *gaps])
        lines += [harness.markdown_table(header, rows, _show), ""]
    lines += _task_accuracy(store, dense)
    lines += render_selection(store)
    notes = store.read_text("notes.md")
    if notes:
        lines += ["## What the runs say", "", notes.strip(), ""]
    costs = _costs(store)
    if costs:
        lines += ["## Cost of the dense targets", "", costs, ""]
    return "\n".join(lines)


TASKS = (("BoolQ", "boolq"), ("PIQA", "piqa"), ("OpenBookQA", "openbookqa"))


def _task_accuracy(store: harness.Store, dense: dict[str, Any]) -> list[str]:
    """Each task's accuracy beside the dense and pruned models': the mean can hide tasks moving apart."""
    header = ["setting", "model", "train", "objective", "seeds", *(t[0] for t in TASKS)]
    rows = []
    for setting in plan.SETTINGS:
        pruned = store.read(store.root / setting.key / "pruned.json")
        if pruned is None:
            continue
        rows += [[setting.key, name, "—", "—", 1, *(_get(r["metrics"], (task, "acc")) for _, task in TASKS)]
                 for name, r in (("dense", dense), ("pruned", pruned))]
        for train in ("alpaca", "wikipedia"):
            for mkey in METHOD_KEYS:
                for objective in OBJECTIVES:
                    runs = [json.loads(p.read_text()) for p in
                            sorted((store.root / setting.key / run_key(mkey, objective, train)).glob("seed*.json"))]
                    if runs:
                        accs = [statistics.mean(_get(r["metrics"], (task, "acc")) for r in runs) for _, task in TASKS]
                        rows.append([setting.key, METHOD_LABELS[mkey], train, objective, len(runs), *accs])
    if not rows:
        return []
    return ["## Accuracy by task", "",
            "The mean accuracy above, task by task (means over the seeds run).", "",
            harness.markdown_table(header, rows, _show), ""]


def _costs(store: harness.Store) -> str:
    rows = []
    for path in sorted([*store.root.glob("*/*-distill-*/seed*.json"), *store.root.glob("*/*-mixed-*/seed*.json")]):
        r = json.loads(path.read_text())
        t = r.get("dense_targets") or {}
        if t:
            sft_run = r["run"].replace("-distill-", "-sft-").replace("-mixed-", "-sft-")
            sft_path = store.root / r["setting"] / sft_run / path.name
            sft = json.loads(sft_path.read_text()) if sft_path.is_file() else None
            rows.append([r["setting"], r["run"], r["seed"], f"{t['samples']} of {t.get('of_samples', t['samples'])}",
                         t["tokens"], t["top_k"], t["bytes"], t["bytes_per_token"], t["seconds"],
                         r["seconds"]["stages"].get("loading"), sft and sft["seconds"]["stages"].get("loading"),
                         r["seconds"]["train"], sft and sft["seconds"]["train"]])
    if not rows:
        return ""
    return harness.markdown_table(["setting", "run", "seed", "samples captured", "target tokens", "k", "bytes",
                                   "bytes/token", "capture s", "loading stage s", "the same with sft", "train s",
                                   "the same with sft"], rows)


def main(args: argparse.Namespace, argv: list[str]) -> int:
    runner = Runner(args)
    if args.select and not args.render_only:
        runner.run_selection()
    elif not args.render_only:
        runner.run()
    harness.write_page(harness.DOCS / "objective.md", render(runner.store, harness.page_command("objective", argv)))
    costs = _costs(runner.store)
    if costs:
        harness.write_part(harness.DOCS / "speed.md", "objective", "\n".join([
            "## The distill objective's dense targets", "",
            "What capturing the dense model's top-k next-token distributions on the training samples adds to the "
            "loading stage, and what the targets hold (int32 ids and float16 log-probabilities for k tokens, a float32 "
            "log-mass for the rest and an int32 position: 6k + 8 bytes per token). They are kept in memory during the "
            "job and in every checkpoint after loading. From `python -m bench objective` "
            "([objective.md](objective.md)); seconds on this page's CPU, each run's own: runs that shared the two "
            "cores with other work (the Wanda 50% mix and SparseGPT 2:4 sft runs on Wikipedia ran beside the test "
            "suite) show longer stages, so compare seconds within a run (capture against its loading stage).", "",
            costs]))
    return 0
