"""The rerun-writes scenario of benchmarks/run.py: what a rerun writes when nothing changed
(issue #12, item 3). Run it with run.py, or with this file, which is run.py with `--only
rerun-writes` (its other options pass through):

    uv run --group bench python benchmarks/run.py --only rerun-writes
    uv run --group bench python benchmarks/rerun_writes.py --quick
    uv run --group bench python benchmarks/rerun_writes.py --etl-root ../before-the-change

A fresh database per round, upgraded first (`etl db upgrade`, not measured); then `etl sync`
over 20,000 ids the simulator (latency 0) all serves, and the same command over the same ids
again (no --skip-loaded); both measured as every run of run.py. Around each run it reads:

* WAL: `pg_current_wal_lsn()` before and after (`pg_wal_lsn_diff`). The LSN is the server's,
  so it also counts what other databases of that server wrote meanwhile; with pg_walinspect
  (PostgreSQL 15+, contrib) the WAL records of the run are also split by relation of this
  database (heap and indexes of each table, full-page images apart), which other databases
  cannot inflate; a temporary replication slot keeps that WAL until it is read.
* rows: n_tup_ins, n_tup_upd (of which HOT), n_tup_del per table from pg_stat_user_tables,
  read once the run's sessions have ended (a session flushes its counts when it exits) and
  after pg_stat_clear_snapshot().

Twice: a rerun right after the first load (it may fall in the same checkpoint cycle), and with
a CHECKPOINT before each run: the first change of each page after a checkpoint writes a
full-page image, so this is what a rerun hours after the first load pays. `--etl-root PATH`
(repeatable) also measures `etl` from another copy of the repository (PYTHONPATH), e.g. the
code before a change; its own migrations make the schema; no target is judged on it.

On a rerun that finds nothing changed, the one table written is etl_call_status: one update
per id, HOT (heap-only: no index entry, a small WAL record) since migration 0004; its table and
index sizes after each run are shown (its pages are filled to 50%). Targets (the issue's): the
rerun's WAL at most 10% of the first load's (this database's relations when pg_walinspect can
tell them apart, else the LSN difference), in each mode; no update of a data table on a rerun.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import psycopg
from bench_base import REPO, BenchError, log
from bench_db import count_rows
from bench_proc import etl_command, sync_timeout
from bench_render import Stat, Target, text_table
from bench_scenarios import Results, Run

from etl.schema import DATA_TABLES

if TYPE_CHECKING:
    from run import Bench

DATA = [t.name for t in DATA_TABLES]
TARGET_WAL_RATIO = 0.10
MODES = {False: "rerun right after the first load", True: "a CHECKPOINT before each run"}
HELP = ("20,000 ids synced into a fresh database, then the same command again with nothing "
        "changed: the rerun's WAL against the first load's (pg_walinspect by relation) and "
        "its row updates; right after, and with a CHECKPOINT before each run")


@dataclass
class Snapshot:
    lsn: str
    stats: dict[str, tuple[int, int, int, int]]  # table: ins, upd, hot upd, del
    checkpoints: int


@dataclass
class Writes:
    """What one run wrote."""

    wal_bytes: int
    by_relation: dict[str, tuple[int, int, int]] | None  # what: records, bytes, FPI bytes
    rows: dict[str, tuple[int, int, int, int]]  # table: ins, upd, hot upd, del
    checkpoints: int
    status_size: tuple[int, int]  # etl_call_status after the run: heap, indexes (bytes)

    @property
    def own_wal(self) -> int | None:
        """WAL of this database's relations (pg_walinspect), None when not known."""
        return None if self.by_relation is None else sum(v[1] for v in
                                                         self.by_relation.values())

    @property
    def fpi(self) -> int | None:
        return None if self.by_relation is None else sum(v[2] for v in
                                                         self.by_relation.values())


def rerun_writes(ctx: Bench) -> Results:
    res = Results()
    n = ctx.sizes["rerun_calls"]
    ids, expected = ctx.ids_file("rerun", n, servable_only=True)
    roots = [REPO, *(Path(r).resolve() for r in ctx.etl_roots)]
    log(f"rerun writes: {n} ids, latency 0, a first load and a rerun, with and without a "
        f"CHECKPOINT before each run, {ctx.rounds} round(s)" +
        (f"; also etl from {', '.join(map(str, roots[1:]))}" if roots[1:] else ""))
    with ctx.simulator(latency_ms=0) as url:
        for root in roots:
            label = "" if root == REPO else f" [etl from {root}]"
            env = ctx.env if root == REPO else {
                **ctx.env, "PYTHONPATH": os.pathsep.join(
                    filter(None, (str(root), ctx.env.get("PYTHONPATH"))))}
            for checkpoint in MODES:
                scenario = "rerun-writes" + (" checkpoint" if checkpoint else "") + label
                for rnd in ctx.round_numbers():
                    res.attempt(f"{scenario} round {rnd}", _round, ctx, res, scenario, rnd, url,
                                ids, n, expected, env, checkpoint)
                _report(res, scenario, MODES[checkpoint] + label, n,
                        ctx.quick_note("rerun_calls") if root == REPO else None)
    return res


def _round(ctx: Bench, res: Results, scenario: str, rnd: int, url: str, ids: Path, n: int,
           expected: int, env: dict[str, str], checkpoint: bool) -> None:
    """A first load and a rerun into a fresh database; an error of PostgreSQL is a
    BenchError (a failure of this round)."""
    try:
        _pair(ctx, res, scenario, rnd, url, ids, n, expected, env, checkpoint)
    except psycopg.Error as exc:
        raise BenchError(f"PostgreSQL: {type(exc).__name__}: {exc}") from None


def _pair(ctx: Bench, res: Results, scenario: str, rnd: int, url: str, ids: Path, n: int,
          expected: int, env: dict[str, str], checkpoint: bool) -> None:
    with ctx.fresh_db("rerun") as db_url:
        upgrade = subprocess.run(etl_command("db", "upgrade", "--db-url", db_url), env=env,
                                 cwd=ctx.work, capture_output=True, text=True, timeout=300)
        if upgrade.returncode != 0:
            raise BenchError(f"etl db upgrade: {upgrade.stderr.strip()[-300:]}")
        with psycopg.connect(db_url, autocommit=True, connect_timeout=10) as conn:
            inspect = False
            with contextlib.suppress(psycopg.Error):
                conn.execute("CREATE EXTENSION IF NOT EXISTS pg_walinspect")
                # A temporary slot (gone with this session) keeps the runs' WAL from being
                # recycled before it is read: other databases' DROP DATABASE checkpoints.
                conn.execute("SELECT pg_create_physical_replication_slot(%s, true, true)",
                             (f"bench_rerun_{uuid.uuid4().hex[:12]}",))
                inspect = True
            for side in ("first load", "rerun"):
                run = _measured(ctx, conn, scenario, side, rnd, url, ids, n, expected, env,
                                db_url, checkpoint, inspect)
                res.add(run)
                loaded = run.extra["summary"].get("loaded")
                if loaded != expected:
                    res.fail(f"{scenario} round {rnd} {side}: {loaded} ids loaded, expected "
                             f"{expected}")
                w: Writes = run.extra["writes"]
                log(f"    WAL {w.wal_bytes / 2**20:.2f} MB (LSN)"
                    + (f", {w.own_wal / 2**20:.2f} MB this database's" if inspect else ""))


def _measured(ctx: Bench, conn: psycopg.Connection, scenario: str, side: str, rnd: int,
              url: str, ids: Path, n: int, expected: int, env: dict[str, str], db_url: str,
              checkpoint: bool, inspect: bool) -> Run:
    """One `etl sync` measured as every run of run.py, and what it wrote (WAL, row counts)."""
    if checkpoint:
        conn.execute("CHECKPOINT")
    before = snapshot(conn)
    child = ctx.measure(etl_command("sync", "--ids-file", str(ids), "--db-url", db_url,
                                    "--base-url", url, "--json"), sync_timeout(n), env)
    summary = child.last_json()
    if child.returncode != 0 or not summary:
        raise BenchError(f"{side}: {child.why()}")
    after = snapshot(conn)  # before anything else reads the tables (hint bits)
    wal = conn.execute("SELECT pg_wal_lsn_diff(%s::pg_lsn, %s::pg_lsn)::bigint",
                       (after.lsn, before.lsn)).fetchone()[0]
    rows = {name: tuple(a - b for a, b in zip(after.stats[name],
                                              before.stats.get(name, (0, 0, 0, 0)),
                                              strict=True))
            for name in after.stats}
    size = conn.execute("SELECT pg_relation_size('etl_call_status'), "
                        "pg_indexes_size('etl_call_status')").fetchone()
    writes = Writes(int(wal), wal_by_relation(conn, before.lsn, after.lsn) if inspect else None,
                    rows, after.checkpoints - before.checkpoints, (int(size[0]), int(size[1])))
    return Run(scenario, side, n, rnd, child.wall_s, child.cpu_s, child.rss_mb,
               count_rows(db_url, "calls"), expected,
               {"pipeline_s": summary.get("duration_s"), "summary": summary, "writes": writes})


def wait_for_other_sessions(conn: psycopg.Connection, timeout_s: float = 30) -> None:
    """Until no other session is connected to this database: each flushes its counts into
    the statistics when it exits."""
    deadline = time.monotonic() + timeout_s
    while conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = "
                       "current_database() AND pid <> pg_backend_pid()").fetchone()[0]:
        if time.monotonic() > deadline:
            raise BenchError("the sync's sessions did not end")
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
    and are left out. Waits until the WAL up to `end` is flushed (pg_walinspect reads no
    further: "cannot accept future end LSN")."""
    deadline = time.monotonic() + 30
    while not conn.execute("SELECT pg_current_wal_flush_lsn() >= %s::pg_lsn",
                           (end,)).fetchone()[0]:
        if time.monotonic() > deadline:
            raise BenchError(f"the WAL up to {end} was not flushed within 30 s")
        time.sleep(0.05)
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


def _mb(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:.2f}"


def _ratio(first: Run, rerun: Run) -> float:
    """The rerun's WAL over the first load's: this database's relations when known."""
    a, b = first.extra["writes"], rerun.extra["writes"]
    if a.own_wal is not None and b.own_wal is not None and a.own_wal:
        return b.own_wal / a.own_wal
    return b.wal_bytes / a.wal_bytes


def _report(res: Results, scenario: str, title: str, n: int, note: str | None) -> None:
    """The section of one mode, and its targets unless `note` is None (another etl's)."""
    firsts = {r.round: r for r in res.select(scenario, "first load")}
    pairs = [(firsts[r.round], r) for r in res.select(scenario, "rerun") if r.round in firsts]
    ratio = Stat.of(_ratio(a, b) for a, b in pairs)
    data_upd = Stat.of(sum(b.extra["writes"].rows.get(t, (0, 0, 0, 0))[1] for t in DATA)
                       for _, b in pairs)
    if note is not None:
        what = "this database's relations" if pairs and pairs[0][0].extra[
            "writes"].by_relation is not None else "LSN difference"
        res.targets.append(Target.of(
            "rerun-writes", f"{title}: the rerun's WAL <= {TARGET_WAL_RATIO:.0%} of the first "
            "load's", ratio, lambda v: v <= TARGET_WAL_RATIO, f"{ratio.fmt('.1%')} ({what})",
            note))
        res.targets.append(Target.of(
            "rerun-writes", f"{title}: no row of a data table updated by the rerun", data_upd,
            lambda v: v == 0, f"{data_upd.fmt('.0f')} updates", note))
    if not pairs:
        return

    def cells(label: str, value: Callable[[Run], float]) -> list[str]:
        return [label, *(Stat.of(value(r) for r in runs).fmt(".2f")
                         for runs in ([a for a, _ in pairs], [b for _, b in pairs]))]

    mib = 2 ** 20
    rows = [cells("wall s", lambda r: r.wall_s),
            cells("client CPU s", lambda r: r.cpu_s),
            cells("WAL MB (server LSN difference)", lambda r: r.extra["writes"].wal_bytes / mib)]
    if pairs[0][0].extra["writes"].by_relation is not None:
        rows += [cells("WAL MB of this database's relations",
                       lambda r: r.extra["writes"].own_wal / mib),
                 cells("  of which full-page images", lambda r: r.extra["writes"].fpi / mib)]
    rows += [cells("checkpoints during the run", lambda r: r.extra["writes"].checkpoints),
             cells("etl_call_status heap MB after", lambda r: r.extra["writes"].status_size[0]
                   / mib),
             cells("etl_call_status indexes MB after",
                   lambda r: r.extra["writes"].status_size[1] / mib)]
    lsn = Stat.of(b.extra["writes"].wal_bytes / a.extra["writes"].wal_bytes for a, b in pairs)
    lines = [text_table(["", "first load", "rerun"], rows), "",
             f"WAL of the rerun / the first load's: {ratio.fmt('.1%')} (server LSN difference: "
             f"{lsn.fmt('.1%')}); row updates of the data tables on the rerun: "
             f"{data_upd.fmt('.0f')}", ""]
    # Row counts and WAL by relation of the median round (by the ratio).
    first, rerun = sorted(pairs, key=lambda p: _ratio(*p))[(len(pairs) - 1) // 2]
    fw, rw = first.extra["writes"], rerun.extra["writes"]
    table_rows = []
    for name in [*DATA, *sorted(set(rw.rows) - set(DATA))]:
        f, r = fw.rows.get(name, (0, 0, 0, 0)), rw.rows.get(name, (0, 0, 0, 0))
        table_rows.append([name, f"{f[0]:,}", f"{f[1]:,}", f"{r[0]:,}", f"{r[1]:,} ({r[2]:,})",
                           f"{r[3]:,}"])
    lines += [f"Rows, round {rerun.round} (the median ratio):",
              text_table(["table", "first: ins", "first: upd", "rerun: ins",
                          "rerun: upd (HOT)", "rerun: del"], table_rows)]
    if rw.by_relation:
        total = sum(v[1] for v in rw.by_relation.values())
        lines += ["", f"The rerun's WAL by relation, round {rerun.round} (pg_walinspect, first "
                  "block of each record):",
                  text_table(["relation", "records", "MB", "share", "of which FPI MB"], [
                      [name, f"{count:,}", _mb(size), f"{size / total:.1%}", _mb(fpi)]
                      for name, (count, size, fpi) in sorted(rw.by_relation.items(),
                                                             key=lambda kv: -kv[1][1])])]
    res.section(f"Rerun writes: {n:,} calls loaded, then the same sync again with nothing "
                f"changed; {title}", *lines)


def main(argv: list[str] | None = None) -> int:
    """run.py with `--only rerun-writes` first (a later --only wins)."""
    import run

    return run.main(["--only", "rerun-writes", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
