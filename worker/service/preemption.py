"""Preemption: a worker asked to stop (SIGTERM: a spot instance reclaimed, a pod evicted) stops its job at the next
checkpoint and gives it back to the queue instead of letting it be killed mid-run and found lost minutes later.

A process-wide flag: set by a signal handler, read by the store reporter at every checkpoint. A preempted run does
not count as one of the job's runs (``max_attempts``). The job starts again from the beginning on the next worker.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

_requested = threading.Event()


def request() -> None:
    _requested.set()


def requested() -> bool:
    return _requested.is_set()


def clear() -> None:
    _requested.clear()


def on_signal(sig: int = signal.SIGUSR2) -> None:
    """Make ``sig`` request preemption in this process. Celery's pool processes get SIGUSR2 from their parent
    (billiard keeps SIGUSR1 for soft time limits)."""

    def handler(_sig: int, _frame: FrameType | None) -> None:
        request()

    signal.signal(sig, handler)
