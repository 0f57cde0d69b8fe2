"""How the pipeline tells the outside world where it is, and asks whether to stop.

The CLI prints progress bars; the service writes status, stage, progress, metrics and events into the
job store. Both implement :class:`Reporter`; the pipeline knows only this protocol.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Protocol

from app.schemas import Stage
from worker.errors import Cancelled


class Reporter(Protocol):
    def stage(self, stage: Stage) -> None:
        """A new stage starts (stages arrive in pipeline order)."""

    def progress(self, fraction: float, message: str = "") -> None:
        """Overall job progress in [0, 1] (never decreasing) with a short human message."""

    def metrics(self, metrics: dict[str, Any]) -> None:
        """Merge ``metrics`` into the job's metrics (e.g. ``{"pruned": {...}}``)."""

    def event(self, kind: str, data: dict[str, Any]) -> None:
        """Anything else worth an entry in the job's event log."""

    def cancel_requested(self) -> bool:
        """True when the job should stop at the next checkpoint."""


def checkpoint(reporter: Reporter) -> None:
    """A cancellation checkpoint: raise :class:`Cancelled` if the job was asked to stop."""
    if reporter.cancel_requested():
        raise Cancelled("cancelled at a checkpoint")


class ConsoleReporter:
    """For `restorelcc run`: one progress line on stderr, stage headers, no cancellation."""

    def __init__(self, stream=sys.stderr, quiet: bool = False):
        self.stream = stream
        self.quiet = quiet
        self._stage: Stage | None = None
        self._t0 = time.monotonic()
        self._last = 0.0
        self.metrics_seen: dict[str, Any] = {}

    def _write(self, text: str) -> None:
        if not self.quiet:
            self.stream.write(text)
            self.stream.flush()

    def stage(self, stage: Stage) -> None:
        self._stage = stage
        self._write(f"\n[{time.monotonic() - self._t0:7.1f}s] ── {stage.value}\n")

    def progress(self, fraction: float, message: str = "") -> None:
        now = time.monotonic()
        if now - self._last < 0.2 and fraction < 1.0:
            return
        self._last = now
        width = 30
        filled = int(round(width * max(0.0, min(1.0, fraction))))
        bar = "█" * filled + "·" * (width - filled)
        self._write(f"\r  {bar} {100 * fraction:5.1f}%  {message[:70]:<70}")

    def metrics(self, metrics: dict[str, Any]) -> None:
        self.metrics_seen.update(metrics)

    def event(self, kind: str, data: dict[str, Any]) -> None:
        if kind in ("warning", "info") and "message" in data:
            self._write(f"\n  {kind}: {data['message']}\n")
        elif kind == "plan":
            plan = next(iter(data["devices"].values()))
            peak = plan["peak"]
            need, have = peak["device_bytes"] / 2**30, data["available_bytes"]["device"] / 2**30
            self._write(f"\n  memory plan: {plan['mode']} model on {data['device']}, peak {need:.2f} GiB "
                        f"({peak['device_stage']}) of {have:.2f} GiB\n")
        elif kind == "resumed":
            step = f", step {data['step']}" if data.get("step") is not None else ""
            self._write(f"\n  resuming from the checkpoint taken at {data['checkpoint']} ({data['stage']}{step})\n")

    def cancel_requested(self) -> bool:
        return False


class NullReporter(ConsoleReporter):
    def __init__(self) -> None:
        super().__init__(quiet=True)
