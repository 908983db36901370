"""The `etl` command as a separate process: output, exit codes and messages (docs/design.md §3)."""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import etl_env, run_etl
from sqlalchemy import create_engine, inspect, select, text
from sqlalchemy.engine import URL

from etl import db
from etl import runs as runs_module
from etl.schema import DATA_TABLES, calls, etl_call_status, etl_runs
from etl.simulator import Simulator, payload_for

SUMMARY_KEYS = {"run_id", "status", "requested", "loaded", "not_found", "failed", "skipped",
                "warnings", "duration_s", "calls_per_s", "database", "api", "unknown_fields",
                "related"}
# Recognisable secrets: neither may show up in any output.
TOKEN = "tok-SECRET-123"
PASSWORD = "pw-SECRET-456"
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (DEBUG|INFO|WARNING) ")


def ids_file(tmp_path: Path, lines: list[str], name: str = "ids.txt") -> Path:
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


def call_ids(start: int, stop: int) -> list[str]:
    return [f"call-{n:06d}" for n in range(start, stop)]


def servable(ids: list[str]) -> list[str]:
    return [i for i in ids if payload_for(i) is not None]


def query(url: URL, statement):
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return conn.execute(statement).all()
    finally:
        engine.dispose()


def table_names(url: URL) -> list[str]:
    engine = create_engine(url)
    try:
        return inspect(engine).get_table_names()
    finally:
        engine.dispose()


def error_lines(stderr: str) -> list[str]:
    """The lines of stderr that are not log lines: what `main` prints for an error."""
    assert "Traceback" not in stderr
    return [line for line in stderr.splitlines() if line and not LOG_LINE.match(line)]


def sync(*args: str, sim: Simulator, db_url: URL, config: Path, input: str | None = None,
         **env: str):
    return run_etl("sync", "--config", str(config), *args, env=etl_env(sim, db_url, **env),
                   input=input)


# -- etl sync ----------------------------------------------------------------------------------


def test_sync_json_prints_one_object_with_exactly_the_summary_keys(
        sim: Simulator, pg_url: URL, fast_config: Path, tmp_path: Path) -> None:
    ids = call_ids(1, 21)
    path = ids_file(tmp_path, ["# calls of the day", "", *ids[:10], f"  {ids[0]}  ", "",
                               *ids[10:], "nf-1", ids[3]])
    proc = sync("--ids-file", str(path), "--json", sim=sim, db_url=pg_url, config=fast_config)

    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 1
    summary = json.loads(lines[0])
    assert set(summary) == SUMMARY_KEYS
    loaded = len(servable(ids))
    assert {k: summary[k] for k in ("status", "requested", "loaded", "not_found", "failed",
                                    "skipped")} == {
        "status": "succeeded", "requested": 21, "loaded": loaded, "not_found": 21 - loaded,
        "failed": 0, "skipped": 0}
    assert isinstance(summary["duration_s"], float)
    assert isinstance(summary["calls_per_s"], float)
    assert summary["warnings"] == 0
    assert summary["database"] == pg_url.render_as_string(hide_password=True)
    assert summary["api"] == sim.url
    [run] = query(pg_url, select(etl_runs.c.run_id, etl_runs.c.loaded))
    assert tuple(run) == (summary["run_id"], loaded)
    assert sim.requests_for(ids[0]) == 1


def test_failed_id_exits_1_and_failures_and_runs_list_it(
        sim: Simulator, pg_url: URL, fast_config: Path, tmp_path: Path) -> None:
    good = call_ids(1, 11)
    first = sync("--ids-file", str(ids_file(tmp_path, [*good, "broken-cli"])), "--json",
                 sim=sim, db_url=pg_url, config=fast_config)
    assert first.returncode == 1, first.stderr
    partial = json.loads(first.stdout)
    assert (partial["status"], partial["failed"]) == ("partial", 1)
    second = sync("--ids-file", str(ids_file(tmp_path, good, "good.txt")), "--json",
                  sim=sim, db_url=pg_url, config=fast_config)
    assert second.returncode == 0, second.stderr
    succeeded = json.loads(second.stdout)

    env = etl_env(sim, pg_url)
    listed = run_etl("failures", "--run", partial["run_id"], env=env)
    assert listed.returncode == 0, listed.stderr
    header, *rows = listed.stdout.splitlines()
    assert header.split() == ["call_id", "http_status", "attempts", "run_id", "error"]
    assert [r.split(None, 4) for r in rows] == [
        ["broken-cli", "500", "5", partial["run_id"], "HTTP 500 (gave up after 5 attempts)"]]

    runs = run_etl("runs", env=env)
    assert runs.returncode == 0, runs.stderr
    header, *rows = runs.stdout.splitlines()
    assert header.split() == ["run_id", "status", "started_at", "finished_at", "requested",
                              "loaded", "not_found", "failed", "skipped", "warnings", "host",
                              "pid", "error"]
    loaded = len(servable(good))
    # Newest first, with their counts (the two timestamps hold a space each), then the
    # host, the process id and why a run did not succeed.
    assert [r.split()[:2] + r.split()[6:13] + [" ".join(r.split()[14:])] for r in rows] == [
        [succeeded["run_id"], "succeeded", "10", str(loaded), str(10 - loaded), "0", "0", "0",
         runs_module.HOST, "-"],
        [partial["run_id"], "partial", "11", str(loaded), str(10 - loaded), "1", "0", "0",
         runs_module.HOST, "1 id(s) failed"],
    ]


def test_bad_ids_file_exits_2_naming_file_and_line_before_any_request(
        sim: Simulator, pg_url: URL, fast_config: Path, tmp_path: Path) -> None:
    path = ids_file(tmp_path, ["call-000001", "# fine", "../etc", "call-000002",
                               "call/000003"])
    proc = sync("--ids-file", str(path), sim=sim, db_url=pg_url, config=fast_config)

    assert proc.returncode == 2
    [line] = error_lines(proc.stderr)
    assert str(path) in line
    assert "lines 3, 5" in line
    assert sim.total_requests == 0
    assert proc.stdout == ""
    assert table_names(pg_url) == []


def test_base_url_with_port_65536_exits_2(sim: Simulator, pg_url: URL, fast_config: Path,
                                          tmp_path: Path) -> None:
    proc = sync("--ids-file", str(ids_file(tmp_path, ["call-000001"])),
                "--base-url", "http://127.0.0.1:65536/api", sim=sim, db_url=pg_url,
                config=fast_config)
    assert proc.returncode == 2
    [line] = error_lines(proc.stderr)
    assert "65536" in line and "base URL" in line
    assert sim.total_requests == 0


def test_wrong_token_exits_3_quickly_with_one_clear_line(
        sim: Simulator, pg_url: URL, fast_config: Path, tmp_path: Path) -> None:
    path = ids_file(tmp_path, call_ids(1, 501))
    started = time.monotonic()
    proc = sync("--ids-file", str(path), sim=sim, db_url=pg_url, config=fast_config,
                COMMUBO_ACCESS_TOKEN=TOKEN)
    elapsed = time.monotonic() - started

    assert proc.returncode == 3
    assert elapsed < 20
    [line] = error_lines(proc.stderr)
    assert "403" in line and "COMMUBO_ACCESS_TOKEN" in line
    assert "SECRET" not in proc.stderr + proc.stdout
    assert sim.total_requests <= 8  # concurrency 4 in fast_config: no retries, no more ids
    [run] = query(pg_url, select(etl_runs.c.status))
    assert run.status == "failed"


def test_unreachable_database_exits_3_with_a_clear_line(
        sim: Simulator, fast_config: Path, tmp_path: Path) -> None:
    proc = run_etl("sync", "--config", str(fast_config),
                   "--ids-file", str(ids_file(tmp_path, ["call-000001"])),
                   env=etl_env(sim, ETL_DATABASE_URL=f"postgresql://postgres:{PASSWORD}"
                                              "@127.0.0.1:1/x"))
    assert proc.returncode == 3
    [line] = error_lines(proc.stderr)
    assert "cannot connect to the database" in line
    assert "127.0.0.1:1/x" in line
    assert "SECRET" not in proc.stderr + proc.stdout
    assert sim.total_requests == 0


def test_ids_file_dash_reads_standard_input(sim: Simulator, pg_url: URL,
                                            fast_config: Path) -> None:
    ids = call_ids(1, 11)
    proc = sync("--ids-file", "-", "--json", sim=sim, db_url=pg_url, config=fast_config,
                input="\n".join(ids) + "\n")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["requested"] == 10
    stored = {r.call_id for r in query(pg_url, select(calls.c.call_id))}
    assert stored == set(servable(ids))


def test_two_shards_together_load_exactly_all_ids(
        sim: Simulator, pg_url: URL, fast_config: Path, tmp_path: Path) -> None:
    ids = [*call_ids(1, 81), "nf-1", "nf-2"]
    path = ids_file(tmp_path, ids)
    requested = []
    for shard in ("0", "1"):
        proc = sync("--ids-file", str(path), "--json", "--shard-index", shard, "--num-shards",
                    "2", sim=sim, db_url=pg_url, config=fast_config)
        assert proc.returncode == 0, proc.stderr
        requested.append(json.loads(proc.stdout)["requested"])

    assert all(n > 0 for n in requested)
    assert sum(requested) == len(ids)
    assert all(sim.requests_for(i) == 1 for i in ids)  # each id in exactly one shard
    statuses = {r.call_id for r in query(pg_url, select(etl_call_status.c.call_id))}
    assert statuses == set(ids)
    assert {r.call_id for r in query(pg_url, select(calls.c.call_id))} == set(servable(ids))


def test_no_migrate_on_an_empty_database_exits_2_with_a_clear_message(
        sim: Simulator, pg_url: URL, fast_config: Path, tmp_path: Path) -> None:
    proc = sync("--ids-file", str(ids_file(tmp_path, ["call-000001"])), "--no-migrate",
                sim=sim, db_url=pg_url, config=fast_config)
    assert proc.returncode == 2
    [line] = error_lines(proc.stderr)
    assert "etl db upgrade" in line
    assert sim.total_requests == 0
    assert table_names(pg_url) == []


# -- etl db, runs, demo ------------------------------------------------------------------------


def test_db_upgrade_then_current_prints_the_head_revision(
        sim: Simulator, pg_url: URL, fast_config: Path, tmp_path: Path) -> None:
    env = etl_env(sim, pg_url)
    head = db.head_revision()
    before = run_etl("db", "current", env=env)
    assert before.returncode == 0, before.stderr
    assert before.stdout.startswith("(none)")

    upgraded = run_etl("db", "upgrade", env=env)
    assert upgraded.returncode == 0, upgraded.stderr
    assert f"-> {head}" in upgraded.stdout

    current = run_etl("db", "current", env=env)
    assert current.stdout.strip() == f"{head} (head)"
    # Now --no-migrate has what it needs.
    proc = sync("--ids-file", str(ids_file(tmp_path, ["call-000001"])), "--no-migrate",
                sim=sim, db_url=pg_url, config=fast_config)
    assert proc.returncode == 0, proc.stderr
    assert [r.call_id for r in query(pg_url, select(calls.c.call_id))] == ["call-000001"]


def test_demo_syncs_simulated_calls_into_sqlite(tmp_path: Path) -> None:
    target = tmp_path / "demo.db"
    proc = run_etl("demo", "--calls", "50", "--db-url", f"sqlite:///{target}",
                   env=etl_env(), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    loaded = int(re.search(r" (\d+) loaded, ", proc.stdout).group(1))
    related = int(re.search(r"; (\d+) of them were related calls", proc.stdout).group(1))
    # The 50 ids, and the chains they start (the demo follows them).
    assert loaded > len(servable(call_ids(1, 51))) and related > 0
    assert "an analyst's first query" in proc.stdout
    assert "history: " in proc.stdout and "call chains (call_links): " in proc.stdout
    count = query(URL.create("sqlite", database=str(target)),
                  text("SELECT COUNT(*) FROM calls"))[0][0]
    assert count == loaded


# -- secrets -----------------------------------------------------------------------------------


@pytest.fixture
def password_url(pg_url: URL) -> Iterator[URL | None]:
    """`pg_url` reached as a role with a password, or None if the server will not have it."""
    role = f"etl_secret_{uuid.uuid4().hex[:8]}"
    admin = create_engine(pg_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f"CREATE ROLE {role} LOGIN PASSWORD '{PASSWORD}'"))
            conn.execute(text(f'GRANT ALL ON DATABASE "{pg_url.database}" TO {role}'))
            conn.execute(text(f"GRANT ALL ON SCHEMA public TO {role}"))
    except Exception:  # no right to create roles: the password part is skipped
        admin.dispose()
        yield None
        return
    url = pg_url.set(username=role, password=PASSWORD)
    try:
        probe = create_engine(url)
        with probe.connect():
            pass
        probe.dispose()
    except Exception:
        url = None
    try:
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(text(f"DROP OWNED BY {role}"))
            conn.execute(text(f"DROP ROLE {role}"))
        admin.dispose()


def test_token_and_password_never_appear_in_output_or_database(
        pg_url: URL, password_url: URL | None, fast_config: Path, tmp_path: Path) -> None:
    db_url = password_url or pg_url
    path = ids_file(tmp_path, [*call_ids(1, 21), "broken-secret", "nf-1"])
    with Simulator(access_token=TOKEN) as sim:
        env = etl_env(sim, db_url, COMMUBO_ACCESS_TOKEN=TOKEN)
        procs = [
            run_etl("-vv", "sync", "--ids-file", str(path), "--config", str(fast_config),
                    env=env),
            run_etl("failures", env=env),
            run_etl("runs", "--json", env=env),
        ]
    assert [p.returncode for p in procs] == [1, 0, 0]
    assert "broken-secret" in procs[1].stdout  # the commands did their work
    for p in procs:
        assert "SECRET" not in p.stdout + p.stderr

    # Nor in the warehouse.
    engine = create_engine(db_url)
    with engine.connect() as conn:
        for t in (*DATA_TABLES, etl_runs, etl_call_status):
            for row in conn.execute(select(t)):
                assert "SECRET" not in repr(tuple(row)), t.name
    engine.dispose()
