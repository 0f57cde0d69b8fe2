"""SQLAlchemy tables of the job store: jobs, events, artifacts, idempotency keys.

The schema is owned by the Alembic migrations in ``app/migrations``; keep the two in step.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

MAX_SEQ = 2**31 - 1  # the seq columns are Integer: 32 bits on PostgreSQL


class UTCDateTime(TypeDecorator):
    """Timezone-aware UTC datetimes on every backend (SQLite stores naive values)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


class Job(Base):
    __tablename__ = "jobs"

    # seq orders jobs (newest first) and backs the list cursor; id is the public identifier.
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(36), unique=True, nullable=False)
    tenant: Mapped[str] = mapped_column(String(128), nullable=False)
    status: Mapped[str] = mapped_column(String(16), nullable=False)
    stage: Mapped[str | None] = mapped_column(String(16))
    progress: Mapped[float] = mapped_column(Float, nullable=False, default=0.0)
    progress_message: Mapped[str] = mapped_column(Text, nullable=False, default="")
    spec: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False, default=dict)
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    retries: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    worker: Mapped[str | None] = mapped_column(String(255))
    run_after: Mapped[datetime | None] = mapped_column(UTCDateTime())
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    retry_of: Mapped[str | None] = mapped_column(String(36), index=True)  # the job this one retries
    checkpoint_bytes: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)  # kept to resume from
    plan: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # memory plan (app.plan): submit, then worker
    queue: Mapped[str | None] = mapped_column(String(64))  # the worker queue it is sent to (None: the default)
    priority: Mapped[int] = mapped_column(Integer, nullable=False, default=5)  # 0-9, higher first
    held: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)  # waits for its tenant's running quota
    output: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # where the result was handed off to

    __table_args__ = (
        Index("ix_jobs_tenant_seq", "tenant", "seq"),
        Index("ix_jobs_status", "status"),
        Index("ix_jobs_tenant_status", "tenant", "status"),
    )


class Event(Base):
    __tablename__ = "events"

    # A global sequence: ordered, unique, race-free; the per-job order is the order of seq.
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(36), ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False)
    kind: Mapped[str] = mapped_column(String(32), nullable=False)
    stage: Mapped[str | None] = mapped_column(String(16))
    data: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False, default=utcnow)

    __table_args__ = (Index("ix_events_job_seq", "job_id", "seq"),)


class Artifact(Base):
    __tablename__ = "artifacts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(36), ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False)
    name: Mapped[str] = mapped_column(String(1024), nullable=False)
    size: Mapped[int] = mapped_column(BigInteger, nullable=False)
    sha256: Mapped[str] = mapped_column(String(64), nullable=False)
    key: Mapped[str] = mapped_column(String(2048), nullable=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False, default=utcnow)

    __table_args__ = (UniqueConstraint("job_id", "name", name="uq_artifacts_job_name"),)


class Delivery(Base):
    """One webhook event of a job (an outbox row written in the transaction of the change it announces), with
    every attempt to deliver it. ``state``: pending → delivered | failed (given up)."""

    __tablename__ = "deliveries"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)  # per-job order
    id: Mapped[str] = mapped_column(String(36), unique=True, nullable=False)  # Restorelcc-Delivery, same on retries
    job_id: Mapped[str] = mapped_column(String(36), ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False)
    tenant: Mapped[str] = mapped_column(String(128), nullable=False)
    event: Mapped[str] = mapped_column(String(32), nullable=False)
    url: Mapped[str] = mapped_column(Text, nullable=False)
    payload: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False)
    state: Mapped[str] = mapped_column(String(16), nullable=False, default="pending")
    attempts: Mapped[list[dict[str, Any]]] = mapped_column(JSON, nullable=False, default=list)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False, default=utcnow)
    claimed_until: Mapped[datetime | None] = mapped_column(UTCDateTime())
    claim: Mapped[str | None] = mapped_column(String(36))  # who holds it: only that sender may record its attempt
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    __table_args__ = (
        Index("ix_deliveries_job_seq", "job_id", "seq"),
        Index("ix_deliveries_state_due", "state", "next_attempt_at"),
    )


# How an idempotency key's request hash is made. 1: before RestoreLCC's default objective changed (revision 0007);
# 2: since. A key is compared in the way it was stored (app.store.jobs.request_digests).
HASH_VERSION = 2


class IdempotencyKey(Base):
    __tablename__ = "idempotency"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant: Mapped[str] = mapped_column(String(128), nullable=False)
    key: Mapped[str] = mapped_column(String(255), nullable=False)
    request_hash: Mapped[str] = mapped_column(String(64), nullable=False)
    # how request_hash was made (app.store.jobs.request_digests); rows stored before revision 0007 are version 1
    hash_version: Mapped[int] = mapped_column(Integer, nullable=False, default=HASH_VERSION, server_default="1")
    job_id: Mapped[str] = mapped_column(String(36), ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False, default=utcnow)

    __table_args__ = (UniqueConstraint("tenant", "key", name="uq_idempotency_tenant_key"),)
