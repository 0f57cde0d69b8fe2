"""Operational hardening: bounded metric labels, a key ring that refuses ambiguous keys and unusable tenant names,
time limits with the margin the worker needs, readiness that keeps driver errors in the log, and PostgreSQL
connections that cannot hang for good."""

from __future__ import annotations

import logging
import os
import socket

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text

from app.auth import KeyRing, hash_key
from app.config import Settings
from app.main import create_app
from app.store.db import current_revision, head_revision, make_engine, upgrade
from app.store.models import Job
from tests.conftest import api_settings, free_port, pg_schema

TENANT_MAX_CHARS = Job.__table__.c.tenant.type.length  # VARCHAR(128): the longest tenant name the store takes


def _series(metrics_text: str, name: str) -> list[dict[str, str]]:
    return [dict(s.labels) for f in text_string_to_metric_families(metrics_text) for s in f.samples if s.name == name]


# Metrics ------------------------------------------------------------------------------------------------------


def test_http_metric_labels_stay_bounded_whatever_a_client_sends(api):
    """Made-up method tokens and paths (no key needed) must not each add a time series."""
    c = api.client
    for i in range(5):
        assert c.request(f"X{i:05d}", "/healthz").status_code == 405
        assert c.request("PROPFIND", "/healthz").status_code == 405
        assert c.get(f"/no-such-path-{i}").status_code == 404
        assert c.request(f"Y{i:05d}", f"/v1/jobs/{i}/nowhere").status_code == 404
    assert c.get("/healthz").status_code == 200
    text_ = c.get("/metrics").text
    requests = _series(text_, "restorelcc_http_requests_total")
    latency = _series(text_, "restorelcc_http_request_duration_seconds_count")
    routes = set(c.get("/openapi.json").json()["paths"]) | {"unmatched"}
    for labels in requests + latency:
        assert labels["method"] in {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "other"}, labels
        assert labels["route"] in routes, labels
    assert 'restorelcc_http_requests_total{method="other",route="/healthz",status="405"} 10.0' in text_
    assert 'restorelcc_http_requests_total{method="other",route="unmatched",status="404"} 5.0' in text_
    assert 'restorelcc_http_requests_total{method="GET",route="unmatched",status="404"} 5.0' in text_
    assert 'restorelcc_http_requests_total{method="GET",route="/healthz",status="200"} 1.0' in text_
    assert 'restorelcc_http_request_duration_seconds_count{method="other",route="/healthz"} 10.0' in text_


# Key ring -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hashed", [False, True])
def test_one_key_for_two_tenants_is_refused_naming_both(tmp_path, hashed):
    """Otherwise the key silently belongs to the last tenant listed, and its jobs land in the wrong tenancy."""
    f = tmp_path / "keys"
    f.write_text(f"bob:{'sha256:' + hash_key('shared-key-1').upper() if hashed else 'shared-key-1'}\n")
    s = Settings(api_keys="alice:shared-key-1,carol:other-key", api_keys_file=f)
    with pytest.raises(ValueError, match="configured for two tenants, 'alice' and 'bob'") as e:
        KeyRing.from_settings(s)
    assert "shared-key-1" not in str(e.value) and hash_key("shared-key-1") not in str(e.value).lower()
    with pytest.raises(ValueError, match="'alice' and 'bob'"):
        create_app(api_settings(tmp_path, f"sqlite:///{tmp_path / 'j.db'}", api_keys=s.api_keys, api_keys_file=f))
    ring = KeyRing.from_settings(Settings(api_keys="alice:shared-key-1,carol:other-key,alice:shared-key-1"))
    assert ring.tenant_for("shared-key-1") == "alice" and len(ring) == 2  # the same tenant twice is harmless


@pytest.mark.parametrize("entry, message", [
    (f"{'t' * (TENANT_MAX_CHARS + 1)}:k1", f"is {TENANT_MAX_CHARS + 1} characters long; at most {TENANT_MAX_CHARS}"),
    ("te\x00am:k1", "control character"),
    ("te\x7fam:k1", "control character"),
    ("*:k1", "'\\*' is reserved"),
])
def test_unusable_tenant_names_stop_the_service_at_start(tmp_path, entry, message):
    f = tmp_path / "keys"
    f.write_text(entry + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        create_app(api_settings(tmp_path, f"sqlite:///{tmp_path / 'j.db'}", api_keys_file=f))


def test_the_bad_hash_of_a_key_is_named_by_its_tenant(tmp_path):
    with pytest.raises(ValueError, match="key hash of tenant 'alice' is not 64 hex digits"):
        KeyRing.from_settings(Settings(api_keys="alice:sha256:" + "z" * 64))


@pytest.mark.postgres
def test_the_longest_tenant_name_accepted_is_stored_on_postgres(tmp_path):
    """128 characters fit jobs.tenant on PostgreSQL; one more would turn every create of that tenant into a 500."""
    for table in Job.metadata.tables.values():  # every tenant column has that limit
        if "tenant" in table.c:
            assert table.c.tenant.type.length == TENANT_MAX_CHARS, table.name
    longest = "t" * TENANT_MAX_CHARS
    with pg_schema() as url:
        with TestClient(create_app(api_settings(tmp_path, url, api_keys=f"{longest}:long-key"))) as c:
            r = c.post("/v1/jobs", headers={"Authorization": "Bearer long-key"},
                       json={"model": {"id": str(tmp_path / "models" / "m")}, "pruning": {"method": "magnitude"},
                             "restoration": {"method": "none"}})
            assert r.status_code == 202, r.text
            assert c.app.state.services.jobs.get(r.json()["id"]).tenant == longest
        with pytest.raises(ValueError, match="characters long"):
            create_app(api_settings(tmp_path, url, api_keys=f"{longest}x:long-key"))


# Time limits --------------------------------------------------------------------------------------------------


def test_the_hard_limit_leaves_the_worker_its_margin_above_the_soft_limit():
    """A lost run that lasted ``hard_limit_run_s`` is taken for one the hard limit killed (failed ``time_limit``,
    not run again), so a run the soft limit lets live must end below it."""
    margin = 120 + 4 * 10  # default stale_after_s + 4 × default heartbeat_s
    for hard in (161, 100 + margin):
        with pytest.raises(ValueError, match=r"hard_time_limit_s \(\d+\) must exceed soft_time_limit_s \(100\) by "
                                             r"more than stale_after_s \+ 4 × heartbeat_s \(120 \+ 4 × 10 = 160 s\)"):
            Settings(soft_time_limit_s=100, hard_time_limit_s=hard)
    ok = Settings(soft_time_limit_s=100, hard_time_limit_s=101 + margin)
    assert ok.hard_limit_run_s > ok.soft_time_limit_s
    with pytest.raises(ValueError, match=r"stale_after_s \+ 4 × heartbeat_s \(600 \+ 4 × 10 = 640 s\)"):
        Settings(stale_after_s=600)  # the default limits (6 h, 6 h + 600 s) leave 600 s
    defaults = Settings()
    assert defaults.hard_limit_run_s > defaults.soft_time_limit_s


# Readiness ----------------------------------------------------------------------------------------------------


def test_readyz_says_which_dependency_failed_but_logs_the_details(tmp_path, caplog):
    """/readyz needs no key: the broker's address and the artifact directory must not show in its body."""
    port = free_port()  # nothing listens there
    s = api_settings(tmp_path, f"sqlite:///{tmp_path / 'j.db'}", redis_url=f"redis://127.0.0.1:{port}/0",
                     artifacts_dir=tmp_path / "artifacts")
    with TestClient(create_app(s)) as c:
        (tmp_path / "artifacts").rmdir()
        (tmp_path / "artifacts").write_text("not a directory")
        with caplog.at_level(logging.WARNING, logger="restorelcc.api"):
            r = c.get("/readyz")
    assert r.status_code == 503
    assert r.json() == {"status": "unavailable", "checks": {"database": "ok", "broker": "error: broker unavailable",
                                                            "artifacts": "error: artifact store unavailable"}}
    assert str(port) not in r.text and str(tmp_path) not in r.text
    logged = caplog.text
    assert "the broker check failed" in logged and str(port) in logged
    assert "the artifacts check failed" in logged and str(tmp_path / "artifacts") in logged


@pytest.mark.postgres
def test_readyz_hides_the_database_address(tmp_path, caplog):
    port = free_port()  # nothing listens there
    s = api_settings(tmp_path, f"postgresql+psycopg://postgres@127.0.0.1:{port}/test", db_read_pool_size=1)
    with TestClient(create_app(s, migrate=False)) as c, caplog.at_level(logging.WARNING, logger="restorelcc.api"):
        r = c.get("/readyz")
    assert r.status_code == 503 and r.json()["checks"]["database"] == "error: database unavailable"
    assert str(port) not in r.text and "127.0.0.1" not in r.text
    assert "the database check failed: OperationalError" in caplog.text and str(port) in caplog.text


# PostgreSQL connections ---------------------------------------------------------------------------------------


def _sockopt(fd: int, level: int, option: int) -> int:
    with socket.socket(fileno=os.dup(fd)) as sock:
        return sock.getsockopt(level, option)


@pytest.mark.postgres
def test_postgres_connections_have_a_connect_timeout_and_keepalives():
    """A blackholed server must fail a connect or an open connection, not hang the API or a worker for good."""
    with pg_schema() as url:
        engine = make_engine(url)
        try:
            upgrade(engine)  # the test database works with them: migrations, then a read
            assert current_revision(engine) == head_revision()
            with engine.connect() as conn:
                assert conn.execute(text("SELECT count(*) FROM jobs")).scalar() == 0
                raw = conn.connection.dbapi_connection
                params = raw.info.get_parameters()
                fd = raw.pgconn.socket
                assert {k: params.get(k) for k in ("connect_timeout", "keepalives", "keepalives_idle",
                                                   "keepalives_interval", "keepalives_count", "tcp_user_timeout")
                        } == {"connect_timeout": "10", "keepalives": "1", "keepalives_idle": "30",
                              "keepalives_interval": "10", "keepalives_count": "3", "tcp_user_timeout": "60000"}
                # and libpq did set them on the socket
                assert _sockopt(fd, socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
                assert _sockopt(fd, socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 30
                assert _sockopt(fd, socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 10
                assert _sockopt(fd, socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 3
                assert _sockopt(fd, socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 60_000
        finally:
            engine.dispose()
        own = make_engine(f"{url}&connect_timeout=3&keepalives_idle=5")  # the URL's own values win
        try:
            with own.connect() as conn:
                params = conn.connection.dbapi_connection.info.get_parameters()
            assert (params["connect_timeout"], params["keepalives_idle"], params["keepalives"]) == ("3", "5", "1")
        finally:
            own.dispose()



def test_the_poll_pool_connects_with_the_timeout_and_keepalives_too():
    from app.store.polls import conninfo

    info = dict(part.split("=", 1) for part in conninfo("postgresql+psycopg://u@h:5432/d?connect_timeout=3").split())
    assert info["connect_timeout"] == "3" and info["keepalives"] == "1" and info["tcp_user_timeout"] == "60000"
