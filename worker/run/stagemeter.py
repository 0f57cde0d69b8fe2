"""Seconds and peak memory per pipeline stage.

CPU memory is the process's resident set, sampled by a background thread (the kernel's own peak is
lifetime-wide, so it cannot tell stages apart); GPU memory is torch's per-device peak, reset per stage.
"""

from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from typing import Any

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm", encoding="ascii") as fh:
            return int(fh.read().split()[1]) * _PAGE
    except OSError:  # not Linux: fall back to the lifetime peak
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _PeakSampler(threading.Thread):
    def __init__(self, interval: float = 0.05):
        super().__init__(daemon=True)
        self.interval = interval
        self.peak = rss_bytes()
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            self.peak = max(self.peak, rss_bytes())

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        return max(self.peak, rss_bytes())


class StageMeter:
    """Collects ``{stage: {"seconds", "peak_rss_mb", "peak_gpu_mb"?}}``."""

    def __init__(self) -> None:
        self.stages: dict[str, dict[str, Any]] = {}

    @contextmanager
    def measure(self, name: str):
        import torch

        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        sampler = _PeakSampler()
        sampler.start()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            seconds = time.perf_counter() - t0
            peak = sampler.stop()
            entry = self.stages.setdefault(name, {"seconds": 0.0, "peak_rss_mb": 0.0})
            entry["seconds"] = round(entry["seconds"] + seconds, 3)
            entry["peak_rss_mb"] = round(max(entry["peak_rss_mb"], peak / 2**20), 1)
            if cuda:
                gpu = torch.cuda.max_memory_allocated() / 2**20
                entry["peak_gpu_mb"] = round(max(entry.get("peak_gpu_mb", 0.0), gpu), 1)
