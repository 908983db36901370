"""Runs an operator can trust: each run's row tells where it ran, that it is alive or why it
ended; exit codes say what to do; the database's problems are sorted into "fix it" (exit 2)
and "retry later" (exit 3) before a single API request."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from helpers import etl_env, fresh_database, run_etl
from sqlalchemy import create_engine, select, text, update
from sqlalchemy.engine import URL

from etl import db, runs
from etl.ids import shard_of
from etl.schema import etl_call_status, etl_runs
from etl.simulator import Simulator


def ids_file(tmp_path: Path, ids: list[str], name: str = "ids.txt") -> Path:
    path = tmp_path / name
    path.write_text("\n".join(ids) + "\n")
    return path


def run_rows(db_url: URL) -> list[dict]:
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            return [dict(r) for r in conn.execute(
                select(etl_runs).order_by(etl_runs.c.started_at)).mappings()]
    finally:
        engine.dispose()


def one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


# -- a run's life -----------------------------------------------------------------------------


def test_a_run_records_where_it_ran_and_how_it_ended(sim: Simulator, pg_url: URL,
                                                     fast_config: Path, tmp_path: Path) -> None:
    path = ids_file(tmp_path, ["call-000001", "broken-1"])
    proc = run_etl("sync", "--config", str(fast_config), "--ids-file", str(path), "--json",
                   env=etl_env(sim, pg_url))
    assert proc.returncode == 1
    [run] = run_rows(pg_url)
    assert run["status"] == "partial"
    assert run["host"] == runs.HOST
    assert isinstance(run["pid"], int) and run["pid"] != os.getpid()
    assert run["heartbeat_at"] is not None and run["heartbeat_at"] <= run["finished_at"]
    assert run["error"] == "1 id(s) failed"
    assert run["warnings"] == 0


def test_a_killed_run_shows_as_abandoned(sim: Simulator, pg_url: URL, fast_config: Path,
                                         tmp_path: Path) -> None:
    sim.latency_ms = 20
    path = ids_file(tmp_path, [f"call-{n:06d}" for n in range(1, 2001)])
    env = etl_env(sim, pg_url)
    proc = subprocess.Popen(
        [sys.executable, "-m", "etl", "sync", "--config", str(fast_config), "--ids-file",
         str(path)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any(
            r["loaded"] for r in (run_rows(pg_url) if _has_runs(pg_url) else [])):
        time.sleep(0.1)
    proc.kill()
    proc.wait(timeout=30)

    [before] = run_rows(pg_url)
    assert before["status"] == "running"  # nobody has looked yet
    shown = run_etl("runs", "--json", env=env)
    assert shown.returncode == 0, shown.stderr
    [run] = json.loads(shown.stdout)
    assert run["status"] == "abandoned"
    assert run["error"] == f"abandoned: its process (pid {proc.pid} on {runs.HOST}) is gone"
    [stored] = run_rows(pg_url)
    assert stored["status"] == "abandoned"


def _has_runs(db_url: URL) -> bool:
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            return conn.execute(text("SELECT to_regclass('etl_runs') IS NOT NULL")).scalar()
    finally:
        engine.dispose()


def test_a_run_elsewhere_is_abandoned_once_its_heartbeat_is_old(pg_url: URL) -> None:
    engine = db.make_engine(pg_url)
    db.upgrade(engine)
    now = datetime.now(UTC)
    fresh, stale, old_style = (runs.RunRecorder(engine, f"r{n}") for n in range(3))
    for recorder in (fresh, stale, old_style):
        recorder.start(requested=1, skipped=0)
        recorder._stop.set()  # no heartbeat thread: the test sets the times
    with engine.begin() as conn:
        conn.execute(update(etl_runs).values(host="another-host", pid=1))
        conn.execute(update(etl_runs).where(etl_runs.c.run_id == "r1").values(
            heartbeat_at=now - timedelta(seconds=runs.ABANDONED_AFTER_S + 1)))
        # A row from before 0002: no heartbeat, judged by its start.
        conn.execute(update(etl_runs).where(etl_runs.c.run_id == "r2").values(
            heartbeat_at=None, host=None, pid=None,
            started_at=now - timedelta(hours=2)))
    assert runs.mark_abandoned(engine, now) == ["r1", "r2"]
    with engine.connect() as conn:
        statuses = dict(conn.execute(select(etl_runs.c.run_id, etl_runs.c.status)).all())
    assert statuses == {"r0": "running", "r1": "abandoned", "r2": "abandoned"}
    engine.dispose()


def test_a_live_run_refreshes_its_heartbeat(pg_url: URL, monkeypatch) -> None:
    monkeypatch.setattr(runs, "HEARTBEAT_S", 0.1)
    engine = db.make_engine(pg_url)
    db.upgrade(engine)
    recorder = runs.RunRecorder(engine, "beating")
    recorder.start(requested=1, skipped=0)
    with engine.connect() as conn:
        first = conn.execute(select(etl_runs.c.heartbeat_at)).scalar_one()
    time.sleep(0.5)
    with engine.connect() as conn:
        later = conn.execute(select(etl_runs.c.heartbeat_at)).scalar_one()
    recorder.finish(runs.RunStatus.SUCCEEDED)
    engine.dispose()
    assert later > first


@pytest.mark.parametrize(("sig", "code", "reason"), [
    (signal.SIGTERM, 143, "stopped by SIGTERM"),
    (signal.SIGINT, 130, "interrupted by Ctrl-C"),
])
def test_a_signal_records_the_run_as_interrupted_with_its_reason(
        sim: Simulator, pg_url: URL, fast_config: Path, tmp_path: Path, sig, code,
        reason) -> None:
    sim.latency_ms = 20
    ids = [f"call-{n:06d}" for n in range(1, 3001)]
    path = ids_file(tmp_path, ids)
    env = etl_env(sim, pg_url)
    proc = subprocess.Popen(
        [sys.executable, "-m", "etl", "sync", "--config", str(fast_config), "--ids-file",
         str(path), "--json"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    deadline = time.monotonic() + 60
    while sim.total_requests < 100 and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code
    summary = json.loads(stdout)
    assert summary["status"] == "interrupted"
    [run] = run_rows(pg_url)
    assert run["status"] == "interrupted"
    assert run["error"] == reason
    # Nothing lost: the counters are the rows, and a rerun completes the work.
    engine = create_engine(pg_url)
    with engine.connect() as conn:
        stored = conn.execute(select(etl_call_status.c.call_id)).scalars().all()
    engine.dispose()
    assert run["loaded"] + run["not_found"] == len(stored) == summary["loaded"] + \
        summary["not_found"]
    again = run_etl("sync", "--config", str(fast_config), "--ids-file", str(path),
                    "--skip-loaded", "--json", env=env)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["skipped"] == len(stored) - summary["not_found"]


# -- exit codes by what the operator must do --------------------------------------------------


@pytest.fixture
def weak_role(pg_server: URL) -> Iterator[tuple[URL, str]]:
    """A database owned by the test, and a role that may log in and nothing more."""
    role = f"etl_weak_{uuid.uuid4().hex[:8]}"
    admin = create_engine(pg_server, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE ROLE "{role}" LOGIN'))
    try:
        with fresh_database(pg_server) as url:
            yield url, role
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP ROLE IF EXISTS "{role}"'))
        admin.dispose()


def test_bad_database_urls_exit_2_in_one_line_before_any_request(
        sim: Simulator, pg_url: URL, tmp_path: Path) -> None:
    path = ids_file(tmp_path, ["call-000001"])
    cases = {
        "unknown database": (pg_url.set(database="no_such_database_here"),
                             'database "no_such_database_here" does not exist'),
        "unknown role": (pg_url.set(username="no_such_role_here"),
                         'role "no_such_role_here" does not exist'),
        "psycopg2 driver": (pg_url.set(drivername="postgresql+psycopg2"),
                            "database driver 'postgresql+psycopg2' is not supported"),
        "no schema on the search_path": (
            pg_url.update_query_dict({"options": "-csearch_path=no_such_schema"}),
            "no schema of the search_path (no_such_schema) exists"),
    }
    for name, (url, said) in cases.items():
        proc = run_etl("sync", "--ids-file", str(path), env=etl_env(sim, url))
        assert proc.returncode == 2, (name, proc.stderr)
        line = one_error_line(proc)
        assert line.startswith("etl: error: ") and said in line, (name, line)
    assert sim.total_requests == 0


def test_a_role_without_privileges_exits_2_naming_them_before_any_request(
        sim: Simulator, weak_role: tuple[URL, str], tmp_path: Path) -> None:
    owner_url, role = weak_role
    url = owner_url.set(username=role, password=None)
    path = ids_file(tmp_path, ["call-000001"])

    proc = run_etl("sync", "--ids-file", str(path), env=etl_env(sim, url))
    assert proc.returncode == 2
    line = one_error_line(proc)
    assert line.startswith(f"etl: error: role {role} lacks privileges a sync needs: CREATE on "
                           "schema public to create or upgrade the tables")

    # The owner creates the schema; the role still may not write to the tables.
    assert run_etl("db", "upgrade", env=etl_env(None, owner_url)).returncode == 0
    proc = run_etl("sync", "--no-migrate", "--ids-file", str(path), env=etl_env(sim, url))
    assert proc.returncode == 2
    assert "SELECT, INSERT, UPDATE, DELETE on " in one_error_line(proc)
    assert sim.total_requests == 0

    # With the grants the README lists, the same command works.
    engine = create_engine(owner_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA '
                          f'public TO "{role}"'))
    engine.dispose()
    proc = run_etl("sync", "--no-migrate", "--ids-file", str(path), env=etl_env(sim, url))
    assert proc.returncode == 0, proc.stderr


def test_a_database_that_does_not_answer_is_exit_3(sim: Simulator, pg_url: URL,
                                                   tmp_path: Path) -> None:
    proc = run_etl("sync", "--ids-file", str(ids_file(tmp_path, ["call-000001"])),
                   env=etl_env(sim, pg_url.set(port=1)))
    assert proc.returncode == 3
    assert "Connection refused" in one_error_line(proc)
    assert sim.total_requests == 0


# -- --retry-failed keeps to its shard ----------------------------------------------------------


def test_retry_failed_refetches_only_the_failed_ids_of_its_shard(
        sim: Simulator, pg_url: URL, fast_config: Path, tmp_path: Path) -> None:
    failing = [f"e500-1-{n}" for n in range(40)]  # fail once, then load
    # One attempt: each fails; the simulator's counters then let the next attempt through.
    env = etl_env(sim, pg_url)
    config = tmp_path / "one-attempt.toml"
    config.write_text(fast_config.read_text().replace("[api]\n", "[api]\nmax_attempts = 1\n"))
    first = run_etl("sync", "--config", str(config), "--ids-file",
                    str(ids_file(tmp_path, failing)), env=env)
    assert first.returncode == 1

    mine = [i for i in failing if shard_of(i, 4) == 1]
    assert 0 < len(mine) < len(failing)
    proc = run_etl("sync", "--config", str(fast_config), "--retry-failed", "--shard-index", "1",
                   "--num-shards", "4", "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["loaded"] == len(mine)
    assert {i for i in failing if sim.requests_for(i) == 2} == set(mine)  # only mine again


# -- where it writes --------------------------------------------------------------------------


def test_without_a_database_setting_sync_says_it_writes_to_commubo_db(
        sim: Simulator, fast_config: Path, tmp_path: Path) -> None:
    env = etl_env(sim)
    proc = run_etl("sync", "--config", str(fast_config), "--ids-file",
                   str(ids_file(tmp_path, ["call-000001"])), env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "no database configured (--db-url, ETL_DATABASE_URL or database.url): writing to " \
           "./commubo.db" in proc.stderr
    assert f"from {sim.url} into sqlite:///commubo.db" in proc.stdout
    assert (tmp_path / "commubo.db").is_file()


def test_demo_never_writes_to_the_configured_warehouse(pg_url: URL, tmp_path: Path) -> None:
    proc = run_etl("demo", "--calls", "20", env=etl_env(None, pg_url), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "commubo-demo.db").is_file()
    assert not _has_runs(pg_url)


# -- migration 0002 on a warehouse filled by 0001 ---------------------------------------------


def test_rows_written_before_0002_stay_valid_after_the_upgrade(pg_url: URL) -> None:
    from alembic import command

    engine = db.make_engine(pg_url)
    with engine.begin() as conn:
        command.upgrade(db.alembic_config(conn), "0001")
        conn.execute(text(
            "INSERT INTO etl_runs (run_id, started_at, finished_at, status, requested, loaded, "
            "not_found, failed, skipped) VALUES ('old-run', now() - interval '1 day', "
            "now() - interval '1 day', 'partial', 2, 1, 0, 1, 0)"))
        conn.execute(text(
            "INSERT INTO etl_call_status (call_id, status, http_status, error, attempts, "
            "run_id, updated_at) VALUES ('old-call', 'failed', 500, 'HTTP 500', 5, 'old-run', "
            "now())"))
    engine.dispose()
    env = etl_env(db_url=pg_url)

    stale = run_etl("runs", env=env)
    assert stale.returncode == 2
    assert f"has schema revision 0001, this version reads {db.head_revision()}: run etl db " \
        "upgrade" in one_error_line(stale)

    assert run_etl("db", "upgrade", env=env).returncode == 0
    shown = run_etl("runs", "--json", env=env)
    assert shown.returncode == 0, shown.stderr
    [old] = json.loads(shown.stdout)
    assert (old["run_id"], old["status"], old["host"], old["warnings"]) == (
        "old-run", "partial", None, None)
    failed = run_etl("failures", "--json", env=env)
    assert [r["call_id"] for r in json.loads(failed.stdout)] == ["old-call"]
