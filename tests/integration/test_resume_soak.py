"""Ten queued jobs and ten kill -9s of the whole Celery worker (main process and pool children) at random moments,
a new worker after each, Redis's visibility timeout left at its default: every job ends succeeded with the same
model bytes, none lost or stuck; a killed job resumes from its checkpoint; kills right after a worker starts (a
message delivered but its job not yet claimed) are recovered too."""

from __future__ import annotations

import os
import random
import signal

import pytest

from tests.conftest import wait_until
from tests.integration.test_service_celery import running_service

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(900)]  # a hang guard: ten jobs, ten worker restarts
JOBS = 10
KILLS = 10
MAX_ATTEMPTS = KILLS + 1  # no job can run out of runs, so every one must succeed (the limit is tested apart)


@pytest.fixture(scope="module")
def service(tmp_path_factory, tiny_assets):
    with running_service(tmp_path_factory.mktemp("soak"), tiny_assets, RESTORELCC_CHECKPOINT_EVERY_STEPS="10",
                         RESTORELCC_MAX_ATTEMPTS=str(MAX_ATTEMPTS)) as service:
        yield service


def test_ten_random_kills_lose_nothing(service, tiny_assets):
    rng = random.Random(17)
    spec = tiny_assets.spec(restore=True)
    spec["restoration"].update(max_steps=100, batch_size=2)
    ids = [service.client.create(spec).id for _ in range(JOBS)]
    plan = []
    for k in range(KILLS):
        aimed = k in (2, 6)  # right after the new worker starts: a message delivered, its job not claimed yet
        plan.append(("start", None) if aimed else ("progress", rng.uniform(0.1, 0.9)))

    def ready_lines() -> int:
        return service.log.read_text(errors="replace").count(" ready.")

    for kind, fraction in plan:  # each round begins with a worker that has just said it is ready
        started = ready_lines()
        if kind == "progress":
            def running_past(f=fraction):
                jobs = [service.jobs.get(i) for i in ids]
                if all(j.status in ("succeeded", "failed", "cancelled") for j in jobs):
                    return True
                return any(j.status == "running" and j.progress >= f for j in jobs)
            wait_until(running_past, timeout=240, what=lambda: [service.jobs.get(i).status for i in ids])
        os.killpg(service.worker.pid, signal.SIGKILL)
        service.worker.wait(timeout=30)
        service.worker = service.start_worker()
        wait_until(lambda s=started: ready_lines() > s, timeout=120, what=lambda: service.log.read_text()[-2000:])

    finals = {i: service.wait_status(i, {"succeeded", "failed", "cancelled"}, timeout=600) for i in ids}
    shas = set()
    resumed = 0
    for job_id, job in finals.items():
        record = service.jobs.get(job_id)
        assert job.status.value == "succeeded", (job_id, job.status, job.error, record.attempts)
        shas.add({a.name: a.sha256 for a in service.jobs.artifacts(job_id)}["model/model.safetensors"])
        assert record.checkpoint_bytes == 0
        resumed += sum(1 for e in service.client.events(job_id) if e.kind == "resumed")
    assert len(shas) == 1  # every run of the same spec, interrupted or not, exported the same bytes
    assert resumed >= 3  # kills mid-job resumed from checkpoints rather than starting over
