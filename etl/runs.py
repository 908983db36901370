"""Run bookkeeping: `etl_runs` rows and per-call `etl_call_status` queries."""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import Engine, func, select, update
from sqlalchemy.engine import Connection

from .schema import etl_call_status, etl_runs
from .text import printable

log = logging.getLogger(__name__)



class RunStatus(StrEnum):
    """The status of a run in etl_runs (and of its summary)."""

    RUNNING = "running"
    SUCCEEDED = "succeeded"  # every id loaded or not found
    PARTIAL = "partial"  # ran to the end, some ids failed
    FAILED = "failed"  # stopped by an error (a 403, the database gone, ...)
    # Stopped by a signal (Ctrl-C, SIGTERM) or by its caller, after committing what it fetched.
    INTERRUPTED = "interrupted"
    # Recorded as running, but its process is gone (kill -9, OOM killer, a lost node).
    ABANDONED = "abandoned"

COUNTERS = ("loaded", "not_found", "failed")
# A live run refreshes its heartbeat with every committed batch and at least this often...
HEARTBEAT_S = 30.0
# ...so a running run whose heartbeat is older than this has no live process behind it. Ten
# missed beats: a database that stalls for a while does not bury a live run.
ABANDONED_AFTER_S = 300.0
HOST = socket.gethostname()
# Ids per IN (...) list when looking up statuses of a large ids file.
_LOOKUP_CHUNK = 5000


def new_run_id(now: datetime | None = None) -> str:
    """Sortable and readable: 20261125T120000Z-3f9a1c."""
    now = now or datetime.now(UTC)
    return f"{now:%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


class RunRecorder:
    """One run's row in `etl_runs` from start to finish: the only code that writes it.

    `start` inserts it as running with this host and process id; a heartbeat thread refreshes
    `heartbeat_at` every HEARTBEAT_S (the loader also does with each committed batch, see
    `add_counts`); `finish` stores the final status and, for a run that did not succeed, why.
    """

    def __init__(self, engine: Engine, run_id: str) -> None:
        self.engine = engine
        self.run_id = run_id
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, requested: int, skipped: int) -> None:
        now = datetime.now(UTC)
        with self.engine.begin() as conn:
            conn.execute(etl_runs.insert().values(
                run_id=self.run_id, started_at=now, status=RunStatus.RUNNING, requested=requested,
                loaded=0, not_found=0, failed=0, skipped=skipped, warnings=0, related=0,
                host=HOST, pid=os.getpid(), heartbeat_at=now,
            ))
        self._thread = threading.Thread(target=self._beat, daemon=True, name="run-heartbeat")
        self._thread.start()

    def finish(self, status: str, error: str | None = None, related: int = 0) -> None:
        """Store the final status, the reason a run did not succeed, and how many related
        calls it fetched. Raises what the database raises: the caller decides whether that
        matters more than the run's own error."""
        self._stop.set()
        with self.engine.begin() as conn:
            conn.execute(update(etl_runs).where(etl_runs.c.run_id == self.run_id).values(
                status=status, finished_at=datetime.now(UTC), related=related,
                error=printable(error, 1000) if error else None))

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                with self.engine.begin() as conn:
                    conn.execute(update(etl_runs).where(
                        etl_runs.c.run_id == self.run_id, etl_runs.c.status == RunStatus.RUNNING,
                    ).values(heartbeat_at=datetime.now(UTC)))
            except Exception as exc:  # noqa: BLE001 - the batches report database trouble
                log.debug("heartbeat not recorded: %s", type(exc).__name__)


def add_counts(conn: Connection, run_id: str, counts: dict[str, int]) -> None:
    """Add to the run's counters inside the caller's transaction, so they match the data;
    a committed batch is also a heartbeat."""
    # coalesce: `warnings` is NULL in rows that started before migration 0002.
    values = {name: func.coalesce(etl_runs.c[name], 0) + n for name, n in counts.items() if n}
    conn.execute(update(etl_runs).where(etl_runs.c.run_id == run_id).values(
        heartbeat_at=datetime.now(UTC), **values))


def mark_abandoned(engine: Engine, now: datetime | None = None) -> list[str]:
    """Store as `abandoned` every running run with no live process behind it: on this host,
    its process is gone; anywhere, its heartbeat is older than ABANDONED_AFTER_S. Returns
    their ids. Rows from before heartbeats (NULL) count by their start time."""
    now = now or datetime.now(UTC)
    with engine.connect() as conn:
        running = conn.execute(select(
            etl_runs.c.run_id, etl_runs.c.host, etl_runs.c.pid, etl_runs.c.heartbeat_at,
            etl_runs.c.started_at).where(etl_runs.c.status == RunStatus.RUNNING)).all()
    gone: dict[str, str] = {}
    for run_id, host, pid, beat, started in running:
        last = _aware(beat or started)
        if host == HOST and pid is not None and not _alive(pid):
            gone[run_id] = f"its process (pid {pid} on {host}) is gone"
        elif now - last > timedelta(seconds=ABANDONED_AFTER_S):
            gone[run_id] = f"no heartbeat since {last:%Y-%m-%d %H:%M:%S} UTC"
    for run_id, why in gone.items():
        with engine.begin() as conn:
            # Only if still running: the run may have finished since it was read.
            conn.execute(update(etl_runs).where(
                etl_runs.c.run_id == run_id, etl_runs.c.status == RunStatus.RUNNING,
            ).values(status=RunStatus.ABANDONED, error=f"abandoned: {why}"))
    return sorted(gone)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def recent_runs(engine: Engine, limit: int = 20) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        rows = conn.execute(
            select(etl_runs).order_by(etl_runs.c.started_at.desc()).limit(limit)
        ).mappings()
        return [dict(r) for r in rows]


def failures(engine: Engine, run_id: str | None = None, limit: int | None = None,
             warnings: bool = False) -> list[dict[str, Any]]:
    """Ids whose last status is failed; with `warnings`, ids loaded with warnings instead."""
    query = select(etl_call_status).where(
        etl_call_status.c.warnings.is_not(None) if warnings
        else etl_call_status.c.status == "failed")
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
