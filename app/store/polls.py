"""The API's status reads — a job and its events, what pollers ask for — without a thread per request.

A poll is the API's most frequent request. Through the synchronous store it costs a hop into the thread pool, an
ORM query and (for a fresh snapshot) a transaction: about three times the HTTP handling itself. On PostgreSQL,
:class:`PostgresPolls` reads on the event loop from an asyncio connection pool: autocommit (one SELECT is a
consistent snapshot by itself), read-only sessions, statements prepared by the server after a few uses, no liveness
ping. A connection the server dropped (a restart, a failover, an idle timeout) fails its read; the pool is then
checked (every idle connection the server dropped too is replaced) and the read runs once more. A pool that cannot
hand out a connection within ``timeout`` seconds (the database is down) fails at once, with no second wait.
Elsewhere (SQLite, the embedded setup) :class:`ThreadedPolls` runs the store's own reads in the thread pool.

The statements are compiled once from the SQLAlchemy tables, so a column added there is read here too.
"""

from __future__ import annotations

from typing import Any, Protocol

from sqlalchemy import bindparam, select
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import make_url
from starlette.concurrency import run_in_threadpool

from app.store.db import pg_connect_args
from app.store.jobs import JobStore
from app.store.models import Event, Job


class Polls(Protocol):
    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def job(self, job_id: str, tenant: str | None = None) -> Job | None: ...

    async def events(self, job_id: str, after: int | None = None, limit: int = 1000) -> list[Event]: ...


class ThreadedPolls:
    """The store's synchronous reads, each in the thread pool."""

    def __init__(self, jobs: JobStore):
        self.jobs = jobs

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def job(self, job_id: str, tenant: str | None = None) -> Job | None:
        return await run_in_threadpool(self.jobs.get, job_id, tenant)

    async def events(self, job_id: str, after: int | None = None, limit: int = 1000) -> list[Event]:
        return await run_in_threadpool(self.jobs.events, job_id, after, limit)


def _compile(statement: Any) -> str:
    return str(statement.compile(dialect=postgresql.psycopg.dialect()))  # pyformat: %(name)s


_JOBS = Job.__table__
_EVENTS = Event.__table__
JOB_SQL = _compile(select(_JOBS).where(_JOBS.c.id == bindparam("id")))
TENANT_JOB_SQL = _compile(select(_JOBS).where(_JOBS.c.id == bindparam("id"), _JOBS.c.tenant == bindparam("tenant")))
EVENTS_SQL = _compile(select(_EVENTS).where(_EVENTS.c.job_id == bindparam("job_id"), _EVENTS.c.seq > bindparam("after"))
                      .order_by(_EVENTS.c.seq).limit(bindparam("limit")))


def conninfo(url: str) -> str:
    """libpq's connection string for a SQLAlchemy PostgreSQL URL, as SQLAlchemy's own psycopg dialect connects
    (several hosts, ``options=-csearch_path=…`` and the other query parameters included)."""
    from psycopg.conninfo import make_conninfo

    _, params = postgresql.psycopg.dialect().create_connect_args(make_url(url))
    params.setdefault("application_name", "restorelcc-polls")  # how pg_stat_activity names these connections
    for key, value in pg_connect_args(url).items():  # the connect timeout and keepalives of every connection
        params.setdefault(key, value)
    return make_conninfo(**params)


class PostgresPolls:
    """Reads on an asyncio pool of ``size`` (at most twice that) read-only autocommit connections. Open it inside
    the running event loop (the app's lifespan) and close it there; it can be opened again after."""

    def __init__(self, url: str, size: int = 16, timeout: float = 10.0):
        self.conninfo, self.size, self.timeout = conninfo(url), size, timeout
        self._pool: Any = None

    @property
    def pool(self) -> Any:
        if self._pool is None:
            raise RuntimeError("the poll pool is not open (it opens with the app's lifespan)")
        return self._pool

    @staticmethod
    async def _configure(conn: Any) -> None:
        await conn.execute("SET default_transaction_read_only = on")

    async def open(self) -> None:
        from psycopg.rows import dict_row
        from psycopg_pool import AsyncConnectionPool

        if self._pool is None:
            self._pool = AsyncConnectionPool(
                self.conninfo, min_size=self.size, max_size=2 * self.size, open=False, timeout=self.timeout,
                configure=self._configure, kwargs={"autocommit": True, "row_factory": dict_row},
                name="restorelcc-polls",
            )
            await self._pool.open()

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()

    async def fetch(self, sql: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        """The rows of one statement; when the server had dropped the connection, the pool is checked (its other
        dropped connections replaced) and the statement runs once more."""
        import psycopg
        from psycopg_pool import PoolClosed, PoolTimeout

        try:
            return await self._fetch(sql, params)
        except (PoolTimeout, PoolClosed):  # no connection to be had: waiting again would only double the wait
            raise
        except psycopg.OperationalError:
            await self.pool.check()  # a restart or failover drops them all, not just the one that failed
        return await self._fetch(sql, params)

    async def _fetch(self, sql: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        async with self.pool.connection() as conn:
            cur = await conn.execute(sql, params)
            return await cur.fetchall()

    async def job(self, job_id: str, tenant: str | None = None) -> Job | None:
        if tenant is None:
            rows = await self.fetch(JOB_SQL, {"id": job_id})
        else:
            rows = await self.fetch(TENANT_JOB_SQL, {"id": job_id, "tenant": tenant})
        return Job(**rows[0]) if rows else None

    async def events(self, job_id: str, after: int | None = None, limit: int = 1000) -> list[Event]:
        rows = await self.fetch(EVENTS_SQL, {"job_id": job_id, "after": -1 if after is None else after,
                                             "limit": limit})
        return [Event(**r) for r in rows]


def make_polls(url: str, jobs: JobStore, size: int) -> Polls:
    """:class:`PostgresPolls` for a PostgreSQL ``url``, :class:`ThreadedPolls` over ``jobs`` otherwise."""
    if make_url(url).get_backend_name() == "postgresql":
        return PostgresPolls(url, size)
    return ThreadedPolls(jobs)
