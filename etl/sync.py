"""The pipeline, as a library call: `run_sync(settings, ids) -> SyncSummary`.

The CLI and the Airflow operator are thin faces over this function.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Protocol

from sqlalchemy import Engine

from . import db, runs
from .config import Settings, require_api
from .errors import DatabaseError, FatalError, InputError
from .extract import Extractor
from .ids import is_valid_call_id
from .load import LOADED, Loader
from .outcome import Outcome

log = logging.getLogger(__name__)

# A partial batch is committed after this long, so a slow (rate-capped) run still makes
# durable progress and a kill loses little work.
FLUSH_INTERVAL_S = 5.0


@dataclass
class SyncSummary:
    """The run summary of SPEC section 3 (`etl sync --json`)."""

    run_id: str
    status: str
    requested: int
    loaded: int = 0
    not_found: int = 0
    failed: int = 0
    skipped: int = 0
    duration_s: float = 0.0
    calls_per_s: float = 0.0

    @property
    def processed(self) -> int:
        return self.loaded + self.not_found + self.failed

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0

    def to_dict(self) -> dict:
        return asdict(self)


class Progress(Protocol):
    """What a progress display gets told; the CLI draws a bar or logs lines."""

    def start(self, total: int) -> None: ...
    def advance(self, n: int, summary: SyncSummary) -> None: ...
    def close(self) -> None: ...


class _NoProgress:
    def start(self, total: int) -> None:
        pass

    def advance(self, n: int, summary: SyncSummary) -> None:
        pass

    def close(self) -> None:
        pass


def run_sync(
    settings: Settings,
    ids: Iterable[str],
    *,
    skip_loaded: bool = False,
    retry_failed: bool = False,
    migrate: bool = True,
    progress: Progress | None = None,
    engine: Engine | None = None,
) -> SyncSummary:
    """Fetch `ids` from the API and load them into `settings.database_url`.

    Returns the summary (its `exit_code` is 0 or 1). Raises InputError (exit 2) for bad ids or
    configuration before any request, and FatalError (exit 3) when the API refuses the
    credentials or the database becomes unreachable; such an error carries `.summary` when a
    run had started. What was committed stays committed.
    """
    require_api(settings)
    ids = _checked(ids)
    own_engine = engine is None
    engine = engine or db.make_engine(settings.database_url)
    progress = progress or _NoProgress()
    extractor = Extractor(settings)
    # Fetching needs no database: unless the ids to fetch depend on what is stored, the
    # workers start now and fill their bounded queue while the schema is checked or
    # upgraded (with Alembic's import, the slowest part of a start).
    early = not (skip_loaded or retry_failed)
    try:
        # Before any request: an unreachable database is exit 3, a stale schema under
        # --no-migrate exit 2, and neither should cost the API a single call.
        if migrate:
            db.check_reachable(engine)
        else:
            db.check_current(engine)
        started = time.monotonic()
        if early:
            extractor.start(ids)
        if migrate:
            db.upgrade(engine)
        if retry_failed:
            known = set(ids)
            ids = ids + [i for i in runs.all_ids_with_status(engine, "failed") if i not in known]
        todo = ids
        if skip_loaded:
            done = runs.ids_with_status(engine, LOADED, ids)
            todo = [i for i in ids if i not in done]
        run_id = runs.new_run_id()
        try:
            runs.start_run(engine, run_id, requested=len(ids), skipped=len(ids) - len(todo))
        except Exception as exc:
            raise DatabaseError(f"cannot record the run: {db.describe_db_error(exc, engine.url)}"
                                ) from None
        summary = SyncSummary(run_id, runs.RUNNING, requested=len(ids),
                              skipped=len(ids) - len(todo))
        log.info("run %s: %d ids requested, %d skipped as already loaded", run_id,
                 summary.requested, summary.skipped)
        if not early:
            started = time.monotonic()
            extractor.start(todo)
        progress.start(len(todo))
        _pipeline(settings, engine, extractor, summary, progress, started)
        return summary
    finally:
        extractor.close()
        progress.close()
        if own_engine:
            engine.dispose()


def _checked(ids: Iterable[str]) -> list[str]:
    if not isinstance(ids, list):
        ids = list(ids)
    # A list that is already unique (as read_ids returns) is used as is: a copy would double
    # the memory the ids take for the whole run.
    unique = ids if len(set(ids)) == len(ids) else list(dict.fromkeys(ids))
    bad = [i for i in unique if not isinstance(i, str) or not is_valid_call_id(i)]
    if bad:
        shown = ", ".join(repr(b)[:70] for b in bad[:5])
        raise InputError(f"{len(bad)} invalid call id(s): {shown} (1 to 64 characters of "
                         "A-Z a-z 0-9 _ -)")
    return unique


def _pipeline(settings: Settings, engine: Engine, extractor: Extractor, summary: SyncSummary,
              progress: Progress, started: float) -> None:
    loader = Loader(engine, summary.run_id)
    batch: list[Outcome] = []
    last_flush = time.monotonic()

    def flush() -> None:
        nonlocal batch, last_flush
        if batch:
            counts = loader.load(batch)
            summary.loaded += counts.get(LOADED, 0)
            summary.not_found += counts.get("not_found", 0)
            summary.failed += counts.get("failed", 0)
            _timing(summary, started)
            batch = []
        last_flush = time.monotonic()

    try:
        for outcome in extractor.results(tick_s=1.0):
            if outcome is not None:
                batch.append(outcome)
                progress.advance(1, summary)
            if len(batch) >= settings.batch_size or (
                batch and time.monotonic() - last_flush >= FLUSH_INTERVAL_S
            ):
                flush()
        flush()
    except FatalError as exc:
        # Stopped by a 403 (what was fetched before it is still worth keeping) or by the
        # database (nothing more can be written): record what we can, then re-raise.
        if not isinstance(exc, DatabaseError):
            _try(flush)
        _timing(summary, started)
        summary.status = runs.FAILED
        _try(lambda: runs.finish_run(engine, summary.run_id, runs.FAILED))
        exc.summary = summary  # type: ignore[attr-defined]
        raise
    except BaseException:
        extractor.stop()
        _timing(summary, started)
        summary.status = runs.FAILED
        _try(lambda: runs.finish_run(engine, summary.run_id, runs.FAILED))
        raise
    _timing(summary, started)
    summary.status = runs.PARTIAL if summary.failed else runs.SUCCEEDED
    try:
        runs.finish_run(engine, summary.run_id, summary.status)
    except Exception as exc:
        raise DatabaseError(
            f"cannot record the end of run {summary.run_id}: "
            f"{db.describe_db_error(exc, engine.url)}") from None
    log.info("run %s %s: %d loaded, %d not found, %d failed, %d skipped in %.1fs",
             summary.run_id, summary.status, summary.loaded, summary.not_found, summary.failed,
             summary.skipped, summary.duration_s)


def _timing(summary: SyncSummary, started: float) -> None:
    summary.duration_s = round(time.monotonic() - started, 3)
    summary.calls_per_s = (round(summary.processed / summary.duration_s, 1)
                           if summary.duration_s > 0 else 0.0)


def _try(step) -> None:
    """Best-effort bookkeeping on the way out of a failed run: its own failure is logged, and
    the error that stopped the run is the one reported."""
    try:
        step()
    except Exception as exc:  # noqa: BLE001 - the original error matters more
        log.warning("could not record the failed run: %s", str(exc).splitlines()[0][:200])
