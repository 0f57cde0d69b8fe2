"""Engines, sessions and schema migrations for the job store (SQLite by default, PostgreSQL in production)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"

# libpq parameters every PostgreSQL connection gets unless its URL sets them: a server that never answers (a
# blackholed address, a dead peer after a failover) fails a connect after 10 s, and an open connection within
# about a minute (keepalives while idle, tcp_user_timeout while data waits unacknowledged), instead of hanging
# the API or a worker for good.
PG_CONNECT_ARGS: dict[str, Any] = {
    "connect_timeout": 10,
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
    "tcp_user_timeout": 60_000,  # milliseconds
}


def pg_connect_args(url: str, given: dict[str, Any] | None = None) -> dict[str, Any]:
    """:data:`PG_CONNECT_ARGS` under ``given``, leaving out those the URL's query sets (connect_args would
    override the URL's)."""
    query = make_url(url).query
    return {**{k: v for k, v in PG_CONNECT_ARGS.items() if k not in query}, **(given or {})}


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An engine for ``url``. SQLite gets WAL, foreign keys, a busy timeout and ``BEGIN IMMEDIATE``
    transactions, so concurrent writers queue up instead of failing on a stale snapshot. PostgreSQL gets
    :data:`PG_CONNECT_ARGS` (a connect timeout and TCP keepalives)."""
    u = make_url(url)
    if u.get_backend_name() == "sqlite":
        if u.database and u.database != ":memory:":
            Path(u.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 60}, **kwargs)

        @event.listens_for(engine, "connect")
        def _connect(dbapi_conn: Any, _: Any) -> None:
            dbapi_conn.isolation_level = None  # SQLAlchemy emits BEGIN itself (below)
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=60000")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        @event.listens_for(engine, "begin")
        def _begin(conn: Any) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    kwargs.setdefault("pool_pre_ping", True)
    kwargs.setdefault("pool_size", 10)
    kwargs.setdefault("max_overflow", 40)
    if u.get_backend_name() == "postgresql" and u.get_driver_name() in ("psycopg", "psycopg2"):  # libpq's
        kwargs["connect_args"] = pg_connect_args(url, kwargs.get("connect_args"))
    return create_engine(url, **kwargs)


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def alembic_config(engine: Engine | None = None) -> Any:
    from alembic.config import Config

    cfg = Config(str(MIGRATIONS_DIR / "alembic.ini"))
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if engine is not None:
        cfg.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False).replace("%", "%%"))
    return cfg


def upgrade_url(url: str) -> None:
    """:func:`upgrade` through an engine of its own, closed afterwards."""
    engine = make_engine(url)
    try:
        upgrade(engine)
    finally:
        engine.dispose()


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Bring the schema to ``revision``; idempotent, and safe when several processes start together
    (PostgreSQL: an advisory lock; SQLite: the immediate transaction)."""
    from alembic import command

    cfg = alembic_config(engine)
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(7224110)"))
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def head_revision() -> str | None:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config()).get_current_head()
