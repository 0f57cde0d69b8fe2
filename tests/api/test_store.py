"""The job store: atomic transitions, the lost-worker sweep, migrations; the store-backed reporter."""

from __future__ import annotations

import asyncio
import threading
from datetime import timedelta

import pytest
import sqlalchemy as sa
from sqlalchemy import update

from app.methods import restoration_config
from app.schemas import JobSpec, JobStatus, Stage
from app.store.db import current_revision, head_revision, make_engine, upgrade
from app.store.jobs import CHANGED_DEFAULTS, JobNotFinished, JobStore, hash_view, request_hash, stale_cutoff
from app.store.models import Job, utcnow
from app.store.polls import PostgresPolls, ThreadedPolls, make_polls
from worker.service.store_reporter import StoreReporter, jsonable


@pytest.fixture
def store(db_url) -> JobStore:
    engine = make_engine(db_url)
    upgrade(engine)
    jobs = JobStore(engine)
    yield jobs
    jobs.dispose()


def test_polls_read_what_the_store_wrote(db_url):
    """The API's status reads (an asyncio pool on PostgreSQL, the store in the thread pool elsewhere) see every
    write at once, keep tenants apart, and return the columns the ORM would."""
    engine = make_engine(db_url)
    upgrade(engine)
    jobs = JobStore(engine)
    polls = make_polls(db_url, jobs, 2)
    assert isinstance(polls, PostgresPolls if db_url.startswith("postgresql") else ThreadedPolls)

    async def scenario() -> None:
        await polls.open()
        try:
            job, _ = jobs.create("alice", {"model": {"id": "m"}})
            seen = await polls.job(job.id, "alice")
            assert (seen.status, seen.spec, seen.tenant) == ("queued", {"model": {"id": "m"}}, "alice")
            assert seen.created_at == jobs.get(job.id).created_at and seen.created_at.utcoffset() is not None
            assert await polls.job(job.id, "bob") is None
            assert (await polls.job(job.id)).id == job.id
            assert jobs.claim(job.id, "w")
            jobs.set_progress(job.id, 0.5, "halfway")
            seen = await polls.job(job.id, "alice")
            assert (seen.status, seen.progress, seen.progress_message) == ("running", 0.5, "halfway")
            every = jobs.events(job.id)
            assert [e.seq for e in await polls.events(job.id)] == [e.seq for e in every] and len(every) >= 2
            assert [e.kind for e in await polls.events(job.id, every[0].seq, 1)] == [every[1].kind]
            assert await polls.events(job.id, every[-1].seq) == []
        finally:
            await polls.close()
            jobs.dispose()

    asyncio.run(scenario())


@pytest.mark.postgres
def test_a_poll_survives_the_server_dropping_its_connections():
    """The poll pool pings nothing: when PostgreSQL has dropped its connections (a restart, a failover, an idle
    timeout), the read that meets one has the pool checked and runs once more, and the caller sees no error.
    Nothing is written through it."""
    import uuid

    import psycopg

    from tests.conftest import pg_schema

    with pg_schema() as url:
        engine = make_engine(url)
        upgrade(engine)
        jobs = JobStore(engine)
        name = f"polls-{uuid.uuid4().hex[:8]}"
        polls = PostgresPolls(f"{url}&application_name={name}", size=2)

        async def scenario() -> None:
            await polls.open()
            try:
                await polls.pool.wait()  # both connections open
                job, _ = jobs.create("alice", {})
                with engine.connect() as c:
                    dropped = c.scalars(sa.text("SELECT pg_terminate_backend(pid, 30000) FROM pg_stat_activity "
                                                "WHERE application_name = :n"), {"n": name}).all()
                assert dropped == [True, True]  # every pooled connection, as a restart would
                assert (await polls.job(job.id, "alice")).status == "queued"
                assert (await polls.job(job.id, "alice")).status == "queued"
                with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
                    await polls.fetch("DELETE FROM jobs RETURNING id", {})
                assert jobs.get(job.id) is not None
            finally:
                await polls.close()
                jobs.dispose()

        asyncio.run(scenario())


def test_upgrade_head_is_idempotent(db_url):
    engine = make_engine(db_url)
    upgrade(engine)
    upgrade(engine)
    assert current_revision(engine) == head_revision() == "0009"
    engine.dispose()


def _flat_dump(base: dict, method: str) -> dict:
    """What the API stored for a job before restoration became per-method: the whole spec, its restoration section
    one flat set of every method's settings (their defaults; lr the method's own, none for 'none')."""
    every = {**restoration_config({}).model_dump(mode="json"), **restoration_config({"method": "lora"}).model_dump(
        mode="json")}
    spec = hash_view(JobSpec.model_validate({**base, "restoration": {"method": method}}).model_dump(mode="json"))
    spec["restoration"] = {**every, "method": method, "lr": spec["restoration"].get("lr")}
    return spec  # without the sections added since (revision 0006), as a row of that time holds it


def _store_as_before(engine, rows: dict[str, tuple[str, dict, str]]) -> None:
    """Queued jobs as an earlier revision stored them, each under an Idempotency-Key: key → (job id, spec, request
    hash). Only the columns every revision since 0001 has (today's models have later ones)."""
    jobs = sa.table("jobs", *(sa.column(c) for c in ("id", "tenant", "status", "progress", "progress_message",
                                                      "attempts", "retries")),
                    sa.column("spec", sa.JSON), sa.column("metrics", sa.JSON), sa.column("created_at", sa.DateTime))
    idempotency = sa.table("idempotency", *(sa.column(c) for c in ("tenant", "key", "request_hash", "job_id")),
                           sa.column("created_at", sa.DateTime))
    with engine.begin() as conn:
        for key, (job_id, spec, digest) in rows.items():
            conn.execute(jobs.insert().values(id=job_id, tenant="t", status="queued", progress=0.0,
                                              progress_message="queued", metrics={}, attempts=0, retries=0,
                                              created_at=utcnow(), spec=spec))
            conn.execute(idempotency.insert().values(tenant="t", key=key, request_hash=digest, job_id=job_id,
                                                     created_at=utcnow()))


def test_stored_specs_keep_only_their_methods_restoration_settings(db_url):
    """Specs stored before restoration became per-method (one flat section holding every method's settings) are
    cut down to their method's own, so the worker can validate them again, and a request retried with the same
    Idempotency-Key after the upgrade still finds its job."""
    engine = make_engine(db_url)
    upgrade(engine, "0001")
    base = {"model": {"id": "/m"}, "data": {"train": "/d/t.jsonl"}}
    ids = {m: f"{m:0<32}" for m in ("restorelcc", "bias", "lora", "none")}
    olds = {m: _flat_dump(base, m) for m in ids}
    _store_as_before(engine, {m: (job_id, olds[m], request_hash(olds[m])) for m, job_id in ids.items()})
    upgrade(engine)
    stored = JobStore(engine)
    for m, job_id in ids.items():
        spec = stored.get(job_id).spec
        validated = JobSpec.model_validate(spec).restoration.model_dump(mode="json")  # + fields added since
        expected = hash_view({"restoration": validated})["restoration"]
        assert spec["restoration"] == expected | ({"objective": "sft"} if m != "none" else {})  # + revision 0007
        retry = JobSpec.model_validate({**base, "restoration": {"method": m}})
        job, created = stored.create("t", retry.model_dump(mode="json"), idempotency_key=m,
                                     left_out=retry.left_out(CHANGED_DEFAULTS))
        assert (job.id, created) == (job_id, False), m
    assert "lora_r" not in stored.get(ids["restorelcc"]).spec["restoration"]
    assert "directions" not in stored.get(ids["bias"]).spec["restoration"]
    assert "heads" not in stored.get(ids["lora"]).spec["restoration"]
    assert stored.get(ids["none"]).spec["restoration"] == {"method": "none"}
    engine.dispose()


def test_stored_specs_without_an_objective_keep_running_with_sft(db_url):
    """A job stored before restoration.objective existed ran (or will run) with sft; RestoreLCC's default has
    changed since, so the upgrade writes sft into its spec, and the same request repeated with its
    Idempotency-Key still finds it. A spec naming its objective, and a method that does not train, are left as
    they are."""
    engine = make_engine(db_url)
    upgrade(engine, "0006")
    base = {"model": {"id": "/m"}, "data": {"train": "/d/t.jsonl"}}
    pre_objective = ("distill_tokens", "distill_top_k", "sft_weight", "objective")
    rows = {}
    for name, restoration in (("restorelcc", {"method": "restorelcc"}), ("lora", {"method": "lora"}),
                              ("none", {"method": "none"}),
                              ("named", {"method": "restorelcc", "objective": "distill", "sft_weight": 0.25})):
        spec = JobSpec.model_validate({**base, "restoration": restoration}).model_dump(mode="json")
        if name != "named":  # as a release before the objective setting stored it
            spec["restoration"] = {k: v for k, v in spec["restoration"].items() if k not in pre_objective}
        rows[name] = (f"{name:0<32}", spec)
    _store_as_before(engine, {name: (job_id, spec, request_hash(hash_view(spec))) for name, (job_id, spec) in
                              rows.items()})
    upgrade(engine)
    stored = JobStore(engine)
    for name in ("restorelcc", "lora"):
        job_id, before = rows[name]
        spec = stored.get(job_id).spec
        assert spec["restoration"] == {**before["restoration"], "objective": "sft"}
        assert JobSpec.model_validate(spec).restoration.objective == "sft"
    assert stored.get(rows["none"][0]).spec == rows["none"][1]
    assert stored.get(rows["named"][0]).spec == rows["named"][1]
    for name in ("restorelcc", "lora", "named"):  # the same requests again, after the upgrade
        restoration = {"method": name} if name != "named" else rows["named"][1]["restoration"]
        again = JobSpec.model_validate({**base, "restoration": restoration})
        job, created = stored.create("t", again.model_dump(mode="json"), idempotency_key=name,
                                     left_out=again.left_out(CHANGED_DEFAULTS))
        assert (job.id, created) == (rows[name][0], False), name
    engine.dispose()


def test_stored_specs_lose_the_settings_their_worker_ignored(db_url):
    """Settings the API refuses now but accepted (and the worker ignored) before: a revision with a local model, an
    adapter output for a method that exports none, a limits key naming no file. The upgrade removes them, so the
    job validates again and runs as it would have; everything else, and a spec without them, stays as it was."""
    engine = make_engine(db_url)
    upgrade(engine, "0007")
    base = {"model": {"id": "/m"}, "data": {"train": "/d/t.jsonl"}, "pruning": {"method": "magnitude"},
            "restoration": {"method": "none"}}
    old = {**base, "model": {"id": "/m", "revision": "main", "dtype": "auto"},
           "output": {"format": "adapter"},
           "evaluation": {"perplexity": ["/d/wiki.jsonl"], "tasks": ["/d/boolq.jsonl"],
                          "limits": {"wiki": 10, "boolq": 20, "piqa": 30}}}
    lora = {**base, "model": {"id": "org/m", "revision": "v1"}, "restoration": {"method": "lora", "objective": "sft"},
            "output": {"format": "adapter"}}
    rows = {n * 32: spec for n, spec in (("a", old), ("b", lora), ("c", base))}
    _store_as_before(engine, {job_id: (job_id, spec, request_hash(spec)) for job_id, spec in rows.items()})
    with pytest.raises(ValueError):
        JobSpec.model_validate(old)
    upgrade(engine, "0008")
    stored = JobStore(engine)
    spec = stored.get("a" * 32).spec
    assert spec["model"] == {"id": "/m", "dtype": "auto"} and spec["output"] == {"format": "merged"}
    assert spec["evaluation"]["limits"] == {"wiki": 10, "boolq": 20}
    JobSpec.model_validate(spec)  # the worker can run it again
    assert stored.get("b" * 32).spec == lora and stored.get("c" * 32).spec == base
    engine.dispose()


def test_stored_training_specs_keep_training_without_the_eos(db_url):
    """A job stored before restoration.response_eos existed trains without it, as submitted: the upgrade writes
    false into its spec, and the same request repeated with its Idempotency-Key still finds it. A spec naming it, and
    a method that does not train, are left as they are."""
    engine = make_engine(db_url)
    upgrade(engine, "0008")
    base = {"model": {"id": "/m"}, "data": {"train": "/d/t.jsonl"}}
    rows = {}
    for name, restoration in (("bias", {"method": "bias"}), ("lora", {"method": "lora"}),
                              ("none", {"method": "none"}), ("named", {"method": "dora", "response_eos": True})):
        spec = JobSpec.model_validate({**base, "restoration": restoration}).model_dump(mode="json")
        if name != "named":  # as the release before the setting stored it
            spec["restoration"].pop("response_eos", None)
        rows[name] = (f"{name:0<32}", spec)
    _store_as_before(engine, {name: (job_id, spec, request_hash(hash_view(spec))) for name, (job_id, spec) in
                              rows.items()})
    upgrade(engine)
    stored = JobStore(engine)
    for name in ("bias", "lora"):
        job_id, before = rows[name]
        spec = stored.get(job_id).spec
        assert spec["restoration"] == {**before["restoration"], "response_eos": False}
        assert JobSpec.model_validate(spec).restoration.response_eos is False
        again = JobSpec.model_validate({**base, "restoration": {"method": name}})
        job, created = stored.create("t", again.model_dump(mode="json"), idempotency_key=name,
                                     left_out=again.left_out(CHANGED_DEFAULTS))
        assert (job.id, created) == (job_id, False), name
    assert stored.get(rows["none"][0]).spec == rows["none"][1]
    assert stored.get(rows["named"][0]).spec == rows["named"][1]
    engine.dispose()


def test_claim_is_atomic_across_threads(store):
    job, _ = store.create("t", {"x": 1})
    wins = []
    barrier = threading.Barrier(8)

    def go(i: int) -> None:
        barrier.wait()
        if store.claim(job.id, f"w{i}"):
            wins.append(i)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1
    row = store.get(job.id)
    assert row.status == "running" and row.attempts == 1 and row.worker == f"w{wins[0]}"


def test_finished_jobs_are_immutable(store):
    job, _ = store.create("t", {})
    store.claim(job.id, "w")
    assert store.finish(job.id, JobStatus.failed, ("boom", "it broke"))
    assert not store.finish(job.id, JobStatus.succeeded)
    assert not store.set_stage(job.id, "loading")
    assert not store.set_progress(job.id, 0.5, "x")
    assert not store.merge_metrics(job.id, {"a": 1})
    assert not store.claim(job.id, "w")
    assert not store.requeue(job.id, utcnow(), "x")
    assert store.request_cancel(job.id).changed is False
    row = store.get(job.id)
    assert (row.status, row.error_code, row.error_message) == ("failed", "boom", "it broke")


def test_the_sweep_requeues_lost_jobs_with_runs_left_and_fails_the_rest(store):
    fresh, _ = store.create("t", {})
    stale, _ = store.create("t", {})
    spent, _ = store.create("t", {})
    cancelling, _ = store.create("t", {})
    queued, _ = store.create("t", {})
    for j in (fresh, stale, spent, cancelling):
        store.claim(j.id, "w")
    store.request_cancel(cancelling.id)
    lost_at = utcnow() - timedelta(minutes=10)  # the last heartbeat of the three lost runs
    with store.session() as s:  # the spent job has already been run twice
        s.execute(update(Job).where(Job.id == spent.id).values(attempts=2))
        s.execute(update(Job).where(Job.id.in_([stale.id, spent.id, cancelling.id])).values(heartbeat_at=lost_at))
    store.heartbeat(fresh.id)
    cutoff = utcnow() - timedelta(minutes=1)
    requeued, ended = store.recover_lost(cutoff, max_attempts=2)
    assert requeued == [stale.id] and sorted(ended) == sorted([spent.id, cancelling.id])
    again = store.get(stale.id)
    assert (again.status, again.attempts, again.stage, again.progress) == ("queued", 1, None, 0.0)
    assert store.events(stale.id)[-1].data == {"status": "queued", "reason": "worker lost", "runs": 1}
    assert not store.heartbeat(stale.id, attempt=1)  # the lost run's writes are refused now
    assert store.claim(stale.id, "w2") and store.get(stale.id).attempts == 2
    assert store.get(spent.id).status == "failed" and store.get(spent.id).error_code == "worker_lost"
    assert "2 times" in store.get(spent.id).error_message
    assert store.get(cancelling.id).status == "cancelled"
    assert store.get(fresh.id).status == "running" and store.get(queued.id).status == "queued"
    assert store.recover_lost(cutoff, max_attempts=2) == ([], [])


def test_the_sweep_leaves_a_job_whose_worker_came_back_while_it_looked(store, monkeypatch):
    """The race the sweep must lose: it saw a stale heartbeat, then the worker beat again before the sweep wrote.
    The job keeps running; it is neither queued again nor failed worker_lost (it has runs left)."""
    job, _ = store.create("t", {})
    store.claim(job.id, "w")
    with store.session() as s:
        s.execute(update(Job).where(Job.id == job.id).values(heartbeat_at=utcnow() - timedelta(minutes=10)))
    requeue = store._requeue_lost

    def beat_first(*args):
        assert store.heartbeat(job.id)  # the worker comes back between the sweep's read and its write
        return requeue(*args)

    monkeypatch.setattr(store, "_requeue_lost", beat_first)
    assert store.recover_lost(utcnow() - timedelta(minutes=1), max_attempts=2) == ([], [])
    row = store.get(job.id)
    assert (row.status, row.attempts, row.error_code) == ("running", 1, None)


def test_the_sweep_fails_a_run_the_hard_time_limit_killed_rather_than_run_it_again(store):
    killed, _ = store.create("t", {})
    short, _ = store.create("t", {})
    for j in (killed, short):
        store.claim(j.id, "w")
    now = utcnow()
    with store.session() as s:  # killed ran 2 h before its last beat; short, 5 min
        s.execute(update(Job).where(Job.id == killed.id).values(
            started_at=now - timedelta(hours=2, minutes=10), heartbeat_at=now - timedelta(minutes=10)))
        s.execute(update(Job).where(Job.id == short.id).values(
            started_at=now - timedelta(minutes=15), heartbeat_at=now - timedelta(minutes=10)))
    requeued, ended = store.recover_lost(now - timedelta(minutes=1), max_attempts=3, time_limit_s=3600)
    assert (requeued, ended) == ([short.id], [killed.id])
    row = store.get(killed.id)
    assert (row.status, row.error_code) == ("failed", "time_limit") and "hard time limit" in row.error_message
    assert store.get(short.id).status == "queued"


def test_take_over_only_when_stale_and_requeue_respects_run_after(store):
    job, _ = store.create("t", {})
    store.claim(job.id, "w1")
    assert not store.take_over(job.id, "w2", stale_cutoff(60))
    assert store.take_over(job.id, "w2", utcnow() + timedelta(seconds=1))  # every heartbeat so far counts as stale
    row = store.get(job.id)
    assert row.worker == "w2" and row.attempts == 2
    assert store.requeue(job.id, utcnow() + timedelta(seconds=60), "network")
    assert store.next_queued() is None and not store.claim(job.id, "w3")
    assert store.requeue(job.id, utcnow(), "again") is False  # only running jobs are requeued


def test_a_run_taken_over_can_no_longer_write(store):
    """Fencing: once w2 takes the job over (attempt 2), w1's run (attempt 1) is refused everywhere."""
    job, _ = store.create("t", {})
    store.claim(job.id, "w1")
    old = StoreReporter(store, job.id, progress_interval_s=0, cancel_poll_s=0, attempt=1)
    old.progress(0.2, "w1 working")
    assert store.get(job.id).progress == pytest.approx(0.2) and not old.cancel_requested()
    assert store.take_over(job.id, "w2", utcnow() + timedelta(seconds=1))
    assert not store.heartbeat(job.id, attempt=1) and store.heartbeat(job.id, attempt=2)
    assert not store.set_stage(job.id, "training", attempt=1)
    assert not store.set_progress(job.id, 0.9, "stale", attempt=1)
    assert not store.merge_metrics(job.id, {"ppl": 1.0}, attempt=1)
    assert not store.add_artifact(job.id, "report.json", 1, "0" * 64, "k", attempt=1)
    assert not store.requeue(job.id, utcnow(), "stale", attempt=1)
    assert not store.finish(job.id, JobStatus.succeeded, attempt=1)
    row = store.get(job.id)
    assert (row.status, row.worker, row.stage, row.progress, row.metrics) == ("running", "w2", None, 0.0, {})
    assert store.artifacts(job.id) == []
    assert old.cancel_requested() and old.superseded  # the old run is told to stop
    new = StoreReporter(store, job.id, progress_interval_s=0, cancel_poll_s=0, attempt=2)
    new.progress(0.5, "w2 working")
    assert not new.cancel_requested() and not new.superseded
    assert store.add_artifact(job.id, "report.json", 1, "0" * 64, "k", attempt=2)
    assert store.finish(job.id, JobStatus.succeeded, attempt=2)


def test_a_finished_jobs_artifacts_never_change(store):
    """The sweep fails a lost run's job without a new attempt: if that run wakes up, its attempt still
    matches, but the job is finished, so it can neither record nor clear artifacts."""
    job, _ = store.create("t", {})
    store.claim(job.id, "w1")
    assert store.add_artifact(job.id, "report.json", 1, "0" * 64, "k1", attempt=1)
    assert store.finish(job.id, JobStatus.failed, ("worker_lost", "gone"))
    assert not store.add_artifact(job.id, "model/config.json", 1, "1" * 64, "k2", attempt=1)
    assert not store.clear_artifacts(job.id, attempt=1)
    assert [(a.name, a.key) for a in store.artifacts(job.id)] == [("report.json", "k1")]


def test_delete_refuses_active_jobs(store):
    job, _ = store.create("t", {}, "idem")
    with pytest.raises(JobNotFinished):
        store.delete(job.id)
    store.request_cancel(job.id)
    assert store.delete(job.id)
    again, created = store.create("t", {}, "idem")  # the key went with the job
    assert created and again.id != job.id


def test_store_reporter_throttles_and_reads_cancellation(store):
    job, _ = store.create("t", {})
    store.claim(job.id, "w")
    rep = StoreReporter(store, job.id, progress_interval_s=60, cancel_poll_s=0)
    rep.stage(Stage.loading)
    rep.progress(0.1, "a")  # first write goes through
    for i in range(50):
        rep.progress(0.1 + i / 100, f"step {i}")  # throttled
    assert store.get(job.id).progress == pytest.approx(0.1)
    rep.progress(0.3, "backwards")  # never decreases
    rep.flush()
    row = store.get(job.id)
    assert row.progress == pytest.approx(0.59) and row.progress_message == "backwards"
    rep.metrics({"ppl": float("nan"), "acc": 0.5})
    rep.event("info", {"message": "hello", "t": (1, 2)})
    assert store.get(job.id).metrics == {"ppl": None, "acc": 0.5}
    assert not rep.cancel_requested()
    store.request_cancel(job.id)
    assert rep.cancel_requested()
    kinds = [e.kind for e in store.events(job.id)]
    assert kinds == ["status", "status", "stage", "progress", "progress", "metrics", "info", "status"]


def test_jsonable():
    assert jsonable({"a": float("inf"), 1: (1, 2.5), "b": {3}}) == {"a": None, "1": [1, 2.5], "b": [3]}


@pytest.mark.postgres
def test_an_unreachable_store_is_a_503_with_retry_after(tmp_path):
    """Polls whose database cannot be reached fail after the pool's timeout with 503 store_unavailable (a client
    retries), not a 500, and a refused connection is not waited for twice."""
    from fastapi.testclient import TestClient

    from app.main import create_app
    from tests.conftest import KEYS, api_settings, free_port, pg_schema

    with pg_schema() as url:
        app = create_app(api_settings(tmp_path, url))
        with TestClient(app) as client:
            headers = {"Authorization": f"Bearer {KEYS['alice']}"}
            services = app.state.services
            assert client.get(f"/v1/jobs/{'0' * 32}", headers=headers).status_code == 404
            dead = PostgresPolls(f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/test", size=1, timeout=0.5)
            live, services.polls = services.polls, dead
            try:
                client.portal.call(dead.open)
                r = client.get(f"/v1/jobs/{'0' * 32}", headers=headers)
                assert r.status_code == 503 and r.json()["error"]["code"] == "store_unavailable", r.text
                assert int(r.headers["Retry-After"]) > 0
                r = client.get(f"/v1/jobs/{'0' * 32}/events", headers=headers)
                assert r.status_code == 503 and r.json()["error"]["code"] == "store_unavailable"
            finally:
                client.portal.call(dead.close)
                services.polls = live
            client.portal.call(live.close)  # a pool opens again after it was closed (a second lifespan)
            client.portal.call(live.open)
            assert client.get(f"/v1/jobs/{'0' * 32}", headers=headers).status_code == 404


def test_an_unreadable_job_store_makes_a_checkpoint_write_transient_not_a_failure(tmp_path):
    """A run asks the job store whether it still owns the job before each checkpoint; when the database cannot be
    read, the job goes back to the queue (TransientError), and no checkpoint is written without that answer."""
    import torch

    from app.store.artifacts import LocalStore
    from tests.conftest import free_port
    from worker.errors import TransientError
    from worker.run.checkpoints import CheckpointStore

    dead = JobStore(make_engine(f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/test"))
    reporter = StoreReporter(dead, "0" * 32, progress_interval_s=0, cancel_poll_s=0, attempt=1)
    artifacts = LocalStore(tmp_path / "artifacts")
    checkpoints = CheckpointStore(artifacts, "jobs/j/checkpoint/", "fp", tmp_path / "scratch",
                                  may_write=lambda: not reporter.check_superseded())
    with pytest.raises(TransientError, match="could not read the job store"):
        checkpoints.save("training", {"step": 1}, {"state": {"w": torch.ones(3)}})
    with pytest.raises(TransientError, match="could not read the job store"):
        checkpoints.stage("layer-0", {"w": torch.ones(3)})
    assert artifacts.list_prefix("jobs/") == []
