"""The pipeline, as a library call: `run_sync(settings, ids) -> SyncSummary`.

The CLI and the Airflow operator are thin faces over this function.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from itertools import chain
from typing import Protocol

from sqlalchemy import Engine, select
from sqlalchemy.exc import SQLAlchemyError

from . import db, runs
from .config import _MAX_RPS_RANGE, Settings, display_url, require_api, validate
from .errors import (
    DatabaseError,
    ExitCode,
    FatalError,
    InputError,
    Interrupted,
    RemoteConfigError,
)
from .extract import Extractor, RelatedCalls, StoredLinks
from .ids import is_valid_call_id, select_shard
from .load import Loader
from .logs import log_context, shard_label
from .outcome import FAILED, NOT_FOUND, CallStatus, Outcome
from .schema import calls, etl_call_status

log = logging.getLogger(__name__)

# A partial batch is committed after this long, so a slow (rate-capped) run still makes
# durable progress and a kill loses little work.
FLUSH_INTERVAL_S = 5.0
# How often the pipeline looks for a stop request while no outcome arrives.
_TICK_S = 0.25
# A run whose every answer is a 404 is suspicious (a base URL that is not the API's) once this
# many ids answered so, or at its end with at least _NOT_FOUND_AT_END of them: a handful of
# ids that truly do not exist should not fail a run.
NOT_FOUND_SUSPECT = 50
_NOT_FOUND_AT_END = 5
# How many links `--follow-related` follows from a call of the ids file by default.
DEFAULT_RELATED_DEPTH = 5
# Ids per IN (...) list when looking up stored calls.
_LOOKUP_CHUNK = 5000


@dataclass
class SyncSummary:
    """The run summary of docs/design.md §3.3 (`etl sync --json`)."""

    run_id: str
    status: str
    requested: int  # the ids asked for (the ids file's, and --retry-failed's)
    # Calls fetched because a fetched call derives from them (--follow-related). They count
    # in loaded, not_found and failed like any other fetch, so a run that completes has
    # requested + related == loaded + not_found + failed + skipped.
    related: int = 0
    loaded: int = 0
    not_found: int = 0
    failed: int = 0
    skipped: int = 0  # ids asked for and not fetched, stored as loaded already (--skip-loaded)
    warnings: int = 0  # calls loaded with values outside what the API doc allows
    duration_s: float = 0.0
    calls_per_s: float = 0.0
    database: str = ""  # where it wrote, the password masked
    api: str = ""  # where it fetched from
    # Fields the API sent that the API doc does not list (kept in calls.raw): schema drift.
    unknown_fields: list[str] = field(default_factory=list)

    @property
    def processed(self) -> int:
        return self.loaded + self.not_found + self.failed

    @property
    def exit_code(self) -> int:
        return ExitCode.IDS_FAILED if self.failed else ExitCode.OK

    def to_dict(self) -> dict:
        return asdict(self)


class StopRequest:
    """Asks a running sync to stop at its next safe point: requests in flight are cut off,
    what was already fetched is committed, and the run is recorded as `interrupted`.

    `stop` only sets attributes, so a signal handler may call it (a lock or an Event could
    deadlock against the main thread it interrupts), and so may another thread (Airflow's
    `on_kill`). The pipeline looks at it at least every quarter second."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self.exit_code: int = ExitCode.INTERRUPTED

    def stop(self, reason: str, exit_code: int = ExitCode.INTERRUPTED) -> None:
        if self.reason is None:
            self.exit_code = exit_code
            self.reason = reason

    @property
    def requested(self) -> bool:
        return self.reason is not None


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
    stop: StopRequest | None = None,
    shard: tuple[int, int] | None = None,
    follow_related: bool = False,
    related_depth: int = DEFAULT_RELATED_DEPTH,
) -> SyncSummary:
    """Fetch `ids` from the API and load them into `settings.database_url`.

    Returns the summary (its `exit_code` is 0 or 1). Raises InputError (exit 2) for bad ids or
    configuration before any request, and FatalError (exit 3) when the API refuses the
    credentials or the database becomes unreachable; such an error carries `.summary` when a
    run had started. What was committed stays committed. With `stop`, the caller can ask the
    run to end early; it then raises Interrupted (exit 130 or 143) after recording the run.
    `shard` (index, count) keeps `retry_failed` to the failed ids of that shard (`ids` are
    the caller's to select).

    With `follow_related`, the calls that fetched calls derive from (`relatedCallId`) are
    fetched too, transitively, up to `related_depth` links from an id of `ids` (1: only the
    calls they name), each id once; with `skip_loaded`, those stored as loaded are not
    fetched again (`extract.RelatedCalls`). A shard follows the chains of its own ids wherever
    they lead: a related id may hash to another shard, and is then fetched by each shard whose
    calls lead to it, which is harmless (the newest fetch of a call wins).

    Every record logged during the run, also by its worker threads, carries the fields
    `run_id` and, with `shard`, `shard` ("3/8" for index 2 of 8; `etl.logs`), so that the
    lines of one run can be picked out of a shared log.
    """
    run_id = runs.new_run_id()
    fields = {"run_id": run_id}
    if shard is not None:
        fields["shard"] = shard_label(*shard)
    with log_context(**fields):
        return _run_sync(settings, ids, run_id, skip_loaded=skip_loaded,
                         retry_failed=retry_failed, migrate=migrate, progress=progress,
                         engine=engine, stop=stop, shard=shard, follow_related=follow_related,
                         related_depth=related_depth)


def _run_sync(settings: Settings, ids: Iterable[str], run_id: str, *, skip_loaded: bool,
              retry_failed: bool, migrate: bool, progress: Progress | None,
              engine: Engine | None, stop: StopRequest | None, shard: tuple[int, int] | None,
              follow_related: bool, related_depth: int) -> SyncSummary:
    validate(settings)
    require_api(settings)
    ids = _checked(ids)
    if follow_related and (isinstance(related_depth, bool) or not isinstance(related_depth, int)
                           or related_depth < 1):
        raise InputError(f"the related depth must be a positive integer, got {related_depth!r}")
    own_engine = engine is None
    engine = engine or db.make_engine(settings.database_url)
    progress = progress or _NoProgress()
    extractor = Extractor(settings)
    # Fetching needs no database: unless the ids to fetch depend on what is stored, the
    # workers start now and fill their bounded queue while the schema is checked or
    # upgraded (with Alembic's import, the slowest part of a start).
    early = not (skip_loaded or retry_failed)
    related: RelatedCalls | None = None
    try:
        # Before any request: a database that cannot be reached (exit 3), or that this role
        # cannot write to, or a stale schema under --no-migrate (exit 2), must not cost the
        # API a single call.
        db.preflight(engine, migrate)
        started = time.monotonic()
        if early:
            # Following related ids needs no database either, without --skip-loaded.
            related = RelatedCalls(ids, related_depth) if follow_related else None
            extractor.start(ids, related.after if related else None)
        if migrate:
            db.upgrade(engine)
        runs.mark_abandoned(engine)
        if retry_failed:
            failed = runs.all_ids_with_status(engine, FAILED)
            if shard is not None:
                failed = select_shard(failed, *shard)
            known = set(ids)
            ids = ids + [i for i in failed if i not in known]
        todo = ids
        done: set[str] = set()
        if skip_loaded:
            done = runs.ids_with_status(engine, CallStatus.LOADED, ids)
            todo = [i for i in ids if i not in done]
        found: list[str] = []
        if follow_related and not early:
            related = RelatedCalls(ids, related_depth,
                                   _stored_links(engine) if skip_loaded else None)
            # The chains of the calls skipped as loaded go on from what is stored with them.
            found = related.after_stored(list(done))
        recorder = runs.RunRecorder(engine, run_id)
        summary = SyncSummary(recorder.run_id, runs.RunStatus.RUNNING, requested=len(ids),
                              skipped=len(ids) - len(todo),
                              database=display_url(settings.database_url),
                              api=settings.base_url or "")
        try:
            recorder.start(summary.requested, summary.skipped)
        except Exception as exc:
            raise DatabaseError(f"cannot record the run: {db.describe_db_error(exc, engine.url)}"
                                ) from None
        log.info("run %s: %d ids requested, %d skipped as already loaded; from %s into %s",
                 summary.run_id, summary.requested, summary.skipped, summary.api,
                 summary.database)
        if not early:
            started = time.monotonic()
            extractor.start(chain(todo, found), related.after if related else None)
        # The total is what was asked for: how many related calls there are is not known yet.
        progress.start(len(todo))
        _pipeline(settings, engine, extractor, recorder, summary, progress, started,
                  stop or StopRequest(), related)
        return summary
    finally:
        extractor.close()
        progress.close()
        if own_engine:
            engine.dispose()


def shard_rate(max_rps: float, num_shards: int) -> float:
    """The request rate cap of one shard when `num_shards` processes (or Airflow tasks) share
    `max_rps`, the cap for all of them together: `max_rps / num_shards`. 0 (no cap) stays 0.

    Below the lowest cap the settings allow (0.1 per second: `config._MAX_RPS_RANGE`) each
    shard gets 0.1, so that the shards together may send up to `num_shards * 0.1` requests a
    second, more than `max_rps`; a warning says so. The alternative, refusing to run, would
    fail a scheduled job over a rate that only matters to a tiny API quota.
    """
    if num_shards < 1:
        raise InputError(f"the number of shards must be at least 1, got {num_shards}")
    if max_rps == 0 or num_shards == 1:
        return max_rps
    each = max_rps / num_shards
    low = _MAX_RPS_RANGE[0]
    if each < low:
        log.warning("max rps %g shared by %d shards would be %g each, below the lowest cap of "
                    "%g: each shard sends up to %g requests/s, together up to %g", max_rps,
                    num_shards, each, low, low, low * num_shards)
        return low
    log.info("max rps %g shared by %d shards: %g each", max_rps, num_shards, each)
    return each


def _stored_links(engine: Engine) -> StoredLinks:
    """For --skip-loaded --follow-related: of some ids, those stored as loaded, each with the
    related id its stored call names (asked by the workers, for the related ids they reach)."""
    joined = etl_call_status.outerjoin(calls, calls.c.call_id == etl_call_status.c.call_id)
    query = select(etl_call_status.c.call_id, calls.c.related_call_id).select_from(joined)

    def lookup(call_ids: list[str]) -> dict[str, str | None]:
        found: dict[str, str | None] = {}
        try:
            with engine.connect() as conn:
                for start in range(0, len(call_ids), _LOOKUP_CHUNK):
                    found.update(conn.execute(query.where(
                        etl_call_status.c.status == CallStatus.LOADED,
                        etl_call_status.c.call_id.in_(call_ids[start:start + _LOOKUP_CHUNK]),
                    )).all())
        except SQLAlchemyError as exc:
            # In a worker: an EtlError stops the run as a database failure (exit 3).
            raise DatabaseError("cannot look up the stored related calls: "
                                f"{db.describe_db_error(exc, engine.url)}") from None
        return found

    return lookup


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


def _pipeline(settings: Settings, engine: Engine, extractor: Extractor,
              recorder: runs.RunRecorder, summary: SyncSummary, progress: Progress,
              started: float, stop: StopRequest, related: RelatedCalls | None = None) -> None:
    loader = Loader(engine, summary.run_id)
    held = _HoldBack(engine, settings)
    batch: list[Outcome] = []
    last_flush = time.monotonic()

    def flush() -> None:
        nonlocal batch, last_flush
        if batch:
            counts = loader.load(batch)
            summary.loaded += counts.get(CallStatus.LOADED, 0)
            summary.not_found += counts.get(NOT_FOUND, 0)
            summary.failed += counts.get(FAILED, 0)
            summary.warnings += counts.get("warnings", 0)
            if related is not None:  # counted as the loader counts: once committed
                summary.related += sum(related.is_related(o.call_id) for o in batch)
            _timing(summary, started)
            batch = []
            new = loader.unknown_fields.difference(summary.unknown_fields)
            if new:
                summary.unknown_fields = sorted(loader.unknown_fields)
                log.warning("the API sent fields this version does not know (kept in "
                            "calls.raw; has the vendor added them?): %s", ", ".join(sorted(new)))
        last_flush = time.monotonic()

    try:
        for outcome in extractor.results(tick_s=_TICK_S):
            if stop.requested:
                # What was fetched before the stop is committed: this outcome and those
                # waiting in the queue (only the requests in flight are given up).
                for fetched in [outcome, *extractor.drain()]:
                    if fetched is not None:
                        batch.extend(held.admit(fetched))
                break
            if outcome is not None:
                batch.extend(held.admit(outcome))
                # The display counts the ids asked for: a related call moves no count.
                progress.advance(0 if related and related.is_related(outcome.call_id) else 1,
                                 summary)
            if len(batch) >= settings.batch_size or (
                batch and time.monotonic() - last_flush >= FLUSH_INTERVAL_S
            ):
                flush()
        if not stop.requested:
            batch.extend(held.finish())
        flush()
    except (FatalError, RemoteConfigError) as exc:
        # Stopped by a 403 or an unreachable API (what was fetched before is still worth
        # keeping), by answers that show a wrong base URL (the 404s held back are not), or by
        # the database (nothing more can be written): record what we can, then re-raise.
        if not isinstance(exc, DatabaseError):
            _try(flush)
        _end(recorder, summary, started, runs.RunStatus.FAILED, str(exc))
        exc.summary = summary
        raise
    except BaseException as exc:
        # A second Ctrl-C or SIGTERM (the first asks politely, below), or a bug.
        extractor.stop()
        if isinstance(exc, KeyboardInterrupt):
            _end(recorder, summary, started, runs.RunStatus.INTERRUPTED, "interrupted at once")
        else:
            _end(recorder, summary, started, runs.RunStatus.FAILED, f"{type(exc).__name__}: {exc}")
        raise
    if stop.requested:
        _end(recorder, summary, started, runs.RunStatus.INTERRUPTED, stop.reason)
        interrupted = Interrupted(f"{stop.reason}: run {summary.run_id} stopped, what was "
                                  "committed stays committed", stop.exit_code)
        interrupted.summary = summary
        raise interrupted
    _timing(summary, started)
    summary.status = runs.RunStatus.PARTIAL if summary.failed else runs.RunStatus.SUCCEEDED
    try:
        recorder.finish(summary.status,
                        f"{summary.failed} id(s) failed" if summary.failed else None,
                        summary.related)
    except Exception as exc:
        raise DatabaseError(
            f"cannot record the end of run {summary.run_id}: "
            f"{db.describe_db_error(exc, engine.url)}") from None
    log.info("run %s %s: %d loaded, %d not found, %d failed, %d skipped in %.1fs",
             summary.run_id, summary.status, summary.loaded, summary.not_found, summary.failed,
             summary.skipped, summary.duration_s)
    if related is not None:
        log.info("run %s: %d related calls fetched (counted above), %d more not fetched as "
                 "they were loaded already", summary.run_id, summary.related, related.skipped)


class _HoldBack:
    """Holds back outcomes that may be the configuration's fault rather than the ids'.

    - Failures with no answer at all (refused, DNS, timeouts), until some request gets an
      answer: if the circuit breaker then stops the run, the API was unreachable and none of
      them is recorded, so calls loaded before do not turn `failed`.
    - 404s, while every answer of the run is a 404: a base URL that is not the API's (a path
      too many, another service on that host) answers 404 for every id; recorded, the run
      would report success and calls loaded before would become `not_found`. Once
      NOT_FOUND_SUSPECT of them are for ids not already stored as `not_found` (those are
      expected to answer 404 again, as in a rerun), or at the end of a run with at least
      _NOT_FOUND_AT_END such, the run stops with a configuration error and records none."""

    def __init__(self, engine: Engine, settings: Settings) -> None:
        self._engine = engine
        self._base_url = settings.base_url
        self._unanswered: list[Outcome] = []
        self._unchecked: list[Outcome] = []  # 404s not yet looked up
        self._suspects: list[Outcome] = []  # 404s for ids not stored as not_found
        self._only_404s = True

    def admit(self, outcome: Outcome) -> list[Outcome]:
        """The outcomes to load now."""
        if outcome.status == FAILED and outcome.http_status is None:
            self._unanswered.append(outcome)
            return []
        released, self._unanswered = self._unanswered, []
        if not self._only_404s:
            return [*released, outcome]
        if outcome.status == NOT_FOUND:
            self._unchecked.append(outcome)
            # Looked up in blocks; once suspects near the threshold, at each new 404.
            if len(self._unchecked) + len(self._suspects) >= NOT_FOUND_SUSPECT:
                released += self._check(NOT_FOUND_SUSPECT)
            return released
        self._only_404s = False
        held = self._suspects + self._unchecked
        self._suspects, self._unchecked = [], []
        return [*released, *held, outcome]

    def finish(self) -> list[Outcome]:
        """At the end of the run: raises for a suspicious run, else what is still held."""
        released, self._unanswered = self._unanswered, []
        if self._only_404s:
            released += self._check(_NOT_FOUND_AT_END)
            released += self._suspects
            self._suspects = []
        return released

    def _check(self, threshold: int) -> list[Outcome]:
        """Look the unchecked 404s up; raise past `threshold` suspects; release the others."""
        known = runs.ids_with_status(self._engine, NOT_FOUND,
                                     [o.call_id for o in self._unchecked])
        released = [o for o in self._unchecked if o.call_id in known]
        self._suspects += [o for o in self._unchecked if o.call_id not in known]
        self._unchecked = []
        if len(self._suspects) >= threshold:
            raise RemoteConfigError(
                f"every id answered so far was 404 Not Found ({len(self._suspects)} not known "
                f"as not found before): check the base URL (COMMUBO_BASE_URL or "
                f"api.base_url, now {self._base_url}); none of these 404s was recorded")
        return released


def _end(recorder: runs.RunRecorder, summary: SyncSummary, started: float, status: str,
         error: str | None) -> None:
    """Record how a run that did not complete ended (best effort: the error that stopped it
    is what gets reported)."""
    _timing(summary, started)
    summary.status = status
    _try(lambda: recorder.finish(status, error, summary.related))


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
