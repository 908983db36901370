"""Run bookkeeping: `etl_runs` rows and per-call `etl_call_status` queries."""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, select, update
from sqlalchemy.engine import Connection

from .schema import etl_call_status, etl_runs

RUNNING, SUCCEEDED, PARTIAL, FAILED = "running", "succeeded", "partial", "failed"
# Stopped by a signal (Ctrl-C, SIGTERM) or by its caller, after committing what it had fetched.
INTERRUPTED = "interrupted"
COUNTERS = ("loaded", "not_found", "failed")
# Ids per IN (...) list when looking up statuses of a large ids file.
_LOOKUP_CHUNK = 5000


def new_run_id(now: datetime | None = None) -> str:
    """Sortable and readable: 20261125T120000Z-3f9a1c."""
    now = now or datetime.now(UTC)
    return f"{now:%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


def start_run(engine: Engine, run_id: str, requested: int, skipped: int) -> None:
    with engine.begin() as conn:
        conn.execute(etl_runs.insert().values(
            run_id=run_id, started_at=datetime.now(UTC), status=RUNNING,
            requested=requested, loaded=0, not_found=0, failed=0, skipped=skipped,
        ))


def add_counts(conn: Connection, run_id: str, counts: dict[str, int]) -> None:
    """Add to the run's counters inside the caller's transaction, so they match the data."""
    values = {name: etl_runs.c[name] + n for name, n in counts.items() if n}
    if values:
        conn.execute(update(etl_runs).where(etl_runs.c.run_id == run_id).values(**values))


def finish_run(engine: Engine, run_id: str, status: str) -> None:
    with engine.begin() as conn:
        conn.execute(update(etl_runs).where(etl_runs.c.run_id == run_id).values(
            status=status, finished_at=datetime.now(UTC)))


def recent_runs(engine: Engine, limit: int = 20) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        rows = conn.execute(
            select(etl_runs).order_by(etl_runs.c.started_at.desc()).limit(limit)
        ).mappings()
        return [dict(r) for r in rows]


def failures(engine: Engine, run_id: str | None = None, limit: int | None = None
             ) -> list[dict[str, Any]]:
    query = select(etl_call_status).where(etl_call_status.c.status == "failed")
    if run_id:
        query = query.where(etl_call_status.c.run_id == run_id)
    query = query.order_by(etl_call_status.c.call_id)
    if limit:
        query = query.limit(limit)
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(query).mappings()]


def run_exists(engine: Engine, run_id: str) -> bool:
    with engine.connect() as conn:
        return conn.execute(
            select(etl_runs.c.run_id).where(etl_runs.c.run_id == run_id)
        ).first() is not None


def ids_with_status(engine: Engine, status: str, ids: Iterable[str]) -> set[str]:
    """Which of `ids` have this last status (looked up in chunks: ids files can be large)."""
    found: set[str] = set()
    with engine.connect() as conn:
        for chunk in _chunks(ids, _LOOKUP_CHUNK):
            found.update(conn.execute(
                select(etl_call_status.c.call_id).where(
                    etl_call_status.c.status == status,
                    etl_call_status.c.call_id.in_(chunk),
                )
            ).scalars())
    return found


def all_ids_with_status(engine: Engine, status: str) -> list[str]:
    with engine.connect() as conn:
        return list(conn.execute(
            select(etl_call_status.c.call_id)
            .where(etl_call_status.c.status == status)
            .order_by(etl_call_status.c.call_id)
        ).scalars())


def _chunks(items: Iterable[str], size: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
