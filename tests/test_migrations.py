"""The Alembic migrations: they build exactly `etl.schema.metadata`, with the `call_details` view,
from a checkout and from an installed wheel (docs/design.md §4.4)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from helpers import ROOT, etl_env, run_etl
from sqlalchemy import DateTime, Engine, column, inspect, select, table, text
from sqlalchemy.engine import URL

from etl import db, runs
from etl.load import Loader
from etl.outcome import OK, Outcome
from etl.schema import etl_call_status, metadata
from etl.simulator import Simulator, payload_for


@pytest.fixture
def engine(any_db_url: URL) -> Iterator[Engine]:
    eng = db.make_engine(any_db_url)
    yield eng
    eng.dispose()


def test_migrated_schema_equals_the_metadata(engine: Engine) -> None:
    db.upgrade(engine)
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True,
                                                         "compare_server_default": True})
        assert compare_metadata(context, metadata) == []
    tables = set(inspect(engine).get_table_names())
    assert tables == {*metadata.tables, "alembic_version"}


def test_upgrade_from_code_twice_changes_nothing(engine: Engine) -> None:
    head = db.head_revision()
    assert db.upgrade(engine) == (None, head)
    before = _schema(engine)
    assert db.upgrade(engine) == (head, head)
    assert _schema(engine) == before


def _schema(engine: Engine) -> dict[str, list]:
    insp = inspect(engine)
    return {t: [(c["name"], str(c["type"]), c["nullable"]) for c in insp.get_columns(t)]
            + sorted(i["name"] for i in insp.get_indexes(t))
            for t in insp.get_table_names()}


def test_0004_times_the_stored_statuses_and_gives_their_updates_room(engine: Engine) -> None:
    # A warehouse at 0003 with statuses in it: each gets fetched_at, the time it was written
    # (no earlier than its fetch); the index on run_id goes; PostgreSQL rewrites the table
    # into pages filled to 50%. SQLite rebuilds the table, so its views are set aside and
    # made again. And back.
    from alembic import command

    postgres = engine.dialect.name == "postgresql"
    with engine.connect() as conn, db.migration_transaction(conn):
        command.upgrade(db.alembic_config(conn), "0003")
    written = datetime(2026, 11, 1, 9, 0, tzinfo=UTC)
    old = table("etl_call_status", *(column(n) for n in (
        "call_id", "status", "http_status", "error", "attempts", "run_id")),
        column("updated_at", DateTime(timezone=True)))
    with engine.begin() as conn:
        conn.execute(old.insert(), [
            {"call_id": "c-1", "status": "loaded", "http_status": 200, "error": None,
             "attempts": 1, "run_id": "old-run", "updated_at": written},
            {"call_id": "c-2", "status": "failed", "http_status": 500, "error": "HTTP 500",
             "attempts": 5, "run_id": "old-run", "updated_at": written + timedelta(minutes=1)}])
    views = set(inspect(engine).get_view_names())
    assert "call_links" in views

    db.upgrade(engine)

    with engine.connect() as conn:
        stored = [(r.call_id, r.status, _utc(r.fetched_at), _utc(r.updated_at))
                  for r in conn.execute(select(etl_call_status).order_by("call_id"))]
        assert conn.execute(text("SELECT count(*) FROM call_links")).scalar_one() == 0
        fillfactor = (conn.execute(text("SELECT reloptions FROM pg_class WHERE oid = "
                                        "'etl_call_status'::regclass")).scalar_one()
                      if postgres else None)
    assert stored == [("c-1", "loaded", written, written),
                      ("c-2", "failed", written + timedelta(minutes=1),
                       written + timedelta(minutes=1))]
    insp = inspect(engine)
    assert {i["name"] for i in insp.get_indexes("etl_call_status")} == {
        "ix_etl_call_status_status"}
    assert set(insp.get_view_names()) == views
    assert fillfactor == (["fillfactor=50"] if postgres else None)

    with engine.connect() as conn, db.migration_transaction(conn):
        command.downgrade(db.alembic_config(conn), "0003")
    insp = inspect(engine)
    assert "fetched_at" not in {c["name"] for c in insp.get_columns("etl_call_status")}
    assert {i["name"] for i in insp.get_indexes("etl_call_status")} == {
        "ix_etl_call_status_status", "ix_etl_call_status_run_id"}
    assert set(insp.get_view_names()) == views
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM etl_call_status")).scalar_one() == 2
        if postgres:
            assert conn.execute(text("SELECT reloptions FROM pg_class WHERE oid = "
                                     "'etl_call_status'::regclass")).scalar_one() is None
    assert db.upgrade(engine) == ("0003", db.head_revision())


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def test_call_details_view_returns_calls_with_customer_and_operator_names(
        engine: Engine) -> None:
    db.upgrade(engine)
    assert "call_details" in inspect(engine).get_view_names()
    payload = {
        "callId": "call-view", "callType": "1", "talkTime": "42",
        "callDateTime": "2026-01-05T10:00:00+09:00",
        "customer": {"customerId": "cus-v", "familyName": "佐藤", "personalName": "太郎",
                     "orgName": "株式会社サンプル商事"},
        "operator": {"operatorId": "op-v", "name": "鈴木 花子", "shortName": "鈴木"},
        "scenario": {"scenarioId": "scn-01"},
    }
    run_id = runs.new_run_id()
    runs.RunRecorder(engine, run_id).start(requested=2, skipped=0)
    Loader(engine, run_id).load([
        Outcome("call-view", OK, payload=payload, http_status=200, attempts=1,
                fetched_at=datetime.now(UTC)),
        Outcome("call-alone", OK, payload={"callId": "call-alone"}, http_status=200,
                attempts=1, fetched_at=datetime.now(UTC)),
    ])
    with engine.connect() as conn:
        rows = conn.execute(text(
            "SELECT call_id, call_type, talk_time, customer_family_name, "
            "customer_personal_name, customer_org_name, operator_name, operator_short_name, "
            "scenario_id FROM call_details ORDER BY call_id")).all()
    assert [tuple(r) for r in rows] == [
        ("call-alone", None, None, None, None, None, None, None, None),
        ("call-view", 1, 42, "佐藤", "太郎", "株式会社サンプル商事", "鈴木 花子", "鈴木", "scn-01"),
    ]


def test_etl_db_upgrade_is_idempotent(any_db_url: URL) -> None:
    env = etl_env(db_url=any_db_url)
    first = run_etl("db", "upgrade", env=env)
    assert first.returncode == 0, first.stderr
    assert f"upgraded (empty) -> {db.head_revision()}" in first.stdout
    second = run_etl("db", "upgrade", env=env)
    assert second.returncode == 0, second.stderr
    assert f"already at {db.head_revision()}" in second.stdout
    engine = db.make_engine(any_db_url)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT COUNT(*) FROM alembic_version")).scalar_one() == 1
    engine.dispose()


def find_uv(env: dict[str, str]) -> list[str] | None:
    """The command that runs uv: `uv` on PATH, else `python -m uv` with an interpreter that
    has the uv module (this one, or `python3`: .ci/run falls back to `python3 -m uv` when pip
    put the uv script where PATH does not look). None when there is no uv at all."""
    found = shutil.which("uv", path=env.get("PATH"))
    if found:
        return [found]
    for python in dict.fromkeys([sys.executable, shutil.which("python3", path=env.get("PATH"))]):
        if python and subprocess.run([python, "-c", "import uv"], env=env,
                                     capture_output=True).returncode == 0:
            return [python, "-m", "uv"]
    return None


def in_ci() -> bool:
    """CI sets CI=true: there a missing tool is a broken environment, not a reason to skip."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def test_installed_wheel_upgrades_and_syncs_outside_the_checkout(
        sim: Simulator, fast_config: Path, tmp_path: Path) -> None:
    dist, venv, work = tmp_path / "dist", tmp_path / "venv", tmp_path / "work"
    work.mkdir()
    clean = {k: v for k, v in os.environ.items()
             if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    uv = find_uv(clean)
    if uv is None:
        reason = ("no uv: not on PATH, and no uv module for python -m uv "
                  f"({sys.executable} or python3)")
        if in_ci():
            pytest.fail(f"{reason}; CI is set, where this test must run", pytrace=False)
        pytest.skip(reason)

    def run(*args: str | Path, cwd: Path = work, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([str(a) for a in args], cwd=cwd, env=env or clean,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"{args}: {proc.stdout}{proc.stderr}"
        return proc

    run(*uv, "build", "--wheel", "--out-dir", dist, ROOT, cwd=ROOT)
    [wheel] = dist.glob("commubo_etl-*.whl")
    run(*uv, "venv", "--python", sys.executable, venv)
    python = venv / "bin" / "python"
    run(*uv, "pip", "install", "--python", python, wheel)

    # The package comes from the venv, not from the checkout.
    where = run(python, "-c", "import etl; print(etl.__file__)").stdout.strip()
    assert Path(where).is_relative_to(venv)

    etl = venv / "bin" / "etl"
    target = f"sqlite:///{work / 'warehouse.db'}"
    env = {k: v for k, v in etl_env(sim).items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    upgraded = run(etl, "db", "upgrade", "--db-url", target, env=env)
    assert f"-> {db.head_revision()}" in upgraded.stdout

    ids = [f"call-{n:06d}" for n in range(1, 31)]
    (work / "ids.txt").write_text("\n".join(ids) + "\n")
    synced = run(etl, "sync", "--ids-file", "ids.txt", "--db-url", target, "--config",
                 fast_config, "--json", env=env)
    summary = json.loads(synced.stdout)
    assert summary["loaded"] == sum(1 for i in ids if payload_for(i) is not None)
    assert summary["failed"] == 0
