"""How a job's time and memory grow with model size, with the memory plan's prediction beside each measurement.

    python -m bench scaling                                   # 135M, 0.5B, 1B, 2B Llama shapes, bf16, this CPU
    python -m bench scaling --shapes llama2-7b                # one 7B-shaped run (weights ≈13.8 GB)
    python -m bench scaling --device cuda --shapes llama2-7b,llama3-8b --prune wanda,sparsegpt:2:4   # GPU check
    python -m bench scaling --shapes 135m,0.5b,1b --objective mixed  # RestoreLCC's default objective
    python -m bench scaling --render-only                     # rewrite docs/scaling.md

Each shape is a random-weight Llama model written by bench.shapes (no download) and run as one job in a process of
its own (`restorelcc run`), with small sample counts: the point is the growth, not the quality. Per stage the page
shows seconds and peak memory (resident set on the CPU, torch's peak on a GPU), the plan's prediction and their
ratio, and fits the exponent k in cost ∝ parameters^k over the CPU sizes. One result per shape, pruning method,
objective and device is kept under bench/results/ (or --store) and reused while its settings match.

``--objective`` sets the training objective: ``sft`` (the first runs' objective, kept for their results), ``mixed``
(RestoreLCC's default: distillation from the dense model's top-k next-token log-probabilities, captured while
loading, mixed half and half with the instruction loss) or ``distill``. The distilled runs measure what sft runs
cannot: the capture in the loading stage and the vocabulary-wide log-softmax in training.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from app.methods import RESTORELCC_OBJECTIVE, RESTORELCC_SFT_WEIGHT
from app.plan_time import NOMINAL, Speed, sparsegpt_columns
from app.shapes import Shapes
from bench import harness
from bench.shapes import SHAPES, build

PAGE = harness.DOCS / "scaling.md"
CPU_SHAPES = ("135m", "0.5b", "1b", "2b")
TARGET_RATIO = 0.20  # the plan is within 20% of the measured peak
TIMED_STAGE_S = 5.0  # stages shorter than this are mostly fixed start costs: their time ratio is shown, not judged
OBJECTIVES = {"sft": {"objective": "sft"}, "distill": {"objective": "distill", "sft_weight": 0.0},
              "mixed": {"objective": RESTORELCC_OBJECTIVE, "sft_weight": RESTORELCC_SFT_WEIGHT}}


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--shapes", default=",".join(CPU_SHAPES), help=f"comma-separated, of: {', '.join(SHAPES)}")
    ap.add_argument("--prune", default="wanda", help="comma-separated: wanda, magnitude, sparsegpt, each with "
                                                      "an optional N:M pattern (sparsegpt:2:4)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--samples", type=int, default=8, help="calibration, probe and evaluation rows")
    ap.add_argument("--steps", type=int, default=4, help="training steps")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "restorelcc-scaling"),
                    help="where the random models are written (kept for later runs)")
    ap.add_argument("--tokenizer", default=None, help="a model directory with the tokenizer (default: SmolLM2's)")
    ap.add_argument("--store", default=str(harness.RESULTS), help="where results are kept")
    ap.add_argument("--negatives", default="minilm", choices=["minilm", "tfidf"],
                    help="how probing picks negatives (tfidf needs no embedding model: the GPU check uses it)")
    ap.add_argument("--streaming", action="store_true",
                    help="stream the decoder layers (model.streaming 'on'); kept beside the whole-model results")
    ap.add_argument("--objective", default="sft", choices=list(OBJECTIVES),
                    help="training objective: sft, distill, or mixed (RestoreLCC's default; see above)")
    ap.add_argument("--build-on", default="cpu", choices=["cpu", "cuda"], help="where the random weights are drawn")
    ap.add_argument("--again", action="store_true", help="measure anew even when a result is stored")


def job_spec(model: Path, prune: str, a: dict[str, Any]) -> dict[str, Any]:
    method, _, pattern = prune.partition(":")
    pruning: dict[str, Any] = {"method": method, "calibration_samples": a["samples"], "seq_len": a["seq_len"]}
    if pattern:
        pruning["pattern"] = pattern
    return {
        "model": {"id": str(model), "dtype": a["dtype"], "streaming": "on" if a.get("streaming") else "off"},
        "pruning": pruning,
        "restoration": {"method": "restorelcc", **OBJECTIVES[a.get("objective", "sft")],
                        "probe_samples": max(4, a["samples"]), "max_steps": a["steps"],
                        "batch_size": 4, "max_seq_len": a["seq_len"], "train_samples": 64,
                        "negatives": a.get("negatives", "minilm")},
        "data": {"train": harness.data("alpaca/train.jsonl")},
        "evaluation": {"perplexity": [harness.data("eval/wikitext_sentences.jsonl")], "limit": a["samples"],
                       "batch_size": 4, "max_seq_len": a["seq_len"]},
    }


def measure(shape: str, prune: str, a: dict[str, Any], tokenizer: Path, build_on: str = "cpu") -> dict[str, Any]:
    """Build the model (if not already there), run the job in a fresh process, keep its stage table and plan."""
    model = build(SHAPES[shape], Path(a["work"]) / f"{shape}-{a['dtype']}", a["dtype"], tokenizer, device=build_on)
    with tempfile.TemporaryDirectory(prefix="scaling-") as tmp:
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(json.dumps(job_spec(model, prune, a)), encoding="utf-8")
        env = {**os.environ, "RESTORELCC_DEVICE": a["device"], "HF_HUB_OFFLINE": "1"}
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "worker.cli", "run", str(spec_path), "--out", f"{tmp}/out",
                               "--quiet"], env=env, cwd=harness.REPO, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{shape} {prune} {a.get('objective', 'sft')}: the job failed:\n{proc.stderr[-3000:]}")
        report = json.loads((Path(tmp) / "out" / "report.json").read_text(encoding="utf-8"))
        digest = hashlib.sha256()
        with open(Path(tmp) / "out" / "model" / "model.safetensors", "rb") as fh:
            for block in iter(lambda: fh.read(1 << 24), b""):
                digest.update(block)
    tokens = {"pruning": (report.get("pruning", {}).get("calibration") or {}).get("tokens"),
              "training": (report.get("restoration") or {}).get("train_tokens")}
    return {"shape": shape, "params": SHAPES[shape].params(), "prune": prune, "stages": report["stages"],
            "tokens": {k: v for k, v in tokens.items() if v},
            "plan": report["plan"], "environment": report["environment"], "seconds": time.perf_counter() - t0,
            "model_sha256": digest.hexdigest(), "checks": report.get("checks", {}),
            "dense_targets": report.get("dense_targets"),
            "machine": harness.machine(), "date": time.strftime("%Y-%m-%d")}


def measured_peak(stage: dict[str, Any], device: str) -> float:
    """Bytes: torch's peak on a GPU, the resident set on the CPU (what the plan predicts)."""
    return (stage["peak_gpu_mb"] if device == "cuda" else stage["peak_rss_mb"]) * 2**20


def fit_exponent(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of log y on log x."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys, strict=True) if x > 0 and y > 0]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx if sxx else None


def _path(store: Path, shape: str, prune: str, device: str, dtype: str, streaming: bool = False,
          objective: str = "sft") -> Path:
    tail = ("" if objective == "sft" else f"-{objective}") + ("-streaming" if streaming else "")
    return store / f"scaling-{shape}-{prune.replace(':', '')}-{device}-{dtype}{tail}.json"


def objective_of(r: dict[str, Any]) -> str:
    """The run's objective (results made before the axis existed were sft)."""
    return r.get("fingerprint", {}).get("objective", "sft")


def _streamed(r: dict[str, Any]) -> bool:
    return r["plan"].get("mode") == "streaming"


def _stored(store: Path) -> list[dict[str, Any]]:
    out = [json.loads(p.read_text(encoding="utf-8")) for p in sorted(store.glob("scaling-*.json"))
           if not p.name.endswith(".stale.json")]
    return sorted(out, key=_order)


def _order(r: dict[str, Any]) -> tuple[bool, bool, str, int]:
    """The page's order: CPU before GPU, sft runs before distilled ones, then pruning method and size."""
    return r["environment"]["device"] != "cpu", objective_of(r) != "sft", r["prune"], r["params"]


def stored_speed(r: dict[str, Any]) -> dict[str, Any] | None:
    """The rates the run's worker measured; a rate measured only by later workers (SparseGPT's column step) is the
    device kind's nominal one. None for a result made before plans had a time part."""
    speed = r["plan"].get("speed")
    if not speed:
        return None
    return NOMINAL[r["plan"]["device"].split(":")[0]].to_dict() | speed


def predicted_seconds(r: dict[str, Any]) -> dict[str, float] | None:
    """Each stage's seconds as the current time plan (app.plan_time) predicts them at the speed the run's worker
    measured (:func:`stored_speed`); None for a result made before plans had a time part."""
    from app.plan import make_plan
    from app.schemas import JobSpec

    speed = stored_speed(r)
    if not speed:
        return None
    fp = r["fingerprint"]
    a = {"samples": fp["samples"], "steps": fp["steps"], "seq_len": fp["seq_len"], "dtype": fp["dtype"],
         "negatives": fp.get("negatives", "minilm"), "streaming": _streamed(r), "objective": objective_of(r)}
    spec = JobSpec.model_validate(job_spec(Path("model"), r["prune"], a))
    plan = make_plan(spec, _shapes(r), r["plan"]["device"],
                     file_bytes=r["plan"]["read_bytes"], streaming=_streamed(r), speed=Speed(**speed))
    return {stage: p.seconds for stage, p in plan.stages.items()}


def _step_measured(r: dict[str, Any]) -> bool:
    """Whether the run's worker measured SparseGPT's column step (later workers do)."""
    return "step_s" in (r["plan"].get("speed") or {})


def _shapes(r: dict[str, Any]) -> Shapes:
    return Shapes.from_config(SHAPES[r["shape"]].config(r["fingerprint"]["dtype"]))


def _gb(n: float) -> str:
    return f"{n / 2**30:.2f}"


def _section(results: list[dict[str, Any]], device: str) -> list[str]:
    lines: list[str] = []
    worst = 0.0
    ratios: list[float] = []  # plan ÷ measured seconds: every stage of at least TIMED_STAGE_S, every whole job
    for r in results:
        plan = r["plan"]["stages"]
        secs = predicted_seconds(r) or {}
        sparsegpt = r["prune"].startswith("sparsegpt")
        # a SparseGPT run whose worker did not measure the column step: its pruning (and so its whole job) is
        # predicted at the nominal step, set from such runs, so it is no check of the plan
        nominal_step = sparsegpt and not _step_measured(r)
        if secs:
            ratios += [secs[st] / m["seconds"] for st, m in r["stages"].items()
                       if m["seconds"] >= TIMED_STAGE_S and not (nominal_step and st == "pruning")]
            if not nominal_step:
                ratios.append(sum(secs.values()) / sum(m["seconds"] for m in r["stages"].values()))
        rows = []
        for stage, m in r["stages"].items():
            meas = measured_peak(m, device)
            pred = plan[stage]["device_bytes"]
            ratio = pred / meas if meas else float("nan")
            worst = max(worst, abs(ratio - 1))
            tokens = r.get("tokens", {}).get(stage)
            plan_s = secs.get(stage)
            rows.append([stage, f"{m['seconds']:.1f}", "—" if plan_s is None else f"{plan_s:.1f}",
                         "—" if plan_s is None else f"{plan_s / m['seconds']:.2f}",
                         f"{tokens / m['seconds']:,.0f}" if tokens else "—", _gb(meas),
                         _gb(pred), f"{ratio:.2f}", "yes" if abs(ratio - 1) <= TARGET_RATIO else "**no**"])
        env = r["environment"]
        speed = stored_speed(r)
        step = ""
        if speed and sparsegpt:
            nominal = ", nominal: not measured by that worker" if nominal_step else ""
            step = f", {speed['step_s'] * 1e6:,.0f} µs per SparseGPT column step{nominal}"
        timed = (f" The time plan: {sum(secs.values()):.0f} s, at the rates the worker measured ("
                 f"{speed['matmul_flops'] / 1e9:,.0f} GFLOP/s matrix multiply, {speed['sort_elements'] / 1e6:,.0f} M "
                 f"elements/s sorted, {speed['move_bytes'] / 1e9:.1f} GB/s onto the device{step})." if speed else "")
        if sparsegpt:
            columns = sparsegpt_columns(_shapes(r))
            per_column = r["stages"]["pruning"]["seconds"] / columns
            timed += f" SparseGPT's {columns:,} column steps: {per_column * 1e6:,.0f} µs each over the pruning stage."
        objective = "" if objective_of(r) == "sft" else f", objective {objective_of(r)}"
        targets = r.get("dense_targets")
        captured = (f" Dense targets: {targets['tokens']:,} tokens at top-{targets['top_k']}, "
                    f"{targets['bytes'] / 2**20:.1f} MiB ({targets['bytes_per_token']:.0f} bytes per token), captured "
                    f"in {targets['seconds']:.1f} s of the loading stage." if targets else "")
        lines += [f"### {r['shape']} ({r['params'] / 1e9:.2f}B parameters, {r['plan']['dtype']}, {r['prune']}"
                  f"{objective}) — {env.get('device_name', env['device'])}, {r['date']}", "",
                  f"Weights {_gb(r['plan']['weight_bytes'])} GiB; the whole job {r['seconds']:.0f} s.{timed}{captured}",
                  "",
                  harness.markdown_table(["stage", "seconds", "plan s", "plan / measured (time)", "tokens/s",
                                          "peak GiB (measured)", "plan GiB", "plan / measured", "within 20%"],
                                         rows), ""]
    if results:
        timed = (f" Time: the plan is between {min(ratios):.2f}× and {max(ratios):.2f}× the measured seconds of "
                 f"every stage of at least {TIMED_STAGE_S:.0f} s and of every whole job "
                 f"(shorter stages are mostly their fixed start cost)." if ratios else "")
        lines.insert(0, f"Largest deviation of the plan from a measured stage peak: **{worst:.0%}** "
                        f"(goal: within {TARGET_RATIO:.0%}).{timed}\n")
    return lines


def _exponents(results: list[dict[str, Any]]) -> list[str]:
    cpu = [r for r in results if r["environment"]["device"] == "cpu" and r["prune"] == "wanda"
           and objective_of(r) == "sft"]
    if len(cpu) < 2:
        return []
    params = [r["params"] for r in cpu]
    rows = []
    for stage in cpu[0]["stages"]:
        secs = [r["stages"][stage]["seconds"] for r in cpu]
        mem = [r["stages"][stage]["peak_rss_mb"] for r in cpu]
        ks, km = fit_exponent(params, secs), fit_exponent(params, mem)
        rows.append([stage, *[f"{s:.1f}" for s in secs], "—" if ks is None else f"{ks:.2f}",
                     "—" if km is None else f"{km:.2f}"])
    header = ["stage", *[f"s @ {r['shape']}" for r in cpu], "k (seconds)", "k (peak memory)"]
    return ["## Growth with size (CPU, Wanda 50%, fitted over the sizes below)", "",
            "k is the exponent of cost ∝ parameters^k. Peak memory includes the fixed runtime (≈0.4 GiB), so its "
            "exponent stays below 1 until the weights dominate.", "", harness.markdown_table(header, rows), ""]


def _streaming(results: list[dict[str, Any]]) -> list[str]:
    """Each streamed run beside the whole-model run of the same shape: peak host memory, and the exported model."""
    def key(r: dict[str, Any]) -> tuple[str, str, str, str]:
        return r["shape"], r["prune"], r["environment"]["device"], objective_of(r)

    whole = {key(r): r for r in results if not _streamed(r)}
    rows, verdicts = [], []
    for s in (r for r in results if _streamed(r)):
        w = whole.get(key(s))
        weights = s["plan"]["weight_bytes"]
        anon = max(m.get("peak_anon_mb", m["peak_rss_mb"]) for m in s["stages"].values()) * 2**20
        peak = max(m["peak_rss_mb"] for m in s["stages"].values()) * 2**20
        w_peak = max(m["peak_rss_mb"] for m in w["stages"].values()) * 2**20 if w else None
        same = None if not w or "model_sha256" not in w else w["model_sha256"] == s["model_sha256"]
        ok = anon <= 0.5 * weights and same is True
        verdicts.append(ok)
        label = s["shape"] if objective_of(s) == "sft" else f"{s['shape']} ({objective_of(s)})"
        rows.append([label, _gb(weights), "—" if w_peak is None else _gb(w_peak), _gb(peak), _gb(anon),
                     f"{anon / weights:.2f}", {True: "yes", False: "**no**", None: "—"}[same],
                     "yes" if ok else "**no**"])
    if not rows:
        return []
    return ["## Layer streaming (CPU)", "",
            "The same job with `model.streaming: \"on\"`: the decoder layers stay in their safetensors files and one "
            "at a time comes into memory (two while training recomputes one). Host memory beyond the memory-mapped "
            "files is the resident set less its file-backed pages (shared libraries' pages too, so it is a little "
            "below what the process holds of its own); the goal is at most half the weights, with the exported model "
            "byte for byte the whole-model run's. The stage tables below set the plan beside the whole resident set.",
            "",
            harness.markdown_table(["shape", "weights GiB", "whole: peak GiB", "streamed: peak GiB",
                                    "streamed: beyond the files GiB", "÷ weights", "same model.safetensors",
                                    "goal met"], rows), ""]


def render(results: list[dict[str, Any]], command: str) -> str:
    results = sorted(results, key=_order)
    streamed = [r for r in results if _streamed(r)]
    results = [r for r in results if not _streamed(r)] + streamed
    cpu = [r for r in results if r["environment"]["device"] == "cpu" and not _streamed(r)]
    gpu = [r for r in results if r["environment"]["device"] != "cpu" and not _streamed(r)]
    lines = ["# Scaling: time and memory against model size", "",
             f"Made by `{command}` (and `scripts/gpu_check.sh` on a GPU). Random-weight Llama-shaped models "
             "(bench/shapes.py) with SmolLM2's tokenizer, a few samples and steps: the point is how cost grows, "
             "not quality. Each stage's measured peak (the process's resident set on the CPU, torch's peak "
             "allocation on a GPU) stands beside the memory plan's prediction (`restorelcc plan`, app/plan.py), "
             "which a worker checks before loading any weights. Each stage's seconds stand beside the time plan's "
             "(app/plan_time.py: the stage's work at the rates the worker measured on its device before the job), "
             "recomputed from the stored rates by the current code. The time plan is an estimate for scheduling, "
             "not a limit: with a few samples, stages of a few seconds are mostly fixed costs, and the token counts "
             "assume rows half as long as their limit (these runs' WikiText sentences are shorter). Runs trained "
             "with the sft objective come first; a heading that names another objective trained RestoreLCC's default "
             "(mixed: the dense model's top-k targets captured while loading, half the loss from them) or pure "
             "distillation (`--objective`).", ""]
    lines += _exponents(cpu)
    lines += ["## CPU", ""] + (_section(cpu, "cpu") or ["Not measured yet.", ""])
    lines += _streaming(results)
    if streamed:
        lines += ["### Streamed runs, stage by stage", ""] + _section(streamed, "cpu")
    lines += ["## GPU", ""]
    if gpu:
        lines += ["Made by `scripts/gpu_check.sh` on the GPU named in each heading: one job each, on a machine that "
                  "started bare (its first job also pays CUDA's start-up, in whichever stage first needs it). "
                  "SparseGPT's column loop is a long chain of small operations, bound by the latency of launching "
                  "them rather than by arithmetic: the time plan counts its column steps at a step time each "
                  "worker measures."
                  + (" Runs made before workers measured it are predicted at the nominal GPU step "
                     "(app/plan_time.py), which was set from such a SparseGPT run: the summary leaves out those "
                     "runs' SparseGPT pruning and whole-job times, which are no check of the plan."
                     if not all(_step_measured(r) for r in gpu) else ""), ""]
    lines += (_section(gpu, "cuda") or [
        "No GPU has run `scripts/gpu_check.sh` yet: every figure above is from a CPU. Until one does, the plan's "
        "GPU predictions (weights and transients on the device, the runtime on the host, and the time at the "
        "rates a GPU worker measures) are unchecked.", ""])
    lines += ["### Several GPUs", "",
              "A model split over a worker's GPUs (`model.split`, docs/api.md) has been run only on CPU stand-ins "
              "of two devices (tests/integration/test_split_run.py: the exported model is the whole-model job's, "
              "byte for byte). No machine with several GPUs has run it, so neither the per-GPU plan nor the "
              "cost of the copies between GPUs is measured yet.", ""]
    return "\n".join(lines).rstrip("\n") + "\n"


def main(args: argparse.Namespace, argv: list[str]) -> int:
    store_dir = Path(args.store)
    store = harness.Store(store_dir)
    if not args.render_only:
        a = {"dtype": args.dtype, "device": args.device, "samples": args.samples, "steps": args.steps,
             "seq_len": args.seq_len, "work": args.work, "negatives": args.negatives, "streaming": args.streaming,
             "objective": args.objective}
        tokenizer = Path(args.tokenizer) if args.tokenizer else Path(harness.model_path(harness.models()[0]))
        for prune in args.prune.split(","):
            for shape in args.shapes.split(","):
                path = _path(store_dir, shape, prune, args.device, args.dtype, args.streaming, args.objective)
                if args.again:
                    path.unlink(missing_ok=True)
                fp = {k: v for k, v in a.items()
                      if k != "work" and (k, v) not in (("negatives", "minilm"), ("streaming", False),
                                                        ("objective", "sft"))}
                fp |= {"shape": shape, "prune": prune}
                if args.objective != "sft":  # what the name stood for when measured: a later default is another run
                    fp |= {"restoration": OBJECTIVES[args.objective]}
                store.get(path, fp, lambda s=shape, p=prune: measure(s, p, a, tokenizer, args.build_on),
                          f"{shape} {prune}{'' if args.objective == 'sft' else ' ' + args.objective}")
    if store_dir == harness.RESULTS:
        harness.write_part(PAGE, None, render(_stored(store_dir), "python -m bench scaling"))
    else:
        for r in _stored(store_dir):
            print("\n".join(_section([r], r["environment"]["device"].split(":")[0])))
    return 0
