"""Races between the API and a worker writing the same job at once, on PostgreSQL (READ COMMITTED, row locks), and
the list cursor and transient retries, on both stores.

A race is staged without sleeps: the worker's transaction is held open right after it wrote (a session hook waits
on an event), the API's call starts in a thread, and the test lets the worker commit once PostgreSQL reports the
API's transaction waiting for a lock (or the call has returned).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import event, text

from app.schemas import JobStatus
from app.store.db import make_engine, upgrade
from app.store.jobs import JobStore
from app.store.models import utcnow
from tests.conftest import pg_schema, wait_until


@pytest.fixture
def store(db_url) -> Iterator[JobStore]:
    engine = make_engine(db_url)
    upgrade(engine)
    jobs = JobStore(engine)
    yield jobs
    jobs.dispose()


@pytest.fixture
def pg_store() -> Iterator[JobStore]:
    with pg_schema() as url:
        engine = make_engine(url)
        upgrade(engine)
        jobs = JobStore(engine)
        yield jobs
        jobs.dispose()


def _waiting_for_a_lock(store: JobStore) -> bool:
    with store.engine.connect() as c:
        return bool(c.execute(text("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                                   "AND datname = current_database()")).scalar())


@contextmanager
def held_open(store: JobStore, write: Callable[[], Any]) -> Iterator[threading.Thread]:
    """Run ``write`` in a thread whose transaction stays open after its statements (before COMMIT) until the block
    ends; yields once the write is in."""
    written, go = threading.Event(), threading.Event()

    def hold(session: Any, _context: Any) -> None:
        if threading.current_thread() is worker:
            written.set()
            assert go.wait(60), "the test never let the held transaction commit"

    worker = threading.Thread(target=write)
    event.listen(store._sessions, "after_flush", hold)
    try:
        worker.start()
        assert written.wait(60), "the held write never flushed"
        yield worker
    finally:
        go.set()
        worker.join(60)
        event.remove(store._sessions, "after_flush", hold)


def _race(store: JobStore, worker_write: Callable[[], Any], api_call: Callable[[], Any]) -> Any:
    """The API's call made while the worker's write is uncommitted; its result once both are done."""
    out: dict[str, Any] = {}
    with held_open(store, worker_write):
        api = threading.Thread(target=lambda: out.setdefault("result", api_call()))
        api.start()
        wait_until(lambda: "result" in out or _waiting_for_a_lock(store), 30,
                   lambda: "the API call neither returned nor waited for a lock")
    api.join(60)
    assert not api.is_alive()
    return out["result"]


@pytest.mark.postgres
def test_a_cancel_racing_a_workers_hand_back_cancels_the_job(pg_store):
    """The worker hands the running job back (preemption: running → queued) while the user cancels. The cancel
    must land: the job ends cancelled, never queued to run again after a 'nothing changed' answer."""
    job, _ = pg_store.create("t", {})
    assert pg_store.claim(job.id, "w")
    result = _race(pg_store, lambda: pg_store.release(job.id, 1, "worker stopping"),
                   lambda: pg_store.request_cancel(job.id, "t"))
    assert (result.status, result.changed) == (JobStatus.cancelled, True)
    assert pg_store.get(job.id).status == "cancelled"


@pytest.mark.postgres
def test_a_reader_never_sees_a_jobs_events_out_of_order(pg_store):
    """A worker's log line is being written when the user cancels: whatever a poller reads in between, reading on
    after the newest seq it saw ends with the whole log (no event committed behind its back)."""
    job, _ = pg_store.create("t", {})
    assert pg_store.claim(job.id, "w")
    seen: list[int] = []

    def poll() -> None:
        seen.extend(e.seq for e in pg_store.events(job.id, after=seen[-1] if seen else None))

    poll()
    with held_open(pg_store, lambda: pg_store.add_event(job.id, "info", {"msg": "a log line"})):
        api = threading.Thread(target=lambda: pg_store.request_cancel(job.id, "t"))
        api.start()
        wait_until(lambda: not api.is_alive() or _waiting_for_a_lock(pg_store), 30,
                   lambda: "the cancel neither returned nor waited for a lock")
        poll()  # while the log line is uncommitted
    api.join(60)
    poll()
    every = [e.seq for e in pg_store.events(job.id)]
    assert [e.kind for e in pg_store.events(job.id)][-2:] == ["info", "status"]
    assert seen == every


def test_a_page_cursor_holds_when_its_job_is_deleted(store):
    ids = [store.create("t", {})[0].id for _ in range(5)]
    store.create("u", {})
    page1, cursor = store.list("t", limit=2)
    assert [j.id for j in page1] == ids[::-1][:2] and cursor is not None
    assert store.request_cancel(ids[3]).changed and store.delete(ids[3])  # the cursor's own job
    page2, cursor2 = store.list("t", limit=2, after=cursor)
    page3, last = store.list("t", limit=2, after=cursor2)
    assert [j.id for j in page2 + page3] == ids[::-1][2:] and last is None
    assert [j.id for j in store.list("t", limit=2, after=ids[2])[0]] == ids[1::-1]  # a bare id, as before
    for bad in (f"{ids[0]}.x", f"{ids[0]}.²", f"{ids[0]}.0", f"{ids[0]}.{2**31}", "nope"):
        with pytest.raises(KeyError):
            store.list("t", after=bad)


def test_transient_retries_do_not_use_up_the_runs_a_lost_worker_has(store):
    """Each transient failure hands the job back (as a preemption does): after more retries than max_attempts the
    job is still run, and its next loss is counted as the first."""
    job, _ = store.create("t", {})
    for attempt in range(4):
        assert store.claim(job.id, "w")
        row = store.get(job.id)
        assert row.attempts == 1, f"retry {attempt}: a transient retry counted as a lost run"
        assert store.requeue(job.id, utcnow() - timedelta(seconds=1), "store down", attempt=1)
        assert not store.heartbeat(job.id, attempt=1)  # the run that handed it back writes nothing more
    assert store.get(job.id).retries == 4


def test_deleting_a_job_says_which_webhook_events_it_gives_up(store, caplog):
    job, _ = store.create("t", {"notify": {"url": "http://127.0.0.1:9/hook"}})
    assert store.request_cancel(job.id).changed  # queued, then cancelled: two deliveries, pending (no receiver)
    assert [d.state for d in store.deliveries(job.id)] == ["pending", "pending"]
    with caplog.at_level("WARNING", logger="restorelcc.store"):
        assert store.delete(job.id)
    assert f"job {job.id} deleted with 2 webhook event(s) not delivered yet; they are given up" in caplog.text
    assert store.deliveries(job.id) == []
