"""A first run on a fresh SQLite file (the embedded default): the schema upgrade is one
transaction, so a run killed at any moment of it leaves no half schema for the next sync to
trip over ("table scenarios already exists"), and first runs started together wait for each
other instead of racing to create the same tables.

The processes run the `etl` command with each DDL statement slowed down (CHILD below): a fresh
file's DDL otherwise takes some 20 ms (after 80 ms of importing Alembic) of a process that lives
for 0.4 s, too short a window for kills at random moments, or for processes started together,
to land in often enough for the test to fail reliably against non-atomic DDL. The child also
reports each DDL statement on stderr, so the test knows which kills did land inside the upgrade.
"""

from __future__ import annotations

import json
import random
import signal
import sqlite3
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import etl_env, expected_warehouse, lost_ids, stored_warehouse
from sqlalchemy.engine import URL

from etl.config import normalize_database_url
from etl.schema import SCHEMA_REVISION, metadata
from etl.simulator import Simulator
from etl.views import VIEWS

DDL_DELAY_S = 0.02
DDL_MARK = "test-ddl-statement"
CHILD = f"""
import sys, time
from sqlalchemy import Engine, event

@event.listens_for(Engine, "before_cursor_execute")
def _slow_ddl(conn, cursor, statement, *args):
    if statement.lstrip().upper().startswith(("CREATE", "ALTER", "DROP")):
        print({DDL_MARK!r}, file=sys.stderr, flush=True)
        time.sleep({DDL_DELAY_S})

from etl.cli import main
main(sys.argv[1:])
"""
IDS = [f"call-{n:06d}" for n in range(1, 6)]
KILLS = 20
PROCESSES = 6
WHOLE = {*metadata.tables, "alembic_version"}


def start_etl(*args: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", CHILD, *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def upgrade_seconds(db_url: URL, env: dict[str, str]) -> float:
    """How long `etl db upgrade` (slowed as above) lives, from start to exit."""
    started = time.monotonic()
    proc = start_etl("db", "upgrade", "--db-url", str(db_url), env=env)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    return time.monotonic() - started


def schema_of(path: Path) -> tuple[set[str], set[str], list[str]]:
    """(tables, views, alembic_version rows) of the file, as any reader would see them."""
    if not path.exists():
        return set(), set(), []
    conn = sqlite3.connect(path, timeout=30)
    try:
        names = conn.execute("SELECT type, name FROM sqlite_master WHERE type IN "
                             "('table', 'view') AND name NOT LIKE 'sqlite_%'").fetchall()
        tables = {n for kind, n in names if kind == "table"}
        versions = ([v for (v,) in conn.execute("SELECT version_num FROM alembic_version")]
                    if "alembic_version" in tables else [])
    finally:
        conn.close()
    return tables, {n for kind, n in names if kind == "view"}, versions


def assert_no_half_schema(path: Path, what: str) -> bool:
    """Either nothing of etl's, or the whole schema at the newest revision: True for whole."""
    tables, views, versions = schema_of(path)
    if not tables and not views:
        return False
    assert (tables, views, versions) == (WHOLE, {v.name for v in VIEWS}, [SCHEMA_REVISION]), (
        f"{what}: half a schema: tables {sorted(tables)}, views {sorted(views)}, "
        f"alembic_version {versions}")
    return True


def sync_args(ids_file: Path, config: Path) -> list[str]:
    return ["sync", "--config", str(config), "--ids-file", str(ids_file), "--json"]


def assert_sync_loads(sim: Simulator, db_url: URL, ids_file: Path, config: Path,
                      what: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "etl", *sync_args(ids_file, config)],
                          env=etl_env(sim, db_url), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{what}: the next sync exited {proc.returncode}: {proc.stderr}"
    assert json.loads(proc.stdout)["loaded"] == len(IDS)


@pytest.fixture
def ids_file(tmp_path: Path) -> Path:
    path = tmp_path / "ids.txt"
    path.write_text("\n".join(IDS) + "\n")
    return path


def test_a_first_upgrade_killed_at_any_moment_leaves_no_half_schema(
        sim: Simulator, fast_config: Path, ids_file: Path, tmp_path: Path) -> None:
    env = etl_env()
    # How long the process lives on a fresh file, and on a file already at the newest
    # revision (start, connect, nothing to do, exit): the upgrade lies between the two.
    fresh = statistics.median(
        upgrade_seconds(normalize_database_url(f"sqlite:///{tmp_path / f'cal-{n}.db'}"), env)
        for n in range(3))
    current = statistics.median(
        upgrade_seconds(normalize_database_url(f"sqlite:///{tmp_path / 'cal-0.db'}"), env)
        for _ in range(3))
    assert fresh > current
    rng = random.Random(20261125)
    delays = sorted(rng.uniform(0.75 * current, fresh) for _ in range(KILLS))

    inside = 0
    for n, delay in enumerate(delays):
        path = tmp_path / f"kill-{n}.db"
        db_url = normalize_database_url(f"sqlite:///{path}")
        what = f"kill {n} at {delay:.3f} s (fresh upgrade {fresh:.3f} s, current {current:.3f} s)"
        proc = start_etl("db", "upgrade", "--db-url", str(db_url), env=env)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        _, stderr = proc.communicate(timeout=30)
        if proc.returncode == -signal.SIGKILL and DDL_MARK in stderr:
            inside += 1
        else:  # killed before its first DDL statement, or it had finished
            assert proc.returncode in (0, -signal.SIGKILL), f"{what}: {stderr}"
        assert_no_half_schema(path, what)
        assert_sync_loads(sim, db_url, ids_file, fast_config, what)
        assert assert_no_half_schema(path, f"{what}, after the next sync")
    print(f"fresh upgrade {fresh:.3f} s, current {current:.3f} s, "
          f"{inside} of {KILLS} kills inside the upgrade")
    # Otherwise the test would prove nothing about the upgrade itself.
    assert inside >= KILLS // 4, f"only {inside} of {KILLS} kills landed inside the upgrade"


def test_first_syncs_started_together_on_a_fresh_file_all_succeed(
        sim: Simulator, fast_config: Path, ids_file: Path, tmp_path: Path) -> None:
    path = tmp_path / "fresh.db"
    db_url = normalize_database_url(f"sqlite:///{path}")
    procs = [start_etl(*sync_args(ids_file, fast_config), env=etl_env(sim, db_url))
             for _ in range(PROCESSES)]
    results = []
    for proc in procs:
        try:
            stdout, stderr = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            for other in procs:
                other.kill()
            raise
        results.append((proc.returncode, stdout, stderr))

    # Exit 0 from each; which process's rows stand (the others count theirs as skipped when
    # older) is the loader's business: the warehouse below must hold every call.
    for code, _, stderr in results:
        assert code == 0, stderr
    # One process ran the DDL; the others waited for its lock and found the schema current.
    assert sum(DDL_MARK in stderr for _, _, stderr in results) == 1
    assert assert_no_half_schema(path, "after the first syncs")
    got = stored_warehouse(db_url)
    assert lost_ids(expected_warehouse(IDS), got) == []
