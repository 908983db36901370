"""`etl.sync.run_sync` end to end: the simulator over HTTP into a real database."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from helpers import (
    Warehouse,
    expected_warehouse,
    lost_ids,
    make_settings,
    stale_entities,
    stored_warehouse,
)
from sqlalchemy import Engine, func, select
from sqlalchemy.engine import URL

from etl import db
from etl.config import Secret
from etl.errors import AuthError, Interrupted
from etl.schema import DATA_TABLES, calls, etl_call_status, etl_runs
from etl.simulator import Simulator, payload_for
from etl.sync import StopRequest, SyncSummary, run_sync
from etl.transform import strip_nul

# -- helpers -----------------------------------------------------------------------------------


@pytest.fixture
def engine_for() -> Iterator:
    engines: list[Engine] = []

    def make(url: URL) -> Engine:
        engines.append(db.make_engine(url))
        return engines[-1]

    yield make
    for e in engines:
        e.dispose()


def ids(start: int, stop: int) -> list[str]:
    return [f"call-{n:06d}" for n in range(start, stop)]


def utc(value: Any) -> Any:
    if isinstance(value, datetime) and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def table(engine: Engine, t, drop: tuple[str, ...] = ()) -> dict[Any, dict[str, Any]]:
    """A table keyed by its primary key, SQLite's naive datetimes made aware."""
    key = [c.name for c in t.primary_key.columns]
    with engine.connect() as conn:
        rows = conn.execute(select(t)).mappings().all()
    return {(r[key[0]] if len(key) == 1 else tuple(r[k] for k in key)):
            {k: utc(v) for k, v in r.items() if k not in drop} for r in rows}


def dump(engine: Engine) -> dict[str, dict]:
    return {t.name: table(engine, t, drop=("fetched_at", "run_id")) for t in DATA_TABLES}


def status_of(engine: Engine) -> dict[str, str]:
    with engine.connect() as conn:
        return dict(conn.execute(select(etl_call_status.c.call_id, etl_call_status.c.status)
                                 ).all())


def assert_summary_matches_bookkeeping(engine: Engine, summary: SyncSummary) -> None:
    with engine.connect() as conn:
        run = conn.execute(select(etl_runs).where(etl_runs.c.run_id == summary.run_id)
                           ).mappings().one()
        by_status = dict(conn.execute(
            select(etl_call_status.c.status, func.count())
            .where(etl_call_status.c.run_id == summary.run_id)
            .group_by(etl_call_status.c.status)).all())
    for name in ("status", "requested", "loaded", "not_found", "failed", "skipped"):
        assert run[name] == getattr(summary, name), name
    assert run["finished_at"] is not None
    assert by_status.get("loaded", 0) == summary.loaded
    assert by_status.get("not_found", 0) == summary.not_found
    assert by_status.get("failed", 0) == summary.failed


def assert_warehouse_holds(db_url: URL, want: Warehouse) -> None:
    """Every id as `expected_warehouse` says: each servable id stored as its transformed
    payload, each 404 recorded not_found; no other call stored."""
    got = stored_warehouse(db_url)
    assert lost_ids(want, got) == []
    assert set(got.calls) == set(want.calls)


def assert_newest_snapshots(db_url: URL, want: Warehouse) -> None:
    """Each customer (with its phone numbers) and operator at its newest snapshot."""
    assert stale_entities(want, stored_warehouse(db_url)) == []


# -- the happy path ----------------------------------------------------------------------------


def test_every_servable_id_is_loaded_as_the_transform_of_its_payload(
        sim: Simulator, any_db_url: URL, engine_for) -> None:
    call_ids = [*ids(1, 121), "nf-1", "nf-2"]
    want = expected_warehouse(call_ids)
    servable = len(want.calls)
    assert 0 < servable < 120  # the simulator's ~3% of 404s are among these ids
    with_nul = [i for i in call_ids if "\x00" in ((payload_for(i) or {}).get("note") or "")]
    assert with_nul  # and some of its notes with U+0000, which must be stripped

    summary = run_sync(make_settings(sim, any_db_url), call_ids)

    assert (summary.status, summary.requested, summary.loaded, summary.not_found,
            summary.failed, summary.skipped) == (
        "succeeded", 122, servable, 122 - servable, 0, 0)
    assert summary.exit_code == 0
    assert_warehouse_holds(any_db_url, want)
    assert_newest_snapshots(any_db_url, want)
    engine = engine_for(any_db_url)
    assert_summary_matches_bookkeeping(engine, summary)
    # The raw payload is what was served, U+0000 stripped.
    stored = table(engine, calls)
    assert {k: v["raw"] for k, v in stored.items()} == {
        k: strip_nul(payload_for(k)) for k in stored}
    for call_id in with_nul:
        assert stored[call_id]["note"] == payload_for(call_id)["note"].replace("\x00", "")


def test_duplicate_ids_are_fetched_once(sim: Simulator, pg_url: URL) -> None:
    summary = run_sync(make_settings(sim, pg_url), ["call-000001", "call-000001", "call-000002",
                                                     "call-000001"])
    assert summary.requested == 2
    assert sim.requests_for("call-000001") == 1


def test_second_run_changes_nothing_in_the_data_tables(
        sim: Simulator, pg_url: URL, engine_for) -> None:
    call_ids = [*ids(1, 101), "nf-1", "poison-1"]
    first = run_sync(make_settings(sim, pg_url), call_ids)
    engine = engine_for(pg_url)
    before = dump(engine)
    assert len(before["calls"]) == first.loaded > 90

    second = run_sync(make_settings(sim, pg_url), call_ids)

    assert dump(engine) == before
    assert (second.loaded, second.not_found, second.failed) == (
        first.loaded, first.not_found, first.failed)
    # Nothing changed: the rows name the run that brought their content, the statuses the
    # last fetch.
    assert set(table(engine, calls)[k]["run_id"] for k in before["calls"]) == {first.run_id}
    assert set(table(engine, etl_call_status)[k]["run_id"] for k in before["calls"]) == {
        second.run_id}


def test_everything_loads_despite_random_faults(pg_url: URL, engine_for) -> None:
    call_ids = ids(1, 151)
    want = expected_warehouse(call_ids, seed=1)
    with Simulator(fault_rate=0.1, seed=1, retry_after_s=1) as sim:
        summary = run_sync(make_settings(sim, pg_url, concurrency=8, max_attempts=6), call_ids)
        requests = sim.total_requests

    assert summary.failed == 0
    assert summary.loaded == len(want.calls)
    assert requests > len(call_ids) + 5  # faults were injected, and retried
    assert_warehouse_holds(pg_url, want)
    assert_newest_snapshots(pg_url, want)
    assert_summary_matches_bookkeeping(engine_for(pg_url), summary)


def test_newest_snapshot_wins_across_two_runs(sim: Simulator, pg_url: URL, engine_for) -> None:
    # Wide ranges: about a third of customers change during the quarter (the simulator).
    first_ids, second_ids = ids(1, 1001), ids(1001, 2001)
    newest_a = expected_warehouse(first_ids).customers
    newest_b = expected_warehouse(second_ids).customers
    # The test needs customers whose newest snapshot came in the first run and an older one
    # in the second, and the other way round.
    shared = newest_a.keys() & newest_b.keys()
    first_wins = [c for c in shared
                  if newest_a[c]["updated_date_time"] > newest_b[c]["updated_date_time"]]
    assert len(first_wins) > 10
    assert len(shared) - len(first_wins) > 10

    run_sync(make_settings(sim, pg_url), first_ids)
    run_sync(make_settings(sim, pg_url), second_ids)

    want = expected_warehouse(first_ids + second_ids)
    assert_newest_snapshots(pg_url, want)
    assert_warehouse_holds(pg_url, want)


# -- skip, retry -------------------------------------------------------------------------------


def test_skip_loaded_fetches_only_ids_not_loaded_yet(
        sim: Simulator, pg_url: URL, engine_for) -> None:
    call_ids = [*ids(1, 41), "nf-1", "broken-1"]
    first = run_sync(make_settings(sim, pg_url), call_ids)
    loaded = [i for i, s in status_of(engine_for(pg_url)).items() if s == "loaded"]
    assert len(loaded) == first.loaded > 30
    sim.reset_counts()

    new_ids = ids(41, 51)
    second = run_sync(make_settings(sim, pg_url), call_ids + new_ids, skip_loaded=True)

    assert second.requested == len(call_ids) + 10
    assert second.skipped == len(loaded)
    assert second.loaded + second.not_found + second.failed == len(call_ids) + 10 - len(loaded)
    assert all(sim.requests_for(i) == 0 for i in loaded)
    assert sim.requests_for("nf-1") == 1  # only `loaded` is skipped
    assert sim.requests_for("broken-1") > 0
    assert all(sim.requests_for(i) >= 1 for i in new_ids)
    assert_summary_matches_bookkeeping(engine_for(pg_url), second)


def test_retry_failed_refetches_ids_that_failed_before(
        sim: Simulator, pg_url: URL, engine_for) -> None:
    # Fails its first 6 requests: 5 attempts in the first run, loaded in the second.
    flaky = "e503-6-retry"
    first = run_sync(make_settings(sim, pg_url), [flaky, *ids(1, 11)])
    assert first.failed == 1
    assert status_of(engine_for(pg_url))[flaky] == "failed"

    second = run_sync(make_settings(sim, pg_url), ids(11, 16), retry_failed=True)

    assert second.requested == 6
    assert second.failed == 0
    assert status_of(engine_for(pg_url))[flaky] == "loaded"
    assert sim.requests_for(flaky) == 7
    assert table(engine_for(pg_url), calls)[flaky]["raw"] == payload_for(flaky)


def test_without_retry_failed_a_failed_id_not_listed_is_left_alone(
        sim: Simulator, pg_url: URL) -> None:
    run_sync(make_settings(sim, pg_url), ["broken-1", *ids(1, 5)])
    before = sim.requests_for("broken-1")
    run_sync(make_settings(sim, pg_url), ids(5, 10))
    assert sim.requests_for("broken-1") == before


# -- bad records -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("poisoned", "reason"),
    [
        ("poison-1", "talkTime"),
        ("bigint-1", "out of range"),
        ("wrongid-1", "callId"),
        ("nocallid-1", "no callId"),
        ("badjson-1", "not JSON"),
        ("array-1", "not a JSON object"),
        ("broken-1", "HTTP 500"),
    ],
)
def test_poisoned_record_fails_alone_while_its_batch_loads(
        sim: Simulator, pg_url: URL, engine_for, poisoned: str, reason: str) -> None:
    good = ids(1, 31)
    want = expected_warehouse(good)
    summary = run_sync(make_settings(sim, pg_url, batch_size=100), [*good[:15], poisoned,
                                                                    *good[15:]])

    assert summary.failed == 1
    assert summary.status == "partial"
    assert summary.exit_code == 1
    engine = engine_for(pg_url)
    with engine.connect() as conn:
        status = conn.execute(select(etl_call_status).where(
            etl_call_status.c.call_id == poisoned)).mappings().one()
    assert status["status"] == "failed"
    assert reason in status["error"]
    assert poisoned not in table(engine, calls)
    assert_warehouse_holds(pg_url, want)
    assert_summary_matches_bookkeeping(engine, summary)


def test_summary_counts_equal_the_bookkeeping_tables(
        sim: Simulator, any_db_url: URL, engine_for) -> None:
    call_ids = [*ids(1, 61), "nf-1", "nf-2", "broken-1", "poison-1", "e500-2-x", "cut-1-x"]
    summary = run_sync(make_settings(sim, any_db_url, batch_size=7), call_ids)
    engine = engine_for(any_db_url)
    servable = sum(1 for i in ids(1, 61) if payload_for(i) is not None)
    assert (summary.loaded, summary.failed, summary.not_found) == (
        servable + 2, 2, 60 - servable + 2)
    assert_summary_matches_bookkeeping(engine, summary)


# -- stopping ----------------------------------------------------------------------------------


def test_a_stop_commits_every_outcome_fetched_before_it(pg_url: URL, engine_for) -> None:
    """The outcomes waiting for the loader when a stop comes are committed, not only those
    already in a batch: the main thread is held in the first `advance` until every worker
    has handed over its ordinary ids and hangs on a trickling one, then asks to stop."""
    ordinary = ids(1, 41)
    trickling = [f"trickle-{n}" for n in range(1, 5)]  # one per worker: each then hangs
    stop = StopRequest()

    class StopOnceAllWereFetched:
        def start(self, total: int) -> None:
            pass

        def advance(self, n: int, summary: SyncSummary) -> None:
            if stop.requested:
                return
            deadline = time.monotonic() + 30
            while (sum(simulator.requests_for(i) > 0 for i in trickling) < len(trickling)
                   and time.monotonic() < deadline):
                time.sleep(0.02)
            time.sleep(0.2)  # the last ordinary outcomes are put before a trickle is asked
            stop.stop("stopped by the test")

        def close(self) -> None:
            pass

    with Simulator(trickle_s=1) as simulator:
        settings = make_settings(simulator, pg_url, concurrency=4, batch_size=1000,
                                 timeout_s=60)
        with pytest.raises(Interrupted) as caught:
            run_sync(settings, [*ordinary, *trickling], progress=StopOnceAllWereFetched(),
                     stop=stop)

    summary = caught.value.summary
    statuses = status_of(engine_for(pg_url))
    assert all(simulator.requests_for(i) == 1 for i in ordinary)
    assert sorted(statuses) == ordinary  # every fetched id committed, no trickling one
    assert summary.loaded + summary.not_found == len(ordinary)
    assert summary.status == "interrupted"


# -- authentication ----------------------------------------------------------------------------


def test_forbidden_stops_the_run_with_auth_error(
        sim: Simulator, pg_url: URL, engine_for) -> None:
    settings = make_settings(sim, pg_url, access_token=Secret("wrong-token"), concurrency=4)
    with pytest.raises(AuthError) as caught:
        run_sync(settings, ids(1, 301))

    summary = caught.value.summary
    assert summary.status == "failed"
    assert summary.loaded == 0
    assert sim.total_requests <= 2 * settings.concurrency
    assert "wrong-token" not in str(caught.value)
    with engine_for(pg_url).connect() as conn:
        run = conn.execute(select(etl_runs)).mappings().one()
    assert (run["run_id"], run["status"]) == (summary.run_id, "failed")
    assert run["finished_at"] is not None
