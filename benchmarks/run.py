"""Benchmarks: commubo-etl's `etl sync` against the same sync written with dlt 1.31.

    uv run --group bench python benchmarks/run.py              # everything, ~20 minutes
    uv run --group bench python benchmarks/run.py --quick      # small sizes, ~2 minutes
    uv run --group bench python benchmarks/run.py --only latency,loader --rounds 5

Scenarios (`--only`, comma-separated):

  latency      simulator latency 50 ms, concurrency 32, 4,000 ids: ours, dlt and a bare
               requests thread pool (reference, no database) against the 640 ids/s bound
  cpu          simulator latency 0, 10,000 ids: client CPU (user+sys) per id, ours vs dlt
  memory       peak RSS: ours at 10,000 and 100,000 ids, dlt at 5,000 and 20,000 only
  loader       Loader.load alone (payloads already fetched, half the rows conflicting) beside
               a raw COPY of the same call rows as the ceiling (and one into an indexed table)
  incremental  a first sync of 100,000 ids, then the same command with --skip-loaded

Each measured run is a subprocess of this script (ours: `python -m etl sync ... --json`; dlt:
`benchmarks/dlt_pipeline.py`), measured with os.wait4 (by the tiny launcher measure.py): wall
time, user+sys CPU and ru_maxrss of that child only. The simulator (`python -m etl simulate`)
runs in a subprocess of its own, one per scenario shared by every side, so its CPU is not
counted. Every run gets a fresh database `bench_run_*` on the PostgreSQL of --pg-url, dropped
afterwards; rows landed are counted in the calls table and checked against the ids the
simulator can serve. Sides run in turn, A B A B, for --rounds rounds; tables show medians.
The tables go to stdout (progress to stderr) and to benchmarks/RESULTS.md (--results), with
the machine, command and date.

Targets are reported as met or not; they never change the exit code, which is 1 only when a
run failed (non-zero exit, timeout, or rows landed not as expected).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import importlib.util
import itertools
import json
import os
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
from machine import facts, git_state

from etl.simulator import DEFAULT_ACCESS_TOKEN, DEFAULT_TENANT_ID, payload_for

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PY = sys.executable
CONCURRENCY = 32
LATENCY_MS = 50
DB_PREFIX = "bench_run_"
SCENARIOS = ("latency", "cpu", "memory", "loader", "incremental")

OURS, DLT, BARE = "commubo-etl", "dlt 1.31", "bare requests"

# Sizes of the full run and of --quick (a smoke run: the targets' sizes are the full ones).
FULL = {
    "latency_ids": 4_000,
    "cpu_ids": 10_000,
    "memory_ours": (10_000, 100_000),
    "memory_dlt": (5_000, 20_000),
    "loader_calls": 20_000,
    "incremental_ids": 100_000,
}
QUICK = {
    "latency_ids": 1_000,
    "cpu_ids": 2_000,
    "memory_ours": (2_000, 10_000),
    "memory_dlt": (1_000, 3_000),
    "loader_calls": 4_000,
    "incremental_ids": 10_000,
}

TARGET_LATENCY_SHARE = 0.95
TARGET_CPU_RATIO = 0.5
TARGET_RSS_MB = 150
TARGET_RSS_GROWTH = 0.10
TARGET_LOADER_CALLS_S = 30_000
TARGET_INCREMENTAL_RATIO = 0.05


class BenchError(Exception):
    """A run could not be measured (exit code, timeout, wrong row count)."""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- measuring one child -----------------------------------------------------------------------


@dataclass
class Child:
    wall_s: float
    cpu_s: float
    rss_mb: float
    returncode: int
    stdout: str
    stderr: str

    def last_json(self) -> dict:
        for line in reversed(self.stdout.strip().splitlines()):
            with contextlib.suppress(ValueError):
                value = json.loads(line)
                if isinstance(value, dict):
                    return value
        return {}

    def why(self) -> str:
        tail = self.stderr.strip().splitlines()[-3:]
        return f"exit code {self.returncode}: " + " | ".join(t[:200] for t in tail)


def measure(cmd: list[str], *, env: dict[str, str], cwd: Path, timeout_s: float) -> Child:
    """Run cmd and return its wall time and, from wait4, the CPU and peak RSS of that process
    alone. It is started by the tiny `measure.py` launcher (see there why), in a process group
    of its own that is killed, and a BenchError raised, after timeout_s."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, \
            tempfile.NamedTemporaryFile(suffix=".json") as cost:
        launcher = [PY, "-I", "-S", str(HERE / "measure.py"), cost.name, *cmd]
        proc = subprocess.Popen(launcher, stdout=out, stderr=err, env=env, cwd=cwd,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        timed_out = threading.Event()

        def kill() -> None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)

        def expire() -> None:
            timed_out.set()
            kill()

        timer = threading.Timer(timeout_s, expire)
        timer.start()
        try:
            proc.wait()
        except BaseException:
            kill()
            proc.wait()
            raise
        finally:
            timer.cancel()
        if timed_out.is_set():
            raise BenchError(f"timed out after {timeout_s:.0f}s: {shlex.join(cmd[:4])} ...")
        try:
            usage = json.loads(Path(cost.name).read_text())
        except ValueError:
            raise BenchError(f"no measurement from the launcher (exit code {proc.returncode})"
                             ) from None
        out.seek(0)
        err.seek(0)
        return Child(usage["wall_s"], usage["user_s"] + usage["sys_s"],
                     usage["maxrss_kb"] / 1024, usage["returncode"],
                     out.read().decode(errors="replace"), err.read().decode(errors="replace"))


def timeout_for(ids: int) -> float:
    """Generous: a run slower than 150 ids/s (plus a minute) is broken, not slow."""
    return 60 + ids / 150


# -- results -----------------------------------------------------------------------------------


@dataclass
class Run:
    scenario: str
    side: str
    size: int
    round: int
    wall_s: float
    cpu_s: float
    rss_mb: float
    rows: int | None
    expected: int | None
    extra: dict = field(default_factory=dict)

    @property
    def ids_per_s(self) -> float:
        return self.size / self.wall_s

    @property
    def cpu_ms_per_id(self) -> float:
        return 1000 * self.cpu_s / self.size

    @property
    def rows_ok(self) -> bool:
        return self.rows == self.expected


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


@dataclass
class Target:
    scenario: str
    text: str
    measured: str
    met: bool | None  # None: not measured in this run
    note: str = ""


# -- the benchmark -----------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.sizes = QUICK if args.quick else FULL
        self.rounds = args.rounds or (1 if args.quick else 3)
        self.pg_url = args.pg_url
        self.work = Path(tempfile.mkdtemp(prefix="commubo-bench-"))
        self.runs: list[Run] = []
        self.failures: list[str] = []
        self.sections: list[tuple[str, str]] = []  # (title, plain-text table)
        self.targets: list[Target] = []
        self._db_seq = itertools.count(1)
        self._servable: dict[tuple[str, int], int] = {}
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("ETL_", "COMMUBO_", "DLT_"))}
        self.env.update(COMMUBO_TENANT_ID=DEFAULT_TENANT_ID,
                        COMMUBO_ACCESS_TOKEN=DEFAULT_ACCESS_TOKEN,
                        RUNTIME__DLTHUB_TELEMETRY="false")

    def close(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)

    # -- databases -----------------------------------------------------------------------------

    def _admin(self) -> psycopg.Connection:
        return psycopg.connect(self.pg_url, autocommit=True, connect_timeout=10)

    def db_url(self, name: str) -> str:
        parts = urlsplit(self.pg_url)
        return urlunsplit(parts._replace(path="/" + name))

    @contextlib.contextmanager
    def fresh_db(self, tag: str) -> Iterator[str]:
        name = f"{DB_PREFIX}{os.getpid()}_{next(self._db_seq)}_{tag}"
        with self._admin() as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        try:
            yield self.db_url(name)
        finally:
            with self._admin() as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def drop_stale_databases(self) -> None:
        """Databases of earlier benchmark runs that were killed before cleaning up."""
        with self._admin() as conn:
            names = [r[0] for r in conn.execute(
                "SELECT datname FROM pg_database WHERE datname LIKE 'bench\\_run\\_%'")]
            for name in names:
                m = re.match(rf"{DB_PREFIX}(\d+)_", name)
                if m and not _pid_alive(int(m.group(1))):
                    conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                    log(f"dropped {name}, left over by an earlier benchmark run")

    def count_rows(self, db_url: str, table: str) -> int:
        with psycopg.connect(db_url, connect_timeout=10) as conn:
            return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]

    # -- ids and the simulator -----------------------------------------------------------------

    def ids_file(self, prefix: str, n: int, servable_only: bool = False) -> tuple[Path, int]:
        """A file of n ordinary ids, and how many of them the simulator serves (not 404).
        With `servable_only`, n ids that all load (none is a 404)."""
        path = self.work / f"ids-{prefix}-{n}{'-servable' if servable_only else ''}.txt"
        key = (prefix, n, servable_only)
        if key not in self._servable:
            if servable_only:
                candidates = (f"{prefix}-{i:07d}" for i in itertools.count())
                ids = list(itertools.islice(
                    (i for i in candidates if payload_for(i) is not None), n))
            else:
                ids = [f"{prefix}-{i:07d}" for i in range(n)]
            path.write_text("\n".join(ids) + "\n")
            self._servable[key] = sum(payload_for(i) is not None for i in ids)
        return path, self._servable[key]

    @contextlib.contextmanager
    def simulator(self, latency_ms: float) -> Iterator[str]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        logfile = open(self.work / f"simulator-{port}.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(
            [PY, "-m", "etl", "simulate", "--port", str(port), "--latency-ms", str(latency_ms)],
            stdout=logfile, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=self.env, cwd=self.work)
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_ready(url, proc, timeout_s=30)
            yield url
        finally:
            proc.send_signal(signal.SIGINT)  # etl simulate stops cleanly on Ctrl-C
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            logfile.close()

    # -- the three kinds of measured run -------------------------------------------------------

    def run_ours(self, scenario: str, rnd: int, base_url: str, ids: Path, n: int, expected: int,
                 db_url: str | None = None, skip_loaded: bool = False,
                 side: str = OURS) -> Run:
        with contextlib.ExitStack() as stack:
            if db_url is None:
                db_url = stack.enter_context(self.fresh_db("ours"))
            cmd = [PY, "-m", "etl", "sync", "--ids-file", str(ids), "--db-url", db_url,
                   "--base-url", base_url, "--concurrency", str(CONCURRENCY), "--json"]
            if skip_loaded:
                cmd.append("--skip-loaded")
            child = measure(cmd, env=self.env, cwd=self.work, timeout_s=timeout_for(n))
            summary = child.last_json()
            if child.returncode != 0 or not summary:
                raise BenchError(f"{side}: {child.why()}")
            rows = self.count_rows(db_url, "calls")
        extra = {"pipeline_s": summary.get("duration_s"), "skipped": summary.get("skipped"),
                 "loaded": summary.get("loaded")}
        return self._record(scenario, side, n, rnd, child, rows, expected, extra)

    def run_dlt(self, scenario: str, rnd: int, base_url: str, ids: Path, n: int,
                expected: int) -> Run:
        with self.fresh_db("dlt") as db_url:
            cmd = [PY, str(HERE / "dlt_pipeline.py"), str(ids), "--base-url", base_url,
                   "--db-url", db_url, "--concurrency", str(CONCURRENCY),
                   "--work-dir", str(self.work / f"dlt-{scenario}-{rnd}-{n}")]
            child = measure(cmd, env=self.env, cwd=self.work, timeout_s=timeout_for(n))
            shutil.rmtree(self.work / f"dlt-{scenario}-{rnd}-{n}", ignore_errors=True)
            out = child.last_json()
            if child.returncode != 0 or not out:
                raise BenchError(f"{DLT}: {child.why()}")
            rows = self.count_rows(db_url, f"{out['dataset']}.{out['table']}")
        return self._record(scenario, DLT, n, rnd, child, rows, expected,
                            {"pipeline_s": out.get("duration_s")})

    def run_bare(self, scenario: str, rnd: int, base_url: str, ids: Path, n: int,
                 expected: int) -> Run:
        cmd = [PY, str(HERE / "bare_requests.py"), str(ids), "--base-url", base_url,
               "--concurrency", str(CONCURRENCY)]
        child = measure(cmd, env=self.env, cwd=self.work, timeout_s=timeout_for(n))
        out = child.last_json()
        if child.returncode != 0 or not out:
            raise BenchError(f"{BARE}: {child.why()}")
        return self._record(scenario, BARE, n, rnd, child, out["ok"], expected,
                            {"pipeline_s": out.get("duration_s"), "fetched_only": True})

    def _record(self, scenario: str, side: str, n: int, rnd: int, child: Child,
                rows: int | None, expected: int | None, extra: dict) -> Run:
        run = Run(scenario, side, n, rnd, child.wall_s, child.cpu_s, child.rss_mb, rows,
                  expected, extra)
        self.runs.append(run)
        check = "ok" if run.rows_ok else f"EXPECTED {expected}"
        log(f"  [{scenario} round {rnd}] {side:<13} {n:>7} ids: {run.wall_s:7.2f} s "
            f"{run.ids_per_s:8.1f} ids/s  {run.cpu_ms_per_id:6.3f} ms CPU/id  "
            f"{run.rss_mb:6.1f} MB  rows {rows} {check}")
        if not run.rows_ok:
            self.failures.append(f"{scenario} round {rnd} {side} {n} ids: {rows} rows landed, "
                                 f"expected {expected}")
        return run

    def attempt(self, what: str, fn, *args, **kwargs):
        """Run one measurement; a failure is recorded and the benchmark goes on."""
        try:
            return fn(*args, **kwargs)
        except BenchError as exc:
            self.failures.append(f"{what}: {exc}")
            log(f"  FAILED {what}: {exc}")
            return None

    def select(self, scenario: str, side: str, size: int | None = None) -> list[Run]:
        return [r for r in self.runs if r.scenario == scenario and r.side == side
                and (size is None or r.size == size)]

    # -- scenarios -----------------------------------------------------------------------------

    def scenario_latency(self) -> None:
        n = self.sizes["latency_ids"]
        bound = CONCURRENCY * 1000 / LATENCY_MS
        ids, expected = self.ids_file("lat", n)
        log(f"latency-bound: latency {LATENCY_MS} ms, concurrency {CONCURRENCY}, {n} ids, "
            f"{self.rounds} round(s)")
        with self.simulator(LATENCY_MS) as url:
            for rnd in range(1, self.rounds + 1):
                self.attempt("latency ours", self.run_ours, "latency", rnd, url, ids, n, expected)
                self.attempt("latency dlt", self.run_dlt, "latency", rnd, url, ids, n, expected)
                self.attempt("latency bare", self.run_bare, "latency", rnd, url, ids, n,
                             expected)
        table = self.side_table("latency", [OURS, DLT, BARE], bound=bound)
        ours, dlt = self.select("latency", OURS), self.select("latency", DLT)
        lines = [table, ""]
        if ours:
            pipe = median([n / r.extra["pipeline_s"] for r in ours if r.extra.get("pipeline_s")])
            startup = median([r.wall_s - r.extra["pipeline_s"] for r in ours
                              if r.extra.get("pipeline_s")])
            lines.append(f"{OURS} inside its pipeline (summary duration_s): {pipe:.1f} ids/s "
                         f"= {pipe / bound:.1%} of the bound; start-up, migration and exit "
                         f"took {startup:.2f} s of the wall time")
        lines += self.ratio_lines("latency", ours, dlt)
        self.sections.append((f"Latency-bound: simulator latency {LATENCY_MS} ms, concurrency "
                              f"{CONCURRENCY}, {n:,} ids (bound {bound:.0f} ids/s)",
                              "\n".join(lines)))
        share = median([r.ids_per_s for r in ours]) / bound if ours else None
        bare = self.select("latency", BARE)
        self.targets.append(Target(
            "latency", f"end-to-end >= {TARGET_LATENCY_SHARE:.0%} of {bound:.0f} ids/s "
            f"({TARGET_LATENCY_SHARE * bound:.0f} ids/s)",
            f"{share * bound:.0f} ids/s = {share:.1%} (dlt "
            f"{_share(dlt, bound)}, bare requests {_share(bare, bound)})" if share else "-",
            share >= TARGET_LATENCY_SHARE if share else None,
            "" if n == FULL["latency_ids"] else f"quick size: {n} ids"))

    def scenario_cpu(self) -> None:
        n = self.sizes["cpu_ids"]
        ids, expected = self.ids_file("cpu", n)
        log(f"CPU per id: latency 0, concurrency {CONCURRENCY}, {n} ids, {self.rounds} round(s)")
        with self.simulator(0) as url:
            for rnd in range(1, self.rounds + 1):
                self.attempt("cpu ours", self.run_ours, "cpu", rnd, url, ids, n, expected)
                self.attempt("cpu dlt", self.run_dlt, "cpu", rnd, url, ids, n, expected)
        ours, dlt = self.select("cpu", OURS), self.select("cpu", DLT)
        lines = [self.side_table("cpu", [OURS, DLT]), "", *self.ratio_lines("cpu", ours, dlt)]
        self.sections.append((f"CPU per id: simulator latency 0, concurrency {CONCURRENCY}, "
                              f"{n:,} ids (whole client process: start-up, fetch, parse, "
                              "transform, load)", "\n".join(lines)))
        if ours and dlt:
            a, b = median([r.cpu_ms_per_id for r in ours]), median([r.cpu_ms_per_id for r in dlt])
            self.targets.append(Target(
                "cpu", f"client CPU per id <= {TARGET_CPU_RATIO:.0%} of dlt's",
                f"{a:.3f} vs {b:.3f} ms/id = {a / b:.0%} of dlt's", a / b <= TARGET_CPU_RATIO,
                "" if n == FULL["cpu_ids"] else f"quick size: {n} ids"))
        else:
            self.targets.append(Target("cpu", "client CPU per id <= 50% of dlt's", "-", None))

    def scenario_memory(self) -> None:
        small, large = self.sizes["memory_ours"]
        dlt_sizes = self.sizes["memory_dlt"]
        log(f"memory: latency 0, ours at {small} and {large} ids, dlt at {dlt_sizes[0]} and "
            f"{dlt_sizes[1]} ids, {self.rounds} round(s)")
        plan = [(OURS, small), (DLT, dlt_sizes[0]), (OURS, large), (DLT, dlt_sizes[1])]
        files = {n: self.ids_file("mem", n) for _, n in plan}
        with self.simulator(0) as url:
            for rnd in range(1, self.rounds + 1):
                for side, n in plan:
                    ids, expected = files[n]
                    fn = self.run_ours if side == OURS else self.run_dlt
                    self.attempt(f"memory {side} {n}", fn, "memory", rnd, url, ids, n, expected)
        rows = []
        for side, n in sorted(plan, key=lambda p: (p[0] != OURS, p[1])):
            rows.append(self.summary_row(self.select("memory", side, n), side, f"{n:,}"))
        table = _render(["side", "ids", "wall s", "ids/s", "CPU ms/id", "peak RSS MB",
                         "rows landed"], rows)
        rss = {(side, n): median([r.rss_mb for r in self.select("memory", side, n)])
               for side, n in plan}
        cpu = {(side, n): median([r.cpu_s for r in self.select("memory", side, n)])
               for side, n in plan}
        lines = [table, ""]
        growth, marginal = {}, {}
        for side, (a, b) in ((OURS, (small, large)), (DLT, dlt_sizes)):
            if rss[(side, a)] != rss[(side, a)] or rss[(side, b)] != rss[(side, b)]:
                continue  # NaN: a size failed
            growth[side] = rss[(side, b)] / rss[(side, a)] - 1
            marginal[side] = 1000 * (cpu[(side, b)] - cpu[(side, a)]) / (b - a)
            lines.append(f"{side}: peak RSS {rss[(side, a)]:.1f} MB at {a:,} ids, "
                         f"{rss[(side, b)]:.1f} MB at {b:,} ids: growth {growth[side]:+.1%}"
                         + (" (dlt is run at these smaller sizes only: its memory grows with "
                            "the ids)" if side == DLT else ""))
        if len(marginal) == 2:
            lines.append(f"marginal CPU per id between the two sizes (start-up cost removed): "
                         f"{OURS} {marginal[OURS]:.3f} ms, {DLT} {marginal[DLT]:.3f} ms "
                         f"({marginal[OURS] / marginal[DLT]:.0%})")
        self.sections.append((f"Memory: simulator latency 0, concurrency {CONCURRENCY}; "
                              f"dlt at {dlt_sizes[0]:,} and {dlt_sizes[1]:,} ids only",
                              "\n".join(lines)))
        note = "" if large == FULL["memory_ours"][1] else f"quick sizes: {small} and {large} ids"
        self.targets.append(Target(
            "memory", f"peak RSS <= {TARGET_RSS_MB} MB at {FULL['memory_ours'][1]:,} ids",
            f"{rss[(OURS, large)]:.1f} MB at {large:,} ids",
            _cmp(rss[(OURS, large)], lambda v: v <= TARGET_RSS_MB), note))
        self.targets.append(Target(
            "memory", f"growth < {TARGET_RSS_GROWTH:.0%} from {FULL['memory_ours'][0]:,} to "
            f"{FULL['memory_ours'][1]:,} ids",
            f"{growth[OURS]:+.1%} ({small:,} -> {large:,} ids)" if OURS in growth else "-",
            growth[OURS] < TARGET_RSS_GROWTH if OURS in growth else None, note))

    def scenario_loader(self) -> None:
        n = self.sizes["loader_calls"]
        log(f"loader alone: {n} calls in batches of 500, half conflicting, and a raw COPY; "
            f"{self.rounds} round(s)")
        results = []
        for rnd in range(1, self.rounds + 1):
            out = self.attempt("loader", self._loader_round, rnd, n)
            if out:
                results.append(out)
        if not results:
            self.targets.append(Target("loader", f">= {TARGET_LOADER_CALLS_S:,} calls/s", "-",
                                       None))
            return
        load_rate = median([r["loader"]["calls"] / r["loader"]["seconds"] for r in results])
        load_cpu = median([1e6 * r["loader"]["client_cpu_s"] / r["loader"]["calls"]
                           for r in results])
        copy_rate = {k: median([r["copy"][k]["rows"] / r["copy"][k]["seconds"] for r in results])
                     for k in ("bare", "indexed")}
        rows = [
            ["Loader.load (5 tables, upsert)", f"{n:,}",
             f"{median([r['loader']['seconds'] for r in results]):.3f}", f"{load_rate:,.0f}",
             f"{load_cpu:.0f}", _rows_cell([r["loader"]["rows"] for r in results], n)],
        ]
        for key, label in (("bare", "COPY of the call rows (ceiling)"),
                           ("indexed", "COPY, calls' PK and indexes")):
            rows.append([label, f"{n:,}",
                         f"{median([r['copy'][key]['seconds'] for r in results]):.3f}",
                         f"{copy_rate[key]:,.0f}", "-",
                         _rows_cell([r["copy"][key]["rows"] for r in results], n)])
        table = _render(["what", "calls", "seconds", "rows/s", "client CPU us/call",
                         "rows landed"], rows)
        lines = [table, "", f"Loader.load reaches {load_rate / copy_rate['bare']:.1%} of the "
                 f"COPY ceiling ({load_rate / copy_rate['indexed']:.1%} of a COPY into a table "
                 "with the calls table's primary key and indexes). The COPY tables have the "
                 "calls table's columns (raw as jsonb, sent as JSON text) and no foreign keys; "
                 "client CPU is the loader process's (Python), not the PostgreSQL server's."]
        self.sections.append((f"Loader alone: {n:,} calls already fetched, batches of 500, "
                              "half of them conflicting", "\n".join(lines)))
        self.targets.append(Target(
            "loader", f">= {TARGET_LOADER_CALLS_S:,} calls/s",
            f"{load_rate:,.0f} calls/s (COPY ceiling {copy_rate['bare']:,.0f} rows/s)",
            load_rate >= TARGET_LOADER_CALLS_S,
            "" if n == FULL["loader_calls"] else f"quick size: {n} calls"))

    def _loader_round(self, rnd: int, n: int) -> dict:
        with self.fresh_db("loader") as load_url, self.fresh_db("copy") as copy_url:
            cmd = [PY, str(HERE / "loader_bench.py"), "--db-url", load_url, "--copy-db-url",
                   copy_url, "--calls", str(n), "--batch-size", "500"]
            child = measure(cmd, env=self.env, cwd=self.work, timeout_s=timeout_for(n) + 120)
        out = child.last_json()
        if child.returncode != 0 or not out:
            raise BenchError(f"loader_bench: {child.why()}")
        ld, cp = out["loader"], out["copy"]
        log(f"  [loader round {rnd}] Loader.load {ld['calls']} calls in {ld['seconds']:.3f} s "
            f"= {ld['calls'] / ld['seconds']:,.0f} calls/s; COPY "
            + "; ".join(f"{k} {v['rows'] / v['seconds']:,.0f} rows/s" for k, v in cp.items()))
        landed = [("Loader.load", ld["rows"])] + [(f"COPY {k}", v["rows"]) for k, v in cp.items()]
        for what, got in landed:
            if got != n:
                self.failures.append(f"loader round {rnd}: {what} landed {got} rows, not {n}")
        return out

    def scenario_incremental(self) -> None:
        n = self.sizes["incremental_ids"]
        # "already-loaded ids": all servable, so the re-run has nothing to fetch (404 ids are
        # never `loaded` and --skip-loaded rightly fetches them again).
        ids, expected = self.ids_file("inc", n, servable_only=True)
        log(f"incremental re-run: {n} ids, latency 0, then --skip-loaded; {self.rounds} "
            "round(s)")
        pairs = []
        with self.simulator(0) as url:
            for rnd in range(1, self.rounds + 1):
                with self.fresh_db("incr") as db_url:
                    first = self.attempt("incremental first", self.run_ours, "incremental",
                                         rnd, url, ids, n, expected, db_url=db_url,
                                         side="first run")
                    if first is None:
                        continue
                    again = self.attempt("incremental skip", self.run_ours, "incremental",
                                         rnd, url, ids, n, expected, db_url=db_url,
                                         skip_loaded=True, side="--skip-loaded")
                    if again is not None:
                        pairs.append((first, again))
        if not pairs:
            self.targets.append(Target("incremental", "< 5% of the first run", "-", None))
            return
        rows = [self.summary_row([p[0] for p in pairs], "first run", f"{n:,}"),
                self.summary_row([p[1] for p in pairs], "--skip-loaded", f"{n:,}")]
        table = _render(["run", "ids", "wall s", "ids/s", "CPU ms/id", "peak RSS MB",
                         "rows landed"], rows)
        ratio = median([b.wall_s / a.wall_s for a, b in pairs])
        skipped = median([b.extra.get("skipped") or 0 for _, b in pairs])
        lines = [table, "", f"--skip-loaded took {ratio:.1%} of the first run's wall time "
                 f"({skipped:,.0f} ids skipped as loaded)"]
        self.sections.append((f"Incremental re-run: {n:,} ids already loaded, latency 0, "
                              "same command with --skip-loaded", "\n".join(lines)))
        self.targets.append(Target(
            "incremental", f"--skip-loaded over {FULL['incremental_ids']:,} loaded ids < "
            f"{TARGET_INCREMENTAL_RATIO:.0%} of the first run's time",
            f"{ratio:.1%} ({median([b.wall_s for _, b in pairs]):.2f} s vs "
            f"{median([a.wall_s for a, _ in pairs]):.2f} s)",
            ratio < TARGET_INCREMENTAL_RATIO,
            "" if n == FULL["incremental_ids"] else f"quick size: {n} ids"))

    # -- tables --------------------------------------------------------------------------------

    def summary_row(self, runs: list[Run], label: str, size: str,
                    bound: float | None = None) -> list[str]:
        if not runs:
            return [label, size, *["-"] * (5 if bound else 4), "failed"]
        ids_s = median([r.ids_per_s for r in runs])
        row = [label, size, f"{median([r.wall_s for r in runs]):.2f}", f"{ids_s:.1f}"]
        if bound:
            row.append(f"{ids_s / bound:.1%}")
        row += [f"{median([r.cpu_ms_per_id for r in runs]):.3f}",
                f"{median([r.rss_mb for r in runs]):.1f}",
                _rows_cell([r.rows for r in runs], runs[0].expected,
                           fetched=runs[0].extra.get("fetched_only", False))]
        return row

    def side_table(self, scenario: str, sides: list[str], bound: float | None = None) -> str:
        headers = ["side", "ids", "wall s", "ids/s"] + (["% of bound"] if bound else [])
        headers += ["CPU ms/id", "peak RSS MB", "rows landed"]
        rows = []
        for side in sides:
            runs = self.select(scenario, side)
            size = f"{runs[0].size:,}" if runs else "-"
            rows.append(self.summary_row(runs, side, size, bound))
        return _render(headers, rows)

    def ratio_lines(self, scenario: str, ours: list[Run], dlt: list[Run]) -> list[str]:
        if not ours or not dlt:
            return []
        o_ids, d_ids = median([r.ids_per_s for r in ours]), median([r.ids_per_s for r in dlt])
        o_cpu, d_cpu = (median([r.cpu_ms_per_id for r in ours]),
                        median([r.cpu_ms_per_id for r in dlt]))
        o_rss, d_rss = median([r.rss_mb for r in ours]), median([r.rss_mb for r in dlt])
        return [f"ratios {OURS} / {DLT}: throughput x{o_ids / d_ids:.2f}, CPU per id "
                f"{o_cpu / d_cpu:.0%}, peak RSS {o_rss / d_rss:.0%}"]

    # -- driving -------------------------------------------------------------------------------

    def warm_up(self, with_dlt: bool) -> None:
        """Import each side once, unmeasured, so the first measured run does not pay for cold
        files and bytecode compilation that later rounds skip."""
        imports = ["import etl.cli, etl.sync, etl.extract, etl.load, etl.db, alembic.command"]
        if with_dlt:
            imports.append("import dlt, dlt.destinations, dlt.sources.helpers.requests")
        for code in imports:
            done = subprocess.run([PY, "-c", code], env=self.env, cwd=self.work, timeout=300,
                                  capture_output=True, text=True)
            if done.returncode != 0:
                raise BenchError(f"{code!r} failed: {done.stderr.strip().splitlines()[-1:]}")

    def run(self, scenarios: list[str]) -> None:
        self.warm_up(with_dlt=bool({"latency", "cpu", "memory"} & set(scenarios)))
        for name in scenarios:
            started = time.perf_counter()
            try:
                getattr(self, f"scenario_{name}")()
            except BenchError as exc:  # e.g. the simulator did not start: skip the scenario
                self.failures.append(f"{name}: {exc}")
                log(f"  FAILED {name}: {exc}")
            log(f"  ({name} took {time.perf_counter() - started:.0f} s)")


def _wait_ready(url: str, proc: subprocess.Popen, timeout_s: float) -> None:
    req = urllib.request.Request(url + "/v1/calls/nf-ready", headers={
        "x-commubo-tenantId": DEFAULT_TENANT_ID, "x-commubo-accessToken": DEFAULT_ACCESS_TOKEN})
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"the simulator exited with code {proc.returncode}")
        try:
            urllib.request.urlopen(req, timeout=2).close()
            return
        except urllib.error.HTTPError as exc:
            if exc.code == 404:  # nf- ids are always 404: the simulator answers
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise BenchError(f"the simulator at {url} did not answer within {timeout_s:.0f}s")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _share(runs: list[Run], bound: float) -> str:
    return f"{median([r.ids_per_s for r in runs]) / bound:.1%}" if runs else "-"


def _cmp(value: float, ok) -> bool | None:
    return None if value != value else ok(value)  # NaN: not measured


def _rows_cell(rows: list[int | None], expected: int | None, fetched: bool = False) -> str:
    if any(r is None for r in rows):
        return "?"
    worst = min(rows, key=lambda r: (r == expected, r))
    word = "fetched, no DB" if fetched else "ok"
    return f"{worst:,}/{expected:,} {word}" if worst == expected else f"{worst:,}/{expected:,} !!"


def _render(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = [c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)]
        return "  ".join([first, *rest]).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])


# -- the machine and the report ----------------------------------------------------------------


def machine(pg_url: str) -> dict[str, str]:
    info = facts(pg_url)
    info["PostgreSQL"] = f"{info['PostgreSQL']} (local, {_redact(pg_url)})"
    info["dlt"] = _version("dlt")
    info["commubo-etl"] = f"{_version('commubo-etl')}, {git_state()}"
    return info

def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        user, host = parts.netloc.rsplit("@", 1)
        return urlunsplit(parts._replace(netloc=f"{user.split(':')[0]}:***@{host}"))
    return url


def _spawn_floor(env: dict[str, str]) -> float:
    """ru_maxrss of a measured child that does nothing (`python -c pass`): no figure below it
    can be told apart (see measure.py)."""
    child = measure([PY, "-c", "pass"], env=env, cwd=REPO, timeout_s=30)
    return child.rss_mb


def report(bench: Bench, scenarios: list[str], info: dict[str, str], command: str,
           started: datetime, elapsed_s: float, loads: tuple[str, str]) -> str:
    mode = ("--quick (small sizes: a smoke run, not the targets' sizes)" if bench.args.quick
            else "full")
    out = ["# Benchmark results", "",
           "Written by `benchmarks/run.py`; do not edit by hand, run it again "
           "(see [the method](#method)).", "",
           f"- date: {started:%Y-%m-%d %H:%M} UTC, took {elapsed_s / 60:.1f} min",
           f"- command: `{command}`",
           f"- mode: {mode}, {bench.rounds} round(s), scenarios: {', '.join(scenarios)}",
           f"- load average (1 min) before / after: {loads[0]} / {loads[1]}"]
    out += [f"- {k}: {v}" for k, v in info.items()]
    out += ["", "## Targets", "", "| scenario | target | measured (median) | met |",
            "|---|---|---|---|"]
    for t in bench.targets:
        met = {True: "yes", False: "**no**", None: "not measured"}[t.met]
        note = f" ({t.note})" if t.note else ""
        out.append(f"| {t.scenario} | {t.text} | {t.measured}{note} | {met} |")
    if bench.failures:
        out += ["", "## Failed runs", ""] + [f"- {f}" for f in bench.failures]
    for title, text in bench.sections:
        out += ["", f"## {title}", "", "```text", text, "```"]
    out += ["", "## All runs", "", "| scenario | round | side | ids | wall s | CPU s | "
            "peak RSS MB | rows | in-process s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in bench.runs:
        inner = r.extra.get("pipeline_s")
        out.append(f"| {r.scenario} | {r.round} | {r.side} | {r.size} | {r.wall_s:.2f} | "
                   f"{r.cpu_s:.2f} | {r.rss_mb:.1f} | {r.rows} | "
                   f"{inner if inner is not None else '-'} |")
    out += ["", "## Method", "", METHOD.strip(), ""]
    return "\n".join(out)


METHOD = """
Run everything with `uv run --group bench python benchmarks/run.py` (about 20 minutes; add
`--quick` for a smoke run of a minute or two, `--only latency,cpu,memory,loader,incremental`
for some scenarios, `--rounds N`, `--results PATH` to write this file elsewhere). dlt is in the
`bench` dependency group only, never in the package's own dependencies.

- **Sides.** Ours is the real command, `python -m etl sync --ids-file F --db-url URL
  --base-url URL --concurrency 32 --json`. The peer is `benchmarks/dlt_pipeline.py`: a
  `@dlt.resource` of the ids, a `@dlt.transformer` with `@dlt.defer` fetching each id through
  `dlt.sources.helpers.requests` (retries included) with the two commubo headers,
  `write_disposition="merge"`, `primary_key="callId"`, destination postgres, normalisation
  defaults (phone numbers become a child table), `extract.workers` and
  `extract.max_parallel_items` set to the concurrency (dlt's defaults, 5 and 20, would cap it
  below 32). The reference `benchmarks/bare_requests.py` is a `requests` thread pool that
  fetches and parses JSON and stores nothing.
- **Measuring.** Each run is a child process, measured with `os.wait4`: wall time from fork
  to exit (interpreter start-up, imports, schema setup in a fresh database, fetch, load,
  exit), user+sys CPU and `ru_maxrss` of that child only. The children are forked by a tiny
  launcher (`benchmarks/measure.py`), because on Linux a child's `ru_maxrss` starts at the
  size of the process it was forked from; the "peak RSS floor" above is what a measured
  `python -c pass` reports. ids/s = ids in the file
  / wall time. The simulator (`python -m etl simulate`) is a separate process, one per
  scenario shared by every side, so its CPU is not counted; the machine's 2 cores are shared
  by the client, the simulator and PostgreSQL, as in the issue.
- **Databases.** Every run gets a fresh database (`CREATE DATABASE bench_run_...`, dropped
  afterwards) on the same local PostgreSQL. Rows landed are counted in `calls` (dlt:
  `commubo.calls`) and must equal the ids the simulator serves (about 3% of ids are 404).
- **Rounds.** Sides run in turn (A B A B) in the same run for every round; tables show the
  median of the rounds, the "All runs" table every run.
- **Loader alone.** `benchmarks/loader_bench.py`, in a worker process so the payloads it holds
  do not inflate the driver: N outcomes built from `payload_for`, every other one loaded
  before the clock starts, then `Loader(engine, run_id).load` over all N in batches of 500
  (all five data tables plus the status rows; half the calls conflict), against a raw
  psycopg `COPY` of the same call rows (calls' columns, `raw` as JSON text) into a fresh
  table with those columns only: the ceiling. A second COPY into a table that also has the
  calls table's primary key and indexes (never foreign keys) shows what the indexes cost.
- **Incremental.** A first sync of the ids into a fresh database, then the same command with
  `--skip-loaded`; the ratio of the two wall times.
- **Noise.** Another busy process on the machine skews every figure: the load average before
  and after is recorded above; run on an otherwise idle machine.
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--rounds", type=int, help="rounds per scenario (default 3, --quick 1)")
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    p.add_argument("--only", help=f"comma-separated scenarios: {','.join(SCENARIOS)}")
    p.add_argument("--pg-url", default=os.environ.get(
        "BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/test"),
        help="a database on the PostgreSQL server to use; bench_run_* databases are created "
        "and dropped beside it (env BENCH_PG_URL)")
    p.add_argument("--results", default=str(HERE / "RESULTS.md"),
                   help="where to write the Markdown report (default benchmarks/RESULTS.md)")
    args = p.parse_args(argv)
    scenarios = list(SCENARIOS)
    if args.only:
        scenarios = [s.strip() for s in args.only.split(",") if s.strip()]
        unknown = [s for s in scenarios if s not in SCENARIOS]
        if unknown:
            p.error(f"unknown scenario(s) {', '.join(unknown)}; choose from "
                    f"{', '.join(SCENARIOS)}")
    if args.rounds is not None and args.rounds < 1:
        p.error("--rounds must be at least 1")
    if {"latency", "cpu", "memory"} & set(scenarios) and importlib.util.find_spec("dlt") is None:
        p.error("dlt is not installed: run with `uv run --group bench python benchmarks/run.py`")

    command = "uv run --group bench python " + shlex.join(
        [os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]])
    started = datetime.now(UTC)
    load_before = f"{os.getloadavg()[0]:.2f}"
    if os.getloadavg()[0] >= 1:
        log(f"warning: load average {load_before}: the machine is busy, figures will be noisy")
    bench = Bench(args)
    t0 = time.perf_counter()
    try:
        info = machine(args.pg_url)
        bench.drop_stale_databases()
        floor = _spawn_floor(bench.env)
        info["peak RSS floor"] = f"{floor:.1f} MB (ru_maxrss of a measured `python -c pass`)"
        log("machine: " + "; ".join(f"{k} {v}" for k, v in info.items()))
        bench.run(scenarios)
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    except BenchError as exc:
        log(f"benchmark stopped: {exc}")
        return 1
    finally:
        bench.close()
    elapsed = time.perf_counter() - t0

    print(f"\ncommubo-etl benchmarks, {started:%Y-%m-%d %H:%M} UTC, "
          f"{'quick' if args.quick else 'full'}, {bench.rounds} round(s), medians\n")
    for title, text in bench.sections:
        print(f"== {title}\n{text}\n")
    print("== Targets")
    print(_render(["scenario", "target", "measured", "met"],
                  [[t.scenario, t.text, t.measured + (f" ({t.note})" if t.note else ""),
                    {True: "yes", False: "NO", None: "-"}[t.met]] for t in bench.targets]))
    if bench.failures:
        print("\n== Failed runs")
        for f in bench.failures:
            print(f"- {f}")
    loads = (load_before, f"{os.getloadavg()[0]:.2f}")
    Path(args.results).write_text(report(bench, scenarios, info, command, started, elapsed,
                                         loads))
    print(f"\nwritten to {os.path.relpath(args.results)} in {elapsed / 60:.1f} min")
    return 1 if bench.failures else 0


if __name__ == "__main__":
    sys.exit(main())
