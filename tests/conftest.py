"""Shared fixtures for the service tests: a job store on SQLite and on PostgreSQL, an API client per tenant.

PostgreSQL (127.0.0.1:5432, trust auth, database ``test``) and Redis (127.0.0.1:6379) are expected to be
running (the CI script starts them). Every PostgreSQL-backed test gets a fresh schema, dropped afterwards.
"""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator
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
