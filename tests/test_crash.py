"""Crash safety (docs/design.md §5.10): a sync killed with SIGKILL at any moment, or whose database
connections are terminated under it, loses nothing that was committed, and running the same
command again leaves exactly the rows of an uninterrupted run.

Each test runs `python -m etl sync` as a process against a simulator with some latency,
interrupts it, reruns it, and compares the five data tables and the call statuses with a
reference database loaded by one uninterrupted run (`fetched_at` and `run_id` aside). Moments
that matter are made certain rather than hoped for: to kill a process while a batch
transaction is open, the test holds a lock that the batch needs and kills the process once
PostgreSQL shows it waiting with rows already written.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from helpers import (
    Warehouse,
    etl_env,
    expected_warehouse,
    fresh_database,
    run_etl,
    stored_warehouse,
)
from sqlalchemy import create_engine, inspect
from sqlalchemy.engine import URL

from etl.db import MIGRATION_LOCK_KEY
from etl.simulator import Simulator
from etl.testing import inconsistencies

CALL_IDS = [*(f"crash-{n:04d}" for n in range(300)), "nf-crash", "poison-crash", "broken-crash"]
CONFIG = ("[api]\nbackoff_s = 0.01\nmax_backoff_s = 0.05\ntimeout_s = 5\nmax_attempts = 3\n"
          "concurrency = 4\n\n[sync]\nbatch_size = 20\n")
APP = "commubo-etl"  # the application_name of etl's database sessions


@dataclass
class Reference:
    warehouse: Warehouse
    exit_code: int


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("crash")
    (path / "etl.toml").write_text(CONFIG)
    (path / "ids.txt").write_text("\n".join(CALL_IDS) + "\n")
    return path


@pytest.fixture(scope="module")
def api() -> Iterator[Simulator]:
    """12 ms per answer, so a run lasts long enough to be interrupted anywhere."""
    with Simulator(latency_ms=12) as simulator:
        yield simulator


@pytest.fixture(scope="module")
def reference(pg_server: URL, api: Simulator, workdir: Path) -> Iterator[Reference]:
    """The same command, never interrupted, in a database of its own."""
    with fresh_database(pg_server, "etl_crash") as url:
        proc = run_etl(*sync_args(workdir), env=etl_env(api, url))
        assert proc.returncode == 1, proc.stderr  # poison-crash and broken-crash fail
        warehouse = stored_warehouse(url)
    # The reference itself is what the simulator serves, so a shared bug cannot hide.
    assert warehouse == expected_warehouse(CALL_IDS, failing=["broken-crash"])
    yield Reference(warehouse, proc.returncode)


def sync_args(workdir: Path, *extra: str) -> list[str]:
    return ["sync", "--config", str(workdir / "etl.toml"), "--ids-file",
            str(workdir / "ids.txt"), "--json", *extra]


def start_sync(workdir: Path, api: Simulator, db_url: URL) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "etl", *sync_args(workdir)],
                            env=etl_env(api, db_url), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def kill(proc: subprocess.Popen[str]) -> None:
    assert proc.poll() is None, "the run ended before the kill: the test proves nothing"
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def libpq(url: URL) -> str:
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


def wait_for(condition: Callable[[], object], what: str, timeout_s: float = 30) -> object:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(0.005)
    raise AssertionError(f"timed out waiting for {what}")


class Watcher:
    """An autocommit session beside the sync: what its sessions are doing, and how far the
    committed work has come."""

    def __init__(self, url: URL) -> None:
        self.conn = psycopg.connect(libpq(url), autocommit=True)
        self.database = url.database

    def committed(self) -> int:
        try:
            return self.conn.execute("SELECT count(*) FROM etl_call_status").fetchone()[0]
        except psycopg.errors.UndefinedTable:
            return 0

    def run_started(self) -> bool:
        """Whether a run's row is in etl_runs: the schema is made and fetching begins."""
        try:
            return self.conn.execute("SELECT count(*) FROM etl_runs").fetchone()[0] > 0
        except psycopg.errors.UndefinedTable:
            return False

    def sessions(self) -> list[tuple[int, str, str | None, bool]]:
        """(pid, state, wait_event_type, has written in its open transaction) of etl's
        sessions on this database."""
        return self.conn.execute(
            "SELECT pid, state, wait_event_type, backend_xid IS NOT NULL FROM pg_stat_activity"
            " WHERE datname = %s AND application_name = %s", (self.database, APP)).fetchall()

    def blocked_writers(self) -> list[int]:
        return [pid for pid, _, wait, wrote in self.sessions() if wait == "Lock" and wrote]

    def terminate(self, pid: int) -> bool:
        return self.conn.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone()[0]

    def close(self) -> None:
        self.conn.close()


class TableLock:
    """Holds `LOCK TABLE calls IN EXCLUSIVE MODE`: a batch then writes scenarios, customers,
    phone numbers and operators, and waits at its insert into calls, its transaction open."""

    def __init__(self, url: URL) -> None:
        self.conn = psycopg.connect(libpq(url))
        self.conn.execute("LOCK TABLE calls IN EXCLUSIVE MODE")

    def release(self) -> None:
        self.conn.rollback()
        self.conn.close()


def assert_batches_were_atomic(url: URL) -> None:
    """Whatever was committed came whole: a call row exactly where a `loaded` status is, and
    every invariant of the loader holds (`etl.testing.inconsistencies`: versions, runs'
    counters). Every kill of these tests lands after the run started, so the schema is there
    and this always checks something."""
    engine = create_engine(url)
    try:
        assert inspect(engine).has_table("calls"), "killed before the schema was made"
    finally:
        engine.dispose()
    got = stored_warehouse(url)
    assert set(got.calls) == {i for i, s in got.statuses.items() if s == "loaded"}
    assert {k: n for k, n in inconsistencies(url).items() if n} == {}


def assert_rerun_equals_the_reference(reference: Reference, workdir: Path, api: Simulator,
                                      url: URL, *extra: str) -> None:
    """The same command run again (with `extra`) ends as the uninterrupted run did, and leaves
    exactly its rows."""
    again = run_etl(*sync_args(workdir, *extra), env=etl_env(api, url))
    assert "Traceback" not in again.stderr
    assert again.returncode == reference.exit_code, again.stderr
    assert stored_warehouse(url) == reference.warehouse


# -- SIGKILL -----------------------------------------------------------------------------------

# Seconds after the run started (its etl_runs row is committed, the schema made, fetching
# about to begin), seeded so that a failure can be replayed. Counted from the start of the
# process instead, the earliest moment fell into the interpreter's start-up, where nothing is
# written and the atomicity check had nothing to check. A run cannot end before 300 ids x
# 12 ms / 4 workers = 0.9 s of answers after its row, so every moment falls inside it:
# fetching, loading, committing. (Kills while starting or upgrading: the upgrade test below.)
_rng = random.Random(20261125)
RANDOM_MOMENTS = sorted(round(_rng.uniform(0.0, 0.8), 2) for _ in range(3))


@pytest.mark.parametrize(
    ("moment_s", "rerun_flags"),
    [pytest.param(s, flags, id=f"run-start-plus-{s:.2f}s{'-skip-loaded' if flags else ''}")
     for s, flags in zip(RANDOM_MOMENTS, [(), ("--skip-loaded",), ()], strict=True)],
)
def test_sync_killed_at_a_random_moment_then_rerun_equals_an_uninterrupted_run(
        pg_url: URL, api: Simulator, workdir: Path, reference: Reference, moment_s: float,
        rerun_flags: tuple[str, ...]) -> None:
    watcher = Watcher(pg_url)
    try:
        proc = start_sync(workdir, api, pg_url)
        wait_for(watcher.run_started, "the run to start (its row in etl_runs)")
        time.sleep(moment_s)
        kill(proc)
    finally:
        watcher.close()
    assert_batches_were_atomic(pg_url)

    assert_rerun_equals_the_reference(reference, workdir, api, pg_url, *rerun_flags)


def test_sync_killed_between_two_batches_then_rerun_equals_an_uninterrupted_run(
        pg_url: URL, api: Simulator, workdir: Path, reference: Reference) -> None:
    watcher = Watcher(pg_url)
    proc = start_sync(workdir, api, pg_url)
    try:
        wait_for(lambda: watcher.committed() >= 60
                 and all(state == "idle" for _, state, _, _ in watcher.sessions()),
                 "three batches committed and no transaction open")
        kill(proc)
        committed = watcher.committed()
    finally:
        watcher.close()
    assert 60 <= committed < len(CALL_IDS)
    assert_batches_were_atomic(pg_url)

    assert_rerun_equals_the_reference(reference, workdir, api, pg_url)


@pytest.mark.parametrize("rerun_flags", [(), ("--skip-loaded",)], ids=["plain", "skip-loaded"])
def test_sync_killed_inside_a_batch_transaction_leaves_nothing_of_that_batch(
        pg_url: URL, api: Simulator, workdir: Path, reference: Reference,
        rerun_flags: tuple[str, ...]) -> None:
    watcher = Watcher(pg_url)
    proc = start_sync(workdir, api, pg_url)
    try:
        wait_for(lambda: watcher.committed() >= 20, "a first batch committed")
        lock = TableLock(pg_url)
        try:
            before = watcher.committed()
            # Waiting at calls, having written customers and operators: mid-batch for sure.
            wait_for(watcher.blocked_writers, "a batch to wait on the calls table")
            kill(proc)
        finally:
            lock.release()
        # The server rolls the dead session's transaction back as soon as it runs on.
        wait_for(lambda: not watcher.sessions(), "the killed session to end")
        assert watcher.committed() == before
    finally:
        watcher.close()
    assert_batches_were_atomic(pg_url)

    assert_rerun_equals_the_reference(reference, workdir, api, pg_url, *rerun_flags)


def test_sync_killed_while_upgrading_an_empty_database_then_rerun_completes(
        pg_url: URL, api: Simulator, workdir: Path, reference: Reference) -> None:
    watcher = Watcher(pg_url)
    # Another upgrader holds the migration lock: the sync waits inside its upgrade.
    holder = psycopg.connect(libpq(pg_url), autocommit=True)
    holder.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK_KEY,))
    try:
        proc = start_sync(workdir, api, pg_url)
        wait_for(lambda: any(wait == "Lock" for _, _, wait, _ in watcher.sessions()),
                 "the sync to wait for the migration lock")
        kill(proc)
    finally:
        holder.close()
        watcher.close()

    assert_rerun_equals_the_reference(reference, workdir, api, pg_url)


# -- connections terminated under a running sync ----------------------------------------------


def test_connections_terminated_between_and_inside_batches_are_survived(
        pg_url: URL, api: Simulator, workdir: Path, reference: Reference) -> None:
    watcher = Watcher(pg_url)
    proc = start_sync(workdir, api, pg_url)
    try:
        wait_for(lambda: watcher.committed() >= 20, "a first batch committed")
        idle = wait_for(lambda: [pid for pid, state, _, _ in watcher.sessions()
                                 if state == "idle"], "an idle pooled session")
        assert all(watcher.terminate(pid) for pid in idle)
        lock = TableLock(pg_url)
        try:
            [pid] = wait_for(watcher.blocked_writers, "a batch to wait on the calls table")
            assert watcher.terminate(pid)
        finally:
            lock.release()
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        watcher.close()

    assert proc.returncode == reference.exit_code, stderr
    assert "Traceback" not in stderr
    assert "retrying the batch" in stderr  # the terminated batch was written again
    assert stored_warehouse(pg_url) == reference.warehouse
    summary = json.loads(stdout)
    with psycopg.connect(libpq(pg_url)) as conn:
        counted = conn.execute("SELECT loaded, not_found, failed, status FROM etl_runs "
                               "WHERE run_id = %s", (summary["run_id"],)).fetchone()
    # The batch whose transaction died was counted once, when it was written again.
    assert counted == (summary["loaded"], summary["not_found"], summary["failed"], "partial")


def test_database_lost_for_good_stops_with_exit_3_and_the_rerun_completes(
        pg_url: URL, api: Simulator, workdir: Path, reference: Reference) -> None:
    watcher = Watcher(pg_url)
    proc = start_sync(workdir, api, pg_url)
    terminated = 0
    try:
        wait_for(lambda: watcher.committed() >= 20, "a first batch committed")
        lock = TableLock(pg_url)
        try:
            # Every attempt at the batch (the first and its 3 retries) is terminated.
            deadline = time.monotonic() + 60
            while proc.poll() is None and time.monotonic() < deadline:
                terminated += sum(watcher.terminate(pid) for pid in watcher.blocked_writers())
                time.sleep(0.01)
        finally:
            lock.release()
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        watcher.close()

    assert proc.returncode == 3
    assert terminated == 4
    assert "Traceback" not in stderr
    [line] = [x for x in stderr.splitlines() if x.startswith("etl: error:")]
    assert "failed 4 times writing a batch" in line
    assert "terminating connection" in line
    summary = json.loads(stdout)  # what was done before the stop
    assert summary["status"] == "failed"
    assert_batches_were_atomic(pg_url)

    assert_rerun_equals_the_reference(reference, workdir, api, pg_url, "--skip-loaded")
