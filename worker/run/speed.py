"""This worker's device rates for the time plan (app.plan_time.Speed), measured once per device and dtype.

Four short measurements on the job's device, under a second on a CPU and a fraction of one on a GPU: one square
matrix multiply in the compute dtype, a stable sort along the rows of a float32 matrix (what pruning's selection
does), a copy of host memory onto the device (what layer streaming does per layer), and SparseGPT on a small
matrix, per column (its column loop is bound by the latency of small operations, which no rate above shows; the
2:4 pattern's loop, a little costlier than the unstructured one). Storage rates are not measured (a cold read
cannot be had without dropping the page cache); they are the device kind's nominal ones.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace
from functools import lru_cache
from typing import TYPE_CHECKING

from app.plan_time import NOMINAL, Speed

if TYPE_CHECKING:
    import torch

MATMUL_SIZE = {"cpu": 512, "cuda": 4096}
SORT_SHAPE = (256, 4096)
MOVE_BYTES = 32 * 2**20
# SparseGPT's rows and columns: few rows, so that a column's step is its fixed cost (on a CPU taller matrices cost
# more per column, their in-block updates being bound by memory, which the plan does not count yet)
STEP_ROWS, STEP_COLUMNS = 64, {"cpu": 64, "cuda": 512}
REPEATS = 2
SLOW_S = 0.25
log = logging.getLogger(__name__)


def _best_of(fn: Callable[[], object], sync: Callable[[], None]) -> float:
    """The fastest of a few timed calls, after a first one (allocations, kernel selection); a first call slower
    than :data:`SLOW_S` is the measurement (a dtype the device computes slowly, such as float16 on some CPUs),
    so that measuring never holds a job up for long."""
    start = time.perf_counter()
    fn()
    sync()
    first = time.perf_counter() - start
    if first > SLOW_S:
        return first
    best = float("inf")
    for _ in range(REPEATS):
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return max(best, 1e-9)


def device_speed(device: str, dtype: str) -> Speed:
    """``device``: "cpu" or "cuda:N"; ``dtype``: the job's compute dtype ("bfloat16", ...). The time plan is an
    estimate: a measurement that fails (a GPU another process has filled) gives the device kind's nominal rates,
    labelled so, and the job goes on."""
    try:
        return _measured(device, dtype)
    except (RuntimeError, ValueError, TypeError, AttributeError) as exc:  # torch's errors, an unknown dtype
        kind = "cuda" if device.startswith("cuda") else "cpu"
        log.warning("could not measure %s's speed (%s); the time plan uses nominal rates", device, exc)
        return replace(NOMINAL[kind], source=f"nominal: measuring {device} failed ({type(exc).__name__})")


@lru_cache(maxsize=8)
def _measured(device: str, dtype: str) -> Speed:
    import torch

    kind = "cuda" if device.startswith("cuda") else "cpu"
    dev = torch.device(device)
    sync = (lambda: torch.cuda.synchronize(dev)) if kind == "cuda" else (lambda: None)
    gen = torch.Generator(device=dev).manual_seed(0)
    n = MATMUL_SIZE[kind]
    a = torch.randn(n, n, device=dev, dtype=getattr(torch, dtype), generator=gen)
    matmul = 2 * n**3 / _best_of(lambda: a @ a, sync)
    rows = torch.randn(*SORT_SHAPE, device=dev, generator=gen)
    sort = rows.numel() / _best_of(lambda: torch.sort(rows, dim=1, stable=True), sync)
    host = torch.empty(MOVE_BYTES, dtype=torch.uint8)
    move = MOVE_BYTES / _best_of(lambda: host.to(dev, copy=True), sync)
    step = _sparsegpt_step(dev, STEP_COLUMNS[kind], gen, sync)
    nominal = NOMINAL[kind]
    return Speed(matmul_flops=matmul, sort_elements=sort, read_bytes=nominal.read_bytes,
                 write_bytes=nominal.write_bytes, move_bytes=move, step_s=step, source="measured")


def _sparsegpt_step(dev: torch.device, cols: int, gen: torch.Generator, sync: Callable[[], None]) -> float:
    """Seconds per column of SparseGPT's update loop (2:4) on ``dev``."""
    import torch

    from worker.prune.sparsegpt import sparsegpt_prune_weight

    weight = torch.randn(STEP_ROWS, cols, device=dev, generator=gen)
    hessian = torch.eye(cols, device=dev)
    # a first small call pays the linear-algebra library's start-up (the Cholesky factorisation), which would
    # otherwise make the timed first call slow enough to be taken as the measurement
    sparsegpt_prune_weight(weight[:, :8], hessian[:8, :8], 0.5, nm=(2, 4))
    sync()
    return _best_of(lambda: sparsegpt_prune_weight(weight, hessian, 0.5, nm=(2, 4)), sync) / cols
