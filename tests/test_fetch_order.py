"""The newest fetch of a call wins (README, load semantics): when two runs fetch one call and
commit in the opposite order of their fetches, the stored row and the call's status stay those
of the newer fetch, and each run still counts what it got. Real databases and real processes,
no mocks."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import psycopg
import pytest
from helpers import RouteServer, answer, etl_env, run_etl
from sqlalchemy import Engine, select
from sqlalchemy.engine import URL

from etl import runs
from etl.load import Loader
from etl.outcome import FAILED, NOT_FOUND, OK, Outcome
from etl.schema import calls, etl_call_status, etl_runs
from etl.simulator import DEFAULT_ACCESS_TOKEN, DEFAULT_TENANT_ID
from etl.transform import transform

OLDER_AT = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)
NEWER_AT = OLDER_AT + timedelta(seconds=30)
NO_COUNTS = {"loaded": 0, "not_found": 0, "failed": 0, "warnings": 0}
# How the statement that writes a batch's statuses starts (etl.load._status_block), the
# first of a batch's statements on a call: pg_stat_activity shows it waiting for a lock.
STATUS_WRITE = "DO $etl$"


# -- helpers -----------------------------------------------------------------------------------


def payload(n: int, call_id: str = "call-x") -> dict[str, Any]:
    """The answer to the n-th request for a call: every column differs from one to the next."""
    return {"callId": call_id, "callType": n % 3, "phoneNumber": f"03-0000-000{n}",
            "callDateTime": f"2026-11-02T08:0{n}:00Z", "talkTime": 60 * n,
            "connectResult": str(n), "checkPoint": f"point {n}", "note": f"fetch {n}"}


def start_run(engine: Engine) -> str:
    """A run row for a Loader to count into (what `etl sync` inserts before its first batch)."""
    run_id = f"run-{time.monotonic_ns()}"
    with engine.begin() as conn:
        conn.execute(etl_runs.insert().values(run_id=run_id, started_at=datetime.now(UTC),
                                              status=runs.RunStatus.RUNNING, warnings=0))
    return run_id


def ok(body: dict[str, Any], fetched_at: datetime) -> Outcome:
    return Outcome(body["callId"], OK, payload=body, http_status=200, attempts=1,
                   fetched_at=fetched_at)


def aware(row: Any) -> dict[str, Any]:
    """A row as a dict, SQLite's naive datetimes made UTC."""
    return {k: (v.replace(tzinfo=UTC) if isinstance(v, datetime) and v.tzinfo is None else v)
            for k, v in dict(row).items()}


def stored_call(engine: Engine, call_id: str = "call-x") -> dict[str, Any] | None:
    with engine.connect() as conn:
        row = conn.execute(select(calls).where(calls.c.call_id == call_id)).mappings().first()
    return aware(row) if row is not None else None


def expected_call(body: dict[str, Any], fetched_at: datetime, run_id: str) -> dict[str, Any]:
    """The calls row a fetch of `body` leaves: every column, raw included."""
    row = transform(body, call_id=body["callId"], fetched_at=fetched_at, run_id=run_id).call
    return {c.name: row[c.name] for c in calls.columns}


def status_of(engine: Engine, call_id: str = "call-x") -> dict[str, Any]:
    with engine.connect() as conn:
        return aware(conn.execute(select(etl_call_status)
                                  .where(etl_call_status.c.call_id == call_id)).mappings().one())


def counters(engine: Engine, run_id: str) -> dict[str, int]:
    with engine.connect() as conn:
        run = conn.execute(select(etl_runs).where(etl_runs.c.run_id == run_id)).mappings().one()
    return {name: run[name] for name in NO_COUNTS}


def counts(**changes: int) -> dict[str, int]:
    return {**NO_COUNTS, **changes}


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def conninfo(url: URL) -> str:
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


def waiting_on_a_lock(watcher: psycopg.Connection, statement: str) -> bool:
    """Whether a session of this database waits for a lock in a statement starting so."""
    return watcher.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND wait_event_type = 'Lock' AND query LIKE %s", (statement + "%",)).fetchone()[0] > 0


def load_behind_a_held_batch(engine: Engine, url: URL, held: tuple[str, list[Outcome]],
                             late: tuple[str, list[Outcome]]
                             ) -> tuple[dict[str, int], dict[str, int]]:
    """Two loads interleaved, each (run id, batch): the `held` batch writes its calls and
    statuses and is then held at its run's counters (a lock on its etl_runs row); the `late`
    batch starts then, and once its status write waits for the held batch's status rows, the
    held batch goes on. The counts of both loads, the held one's first."""
    (held_run, held_batch), (late_run, late_batch) = held, late
    # The pool is left last, so that a failure releases the lock before waiting for threads.
    with (ThreadPoolExecutor(2) as pool,
          psycopg.connect(conninfo(url), autocommit=True) as watcher,
          psycopg.connect(conninfo(url)) as lock):
        lock.execute("SELECT 1 FROM etl_runs WHERE run_id = %s FOR UPDATE", (held_run,))
        first = pool.submit(Loader(engine, held_run).load, held_batch)
        wait_for(lambda: waiting_on_a_lock(watcher, "UPDATE etl_runs"), "the held batch")
        second = pool.submit(Loader(engine, late_run).load, late_batch)
        wait_for(lambda: waiting_on_a_lock(watcher, STATUS_WRITE),
                 "the late batch's status write")
        lock.rollback()
        return first.result(timeout=60), second.result(timeout=60)


# -- two loaders, one call -------------------------------------------------------------------


@pytest.mark.parametrize("newer_first", [True, False], ids=["newer-commits-first",
                                                            "older-commits-first"])
def test_the_newer_fetch_stays_whichever_run_commits_last(engine: Engine,
                                                          newer_first: bool) -> None:
    older_run, newer_run = start_run(engine), start_run(engine)
    older = (Loader(engine, older_run), ok(payload(1), OLDER_AT))
    newer = (Loader(engine, newer_run), ok(payload(2), NEWER_AT))
    results = {}
    for loader, outcome in ([newer, older] if newer_first else [older, newer]):
        results[loader.run_id] = loader.load([outcome])

    assert stored_call(engine) == expected_call(payload(2), NEWER_AT, newer_run)
    status = status_of(engine)
    assert (status["status"], status["run_id"]) == ("loaded", newer_run)
    # Each run counts what it got, whichever fetch stayed.
    assert results == {newer_run: counts(loaded=1), older_run: counts(loaded=1)}
    assert counters(engine, newer_run) == counters(engine, older_run) == counts(loaded=1)


def test_the_newest_of_several_fetches_in_one_batch_wins(engine: Engine) -> None:
    run_id = start_run(engine)
    batch = [ok(payload(2), NEWER_AT), ok(payload(3), NEWER_AT + timedelta(seconds=1)),
             ok(payload(1), OLDER_AT)]
    assert Loader(engine, run_id).load(batch) == counts(loaded=3)
    assert stored_call(engine) == expected_call(payload(3), NEWER_AT + timedelta(seconds=1),
                                                run_id)


def test_fetch_times_with_an_offset_compare_as_instants(engine: Engine) -> None:
    # 18:00:10+09:00 is 09:00:10 UTC: after OLDER_AT, before NEWER_AT (as text it would be
    # after both).
    tokyo = datetime.fromisoformat("2026-11-02T18:00:10+09:00")
    first, second, third = start_run(engine), start_run(engine), start_run(engine)
    Loader(engine, first).load([ok(payload(2), NEWER_AT)])
    Loader(engine, second).load([ok(payload(1), tokyo)])
    assert stored_call(engine) == expected_call(payload(2), NEWER_AT, first)
    Loader(engine, third).load([ok(payload(3), OLDER_AT)])
    assert stored_call(engine) == expected_call(payload(2), NEWER_AT, first)


# Outcomes older than the stored fetch: a 404, a fetch that failed, an answer not a call.
OLDER_OUTCOMES = {
    "not-found": lambda: Outcome("call-x", NOT_FOUND, http_status=404, attempts=1,
                                 fetched_at=OLDER_AT),
    "failed": lambda: Outcome("call-x", FAILED, http_status=500, attempts=5,
                              error="HTTP 500 (gave up after 5 attempts)", fetched_at=OLDER_AT),
    "bad-payload": lambda: ok({"callId": "call-x", "talkTime": "not a number"}, OLDER_AT),
}


@pytest.mark.parametrize("kind", OLDER_OUTCOMES)
def test_an_older_404_or_failure_leaves_a_newer_load_and_its_status(engine: Engine,
                                                                    kind: str) -> None:
    newer_run, older_run = start_run(engine), start_run(engine)
    Loader(engine, newer_run).load([ok(payload(2), NEWER_AT)])
    before = status_of(engine)

    outcome = OLDER_OUTCOMES[kind]()
    got = Loader(engine, older_run).load([outcome])
    assert stored_call(engine) == expected_call(payload(2), NEWER_AT, newer_run)
    assert status_of(engine) == before
    # The run still counts what it got: its own failure or 404.
    expected = counts(not_found=1) if outcome.status == NOT_FOUND else counts(failed=1)
    assert got == expected
    assert counters(engine, older_run) == expected


def test_a_404_without_a_time_gives_way_only_to_a_fetch_after_its_batch(engine: Engine) -> None:
    # A 404 carries no fetch time: it happened before its batch reached the loader, so only a
    # call fetched after that is known to be newer (a concurrent run's; here a time ahead).
    stored_run, ahead_run, gone_run = start_run(engine), start_run(engine), start_run(engine)
    not_found = Outcome("call-x", NOT_FOUND, http_status=404, attempts=1)
    Loader(engine, stored_run).load([ok(payload(1), datetime.now(UTC) - timedelta(minutes=1))])
    Loader(engine, gone_run).load([not_found])
    assert (status_of(engine)["status"], status_of(engine)["run_id"]) == ("not_found",
                                                                          gone_run)

    ahead = datetime.now(UTC) + timedelta(minutes=1)
    Loader(engine, ahead_run).load([ok(payload(2), ahead)])
    Loader(engine, gone_run).load([not_found])
    assert (status_of(engine)["status"], status_of(engine)["run_id"]) == ("loaded", ahead_run)
    assert stored_call(engine) == expected_call(payload(2), ahead, ahead_run)


def test_a_404_recorded_while_a_newer_fetch_commits_gives_way(pg_engine: Engine,
                                                              pg_url: URL) -> None:
    # The 404's status write waits for the newer fetch's batch, which holds the call's status
    # row, and then finds that fetch's status stored: it gives way.
    older_run, newer_run = start_run(pg_engine), start_run(pg_engine)
    not_found = Outcome("call-x", NOT_FOUND, http_status=404, attempts=1, fetched_at=OLDER_AT)
    # The newer fetch's batch writes its call and status and waits at its counters.
    newer_counts, older_counts = load_behind_a_held_batch(
        pg_engine, pg_url, (newer_run, [ok(payload(2), NEWER_AT)]), (older_run, [not_found]))

    status = status_of(pg_engine)
    assert (status["status"], status["run_id"]) == ("loaded", newer_run)
    assert stored_call(pg_engine) == expected_call(payload(2), NEWER_AT, newer_run)
    assert (newer_counts, older_counts) == (counts(loaded=1), counts(not_found=1))


# -- a fetch that found the content unchanged is the newest fetch all the same ---------------
# It leaves the call's row alone (calls.fetched_at stays the time of the fetch that brought the
# content) and records its own time in etl_call_status.fetched_at: an outcome fetched before it
# but committed after it must give way, though it is newer than the row.

BROUGHT_AT = OLDER_AT - timedelta(minutes=1)  # the content is brought
BETWEEN_AT = OLDER_AT  # an outcome fetched in between, committed last
AGAIN_AT = NEWER_AT  # the same content fetched again, committed first

BETWEEN = {
    "not-found": lambda: Outcome("call-x", NOT_FOUND, http_status=404, attempts=1,
                                 fetched_at=BETWEEN_AT),
    "failed": lambda: Outcome("call-x", FAILED, http_status=500, attempts=5,
                              error="HTTP 500 (gave up after 5 attempts)",
                              fetched_at=BETWEEN_AT),
    # The source changed, and changed back before the fetch that found the content unchanged.
    "other-content": lambda: ok(payload(2), BETWEEN_AT),
}
BETWEEN_COUNTS = {"not-found": counts(not_found=1), "failed": counts(failed=1),
                  "other-content": counts(loaded=1)}


def assert_the_unchanged_load_stays(engine: Engine, brought_run: str, again_run: str) -> None:
    # The row as its content was brought; the status of the fetch that found it unchanged.
    assert stored_call(engine) == expected_call(payload(1), BROUGHT_AT, brought_run)
    status = status_of(engine)
    assert (status["status"], status["run_id"], status["fetched_at"], status["error"]) == (
        "loaded", again_run, AGAIN_AT, None)


@pytest.mark.parametrize("kind", BETWEEN)
def test_an_outcome_fetched_before_an_unchanged_load_and_committed_after_it_gives_way(
        engine: Engine, kind: str) -> None:
    brought_run, again_run, late_run = start_run(engine), start_run(engine), start_run(engine)
    Loader(engine, brought_run).load([ok(payload(1), BROUGHT_AT)])
    assert Loader(engine, again_run).load([ok(payload(1), AGAIN_AT)]) == counts(loaded=1)

    got = Loader(engine, late_run).load([BETWEEN[kind]()])

    assert_the_unchanged_load_stays(engine, brought_run, again_run)
    # The late run still counts what it got.
    assert got == counters(engine, late_run) == BETWEEN_COUNTS[kind]


@pytest.mark.parametrize("kind", BETWEEN)
def test_an_outcome_fetched_before_an_unchanged_load_waits_for_it_and_gives_way(
        pg_engine: Engine, pg_url: URL, kind: str) -> None:
    # Interleaved: the late outcome's batch starts while the unchanged load's batch, which
    # wrote no row and so locked none, holds the call's status row. The late batch waits
    # there, then finds the newer fetch's status committed and gives way: no status, and
    # (other content) no row.
    brought_run, again_run, late_run = (start_run(pg_engine) for _ in range(3))
    Loader(pg_engine, brought_run).load([ok(payload(1), BROUGHT_AT)])
    # The unchanged load's batch writes its status, then waits at its counters.
    again_counts, late_counts = load_behind_a_held_batch(
        pg_engine, pg_url, (again_run, [ok(payload(1), AGAIN_AT)]),
        (late_run, [BETWEEN[kind]()]))

    assert_the_unchanged_load_stays(pg_engine, brought_run, again_run)
    assert (again_counts, late_counts) == (counts(loaded=1), BETWEEN_COUNTS[kind])


def test_a_load_older_than_a_stored_404_brings_its_content_and_leaves_the_404(
        engine: Engine) -> None:
    # The row holds the newest content fetched; the status tells the newest fetch. So a late
    # load with other content, fetched after the stored row's and before the 404, writes its
    # row but not its status (the 404's time is known: etl_call_status.fetched_at).
    brought_run, gone_run, late_run = start_run(engine), start_run(engine), start_run(engine)
    Loader(engine, brought_run).load([ok(payload(1), BROUGHT_AT)])
    Loader(engine, gone_run).load([Outcome("call-x", NOT_FOUND, http_status=404, attempts=1,
                                           fetched_at=AGAIN_AT)])

    assert Loader(engine, late_run).load([ok(payload(2), BETWEEN_AT)]) == counts(loaded=1)

    assert stored_call(engine) == expected_call(payload(2), BETWEEN_AT, late_run)
    status = status_of(engine)
    assert (status["status"], status["run_id"], status["fetched_at"]) == (
        "not_found", gone_run, AGAIN_AT)
    # An older load still brings nothing: the row holds newer content.
    Loader(engine, start_run(engine)).load([ok(payload(3), BROUGHT_AT)])
    assert stored_call(engine) == expected_call(payload(2), BETWEEN_AT, late_run)
    assert status_of(engine) == status


# -- two `etl sync` processes, the first to fetch committing last ----------------------------


class Api:
    """A commubo API in a thread for three ids: `call-a` answers the same call every time,
    `call-b` a different one to each request (`payload(n)` for the n-th), and `call-c` 404 to
    the first request, then `payload(n)`. `requests` counts the requests per id."""

    def __init__(self, route_server: Callable[..., RouteServer]) -> None:
        self.requests: dict[str, int] = {}
        self._guard = threading.Lock()
        self.url = route_server(self._route).url

    def _route(self, h: BaseHTTPRequestHandler, call_id: str) -> None:
        with self._guard:
            n = self.requests[call_id] = self.requests.get(call_id, 0) + 1
        body = self.answer(call_id, n)
        answer(h, 200 if body is not None else 404,
               json.dumps(body).encode() if body is not None else b"{}",
               ("Content-Type", "application/json"))

    @staticmethod
    def answer(call_id: str, n: int) -> dict[str, Any] | None:
        if call_id == "call-a":
            return payload(1, "call-a")
        if call_id == "call-c" and n == 1:
            return None
        return payload(n, call_id)


@pytest.fixture
def api(route_server) -> Api:
    return Api(route_server)


def test_a_sync_that_fetched_first_and_commits_last_leaves_the_newer_fetches(
        api: Api, pg_engine: Engine, pg_url: URL, fast_config: Path, tmp_path: Path) -> None:
    env = etl_env(None, pg_url, COMMUBO_BASE_URL=api.url, COMMUBO_TENANT_ID=DEFAULT_TENANT_ID,
                  COMMUBO_ACCESS_TOKEN=DEFAULT_ACCESS_TOKEN)
    first_ids, second_ids = tmp_path / "first.txt", tmp_path / "second.txt"
    first_ids.write_text("call-a\ncall-b\ncall-c\n")
    second_ids.write_text("call-b\ncall-c\n")
    # call-a is stored, so that a lock on its status row can hold the first sync's batch: a
    # batch writes its statuses first, in key order, so it waits at call-a before it touches
    # call-b or call-c. It is stored with other content than the API answers, so that the
    # first sync's fetch writes the row too.
    Loader(pg_engine, start_run(pg_engine)).load([ok(payload(0, "call-a"), datetime.now(UTC))])

    with (psycopg.connect(conninfo(pg_url), autocommit=True) as watcher,
          psycopg.connect(conninfo(pg_url)) as lock):
        lock.execute("SELECT 1 FROM etl_call_status WHERE call_id = %s FOR UPDATE", ("call-a",))
        first = subprocess.Popen(
            [sys.executable, "-m", "etl", "sync", "--config", str(fast_config), "--ids-file",
             str(first_ids), "--json"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_for(lambda: waiting_on_a_lock(watcher, STATUS_WRITE)
                     or first.poll() is not None, "the first sync's batch")
            assert first.poll() is None, first.stderr.read() if first.stderr else ""
            # It holds the first fetches of call-b and call-c (a 404), not yet committed.
            assert api.requests == {"call-a": 1, "call-b": 1, "call-c": 1}
            assert stored_call(pg_engine, "call-b") is None

            second = run_etl("sync", "--config", str(fast_config), "--ids-file",
                             str(second_ids), "--json", env=env)
            assert second.returncode == 0, second.stderr
            second_run = json.loads(second.stdout)["run_id"]
            assert api.requests == {"call-a": 1, "call-b": 2, "call-c": 2}
            # The second sync fetched later and committed first; the first still waits.
            assert stored_call(pg_engine, "call-b")["run_id"] == second_run
            assert waiting_on_a_lock(watcher, STATUS_WRITE)
        finally:
            lock.rollback()
            stdout, stderr = first.communicate(timeout=120)
    assert first.returncode == 0, stderr
    summary = json.loads(stdout)
    first_run = summary["run_id"]

    # The first sync's batch did commit (it still waited when the second sync had ended)...
    assert stored_call(pg_engine, "call-a")["run_id"] == first_run
    assert status_of(pg_engine, "call-a")["run_id"] == first_run
    # ...and the newer fetches stayed, rows and statuses; each run counts what it got.
    for call_id in ("call-b", "call-c"):
        row = stored_call(pg_engine, call_id)
        assert row == expected_call(payload(2, call_id), row["fetched_at"], second_run)
        status = status_of(pg_engine, call_id)
        assert (status["status"], status["run_id"]) == ("loaded", second_run)
    assert counters(pg_engine, first_run) == counts(loaded=2, not_found=1)
    assert counters(pg_engine, second_run) == counts(loaded=2)
    assert {k: summary[k] for k in NO_COUNTS} == counts(loaded=2, not_found=1)
