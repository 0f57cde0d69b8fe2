"""Seconds and peak memory per pipeline stage.

CPU memory is the process's resident set, sampled by a background thread (the kernel's own peak is
lifetime-wide, so it cannot tell stages apart); GPU memory is torch's per-device peak, reset per stage.
Before each stage, memory the last one freed goes back to the operating system (``gc`` and glibc's
``malloc_trim``): a long-lived worker does not keep its largest stage's heap, and each stage's peak is its own
rather than the highest so far.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from contextlib import contextmanager
from typing import Any

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    return rss_pair()[0]


def rss_pair() -> tuple[int, int]:
    """(resident set, its part not backed by files): the second leaves out pages of memory-mapped files (a
    streamed model's safetensors), which the kernel can drop and read again."""
    try:
        with open("/proc/self/statm", encoding="ascii") as fh:
            fields = fh.read().split()
        resident, shared = int(fields[1]) * _PAGE, int(fields[2]) * _PAGE
        return resident, resident - shared
    except OSError:  # not Linux: fall back to the lifetime peak
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return peak, peak


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def return_large_frees(threshold: int = 4 * 2**20) -> None:
    """Serve every allocation above ``threshold`` bytes by its own mapping, returned to the OS when freed.

    glibc raises its mmap threshold (up to 32 MiB) each time a large block is freed, after which blocks below it
    come from the heap and stay there once freed: pruning a 1B model's layers one matrix at a time then leaves
    hundreds of MiB of freed temporaries in the heap. A fixed threshold keeps the resident set at what is live.
    """
    import ctypes

    with contextlib.suppress(OSError, AttributeError):  # not glibc
        ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, threshold)


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc only; elsewhere just the collection)."""
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class _PeakSampler(threading.Thread):
    def __init__(self, interval: float = 0.05):
        super().__init__(daemon=True)
        self.interval = interval
        self.peak, self.peak_anon = rss_pair()
        self._stop_event = threading.Event()

    def sample(self) -> None:
        rss, anon = rss_pair()
        self.peak, self.peak_anon = max(self.peak, rss), max(self.peak_anon, anon)

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            self.sample()

    def stop(self) -> tuple[int, int]:
        self._stop_event.set()
        self.join()
        self.sample()
        return self.peak, self.peak_anon


class StageMeter:
    """Collects ``{stage: {"seconds", "peak_rss_mb", "peak_anon_mb", "start_rss_mb", "peak_gpu_mb"?}}``; the
    resident set at the stage's start is what earlier stages left in memory, its anonymous part what is not a page
    of a memory-mapped file."""

    def __init__(self, device: str = "cpu", devices: tuple[str, ...] = ()) -> None:
        """``devices``: every GPU of a model split over several (``peak_gpu_mb`` is the fullest one's)."""
        self.stages: dict[str, dict[str, Any]] = {}
        self.device = device
        self.devices = tuple(devices) or (device,)

    @contextmanager
    def measure(self, name: str):
        import torch

        release_memory()
        cuda = self.device.startswith("cuda") and torch.cuda.is_available()
        if cuda:
            torch.cuda.empty_cache()
            for d in self.devices:
                torch.cuda.reset_peak_memory_stats(d)
        start = rss_bytes()
        sampler = _PeakSampler()
        sampler.start()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            seconds = time.perf_counter() - t0
            peak, anon = sampler.stop()
            entry = self.stages.setdefault(
                name, {"seconds": 0.0, "peak_rss_mb": 0.0, "start_rss_mb": round(start / 2**20, 1)})
            entry["seconds"] = round(entry["seconds"] + seconds, 3)
            entry["peak_rss_mb"] = round(max(entry["peak_rss_mb"], peak / 2**20), 1)
            entry["peak_anon_mb"] = round(max(entry.get("peak_anon_mb", 0.0), anon / 2**20), 1)
            if cuda:
                gpu = max(torch.cuda.max_memory_allocated(d) for d in self.devices) / 2**20
                entry["peak_gpu_mb"] = round(max(entry.get("peak_gpu_mb", 0.0), gpu), 1)
