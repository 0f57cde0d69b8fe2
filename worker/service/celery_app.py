"""The Celery app (Redis broker) and the thin ``restorelcc.run_job`` task.

Reliability: late acks, prefetch 1, a task whose worker process dies or hits the hard time limit is rejected back
to the queue,
soft/hard time limits from settings (Celery's soft limit a margin behind the job's own deadline, so that the job
fails ``time_limit`` at a checkpoint), broker visibility timeout longer than the hard limit. The job store,
not Celery's result backend, holds job state. On start (and every ``sweep_interval_s``) the worker fails
jobs whose heartbeat went stale (``worker_lost``) and re-sends queued jobs whose broker message was lost.

Run with ``restorelcc worker`` (or ``celery -A worker.service.celery_app worker``).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from celery import Celery, signals

from app.config import Settings, get_settings
from app.service import TASK_NAME, broker_priority, celery_priority_options

log = logging.getLogger("restorelcc.worker")


SOFT_LIMIT_MARGIN_S = 60.0


def celery_soft_time_limit(settings: Settings) -> float:
    """Celery's soft limit: a backstop behind the job's own deadline, never ahead of it. The job's deadline
    (``soft_time_limit_s``) starts when its run starts, up to a stale wait (``stale_after_s`` + 2 heartbeats) after
    the task did, and is honoured at the next cancellation point, where the job fails ``time_limit`` cleanly; Celery's
    SoftTimeLimitExceeded lands wherever the code is. So it fires that wait plus a margin later, and always halfway
    before the hard limit at the latest (the settings keep the hard limit above the soft one plus the wait)."""
    wait = settings.stale_after_s + 2 * settings.heartbeat_s
    soft = settings.soft_time_limit_s + wait
    return min(soft + SOFT_LIMIT_MARGIN_S, (soft + settings.hard_time_limit_s) / 2)


def make_celery(settings: Settings | None = None) -> Celery:
    settings = settings or get_settings()
    app = Celery("restorelcc", broker=settings.redis_url or "redis://127.0.0.1:6379/0")
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_timeout=False,  # a task killed by the hard time limit: back to the queue, then failed there
        worker_prefetch_multiplier=1,
        worker_max_tasks_per_child=settings.worker_max_tasks_per_child,
        task_soft_time_limit=celery_soft_time_limit(settings),
        task_time_limit=settings.hard_time_limit_s,
        broker_transport_options={"visibility_timeout": settings.visibility_timeout, **celery_priority_options()},
        task_default_queue=settings.queue,
        task_routes={TASK_NAME: {"queue": settings.queue}},
        task_ignore_result=True,
        result_backend=None,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        task_serializer="json",
        accept_content=["json"],
    )
    return app


app = make_celery()


class AppEnqueuer:
    """Sends jobs from a worker process: to the job's queue, with its priority (app.service.Enqueuer)."""

    def enqueue(self, job_id: str, queue: str | None = None, priority: int = 5) -> None:
        app.send_task(TASK_NAME, args=[job_id], queue=queue or get_settings().queue, priority=broker_priority(priority))

    def check(self) -> None:
        return None


def send_job(job_id: str) -> None:
    """Send a queued job to the broker again, to the queue and with the priority it was given at submit."""
    from worker.service.tasks import get_context

    d = get_context().jobs.dispatch_of(job_id)
    AppEnqueuer().enqueue(job_id, d.queue if d else None, d.priority if d else 5)


@app.task(name=TASK_NAME, bind=True, acks_late=True, reject_on_worker_lost=True)
def run_job_task(self: Any, job_id: str) -> str:
    from worker.service.tasks import Outcome, get_context, release_held, run_job

    result = run_job(job_id)
    if result.outcome is Outcome.retry:
        d = get_context().jobs.dispatch_of(job_id)  # back to its own queue, at its own priority
        raise self.retry(countdown=result.retry_in or 0, max_retries=None,
                         queue=(d and d.queue) or get_settings().queue,
                         priority=broker_priority(d.priority if d else 5))
    if result.outcome is Outcome.preempted:  # for the next worker
        send_job(job_id)
    release_held(job_id, AppEnqueuer())
    return result.outcome.value


_sweeper_stop = threading.Event()


def resend_lost_messages() -> list[str]:
    """Queued jobs whose broker message is gone, sent again (see worker.service.requeue)."""
    from datetime import timedelta

    from app.store.models import utcnow
    from app.tenancy import worker_queues
    from worker.service.requeue import broker_messages, resend_lost
    from worker.service.tasks import get_context

    ctx = get_context()
    queues = list(worker_queues(ctx.settings))

    def held() -> str:
        with app.connection_for_write() as conn:
            return "\n".join(broker_messages(conn.default_channel.client, queue,
                                             delivered_after=time.time() - ctx.settings.requeue_after_s)
                             for queue in queues)

    return resend_lost(ctx.jobs, held, send_job, utcnow() - timedelta(seconds=ctx.settings.requeue_after_s))


def recover_lost_jobs() -> list[str]:
    """Jobs whose worker was lost: those with runs left are queued and sent again (see worker.service.tasks.sweep)."""
    from worker.service.tasks import sweep

    return sweep(send=send_job, enqueuer=AppEnqueuer())


def _sweep_loop(interval: float) -> None:
    while True:
        for name, step in (("lost-job sweep", recover_lost_jobs), ("lost-message sweep", resend_lost_messages)):
            try:
                step()
            except Exception:
                log.warning("%s failed", name, exc_info=True)
        if _sweeper_stop.wait(interval):
            return


@signals.worker_ready.connect
def _on_worker_ready(**_: Any) -> None:
    threading.Thread(target=_sweep_loop, args=(get_settings().sweep_interval_s,), daemon=True,
                     name="restorelcc-sweeper").start()


@signals.worker_process_init.connect
def _in_pool_process(**_: Any) -> None:
    from worker.service import preemption

    preemption.on_signal()  # SIGUSR2 from the main process below


@signals.worker_shutting_down.connect
def _on_shutdown(**_: Any) -> None:
    """Warm shutdown (SIGTERM): tell the pool processes to stop their jobs at the next checkpoint and give them
    back to the queue, so the worker exits within seconds instead of at the end of a job hours long."""
    import contextlib
    import os
    import signal

    from billiard.process import active_children

    _sweeper_stop.set()
    for child in active_children():
        with contextlib.suppress(ProcessLookupError, TypeError):  # gone already, or not started yet
            os.kill(child.pid, signal.SIGUSR2)
