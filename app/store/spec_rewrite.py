"""Rewriting every stored job spec in a migration: a page of specs at a time, so a long job history need not fit in
memory, and only the rows that change are written."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import sqlalchemy as sa

JOBS = sa.table("jobs", sa.column("seq", sa.Integer), sa.column("spec", sa.JSON))


def rewrite_specs(conn: sa.Connection, rewrite: Callable[[Any], Any], page: int = 500) -> None:
    """Store ``rewrite(spec)`` for every job whose spec it changes."""
    last = -1
    while True:
        rows = conn.execute(sa.select(JOBS.c.seq, JOBS.c.spec).where(JOBS.c.seq > last).order_by(JOBS.c.seq)
                            .limit(page)).all()
        if not rows:
            return
        for seq, spec in rows:
            new = rewrite(spec)
            if new != spec:
                conn.execute(JOBS.update().where(JOBS.c.seq == seq).values(spec=new))
        last = rows[-1][0]


def with_training_setting(spec: Any, key: str, value: Any, methods: tuple[str, ...]) -> Any:
    """``spec`` with ``restoration.<key>`` set to ``value`` where its method (one of ``methods``, those that train at
    the migration's revision) names none; else unchanged."""
    r = spec.get("restoration") if isinstance(spec, dict) else None
    if not isinstance(r, dict) or r.get("method", "restorelcc") not in methods or key in r:
        return spec
    return {**spec, "restoration": {**r, key: value}}
