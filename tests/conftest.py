"""Shared fixtures for the service tests: a job store on SQLite and on PostgreSQL, an API client per tenant.

PostgreSQL (127.0.0.1:5432, trust auth, database ``test``) and Redis (127.0.0.1:6379) are expected to be
running (the CI script starts them). Every PostgreSQL-backed test gets a fresh schema, dropped afterwards.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

PG_BASE = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
KEYS = {"alice": "key-alice-123", "bob": "key-bob-456"}


@contextmanager
def pg_schema() -> Iterator[str]:
    """A fresh PostgreSQL schema; yields a DATABASE_URL whose search_path points at it."""
    from sqlalchemy import create_engine, text

    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_BASE, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f"CREATE SCHEMA {name}"))
    try:
        yield f"{PG_BASE}?options=-csearch_path%3D{name}"
    finally:
        with admin.connect() as c:
            c.execute(text(f"DROP SCHEMA {name} CASCADE"))
        admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request, tmp_path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'jobs.db'}"
    else:
        with pg_schema() as url:
            yield url


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Api:
    client: Any  # fastapi.testclient.TestClient
    services: Any  # app.deps.Services
    root: Path

    def h(self, tenant: str = "alice") -> dict[str, str]:
        return {"Authorization": f"Bearer {KEYS[tenant]}"}

    def spec(self, **sections: Any) -> dict[str, Any]:
        spec: dict[str, Any] = {
            "model": {"id": str(self.root / "models" / "tiny")},
            "pruning": {"method": "magnitude", "sparsity": 0.5},
            "restoration": {"method": "none"},
        }
        spec.update(sections)
        return spec

    def create(self, tenant: str = "alice", **sections: Any) -> dict[str, Any]:
        r = self.client.post("/v1/jobs", json=self.spec(**sections), headers=self.h(tenant))
        assert r.status_code == 202, r.text
        return r.json()


def api_settings(root: Path, db_url: str, **overrides: Any):
    from app.config import Settings

    (root / "models").mkdir(parents=True, exist_ok=True)
    (root / "data").mkdir(parents=True, exist_ok=True)
    values: dict[str, Any] = dict(
        data_dir=root / "state", database_url=db_url,
        api_keys=",".join(f"{t}:{k}" for t, k in KEYS.items()),
        model_roots=[root / "models"], data_roots=[root / "data"],
    )
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def api(tmp_path, db_url) -> Iterator[Api]:
    from fastapi.testclient import TestClient

    from app.main import create_app

    app = create_app(api_settings(tmp_path, db_url))
    with TestClient(app) as client:
        yield Api(client, app.state.services, tmp_path)


@contextmanager
def serve_in_thread(app: Any) -> Iterator[str]:
    """Run ``app`` with uvicorn on 127.0.0.1 (a free port) in a thread; yields its base URL."""
    import threading
    import time

    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@dataclass
class TinyAssets:
    root: Path  # models/ and data/ below it: the allowed roots
    model: Path
    text: Path
    train: Path
    long_text: Path  # enough rows that evaluating it takes seconds (for cancellation tests)

    def spec(self, model: str | None = None, slow: bool = False, restore: bool = False) -> dict[str, Any]:
        """Magnitude pruning to 50 %, no restoration (or a few RestoreLCC steps), a small evaluation."""
        restoration = {"method": "none"}
        if restore:
            restoration = {"method": "restorelcc", "heads": 0.5, "probe_samples": 16, "train_samples": 16,
                           "max_steps": 4, "batch_size": 4, "max_seq_len": 64}
        return {
            "model": {"id": model or str(self.model)},
            "pruning": {"method": "magnitude", "sparsity": 0.5},
            "restoration": restoration,
            "data": {"train": str(self.train)},
            "evaluation": {"perplexity": [str(self.long_text if slow else self.text)],
                           "limit": None if slow else 4, "max_seq_len": 64, "batch_size": 4},
        }


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory) -> TinyAssets:
    from tests.tiny import instruction_rows, save_tiny, text_rows, write_jsonl

    root = tmp_path_factory.mktemp("assets")
    (root / "data").mkdir()
    model = save_tiny("llama", root / "models" / "tiny")
    return TinyAssets(
        root=root, model=model,
        text=write_jsonl(root / "data" / "text.jsonl", text_rows(8)),
        train=write_jsonl(root / "data" / "train.jsonl", instruction_rows(16)),
        long_text=write_jsonl(root / "data" / "long.jsonl", text_rows(200)),
    )


def check_downloaded_model(model_dir: Path, report: dict[str, Any]) -> None:
    """The model loads with plain transformers and every pruned weight has the sparsity the report gives."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    modules = report["sparsity"]["modules"]
    assert modules, "report lists no pruned modules"
    for name, fraction in modules.items():
        w = model.get_submodule(name).weight
        assert abs(float((w == 0).float().mean()) - fraction) < 1e-9, name
    assert abs(report["sparsity"]["overall"] - 0.5) < 0.01


@pytest.fixture(scope="module")
def s3_endpoint():
    """A real S3-compatible server (moto's server mode) on 127.0.0.1 for the module's tests."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


def stop_group(proc: subprocess.Popen, timeout: float = 20) -> None:
    """SIGTERM a process started in its own session (and its children), SIGKILL after ``timeout``; wait for it."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def wait_until(condition: Callable[[], Any], timeout: float, what: Callable[[], Any] = lambda: "",
               alive: subprocess.Popen | None = None, poll_s: float = 0.1) -> Any:
    """Wait until ``condition()`` is true (polled every ``poll_s``) and return its value; fail the test after
    ``timeout`` seconds, or at once if the process ``alive`` exits first, with ``what()`` as the message."""
    deadline = time.monotonic() + timeout
    stop = threading.Event()
    while not (value := condition()):
        assert alive is None or alive.poll() is None, what()
        assert time.monotonic() < deadline, what()
        stop.wait(poll_s)
    return value
