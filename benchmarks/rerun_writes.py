"""What a rerun writes when nothing changed (issue #12, item 3).

    uv run python benchmarks/rerun_writes.py                 # 20,000 calls
    uv run python benchmarks/rerun_writes.py --calls 2000    # a quick look
    uv run python benchmarks/rerun_writes.py --checkpoint    # a CHECKPOINT before each run

Starts the simulator in a thread (127.0.0.1, a free port, no latency), creates a fresh
database `bench_rerun_*` on the PostgreSQL of --pg-url (dropped afterwards), upgrades it, then
runs `python -m etl sync` as a subprocess over --calls ids the simulator serves, and then the
same command over the same ids again (no --skip-loaded). Around each run it reads:

* WAL: `pg_current_wal_lsn()` before and after (`pg_wal_lsn_diff`). The LSN is the server's,
  so it also counts what other databases of that server wrote meanwhile; with pg_walinspect
  (PostgreSQL 15+, contrib) the WAL records of the run are also split by relation of this
  database (heap and indexes of each table, full-page images apart), which other databases
  cannot inflate.
* rows: n_tup_ins, n_tup_upd (of which HOT), n_tup_del per table from pg_stat_user_tables,
  read once the run's sessions have ended (a session flushes its counts when it exits) and
  after pg_stat_clear_snapshot().

--checkpoint issues a CHECKPOINT before each run: the first change of each page after a
checkpoint writes a full-page image, so this is what a rerun hours after the first load pays
(a rerun right after it may fall in the same checkpoint cycle and write fewer of them).
--etl-root runs `etl` from another copy of the repository (PYTHONPATH), e.g. the code before a
change, to print the same figures for it (its own migrations make the schema).

On a rerun that finds nothing changed, the one table written is etl_call_status: one update
per id, HOT (heap-only: no index entry, a small WAL record) since migration 0004, whose table
and index sizes after the first load are printed too (its pages are filled to 50%).

The target of the issue: the rerun's WAL at most 10% of the first load's, n_tup_upd of the
data tables near zero.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
from sqlalchemy.engine import URL

from etl.schema import DATA_TABLES
from etl.simulator import DEFAULT_ACCESS_TOKEN, DEFAULT_TENANT_ID, Simulator, payload_for

REPO = Path(__file__).resolve().parent.parent
DATA = [t.name for t in DATA_TABLES]
TARGET_WAL_RATIO = 0.10


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def servable_ids(n: int) -> list[str]:
    """The first `n` ids `call-000001`... that the simulator answers with a call (about 3%
    answer 404; they are left out, so that every id requested is a call loaded)."""
    out: list[str] = []
    number = 1
    while len(out) < n:
        call_id = f"call-{number:07d}"
        if payload_for(call_id) is not None:
            out.append(call_id)
        number += 1
    return out


@contextlib.contextmanager
def fresh_database(server: str) -> Iterator[str]:
    """A new database on the server of `server` (a libpq URL), dropped afterwards."""
    name = f"bench_rerun_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield psycopg.conninfo.make_conninfo(server, dbname=name)
    finally:
        with psycopg.connect(server, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def sqlalchemy_url(conninfo: str) -> str:
    params = psycopg.conninfo.conninfo_to_dict(conninfo)
    return URL.create("postgresql+psycopg", username=params.get("user"),
                      password=params.get("password"), host=params.get("host"),
                      port=int(params["port"]) if params.get("port") else None,
                      database=params["dbname"]).render_as_string(hide_password=False)


@dataclass
class Snapshot:
    lsn: str
    stats: dict[str, tuple[int, int, int, int]]  # table: ins, upd, hot upd, del
    checkpoints: int


@dataclass
class Measured:
    wall_s: float
    wal_bytes: int
    by_relation: dict[str, tuple[int, int, int]] | None  # what: records, bytes, FPI bytes
    rows: dict[str, tuple[int, int, int, int]]
    checkpoints: int
    summary: dict
    status_size: tuple[int, int]  # etl_call_status after the run: heap, indexes (bytes)


def wait_for_other_sessions(conn: psycopg.Connection, timeout_s: float = 30) -> None:
    """Until no other session is connected to this database: each flushes its counts into
    the statistics when it exits."""
    deadline = time.monotonic() + timeout_s
    while conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = "
                       "current_database() AND pid <> pg_backend_pid()").fetchone()[0]:
        if time.monotonic() > deadline:
            raise RuntimeError("the sync's sessions did not end")
        time.sleep(0.05)


def snapshot(conn: psycopg.Connection) -> Snapshot:
    wait_for_other_sessions(conn)
    conn.execute("SELECT pg_stat_force_next_flush()" if conn.info.server_version >= 150000
                 else "SELECT 1")
    conn.execute("SELECT pg_stat_clear_snapshot()")
    stats = {name: (ins, upd, hot, dele) for name, ins, upd, hot, dele in conn.execute(
        "SELECT relname, n_tup_ins, n_tup_upd, n_tup_hot_upd, n_tup_del "
        "FROM pg_stat_user_tables WHERE schemaname = current_schema()")}
    checkpoints = conn.execute(
        "SELECT num_timed + num_requested FROM pg_stat_checkpointer"
        if conn.info.server_version >= 170000 else
        "SELECT checkpoints_timed + checkpoints_req FROM pg_stat_bgwriter").fetchone()[0]
    lsn = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()[0]
    return Snapshot(lsn, stats, checkpoints)


def wal_by_relation(conn: psycopg.Connection, start: str, end: str
                    ) -> dict[str, tuple[int, int, int]]:
    """The WAL records between two LSNs that touch a relation of this database (their first
    block reference), by table ("calls", "calls (indexes)", ...): records, bytes, FPI bytes.
    Records of no relation (commits and the like) cannot be told apart from other databases'
    and are left out."""
    rows = conn.execute("""
        WITH recs AS (
            SELECT r.record_length, r.fpi_length,
                   regexp_match(r.block_ref, 'rel (\\d+)/(\\d+)/(\\d+)') AS rel
            FROM pg_get_wal_records_info(%s::pg_lsn, %s::pg_lsn) r
        ), ours AS (
            SELECT record_length, fpi_length,
                   pg_filenode_relation(CASE WHEN rel[1]::oid = (SELECT dattablespace
                       FROM pg_database WHERE datname = current_database())
                       THEN 0 ELSE rel[1]::oid END, rel[3]::oid) AS relid
            FROM recs
            WHERE rel[2]::oid = (SELECT oid FROM pg_database
                                 WHERE datname = current_database())
        )
        SELECT COALESCE(t.relname || ' (indexes)', c.relname, '(other relations)'),
               count(*), sum(record_length), sum(fpi_length)
        FROM ours LEFT JOIN pg_class c ON c.oid = ours.relid
        LEFT JOIN pg_index i ON i.indexrelid = c.oid
        LEFT JOIN pg_class t ON t.oid = i.indrelid
        GROUP BY 1
    """, (start, end)).fetchall()
    out: dict[str, tuple[int, int, int]] = {}
    for name, n, size, fpi in rows:
        # Each session creates its temporary staging tables: rows in the system catalogs.
        name = "system catalogs (staging tables)" if name.startswith("pg_") else name
        held = out.get(name, (0, 0, 0))
        out[name] = (held[0] + int(n), held[1] + int(size), held[2] + int(fpi))
    return out


def sync(ids_file: Path, env: dict[str, str], cwd: Path, timeout_s: float) -> tuple[float, dict]:
    cmd = [sys.executable, "-m", "etl", "sync", "--ids-file", str(ids_file), "--json"]
    started = time.monotonic()
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout_s)
    wall = time.monotonic() - started
    if proc.returncode != 0:
        raise RuntimeError(f"etl sync exited {proc.returncode}: {proc.stderr[-2000:]}")
    return wall, json.loads(proc.stdout.strip().splitlines()[-1])


def measure(conn: psycopg.Connection, ids_file: Path, env: dict[str, str], cwd: Path,
            checkpoint: bool, inspect: bool, timeout_s: float) -> Measured:
    if checkpoint:
        conn.execute("CHECKPOINT")
    before = snapshot(conn)
    wall, summary = sync(ids_file, env, cwd, timeout_s)
    after = snapshot(conn)
    wal = conn.execute("SELECT pg_wal_lsn_diff(%s::pg_lsn, %s::pg_lsn)::bigint",
                       (after.lsn, before.lsn)).fetchone()[0]
    rows = {name: tuple(a - b for a, b in zip(after.stats[name],
                                              before.stats.get(name, (0, 0, 0, 0)),
                                              strict=True))
            for name in after.stats}
    size = conn.execute("SELECT pg_relation_size('etl_call_status'), "
                        "pg_indexes_size('etl_call_status')").fetchone()
    return Measured(wall, int(wal), wal_by_relation(conn, before.lsn, after.lsn)
                    if inspect else None, rows, after.checkpoints - before.checkpoints,
                    summary, (int(size[0]), int(size[1])))


def run_scenario(args: argparse.Namespace, sim: Simulator, ids_file: Path, etl_root: Path,
                 n: int) -> tuple[Measured, Measured]:
    with fresh_database(args.pg_url) as conninfo:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("COMMUBO_", "ETL_DATABASE_URL", "ETL_CONFIG"))}
        env.update(COMMUBO_BASE_URL=sim.url, COMMUBO_TENANT_ID=DEFAULT_TENANT_ID,
                   COMMUBO_ACCESS_TOKEN=DEFAULT_ACCESS_TOKEN,
                   ETL_DATABASE_URL=sqlalchemy_url(conninfo))
        if etl_root != REPO:
            env["PYTHONPATH"] = os.pathsep.join(
                p for p in (str(etl_root), env.get("PYTHONPATH")) if p)
        upgrade = subprocess.run([sys.executable, "-m", "etl", "db", "upgrade"], env=env,
                                 cwd=etl_root, capture_output=True, text=True, timeout=300)
        if upgrade.returncode != 0:
            raise RuntimeError(f"etl db upgrade failed: {upgrade.stderr[-2000:]}")
        with psycopg.connect(conninfo, autocommit=True) as conn:
            inspect = False
            with contextlib.suppress(psycopg.Error):
                conn.execute("CREATE EXTENSION IF NOT EXISTS pg_walinspect")
                # A temporary slot (gone with this session) keeps the runs' WAL from being
                # recycled before it is read: other databases' DROP DATABASE checkpoints.
                conn.execute("SELECT pg_create_physical_replication_slot(%s, true, true)",
                             (f"bench_rerun_{uuid.uuid4().hex[:12]}",))
                inspect = True
            timeout_s = 120 + n / 50
            log(f"  first load of {n} calls ...")
            first = measure(conn, ids_file, env, etl_root, args.checkpoint, inspect, timeout_s)
            log(f"    {first.wall_s:.1f}s, {first.summary.get('loaded')} loaded")
            log("  rerun of the same ids ...")
            rerun = measure(conn, ids_file, env, etl_root, args.checkpoint, inspect, timeout_s)
            log(f"    {rerun.wall_s:.1f}s, {rerun.summary.get('loaded')} loaded")
    for m in (first, rerun):
        if m.summary.get("loaded") != n:
            raise RuntimeError(f"expected {n} calls loaded, the run says {m.summary}")
    return first, rerun


def mb(n: float) -> str:
    return f"{n / 2**20:.2f} MB"


def report(label: str, first: Measured, rerun: Measured) -> list[str]:
    ratio = rerun.wal_bytes / first.wal_bytes
    lines = [f"## {label}", "",
             "| | first load | rerun |", "|---|---:|---:|",
             f"| wall time | {first.wall_s:.1f} s | {rerun.wall_s:.1f} s |",
             f"| WAL (server LSN diff) | {mb(first.wal_bytes)} | {mb(rerun.wal_bytes)} |"]
    if first.by_relation is not None and rerun.by_relation is not None:
        ours = [sum(v[1] for v in m.by_relation.values()) for m in (first, rerun)]
        fpi = [sum(v[2] for v in m.by_relation.values()) for m in (first, rerun)]
        lines += [f"| WAL of this database's relations (pg_walinspect) | {mb(ours[0])} | "
                  f"{mb(ours[1])} |",
                  f"| of which full-page images | {mb(fpi[0])} | {mb(fpi[1])} |"]
    # Judged on this database's WAL when pg_walinspect tells it apart from other databases'.
    judged = ours[1] / ours[0] if first.by_relation is not None else ratio
    lines += [f"| checkpoints during the run | {first.checkpoints} | {rerun.checkpoints} |",
              "| etl_call_status after the run: heap / indexes | "
              + " | ".join(f"{mb(m.status_size[0])} / {mb(m.status_size[1])}"
                           for m in (first, rerun)) + " |",
              "", f"WAL ratio rerun / first load: **{ratio:.1%}** (LSN diff)"
              + (f", **{judged:.1%}** (this database's relations)"
                 if first.by_relation is not None else "")
              + f"; target at most {TARGET_WAL_RATIO:.0%}: "
              + ("met" if judged <= TARGET_WAL_RATIO else "NOT met"), "",
              "| table | first: ins | first: upd | rerun: ins | rerun: upd (HOT) | rerun: del |",
              "|---|---:|---:|---:|---:|---:|"]
    for name in [*DATA, *sorted(set(rerun.rows) - set(DATA))]:
        f, r = first.rows.get(name, (0, 0, 0, 0)), rerun.rows.get(name, (0, 0, 0, 0))
        lines.append(f"| {name} | {f[0]} | {f[1]} | {r[0]} | {r[1]} ({r[2]}) | {r[3]} |")
    data_upd = sum(rerun.rows.get(name, (0, 0, 0, 0))[1] for name in DATA)
    lines += ["", f"n_tup_upd of the data tables on the rerun: **{data_upd}**"]
    if rerun.by_relation:
        total = sum(v[1] for v in rerun.by_relation.values())
        lines += ["", "Rerun WAL by relation (pg_walinspect, first block of each record):", "",
                  "| relation | records | bytes | share | of which FPI |",
                  "|---|---:|---:|---:|---:|"]
        for name, (count, size, fpi) in sorted(rerun.by_relation.items(),
                                               key=lambda kv: -kv[1][1]):
            lines.append(f"| {name} | {count} | {mb(size)} | {size / total:.1%} | {mb(fpi)} |")
    return [*lines, ""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--pg-url", default=os.environ.get(
        "ETL_BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"),
        help="libpq URL of a database on the server to use (fresh databases are made there)")
    parser.add_argument("--checkpoint", action="store_true",
                        help="CHECKPOINT before each run (full-page images as hours later)")
    parser.add_argument("--etl-root", type=Path, action="append", default=[],
                        help="also measure the etl package of this repository copy (repeatable)")
    args = parser.parse_args(argv)

    ids = servable_ids(args.calls)
    out: list[str] = [f"# Rerun writes: {args.calls} calls, rerun without --skip-loaded"
                      + (" (CHECKPOINT before each run)" if args.checkpoint else ""), ""]
    with tempfile.TemporaryDirectory(prefix="rerun-writes-") as tmp, \
            Simulator(latency_ms=0) as sim:
        ids_file = Path(tmp) / "ids.txt"
        ids_file.write_text("\n".join(ids) + "\n")
        for root in [REPO, *args.etl_root]:
            root = root.resolve()
            label = "this code" if root == REPO else f"etl from {root}"
            log(f"{label}:")
            first, rerun = run_scenario(args, sim, ids_file, root, len(ids))
            out += report(label, first, rerun)
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
