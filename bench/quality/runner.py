"""Running the quality benchmark: one pipeline run per (setting, method, seed), each kept as one JSON.

Layout under the results root::

    dense.json                               the dense model's metrics (measured once)
    <setting>/pruned/seed0.json              the pruned model's metrics (once per setting)
    <setting>/<method>/seed<k>.json          one restoration run: its rows, info and timings
    runs/<setting>/pruned/model/             the pruned model, reused by every method (pruning 'none')
    runs/<setting>/<method>-s<k>/            the pipeline's output (report.json, adapter/; model/ removed)

A result is reused when its JSON exists and its fingerprint (the job without model paths, plus the
evaluation) matches; a JSON with another fingerprint is renamed ``*.stale.json`` and recomputed.
The pipeline runs without evaluation; the bench evaluates the exported (merged) model itself, so the
pruned model is not re-evaluated by every method, and evaluates LoRA/DoRA adapters unmerged on top of
the pruned model (peft).
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.quality import plan
from bench.quality.plan import Budget, Data, Method, Setting


class LogReporter:
    """Pipeline reporter for logs: stage headers, and a progress line at most every ``every`` seconds."""

    def __init__(self, prefix: str, every: float = 20.0):
        self.prefix, self.every = prefix, every
        self._last = 0.0
        self._t0 = time.monotonic()

    def _say(self, text: str) -> None:
        print(f"[{time.monotonic() - self._t0:7.1f}s] {self.prefix} {text}", file=sys.stderr, flush=True)

    def stage(self, stage: Any) -> None:
        self._say(f"── {getattr(stage, 'value', stage)}")

    def progress(self, fraction: float, message: str = "") -> None:
        now = time.monotonic()
        if now - self._last >= self.every:
            self._last = now
            self._say(f"{100 * fraction:5.1f}% {message}")

    def metrics(self, metrics: dict[str, Any]) -> None:
        pass

    def event(self, kind: str, data: dict[str, Any]) -> None:
        if kind in ("warning", "info") and "message" in data:
            self._say(f"{kind}: {data['message']}")

    def cancel_requested(self) -> bool:
        return False


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def machine() -> dict[str, Any]:
    """Where the numbers were measured."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


class Store:
    """The JSON results under one root, with fingerprint checks."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def result(self, setting: str, method: str, seed: int) -> Path:
        return self.root / setting / method / f"seed{seed}.json"

    @property
    def dense(self) -> Path:
        return self.root / "dense.json"

    def run_dir(self, setting: str, name: str) -> Path:
        return self.root / "runs" / setting / name

    def load(self, path: Path, fp: dict[str, Any] | None) -> dict[str, Any] | None:
        """The stored result if present and made with fingerprint ``fp`` (None: any)."""
        if not path.is_file():
            return None
        obj = json.loads(path.read_text(encoding="utf-8"))
        if fp is None or _normalise(obj.get("fingerprint")) == _normalise(fp):
            return obj
        stale = path.with_suffix(".stale.json")
        path.rename(stale)
        say(f"{path}: made with other settings; moved to {stale.name}, recomputing")
        return None

    def save(self, path: Path, obj: dict[str, Any]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
        tmp.replace(path)  # never a half-written result

    def all_results(self) -> list[dict[str, Any]]:
        out = []
        for p in sorted(self.root.glob("*/*/seed*.json")):
            if p.name.endswith(".stale.json") or p.parts[-3] in ("runs", "search"):
                continue
            out.append(json.loads(p.read_text(encoding="utf-8")))
        return out

    def current_results(self, budget: plan.Budget, data: plan.Data) -> tuple[list[dict[str, Any]], list[str]]:
        """The stored results today's plan would reuse, and ``setting/method/seed`` of those it would not (made
        with other settings, e.g. before a default changed): a page must not show those under today's labels."""
        keep, other = [], []
        for r in self.all_results():
            want = plan.expected_fingerprint(budget, data, r["setting"], r["method"], r["seed"])
            if want is not None and _normalise(r.get("fingerprint")) == _normalise(want):
                keep.append(r)
            else:
                other.append(f"{r['setting']}/{r['method']}/seed{r['seed']}")
        return keep, other

    def dense_result(self) -> dict[str, Any] | None:
        return json.loads(self.dense.read_text(encoding="utf-8")) if self.dense.is_file() else None


_IN_RESULTS = re.compile(r'"[^"]*/bench/results/')


def _normalise(obj: Any) -> Any:
    """Comparable form of a fingerprint: key order ignored, and paths under the shared data folder or under a
    checkout's bench/results (the search's selection rows) written relative to them, so results stay reusable
    from another checkout or machine."""
    from bench.common import SHARED_DATA

    text = json.dumps(obj, sort_keys=True)
    root = json.dumps(str(SHARED_DATA.resolve()))[1:-1]
    return json.loads(_IN_RESULTS.sub('"$RESULTS/', text.replace(root, "$SHARED_DATA")))


@dataclass
class Bench:
    budget: Budget
    data: Data
    dense_dir: str
    store: Store
    keep_models: bool = False

    # ── evaluation outside the pipeline ──────────────────────────────────────────────────────────────

    def evaluate(self, model_dir: Path, ev: dict[str, Any], adapter_dir: Path | None = None, label: str = ""
                 ) -> tuple[dict[str, Any], float]:
        """Metrics of a saved model (optionally with an unmerged peft adapter on top) and seconds taken."""
        import torch

        from app.schemas import EvaluationSpec
        from worker.evaluate import evaluate_spec
        from worker.model.load import load_model, resolve_source

        device = "cuda" if torch.cuda.is_available() else "cpu"
        model, tokenizer = load_model(resolve_source(str(model_dir)), "float32", device=device)
        if adapter_dir is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(adapter_dir))
        reporter = LogReporter(f"{label} evaluate")
        t0 = time.perf_counter()
        metrics = evaluate_spec(model, tokenizer, EvaluationSpec.model_validate(ev), progress=reporter.progress)
        seconds = time.perf_counter() - t0
        del model
        return metrics, seconds

    # ── dense and pruned ─────────────────────────────────────────────────────────────────────────────

    def ensure_base(self, setting: Setting) -> dict[str, Any]:
        """Dense metrics (once) and this setting's pruned metrics; prunes and keeps the pruned model."""
        from app.schemas import JobSpec
        from worker.pipeline import run_pipeline

        ev = plan.evaluation(self.data, self.budget)
        path = self.store.result(setting.key, "pruned", 0)
        base_fp = plan.pruned_fingerprint(setting, self.budget, self.data, ev)
        found = self.store.load(path, base_fp)
        need_dense = self.store.load(self.store.dense, {"evaluation": ev}) is None
        if found is not None and not need_dense:
            return found
        out = self.store.run_dir(setting.key, "pruned")
        job = plan.prune_job(setting, self.budget, self.data, self.dense_dir, {**ev, "dense": need_dense})
        say(f"=== {setting.key}: prune{' + dense' if need_dense else ''} + evaluate")
        t0 = time.perf_counter()
        report = run_pipeline(JobSpec.model_validate(job), out, LogReporter(f"{setting.key}/pruned"))
        seconds = time.perf_counter() - t0
        (out / "pruned_by.json").write_text(json.dumps(plan.pruning_spec(setting, self.budget)) + "\n")
        env = {**machine(), "threads": report["environment"]["threads"]}
        if need_dense:
            self.store.save(self.store.dense, {
                "setting": None, "method": "dense", "seed": 0, "fingerprint": {"evaluation": ev},
                "rows": {"dense": {"metrics": report["metrics"]["dense"]}}, "environment": env,
            })
        stages = {k: v["seconds"] for k, v in report["stages"].items()}
        result = {
            "setting": setting.key, "method": "pruned", "seed": 0, "fingerprint": base_fp,
            "rows": {"pruned": {"metrics": report["metrics"]["pruned"], "trainable_params": 0}},
            "info": {"sparsity": report["sparsity"]["overall"], "pruning": report.get("pruning")},
            "seconds": {"total": round(seconds, 1), "stages": stages},
            "environment": env,
        }
        self.store.save(path, result)
        return result

    def pruned_model(self, setting: Setting) -> Path:
        """The cached pruned model directory; pruned again (deterministic, no evaluation) if missing."""
        from app.schemas import JobSpec
        from worker.pipeline import run_pipeline

        out = self.store.run_dir(setting.key, "pruned")
        marker = out / "pruned_by.json"
        want = _normalise(plan.pruning_spec(setting, self.budget))
        made = _normalise(json.loads(marker.read_text())) if marker.is_file() else None
        if not (out / "model" / "config.json").is_file() or made != want:
            say(f"=== {setting.key}: pruned model missing or made otherwise, pruning again")
            job = plan.prune_job(setting, self.budget, self.data, self.dense_dir, None)
            run_pipeline(JobSpec.model_validate(job), out, LogReporter(f"{setting.key}/pruned"))
            marker.write_text(json.dumps(want) + "\n")
        return out / "model"

    # ── one restoration run ──────────────────────────────────────────────────────────────────────────

    def run_method(self, setting: Setting, method: Method, seed: int) -> dict[str, Any]:
        ev = plan.evaluation(self.data, self.budget)
        job = plan.restore_job(method, self.budget, self.data, "", self.dense_dir, seed)
        fp = plan.restore_fingerprint(setting, method, self.budget, self.data, seed, ev)
        path = self.store.result(setting.key, method.key, seed)
        found = self.store.load(path, fp)
        if found is not None:
            say(f"{setting.key}/{method.key}/seed{seed}: already measured")
            return found
        result = self.restore_and_evaluate(setting, method, seed, job, ev, f"{method.key}-s{seed}")
        result["fingerprint"] = fp
        self.store.save(path, result)
        say(f"{setting.key}/{method.key}/seed{seed}: done in {result['seconds']['total']:.0f}s → {path}")
        return result

    def restore_and_evaluate(self, setting: Setting, method: Method, seed: int, job: dict[str, Any],
                             ev: dict[str, Any], run_name: str) -> dict[str, Any]:
        """Run the pipeline on the cached pruned model, then evaluate the merged (and unmerged) model."""
        from app.schemas import JobSpec
        from worker.pipeline import run_pipeline

        pruned = self.pruned_model(setting)
        job = json.loads(json.dumps(job))
        job["model"]["id"] = str(pruned)
        out = self.store.run_dir(setting.key, run_name)
        if out.exists():
            shutil.rmtree(out)  # a run interrupted before its result was saved
        label = f"{setting.key}/{run_name}"
        say(f"=== {label}")
        t0 = time.perf_counter()
        report = run_pipeline(JobSpec.model_validate(job), out, LogReporter(label))
        rest = report["restoration"]
        common = {"trainable_params": rest["trainable_params"], "train_seconds": rest["train_seconds"]}
        merged, eval_merged = self.evaluate(out / "model", ev, label=label)
        seconds: dict[str, Any] = {
            "pipeline": report["seconds_total"],
            "stages": {k: v["seconds"] for k, v in report["stages"].items()},
            "train": rest["train_seconds"],
            "eval_merged": round(eval_merged, 1),
        }
        rows: dict[str, Any] = {}
        if method.forms == ("",):
            rows[method.key] = {"metrics": merged, **common}
        else:
            unmerged, eval_unmerged = self.evaluate(pruned, ev, adapter_dir=out / "adapter", label=f"{label} unmerged")
            seconds["eval_unmerged"] = round(eval_unmerged, 1)
            rows[plan.row_key(method.key, "unmerged")] = {"metrics": unmerged, **common}
            rows[plan.row_key(method.key, "merged")] = {"metrics": merged, **common}
        seconds["total"] = round(time.perf_counter() - t0, 1)
        if not self.keep_models:
            shutil.rmtree(out / "model", ignore_errors=True)
        keep = ("head_selection", "chosen_heads", "chosen_scores", "steps", "train_tokens", "probe_samples",
                "negatives_backend", "remasked_weights", "remask_weight_change_rel", "remask_update_lost_rel",
                "merge_remask_max_abs_logit_change", "unmerged_inference_overhead", "adapter")
        info = {k: rest[k] for k in keep if k in rest}
        curve = rest.get("loss_curve") or []
        info["loss_first_last"] = [curve[0], curve[-1]] if curve else None
        info["checks"] = report.get("checks", {})
        return {
            "setting": setting.key, "method": method.key, "seed": seed, "rows": rows, "info": info,
            "seconds": seconds, "environment": {**machine(), "threads": report["environment"]["threads"]},
        }


def run(bench: Bench, only: plan.Selection) -> list[tuple[str, float]]:
    """Everything the selection asks for, skipping what is stored; returns (run, seconds) of new runs."""
    timings: list[tuple[str, float]] = []
    todo = plan.plan(bench.budget, only)
    for setting in plan.SETTINGS:
        if not any(s.key == setting.key for s, _, _ in todo) and not only.wants(setting.key, "pruned"):
            continue
        t0 = time.perf_counter()
        before = bench.store.result(setting.key, "pruned", 0).is_file()
        bench.ensure_base(setting)
        if not before:
            timings.append((f"{setting.key}/pruned", time.perf_counter() - t0))
        for s, method, seed in todo:
            if s.key != setting.key:
                continue
            t0 = time.perf_counter()
            res = bench.run_method(setting, method, seed)
            if "total" in res.get("seconds", {}) and time.perf_counter() - t0 > 1:
                timings.append((f"{setting.key}/{method.key}/seed{seed}", res["seconds"]["total"]))
    return timings
