"""The benchmark harness: one implementation of what every script under benchmarks/ needs,
split by job into the modules beside this one; this one holds the session, `Context`.

The scripts (`run.py`, `reliability.py`, ...) are lists of scenarios over it; they import each
piece from the module that holds it (`from harness import Context`, `from bench_render import
Stat`, ...: Python puts the script's directory, benchmarks/, on sys.path). Nothing here imports
tests/: the expected-warehouse oracle is `etl.testing`.

Where each piece is, one of each:

- bench_base.py: `log(msg)` (progress on stderr, with the time of day), `BenchError` (a run
  that could not be measured), `HERE`, `REPO`, `PY`.
- bench_proc.py, processes: `child_env(...)`, the environment of every child process (`etl
  sync`, the simulator, dlt): the caller's, less every `ETL_*`, `COMMUBO_*` and `DLT_*`
  variable (a stray setting would skew a run), plus the simulator's tenant id and access
  token; `simulator_process(...)` (`etl simulate` as a subprocess, yielded once it answers;
  `simulator_stats(url)`: its counters and per-second series, from `/_stats`); `measure(cmd,
  ...) -> Child` (a child run through the tiny launcher measure.py: wall time, user+sys CPU
  and ru_maxrss of that child alone, from os.wait4; killed with its process group after a
  timeout); `measure_all` (several at once); `start`/`finish` (an unmeasured child one may
  signal or kill); `etl_command`; `summary_json` (the `--json` summary a run printed);
  `sync_timeout`; `wait_for`.
- bench_db.py, databases on a PostgreSQL server: `fresh_database(server, tag)` (a context
  manager: a new `bench_run_<pid>_<n>_<tag>` database, dropped WITH (FORCE) afterwards),
  `drop_stale_databases(server)` (those of killed earlier runs), `libpq_url`, `redact`,
  `count_rows`.
- bench_machine.py, facts: `machine_facts(pg_url)` (CPUs, memory, OS, Python, PostgreSQL,
  versions, the git commit), `load_average()`, `command_line()`; `CpuMeter` (the CPU the
  machine, the simulator and the PostgreSQL server spent while a block ran: is the machine
  saturated?).
- bench_render.py, figures: `Stat` (median and spread min–max over rounds), `Target` (met only
  when the whole spread meets it), `text_table`, `markdown_table`, `side_table` (the table of
  measured sides), `report_header` (the top of a Markdown report).
- bench_scenarios.py, scenarios: `Scenario`, `Registry` (the list a script runs, `--only`
  parsing), `Results` (what a scenario hands back: sections, targets, runs, failures,
  figures, records), `Run`, `run_scenarios`.
- harness.py (this module): `Context` (one session: work dir, env, server, rounds; fresh
  databases, the simulator, ids files, the measured sides `sync` (ours), `sync_shards` (ours
  as N shard processes at once), `dlt`, `bare`, and `figure` (a picture beside the report)),
  and the sides' names `OURS`, `DLT`, `BARE` and their `CONCURRENCY`.

Adding a scenario to run.py (its context is `run.Bench`, a `Context`): a function that takes
the context and returns Results, registered in run.py's SCENARIOS (`--only` and `--help` then
know it; its sections, targets and runs go to stdout and RESULTS.md):

    @SCENARIOS.add("batch-1000", "latency 50 ms, 4,000 ids, --batch-size 1000")
    def batch_1000(ctx: Bench) -> Results:
        res = Results()
        ids, expected = ctx.ids_file("batch", 4_000)
        with ctx.simulator(latency_ms=50) as url:
            for rnd in ctx.round_numbers():
                res.record("batch-1000", ctx.sync, "batch-1000", rnd, url, ids, 4_000,
                           expected, options=["--batch-size", "1000"])
        runs = res.select("batch-1000", OURS)
        res.section("Batches of 1,000: 4,000 ids", side_table([side_row(runs, OURS, "4,000")]))
        ids_s = Stat.of(r.ids_per_s for r in runs)
        res.targets.append(Target.of("batch-1000", ">= 600 ids/s", ids_s, lambda v: v >= 600,
                                     f"{ids_s.fmt('.0f')} ids/s"))
        return res

A longer scenario may live in a module of its own beside run.py (scale_out.py,
rate_limited.py, rerun_writes.py): plain functions over the context that run.py registers
(`SCENARIOS.add(name, help)(module.function)`).

Several processes at once: `measure_all([cmd, ...], env=ctx.env, cwd=ctx.work, timeout_s=..)`
(shards of one sync: `ctx.sync_shards`); a picture: `ctx.figure(res, "name.png", caption, draw,
...)` saves it under `ctx.figure_dir` (beside the report; ctx.work is removed at the end) and
appends (caption, path) to `res.figures`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import shutil
import subprocess
import sysconfig
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from bench_base import HERE, PY, REPO, BenchError, log
from bench_db import count_rows, fresh_database, libpq_url
from bench_machine import CpuMeter
from bench_proc import (
    Child,
    child_env,
    etl_command,
    measure,
    measure_all,
    simulator_process,
    sync_timeout,
)
from bench_scenarios import Results, Run

from etl.simulator import payload_for

CONCURRENCY = 32  # the client concurrency of the measured sides, unless a scenario says
OURS, DLT, BARE = "commubo-etl", "dlt 1.31", "bare requests"


class Context:
    """One benchmark session, given to every scenario: the PostgreSQL server (`pg_url`, a
    libpq URL), the rounds, a work directory (removed by `close`), the children's `env`,
    and the pieces a scenario is made of: fresh databases, the simulator, ids files, and the
    measured sides (`sync`: `etl sync`; `dlt`: benchmarks/dlt_pipeline.py; `bare`:
    benchmarks/bare_requests.py). A script subclasses it for its own settings."""

    def __init__(self, pg_url: str, *, rounds: int = 1, quick: bool = False,
                 args: Any = None, prefix: str = "commubo-bench-") -> None:
        self.pg_url = libpq_url(pg_url)
        self.rounds = rounds
        self.quick = quick
        self.args = args
        self.work = Path(tempfile.mkdtemp(prefix=prefix))
        self.env = child_env()
        self.figure_dir: Path | None = None  # where `figure` saves pictures (None: nowhere)
        self._servable: dict[tuple[str, int, bool], int] = {}

    def close(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)

    def __enter__(self) -> Context:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def round_numbers(self) -> range:
        return range(1, self.rounds + 1)

    # -- databases, the simulator, ids ------------------------------------------------------

    def fresh_db(self, tag: str) -> contextlib.AbstractContextManager[str]:
        return fresh_database(self.pg_url, tag)

    def simulator(self, *options: str, latency_ms: float = 0
                  ) -> contextlib.AbstractContextManager[str]:
        """`etl simulate` in a subprocess (see `simulator_process`); yields its URL."""
        return simulator_process(*options, latency_ms=latency_ms, env=self.env, cwd=self.work)

    def write_ids(self, name: str, ids: Iterable[str]) -> Path:
        path = self.work / f"{name}.txt"
        path.write_text("\n".join(ids) + "\n")
        return path

    def ids_file(self, prefix: str, n: int, servable_only: bool = False) -> tuple[Path, int]:
        """A file of n ordinary ids `<prefix>-0000000`..., and how many the simulator serves
        (about 3% are 404). With `servable_only`, n ids that all load."""
        name = f"ids-{prefix}-{n}{'-servable' if servable_only else ''}"
        key = (prefix, n, servable_only)
        if key not in self._servable:
            if servable_only:
                candidates = (f"{prefix}-{i:07d}" for i in itertools.count())
                ids = list(itertools.islice(
                    (i for i in candidates if payload_for(i) is not None), n))
            else:
                ids = [f"{prefix}-{i:07d}" for i in range(n)]
            self.write_ids(name, ids)
            self._servable[key] = sum(payload_for(i) is not None for i in ids)
        return self.work / f"{name}.txt", self._servable[key]

    # -- measured children ------------------------------------------------------------------

    def measure(self, cmd: list[str], timeout_s: float, env: dict[str, str] | None = None
                ) -> Child:
        """`measure` in the work directory, with `self.env` unless `env` is given."""
        return measure(cmd, env=self.env if env is None else env, cwd=self.work,
                       timeout_s=timeout_s)

    def sync(self, scenario: str, rnd: int, base_url: str, ids: Path, n: int,
             expected: int | None, *, db_url: str | None = None, options: Sequence[str] = (),
             side: str = OURS, concurrency: int = CONCURRENCY, ok_codes: Sequence[int] = (0,),
             env: dict[str, str] | None = None, timeout_s: float | None = None) -> Run:
        """`etl sync --ids-file IDS --json OPTIONS` measured, into `db_url` (a fresh database
        when None); rows landed counted in calls. An exit code of `ok_codes` expected (1: a
        finished run with failed ids), and its summary."""
        with contextlib.ExitStack() as stack:
            if db_url is None:
                db_url = stack.enter_context(self.fresh_db("ours"))
            child = self.measure(_sync_command(ids, db_url, base_url, concurrency, options),
                                 timeout_s or sync_timeout(n), env)
            summary = child.last_json()
            if child.returncode not in ok_codes or not summary:
                raise BenchError(f"{side}: {child.why()}")
            rows = count_rows(db_url, "calls")
        return _run(scenario, side, n, rnd, child, rows, expected,
                    {"pipeline_s": summary.get("duration_s"), "skipped": summary.get("skipped"),
                     "loaded": summary.get("loaded"), "summary": summary})

    def sync_shards(self, scenario: str, rnd: int, base_url: str, ids: Path, n: int,
                    expected: int | None, shards: int, *, options: Sequence[str] = (),
                    side: str | None = None, concurrency: int = CONCURRENCY,
                    timeout_s: float | None = None) -> Run:
        """`shards` processes `etl sync --ids-file IDS --shard-index I --num-shards SHARDS
        --json OPTIONS` at once (`measure_all`), each at `concurrency`, into one fresh
        database: one Run of them all. Its wall time is from the start of the first to the end
        of the last (so ids/s is the aggregate), its CPU the sum of the children's, its peak
        RSS the largest; `extra["cpu"]` is the machine's CpuUse meanwhile (its simulator and
        PostgreSQL apart), `extra["children"]` each child's (wall s, CPU s, summary)."""
        side = side or f"{shards} process{'es' if shards > 1 else ''}"
        with self.fresh_db(f"shards{shards}") as db_url:
            cmds = [_sync_command(ids, db_url, base_url, concurrency,
                                  [*options, "--shard-index", str(i), "--num-shards",
                                   str(shards)]) for i in range(shards)]
            with CpuMeter(pg_url=self.pg_url, simulator_url=base_url) as meter:
                started = time.perf_counter()
                children = measure_all(cmds, env=self.env, cwd=self.work,
                                       timeout_s=timeout_s or sync_timeout(n))
                wall = time.perf_counter() - started
            summaries = [c.last_json() for c in children]
            for i, (child, summary) in enumerate(zip(children, summaries, strict=True)):
                if child.returncode != 0 or not summary:
                    raise BenchError(f"{side}, shard {i}: {child.why()}")
            rows = count_rows(db_url, "calls")
        cpu = sum(c.cpu_s for c in children)
        use = dataclasses.replace(meter.use, clients_s=cpu)
        log(f"  [{scenario} round {rnd}] {side}: {use.breakdown()}, load average "
            f"{use.load1:.2f}")
        return Run(scenario, side, n, rnd, wall, cpu, max(c.rss_mb for c in children), rows,
                   expected, {"shards": shards, "cpu": use,
                              "pipeline_s": max(s.get("duration_s") or 0 for s in summaries),
                              "children": [(c.wall_s, c.cpu_s, s) for c, s in
                                           zip(children, summaries, strict=True)]})

    def dlt(self, scenario: str, rnd: int, base_url: str, ids: Path, n: int,
            expected: int | None, *, side: str = DLT, concurrency: int = CONCURRENCY,
            timeout_s: float | None = None) -> Run:
        """benchmarks/dlt_pipeline.py measured, into a fresh database."""
        work_dir = self.work / f"dlt-{scenario}-{rnd}-{n}"
        with self.fresh_db("dlt") as db_url:
            cmd = [PY, str(HERE / "dlt_pipeline.py"), str(ids), "--base-url", base_url,
                   "--db-url", db_url, "--concurrency", str(concurrency),
                   "--work-dir", str(work_dir)]
            child = self.measure(cmd, timeout_s or sync_timeout(n))
            shutil.rmtree(work_dir, ignore_errors=True)
            out = child.last_json()
            if child.returncode != 0 or not out:
                raise BenchError(f"{side}: {child.why()}")
            rows = count_rows(db_url, f"{out['dataset']}.{out['table']}")
        return _run(scenario, side, n, rnd, child, rows, expected,
                    {"pipeline_s": out.get("duration_s")})

    def bare(self, scenario: str, rnd: int, base_url: str, ids: Path, n: int,
             expected: int | None, *, side: str = BARE, concurrency: int = CONCURRENCY) -> Run:
        """benchmarks/bare_requests.py measured: fetches only, no database."""
        cmd = [PY, str(HERE / "bare_requests.py"), str(ids), "--base-url", base_url,
               "--concurrency", str(concurrency)]
        child = self.measure(cmd, sync_timeout(n))
        out = child.last_json()
        if child.returncode != 0 or not out:
            raise BenchError(f"{side}: {child.why()}")
        return _run(scenario, side, n, rnd, child, out["ok"], expected,
                    {"pipeline_s": out.get("duration_s"), "fetched_only": True})

    def figure(self, res: Results, name: str, caption: str,
               draw: Callable[..., None], *args: Any) -> Path | None:
        """A picture for the report: `draw(path, *args)` saves it as `figure_dir/name`, and
        (caption, path) goes to `res.figures`. Nothing when figure_dir is None; an error of
        `draw` (matplotlib missing, say) is a failure recorded in `res`."""
        if self.figure_dir is None:
            return None
        path = self.figure_dir / name
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            draw(path, *args)
        except Exception as exc:  # a picture is never worth the rest of the report
            res.fail(f"picture {name}: {type(exc).__name__}: {exc}")
            return None
        res.figures.append((caption, path))
        log(f"  picture {path} ({path.stat().st_size / 1024:.0f} KiB)")
        return path

    def warm_up(self, modules: Iterable[str] = ()) -> None:
        """Compile the bytecode of the environment and of etl, then import etl's sync path
        (and `modules`) once, unmeasured, so no measured run pays for cold files or for
        compiling. An installed tool has its .pyc files (pip and `uv sync --compile-bytecode`
        write them at install), but `uv run` does not compile, and where
        PYTHONDONTWRITEBYTECODE is set (as on CI machines) no run would write them: every
        child, ours and dlt's alike, would compile every module it imports, each time (about
        0.8 s of CPU per `etl sync` start, more for dlt)."""
        site = sysconfig.get_paths()["purelib"]
        compile_all = [PY, "-m", "compileall", "-q", "-j", "0", site, str(REPO / "etl")]
        imports = ["import etl.cli, etl.sync, etl.extract, etl.load, etl.db, alembic.command",
                   *(f"import {m}" for m in modules)]
        env = {k: v for k, v in self.env.items() if k != "PYTHONDONTWRITEBYTECODE"}
        done = subprocess.run(compile_all, env=env, cwd=self.work, timeout=900,
                              capture_output=True, text=True)
        if done.returncode != 0:  # a file that does not compile is left as it is
            log(f"  compileall: exit {done.returncode}, "
                f"{done.stdout.strip().splitlines()[-1:] or done.stderr.strip()[-200:]}")
        for code in imports:
            done = subprocess.run([PY, "-c", code], env=self.env, cwd=self.work, timeout=300,
                                  capture_output=True, text=True)
            if done.returncode != 0:
                raise BenchError(f"{code!r} failed: {done.stderr.strip().splitlines()[-1:]}")

    def spawn_floor(self) -> float:
        """ru_maxrss of a measured child that does nothing (`python -c pass`): no figure
        below it can be told apart (see measure.py)."""
        return self.measure([PY, "-c", "pass"], 30).rss_mb


def _sync_command(ids: Path, db_url: str, base_url: str, concurrency: int,
                  options: Sequence[str]) -> list[str]:
    return etl_command("sync", "--ids-file", str(ids), "--db-url", db_url, "--base-url",
                       base_url, "--concurrency", str(concurrency), "--json", *options)


def _run(scenario: str, side: str, n: int, rnd: int, child: Child, rows: int | None,
         expected: int | None, extra: dict) -> Run:
    return Run(scenario, side, n, rnd, child.wall_s, child.cpu_s, child.rss_mb, rows,
               expected, extra)
