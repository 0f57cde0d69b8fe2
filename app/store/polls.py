"""The API's status reads — a job and its events, what pollers ask for — without a thread per request.

A poll is the API's most frequent request. Through the synchronous store it costs a hop into the thread pool, an
ORM query and (for a fresh snapshot) a transaction: about three times the HTTP handling itself. On PostgreSQL,
:class:`PostgresPolls` reads on the event loop from an asyncio connection pool: autocommit (one SELECT is a
consistent snapshot by itself), read-only sessions, statements prepared by the server after a few uses, no liveness
ping. A connection the server dropped (a restart, a failover, an idle timeout) fails its read; the pool discards
it and the read runs once more on another. Elsewhere (SQLite, the embedded setup) :class:`ThreadedPolls` runs the
store's own reads in the thread pool.

The statements are compiled once from the SQLAlchemy tables, so a column added there is read here too.
"""

from __future__ import annotations

from typing import Any, Protocol

from sqlalchemy import bindparam, select
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import make_url
from starlette.concurrency import run_in_threadpool

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
    """libpq's form of a SQLAlchemy PostgreSQL URL (its query, e.g. ``options=-csearch_path=…``, kept)."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


class PostgresPolls:
    """Reads on an asyncio pool of ``size`` (at most twice that) read-only autocommit connections. Open it inside
    the running event loop (the app's lifespan) and close it there."""

    def __init__(self, url: str, size: int = 16):
        from psycopg.rows import dict_row
        from psycopg_pool import AsyncConnectionPool

        self.pool = AsyncConnectionPool(
            conninfo(url), min_size=size, max_size=2 * size, open=False, configure=self._configure,
            kwargs={"autocommit": True, "row_factory": dict_row}, name="restorelcc-polls",
        )

    @staticmethod
    async def _configure(conn: Any) -> None:
        await conn.execute("SET default_transaction_read_only = on")

    async def open(self) -> None:
        await self.pool.open()

    async def close(self) -> None:
        await self.pool.close()

    async def fetch(self, sql: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        """The rows of one statement; run once more on another connection if the server had dropped this one."""
        import psycopg

        try:
            return await self._fetch(sql, params)
        except psycopg.OperationalError:
            pass  # the pool discards a broken connection when it is given back
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
