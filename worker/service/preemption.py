"""Preemption: a worker asked to stop (SIGTERM: a spot instance reclaimed, a pod evicted) stops its job at the next
checkpoint and gives it back to the queue instead of letting it be killed mid-run and found lost minutes later.

A process-wide flag: set by a signal handler, read by the store reporter at every cancellation point. The training
loop writes a checkpoint before it stops, and the next worker resumes from the job's newest checkpoint. A preempted
run does not count as one of the job's runs (``max_attempts``). A job that reaches no safe point within the grace
period (``preempt_grace_s``) is handed back from its heartbeat thread and the process exits (:func:`overdue`).
"""

from __future__ import annotations

import signal
import threading
import time
from types import FrameType

_requested = threading.Event()
_since: list[float] = []


def request() -> None:
    if not _requested.is_set():
        _since[:] = [time.monotonic()]
    _requested.set()


def requested() -> bool:
    return _requested.is_set()


def overdue(grace_s: float) -> bool:
    """Whether preemption was requested more than ``grace_s`` seconds ago."""
    return _requested.is_set() and bool(_since) and time.monotonic() - _since[0] > grace_s


def clear() -> None:
    _requested.clear()
    _since.clear()


def on_signal(sig: int = signal.SIGUSR2) -> None:
    """Make ``sig`` request preemption in this process. Celery's pool processes get SIGUSR2 from their parent
    (billiard keeps SIGUSR1 for soft time limits)."""

    def handler(_sig: int, _frame: FrameType | None) -> None:
        request()

    signal.signal(sig, handler)
