"""The embedded local worker: polls the job store for queued jobs and runs them with the same
:func:`worker.service.tasks.run_job` the Celery task uses. No broker needed.

``restorelcc serve`` starts it as a subprocess (``python -m worker.service.embedded``) so that a job's memory use
or a crash never takes the API down; ``restorelcc worker --embedded`` runs it in the foreground.
"""

from __future__ import annotations

import argparse
import fcntl
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from app.config import Settings, get_settings
from app.service import LocalEnqueuer
from app.store.db import upgrade
from worker.service import preemption
from worker.service.tasks import WorkerContext, make_context, release_held, run_job, set_context, sweep

log = logging.getLogger("restorelcc.worker")
WORKER_LOCK = "worker.lock"  # in the data directory: held by the one local worker that runs its jobs


class LocalWorker:
    def __init__(self, settings: Settings | None = None, ctx: WorkerContext | None = None):
        self.ctx = ctx or make_context(settings)
        self.settings = self.ctx.settings
        self.stop = threading.Event()
        self._last_sweep = -float("inf")
        self._sweep_lock = threading.Lock()

    def maybe_sweep(self) -> None:
        now = time.monotonic()
        with self._sweep_lock:
            if now - self._last_sweep < self.settings.sweep_interval_s:
                return
            self._last_sweep = now
            try:
                sweep(self.ctx, enqueuer=LocalEnqueuer())
            except Exception:
                log.warning("lost-job sweep failed", exc_info=True)

    def run_once(self) -> bool:
        """Run the oldest due queued job, if any. Returns whether one was found."""
        self.maybe_sweep()
        job_id = self.ctx.jobs.next_queued()
        if job_id is None:
            return False
        result = run_job(job_id, self.ctx)
        log.info("job %s: %s", job_id, result.outcome.value)
        release_held(job_id, LocalEnqueuer(), self.ctx)
        return True

    def sweep_forever(self) -> threading.Thread:
        """Sweep every ``sweep_interval_s`` in the background, so that a job lost by an earlier worker is queued
        again (or ended) while this one runs a long job, not only between jobs."""

        def loop() -> None:
            while not self.stop.wait(self.settings.sweep_interval_s):
                self.maybe_sweep()

        thread = threading.Thread(target=loop, daemon=True, name="restorelcc-sweeper")
        thread.start()
        return thread

    def run_forever(self) -> None:
        set_context(self.ctx)
        log.info("embedded worker polling %s", self.settings.db_url.split("@")[-1])
        self.sweep_forever()
        while not self.stop.is_set():
            try:
                found = self.run_once()
            except Exception:
                log.exception("embedded worker loop error")
                found = False
            if not found:
                self.stop.wait(self.settings.poll_interval_s)


@contextmanager
def worker_slot(lock: Path, stop: threading.Event, poll_s: float) -> Iterator[bool]:
    """The one local-worker slot of a data directory: an exclusive lock on ``lock``, waited for until ``stop``.
    Yields whether it is held. A worker whose service was killed (an orphan finishing its current job) keeps the
    slot until it exits, so the restarted service's worker never runs a second job beside it."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        waiting = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not waiting:
                    log.warning("another local worker holds %s (one finishing its job?); waiting for it", lock)
                    waiting = True
                if stop.wait(poll_s):
                    yield False
                    return
        if waiting:
            log.info("local-worker slot %s is free; starting", lock)
        yield True
    finally:
        os.close(fd)  # releases the lock


def watch_parent(parent: int, stop: threading.Event, interval_s: float = 1.0) -> threading.Thread:
    """Set ``stop`` once ``parent`` is no longer our parent (it died, even by SIGKILL): no orphan workers."""

    def watch() -> None:
        while not stop.wait(interval_s):
            if os.getppid() != parent:
                log.warning("parent process %s is gone; stopping after the current job", parent)
                stop.set()

    thread = threading.Thread(target=watch, daemon=True, name="parent-watch")
    thread.start()
    return thread


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.service.embedded", description=__doc__)
    parser.add_argument("--once", action="store_true", help="run at most one queued job, then exit")
    parser.add_argument("--no-migrate", action="store_true")
    parser.add_argument("--parent", type=int, default=None,
                        help="stop (after the current job) when this process, the one that started us, is gone")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = get_settings()
    worker = LocalWorker(settings)
    if not args.no_migrate:
        upgrade(worker.ctx.jobs.engine)
    if args.once:
        with worker_slot(settings.data_dir / WORKER_LOCK, worker.stop, settings.poll_interval_s) as held:
            if held:
                worker.run_once()
        return 0

    def _stop(*_: object) -> None:
        worker.stop.set()
        preemption.request()  # the running job stops at its next checkpoint and goes back to the queue

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    if args.parent is not None:
        watch_parent(args.parent, worker.stop)
    with worker_slot(settings.data_dir / WORKER_LOCK, worker.stop, settings.poll_interval_s) as held:
        if held:
            worker.run_forever()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
