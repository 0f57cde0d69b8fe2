"""What every benchmark shares: where the data and the results are, the runner (pipeline runs and evaluations,
each result kept as one JSON with its fingerprint and reused while the fingerprint matches), and the renderer's
pieces (markdown tables, the command a page names, writing a page). bench imports app/ and worker/ only here,
in plan.contract(), in speed.measure() and in service's measurements, inside the functions that need them.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("RESTORELCC_SHARED_DATA", REPO.parent / "shared" / "data"))
RESULTS = REPO / "bench" / "results"
DOCS = REPO / "docs"
# Every page's targets, as data: the renderers and the search read them from here, never from their own code.
TARGETS: dict[str, dict[str, Any]] = json.loads((Path(__file__).parent / "targets.json").read_text(encoding="utf-8"))


def data(path: str) -> str:
    p = SHARED_DATA / path
    if not p.is_file():
        raise SystemExit(f"benchmark data not found: {p} (set RESTORELCC_SHARED_DATA)")
    return str(p)


def models() -> tuple[str, dict[str, Any]]:
    """The demo model's name and every model ``restorelcc fetch-model`` knows."""
    from worker.assets.models import DEMO_MODEL, MODELS

    return DEMO_MODEL, MODELS


def model_path(name: str) -> str:
    """A known model's directory (fetched on first use)."""
    from worker.assets.models import model_dir

    return str(model_dir(name))


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# ── the runner ───────────────────────────────────────────────────────────────────────────────────────────


class Store:
    """JSON results under one root. A result is reused only while its fingerprint (what made it) matches; one
    with another fingerprint is renamed ``*.stale.json`` and made again."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def read(self, path: Path, fp: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """The stored result if present and made with fingerprint ``fp`` (None: any); never moves anything."""
        if not path.is_file():
            return None
        obj = json.loads(path.read_text(encoding="utf-8"))
        return obj if fp is None or normalise(obj.get("fingerprint")) == normalise(fp) else None

    def load(self, path: Path, fp: dict[str, Any] | None) -> dict[str, Any] | None:
        """As ``read``, but a result made with another fingerprint is set aside (``*.stale.json``)."""
        found = self.read(path, fp)
        if found is not None or not path.is_file():
            return found
        stale = path.with_suffix(".stale.json")
        path.rename(stale)
        say(f"{path}: made with other settings; moved to {stale.name}, recomputing")
        return None

    def read_text(self, name: str) -> str | None:
        """A text file stored next to the results (notes written by hand), or None."""
        path = self.root / name
        return path.read_text(encoding="utf-8") if path.is_file() else None

    def save(self, path: Path, obj: dict[str, Any]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
        tmp.replace(path)  # never a half-written result

    def get(self, path: Path, fp: dict[str, Any], make: Callable[[], dict[str, Any]], label: str,
            **extra: Any) -> dict[str, Any]:
        """The stored result made with ``fp``, or ``make()`` run now and stored with ``fp`` (and ``extra``)."""
        found = self.load(path, fp)
        if found is not None:
            say(f"{label}: already measured")
            return found
        t0 = time.perf_counter()
        found = {**make(), "fingerprint": fp, **extra}
        self.save(path, found)
        say(f"{label}: done in {time.perf_counter() - t0:.0f}s → {path}")
        return found


_IN_RESULTS = re.compile(r'"[^"]*/bench/results/')


def normalise(obj: Any) -> Any:
    """Comparable form of a fingerprint: key order ignored, paths under the shared data folder or under a
    checkout's bench/results (the search's selection rows) written relative to them, so results stay reusable
    from another checkout or machine, and a restoration's objective settings left out where they hold their sft
    values, and response_eos where false (results made before those settings existed name none)."""
    text = json.dumps(obj, sort_keys=True)
    root = json.dumps(str(SHARED_DATA.resolve()))[1:-1]
    from app.methods import DISTILL_ONLY

    return _without(json.loads(_IN_RESULTS.sub('"$RESULTS/', text.replace(root, "$SHARED_DATA"))),
                    {"objective": "sft", **DISTILL_ONLY, "response_eos": False})


def _without(obj: Any, sft: dict[str, Any]) -> Any:
    """``obj`` with every restoration section's ``sft`` settings left out where they hold those values."""
    if isinstance(obj, list):
        return [_without(v, sft) for v in obj]
    if not isinstance(obj, dict):
        return obj
    out = {k: _without(v, sft) for k, v in obj.items()}
    r = out.get("restoration")
    if isinstance(r, dict):
        out["restoration"] = {k: v for k, v in r.items() if k not in sft or v != sft[k]}
    return out


class LogReporter:
    """Pipeline reporter for logs: stage headers, and a progress line at most every ``every`` seconds."""

    def __init__(self, prefix: str, every: float = 20.0):
        self.prefix, self.every = prefix, every
        self._last, self._t0 = 0.0, time.monotonic()

    def _say(self, text: str) -> None:
        say(f"[{time.monotonic() - self._t0:7.1f}s] {self.prefix} {text}")

    def stage(self, stage: Any) -> None:
        self._say(f"── {getattr(stage, 'value', stage)}")

    def progress(self, fraction: float, message: str = "") -> None:
        if time.monotonic() - self._last >= self.every:
            self._last = time.monotonic()
            self._say(f"{100 * fraction:5.1f}% {message}")

    def metrics(self, metrics: dict[str, Any]) -> None:
        pass

    def event(self, kind: str, data: dict[str, Any]) -> None:
        if kind in ("warning", "info") and "message" in data:
            self._say(f"{kind}: {data['message']}")

    def cancel_requested(self) -> bool:
        return False


def write_rows(source: str, path: Path, start: int, rows: int, scored: int, scored_word: str = "evaluated") -> bool:
    """Rows ``start .. start+rows-1`` of the JSONL ``source`` as the file ``path`` (selection rows), refusing rows a
    page scores (``0 .. scored-1``) and rows that do not exist. Returns whether ``path`` changed (new or other rows).
    """
    if start < scored:
        raise ValueError(f"selection rows start at {start}, inside the {scored_word} rows 0..{scored - 1}")
    lines = [ln for ln in Path(source).read_text(encoding="utf-8").splitlines() if ln.strip()]
    chosen = lines[start : start + rows]
    if len(chosen) < rows:
        raise ValueError(f"{source} has {len(lines)} rows; rows {start}..{start + rows - 1} do not exist")
    text = "\n".join(chosen) + "\n"
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return True


def run_job(job: dict[str, Any], out: Path, label: str) -> dict[str, Any]:
    """One job through the service's own pipeline; its report (the pipeline writes it and the model to ``out``)."""
    from app.schemas import JobSpec
    from worker.run.pipeline import run_pipeline

    say(f"=== {label}")
    return run_pipeline(JobSpec.model_validate(job), out, LogReporter(label))


def evaluate(model_dir: Path, ev: dict[str, Any], adapter_dir: Path | None = None, label: str = ""
             ) -> tuple[dict[str, Any], float]:
    """Metrics of a saved model (optionally with an unmerged peft adapter on top) and the seconds they took."""
    import torch

    from app.schemas import EvaluationSpec
    from worker.model.load import load_model, resolve_source
    from worker.run.evaluate import evaluate_spec

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = load_model(resolve_source(str(model_dir)), "float32", device=device)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir))
    t0 = time.perf_counter()
    metrics = evaluate_spec(model, tokenizer, EvaluationSpec.model_validate(ev),
                            progress=LogReporter(f"{label} evaluate").progress)
    return metrics, time.perf_counter() - t0


def machine() -> dict[str, Any]:
    """Where the numbers were measured."""
    import torch

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                   if ln.startswith("model name"))
    return {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "cpu": cpu, "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
        "python": platform.python_version(), "torch": torch.__version__,
    }


# ── the renderer ─────────────────────────────────────────────────────────────────────────────────────────


def cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1000 else f"{v:,.0f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return "—" if v is None else str(v)


def markdown_table(header: list[str], rows: list[list[Any]], show: Callable[[Any], str] = cell) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(show(v) for v in r) + " |" for r in rows])


def page_command(benchmark: str, argv: list[str]) -> str:
    """The command line a page names: without --only and --render-only (they do not change what it shows)."""
    out, skip = [], False
    for a in argv:
        if skip or a == "--only":
            skip = not skip
            continue
        if not (a.startswith("--only=") or a == "--render-only"):
            out.append(shlex.quote(a))
    return " ".join(["python -m bench", benchmark, *out])


def write_page(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    say(f"wrote {path}")


_PART = "<!-- the part below is written by python -m bench {} -->"
_PART_RE = re.compile(r"^<!-- the part below is written by python -m bench (\w+) -->\n", re.MULTILINE)


def write_part(path: Path, benchmark: str | None, text: str) -> None:
    """Write one benchmark's part of a page that several write: ``None`` is the page's top; a named part follows it,
    after a marker line naming its benchmark, and runs to the next part. The other parts are kept as they are."""
    old = path.read_text(encoding="utf-8") if path.is_file() else ""
    pieces = _PART_RE.split(old)  # [top, name, body, name, body, ...]
    top, parts = pieces[0], dict(zip(pieces[1::2], pieces[2::2], strict=True))
    if benchmark is None:
        top = text
    else:
        parts[benchmark] = text
    out = top.rstrip("\n") + "\n"
    for name, body in parts.items():
        out += "\n" + _PART.format(name) + "\n" + body.strip("\n") + "\n"
    write_page(path, out)


def relative(path: Path) -> str:
    """``path`` as a page names it: relative to the checkout when inside it."""
    try:
        return str(Path(path).resolve().relative_to(REPO))
    except ValueError:
        return str(path)
