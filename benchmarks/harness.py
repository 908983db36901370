"""The benchmark harness: one implementation of what every script under benchmarks/ needs.

The scripts (`run.py`, `reliability.py`, ...) are lists of scenarios over it; they import it
as `from harness import ...` (Python puts the script's directory, benchmarks/, on sys.path).
Nothing here imports tests/: the expected-warehouse oracle is `etl.testing`.

What it holds, one of each:

- `log(msg)`: progress on stderr, with the time of day.
- `child_env(...)`: the environment of every child process (`etl sync`, the simulator, dlt):
  the caller's, less every `ETL_*`, `COMMUBO_*` and `DLT_*` variable (a stray setting would
  skew a run), plus the simulator's tenant id and access token.
- Databases on a PostgreSQL server: `fresh_database(server, tag)` (a context manager: a new
  `bench_run_<pid>_<n>_<tag>` database, dropped WITH (FORCE) afterwards),
  `drop_stale_databases(server)` (those of killed earlier runs), `libpq_url`, `redact`,
  `count_rows`.
- Processes: `simulator_process(...)` (`etl simulate` as a subprocess, yielded once it
  answers; `simulator_stats(url)`: its counters and per-second series, from `/_stats`);
  `measure(cmd, ...) -> Child` (a child run through the tiny launcher measure.py:
  wall time, user+sys CPU and ru_maxrss of that child alone, from os.wait4; killed with its
  process group after a timeout); `measure_all` (several at once); `start`/`finish` (an
  unmeasured child one may signal or kill); `etl_command`; `summary_json` (the `--json`
  summary a run printed); `wait_for`.
- Facts: `machine_facts(pg_url)` (CPUs, memory, OS, Python, PostgreSQL, versions, the git
  commit), `load_average()`, `command_line()`; `CpuMeter` (the CPU the machine, the simulator
  and the PostgreSQL server spent while a block ran: is the machine saturated?).
- Figures: `Stat` (median and spread min–max over rounds), `Target` (met only when the whole
  spread meets it), `text_table`, `markdown_table`, `side_table` (the table of measured sides).
- Scenarios: `Scenario`, `Registry` (the list a script runs, `--only` parsing), `Results`
  (what a scenario hands back: sections, targets, runs, failures, figures, records),
  `Context` (one session: work dir, env, server, rounds; fresh databases, the simulator, ids
  files, the measured sides `sync` (ours), `sync_shards` (ours as N shard processes at
  once), `dlt`, `bare`, and `figure` (a picture beside the report)), `run_scenarios`.

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
import importlib.metadata
import itertools
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg

from etl.config import display_url, normalize_database_url
from etl.simulator import DEFAULT_ACCESS_TOKEN, DEFAULT_TENANT_ID, payload_for

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PY = sys.executable
DB_PREFIX = "bench_run_"
CONCURRENCY = 32  # the client concurrency of the measured sides, unless a scenario says
OURS, DLT, BARE = "commubo-etl", "dlt 1.31", "bare requests"


class BenchError(Exception):
    """A run could not be measured (exit code, timeout, no summary, a service that did not
    start). `Results.attempt` records it as a failure and the benchmark goes on."""


def log(msg: str) -> None:
    """Progress on stderr, with the time of day (stdout is for the report)."""
    print(f"[{datetime.now():%H:%M:%S}] {msg}", file=sys.stderr, flush=True)


# -- the environment of children -------------------------------------------------------------


def child_env(*, base_url: str | None = None, db_url: str | None = None, **extra: str
              ) -> dict[str, str]:
    """The environment of a child: this process's, less every ETL_*, COMMUBO_* and DLT_*
    variable (a developer's ETL_CONFIG, a stray COMMUBO_BASE_URL or DLT setting would skew
    a run), plus the simulator's tenant id and access token, dlt's telemetry off, and
    COMMUBO_BASE_URL / ETL_DATABASE_URL when given."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ETL_", "COMMUBO_", "DLT_"))}
    env.update(COMMUBO_TENANT_ID=DEFAULT_TENANT_ID, COMMUBO_ACCESS_TOKEN=DEFAULT_ACCESS_TOKEN,
               RUNTIME__DLTHUB_TELEMETRY="false")
    if base_url is not None:
        env["COMMUBO_BASE_URL"] = base_url
    if db_url is not None:
        env["ETL_DATABASE_URL"] = db_url
    env.update(extra)
    return env


# -- databases -------------------------------------------------------------------------------


def libpq_url(url: str) -> str:
    """`url` (postgres://, postgresql:// or postgresql+psycopg://) as a libpq URL, which
    psycopg, `etl` and dlt all take."""
    return (normalize_database_url(url).set(drivername="postgresql")
            .render_as_string(hide_password=False))


def database_url(server: str, name: str) -> str:
    """The libpq URL of database `name` on the server of `server`."""
    return (normalize_database_url(server).set(drivername="postgresql", database=name)
            .render_as_string(hide_password=False))


def redact(url: str) -> str:
    """The URL for a report: the password masked."""
    return display_url(normalize_database_url(url).set(drivername="postgresql"))


_DB_SEQ = itertools.count(1)


@contextlib.contextmanager
def fresh_database(server: str, tag: str) -> Iterator[str]:
    """A new, empty database `bench_run_<pid>_<n>_<tag>` on the server of `server` (a libpq
    URL of any database there) for as long as the block runs; yields its libpq URL. Dropped
    WITH (FORCE) afterwards, so sessions of a killed child do not keep it."""
    tag = re.sub(r"[^a-z0-9_]", "_", tag.lower())
    name = f"{DB_PREFIX}{os.getpid()}_{next(_DB_SEQ)}_{tag}"[:63]
    with _admin(server) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield database_url(server, name)
    finally:
        with _admin(server) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def drop_stale_databases(server: str) -> list[str]:
    """Drop the databases of earlier benchmark runs that were killed before cleaning up (their
    process is gone); returns their names."""
    dropped = []
    with _admin(server) as conn:
        names = [r[0] for r in conn.execute(
            "SELECT datname FROM pg_database WHERE datname LIKE 'bench\\_run\\_%'")]
        for name in names:
            m = re.match(rf"{DB_PREFIX}(\d+)_", name)
            if m and not _pid_alive(int(m.group(1))):
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                log(f"dropped {name}, left over by an earlier benchmark run")
                dropped.append(name)
    return dropped


def count_rows(db_url: str, table: str) -> int:
    with psycopg.connect(db_url, connect_timeout=10) as conn:
        return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


def _admin(server: str) -> psycopg.Connection:
    return psycopg.connect(server, autocommit=True, connect_timeout=10)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# -- processes -------------------------------------------------------------------------------


def etl_command(*args: str) -> list[str]:
    """The `etl` command as this interpreter runs it: `python -m etl ARGS`."""
    return [PY, "-m", "etl", *args]


@contextlib.contextmanager
def simulator_process(*options: str, latency_ms: float = 0, env: dict[str, str], cwd: Path,
                      timeout_s: float = 30) -> Iterator[str]:
    """`etl simulate --latency-ms L OPTIONS` in a subprocess of its own (its CPU is not the
    client's), on a free port; yields its base URL once it answers, and stops it (SIGTERM, then
    SIGKILL after 10 s) after the block. Its output goes to simulator-<port>.log in `cwd`;
    `simulator_pid(url)` is its process id while the block runs."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with open(cwd / f"simulator-{port}.log", "wb") as logfile:
        proc = subprocess.Popen(
            etl_command("simulate", "--port", str(port), "--latency-ms", f"{latency_ms:g}",
                        *options),
            stdout=logfile, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            cwd=cwd)
        url = f"http://127.0.0.1:{port}"
        _SIMULATORS[url] = proc.pid
        try:
            _wait_ready(url, proc, timeout_s)
            yield url
        finally:
            _SIMULATORS.pop(url, None)
            # SIGTERM, not Ctrl-C: a benchmark started in the background without job control
            # passes on an ignored SIGINT. The simulator keeps no state worth a clean exit.
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


_SIMULATORS: dict[str, int] = {}  # base URL -> pid of the simulator_process serving it


def simulator_pid(url: str) -> int | None:
    """The process id of the `simulator_process` serving `url` (None: not one of those)."""
    return _SIMULATORS.get(url)


def simulator_stats(url: str) -> dict:
    """The simulator's counters (`GET /_stats`, which counts no request): `requests`,
    `rate_limited` (429s of its rate limit), `rate_limit`, `burst`, and `per_second`, one
    entry per second since its first request: `{"s", "requests", "ok", "not_found",
    "rate_limited"}`."""
    try:
        with urllib.request.urlopen(url + "/_stats", timeout=10) as resp:
            return json.loads(resp.read())
    except (OSError, ValueError) as exc:
        raise BenchError(f"no /_stats from the simulator at {url}: {exc}") from None


def _wait_ready(url: str, proc: subprocess.Popen, timeout_s: float) -> None:
    """Until the simulator answers anything on /_stats (not an API path: counted nowhere,
    never rate-limited; a simulator without it answers an HTTP error, which is as good)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"the simulator exited with code {proc.returncode}")
        try:
            urllib.request.urlopen(url + "/_stats", timeout=2).close()
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            pass
        time.sleep(0.1)
    raise BenchError(f"the simulator at {url} did not answer within {timeout_s:.0f}s")


@dataclass
class Child:
    """A measured child: its wall time, user+sys CPU and peak RSS (ru_maxrss in MiB), exit
    code and output."""

    wall_s: float
    cpu_s: float
    rss_mb: float
    returncode: int
    stdout: str
    stderr: str

    def last_json(self) -> dict:
        """The last line of stdout that is a JSON object (a `--json` summary), else {}."""
        return summary_json(self.stdout)

    def why(self) -> str:
        tail = self.stderr.strip().splitlines()[-3:]
        return f"exit code {self.returncode}: " + " | ".join(t[:200] for t in tail)


def summary_json(stdout: str) -> dict:
    """The last line of `stdout` that is a JSON object ({} if none): the summary
    `etl sync --json` (or a helper script) printed."""
    for line in reversed(stdout.strip().splitlines()):
        with contextlib.suppress(ValueError):
            value = json.loads(line)
            if isinstance(value, dict):
                return value
    return {}


def measure(cmd: list[str], *, env: dict[str, str], cwd: Path, timeout_s: float) -> Child:
    """Run cmd and return its wall time and, from wait4, the CPU and peak RSS of that process
    alone. It is started by the tiny `measure.py` launcher (see there why), in a process group
    of its own that is killed, and a BenchError raised, after timeout_s (or when this process
    is interrupted)."""
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


def measure_all(cmds: Sequence[list[str]], *, env: dict[str, str], cwd: Path,
                timeout_s: float) -> list[Child]:
    """Several commands at once (shards of one sync, say), each measured as by `measure`;
    their Childs in the order of `cmds`. Raises the first BenchError once all have ended."""
    with ThreadPoolExecutor(max(1, len(cmds))) as pool:
        futures = [pool.submit(measure, cmd, env=env, cwd=cwd, timeout_s=timeout_s)
                   for cmd in cmds]
    return [f.result() for f in futures]


def start(cmd: list[str], *, env: dict[str, str], cwd: Path) -> subprocess.Popen[str]:
    """An unmeasured child (to signal or kill while it runs), stdout and stderr piped as
    text; end it with `finish`."""
    return subprocess.Popen(cmd, env=env, cwd=cwd, text=True, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(proc: subprocess.Popen[str], timeout_s: float = 600) -> tuple[str, str]:
    """Wait for a child of `start`; its stdout and stderr. Killed, and a BenchError raised,
    after timeout_s."""
    try:
        return proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise BenchError(f"timed out after {timeout_s:.0f}s: {shlex.join(proc.args[:5])} ..."
                         ) from None


def sync_timeout(ids: int) -> float:
    """Generous: a run slower than 150 ids/s (plus a minute) is broken, not slow."""
    return 60 + ids / 150


def wait_for(condition: Callable[[], object], timeout_s: float = 60) -> bool:
    """Poll `condition` every 5 ms until it is true (True) or timeout_s passed (False)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.005)
    return False


# -- facts about the machine and the run -----------------------------------------------------


def machine_facts(pg_url: str, *, versions: Iterable[str] = ()) -> dict[str, str]:
    """CPUs, memory, OS, Python, the PostgreSQL server (version and redacted URL), the
    versions of the distributions `versions` (dlt, say) and of commubo-etl with the commit
    measured."""
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    memory = "?"
    with contextlib.suppress(OSError, IndexError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                memory = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    with psycopg.connect(pg_url, connect_timeout=10) as conn:
        server = conn.execute("SHOW server_version").fetchone()[0]
    info = {
        "CPUs": f"{os.cpu_count()} x {model}",
        "memory": memory,
        "OS": f"{platform.system()} {platform.release()}",
        "Python": f"{platform.python_implementation()} {platform.python_version()}",
        "PostgreSQL": f"{server} ({redact(pg_url)})",
    }
    for dist in versions:
        info[dist] = _version(dist)
    info["commubo-etl"] = f"{_version('commubo-etl')}, {git_state()}"
    return info


def git_state() -> str:
    """The commit measured, and whether etl/ differs from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, text=True,
                              capture_output=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "etl"], cwd=REPO,
                               text=True, capture_output=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return "not a git checkout"
    changed = [line for line in dirty.splitlines() if line.strip()]
    tree = f", {len(changed)} file(s) under etl/ changed since" if changed else ""
    return f"commit {head}{tree}"


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def load_average(warn: bool = False) -> float:
    """The 1-minute load average; with `warn`, a warning on stderr when it is 1 or more (the
    figures will be noisy)."""
    load = os.getloadavg()[0]
    if warn and load >= 1:
        log(f"warning: load average {load:.2f}: the machine is busy, figures will be noisy")
    return load


_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _proc_stat(pid: int | str) -> tuple[int, float, float] | None:
    """(ppid, own user+sys CPU s, user+sys CPU s of its reaped children) of a process, from
    /proc/PID/stat; None when it is gone (or this is not Linux)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()  # the name, in parentheses, may hold spaces
    # fields[0] is the state; then ppid ... utime (11), stime, cutime, cstime (14)
    own = (int(fields[11]) + int(fields[12])) / _TICK
    return int(fields[1]), own, (int(fields[13]) + int(fields[14])) / _TICK


def _machine_cpu() -> tuple[float, float]:
    """(busy, idle) CPU seconds of all cores since boot, from /proc/stat (busy: user, nice,
    system, irq, softirq, steal; idle: idle and iowait)."""
    try:
        first = Path("/proc/stat").read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return math.nan, math.nan
    user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in first[1:9])
    return (user + nice + system + irq + softirq + steal) / _TICK, (idle + iowait) / _TICK


_POSTMASTERS: dict[str, int | None] = {}


def postmaster_pid(pg_url: str) -> int | None:
    """The process id of the PostgreSQL server of `pg_url` when it runs on this machine and
    its processes can be seen in /proc (the parent of a session's backend); else None (a
    server elsewhere, or in a container with its own process ids)."""
    if pg_url not in _POSTMASTERS:
        pid = None
        with contextlib.suppress(psycopg.Error, OSError), \
                psycopg.connect(pg_url, connect_timeout=10) as conn:
            backend = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
            stat = _proc_stat(backend)
            if stat is not None and "postgres" in Path(f"/proc/{backend}/cmdline").read_text():
                pid = stat[0]
        _POSTMASTERS[pg_url] = pid
    return _POSTMASTERS[pg_url]


def _tree_cpu(root: int) -> float:
    """User+sys CPU s of a process, of its reaped children and of its living children (one
    level: PostgreSQL's backends and background processes are the postmaster's children)."""
    stat = _proc_stat(root)
    if stat is None:
        return math.nan
    total = stat[1] + stat[2]
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and (child := _proc_stat(entry.name)) and child[0] == root:
            total += child[1] + child[2]
    return total


@dataclass(frozen=True)
class CpuUse:
    """What the machine spent while a block ran: its busy CPU seconds over all `cores`, and of
    that, the simulator's and the PostgreSQL server's (NaN when unknown); `clients_s` is
    filled in by the caller (the measured children's, from wait4)."""

    wall_s: float
    cores: int
    busy_s: float
    simulator_s: float
    postgres_s: float
    load1: float
    clients_s: float = math.nan

    @property
    def busy_share(self) -> float:
        """Busy CPU over the CPU the cores had: 1.0 is every core busy all the time."""
        return self.busy_s / (self.wall_s * self.cores) if self.wall_s else math.nan

    @property
    def rest_s(self) -> float:
        """Busy CPU neither the clients', the simulator's nor PostgreSQL's: the benchmark
        driver, the launchers, anything else running on the machine."""
        return self.busy_s - sum(v for v in (self.clients_s, self.simulator_s,
                                             self.postgres_s) if not math.isnan(v))

    def breakdown(self) -> str:
        """`cores 97% busy (clients 12.1 s, simulator 4.0 s, PostgreSQL 3.2 s, rest 0.4 s of
        19.7 s)`, for a report line."""
        parts = [f"{name} {v:.1f} s" for name, v in (
            ("clients", self.clients_s), ("simulator", self.simulator_s),
            ("PostgreSQL", self.postgres_s), ("rest", self.rest_s)) if not math.isnan(v)]
        return (f"{self.cores} cores {self.busy_share:.0%} busy ({', '.join(parts)} of "
                f"{self.busy_s:.1f} s)")


class CpuMeter:
    """A context manager measuring the machine's CPU while its block runs (see CpuUse); the
    result is `meter.use` after the block. `simulator_url`: a `simulator_process` whose CPU
    to tell apart; `pg_url`: the PostgreSQL server whose CPU to tell apart (when local)."""

    def __init__(self, *, pg_url: str | None = None, simulator_url: str | None = None) -> None:
        self._sim = simulator_pid(simulator_url) if simulator_url else None
        self._pg = postmaster_pid(pg_url) if pg_url else None
        self.use: CpuUse | None = None

    def _sample(self) -> tuple[float, float, float, float]:
        sim = _proc_stat(self._sim) if self._sim else None
        return (time.perf_counter(), _machine_cpu()[0],
                sim[1] + sim[2] if sim else math.nan,
                _tree_cpu(self._pg) if self._pg else math.nan)

    def __enter__(self) -> CpuMeter:
        self._start = self._sample()
        return self

    def __exit__(self, *exc_info: object) -> None:
        end = self._sample()
        wall, busy, sim, pg = (b - a for a, b in zip(self._start, end, strict=True))
        self.use = CpuUse(wall, os.cpu_count() or 1, busy, sim, pg, os.getloadavg()[0])


def command_line(uv_options: str = "") -> str:
    """How this script was started, as a `uv run` command to paste."""
    script = os.path.relpath(sys.argv[0], REPO)
    return " ".join(filter(None, ["uv run", uv_options, "python",
                                  shlex.join([script, *sys.argv[1:]])]))


def report_header(title: str, script: str, *, started: datetime, took_s: float,
                  command: str, lines: Iterable[str], facts: dict[str, str]) -> list[str]:
    """The top of a Markdown report: who wrote it, when, the command, the script's own
    bullet `lines`, and the machine's facts."""
    return [f"# {title}", "",
            f"Written by `benchmarks/{script}`; do not edit by hand, run it again (see "
            "[the method](#method)).", "",
            f"- date: {started:%Y-%m-%d %H:%M} UTC, took {took_s / 60:.1f} min",
            f"- command: `{command}`",
            *(f"- {line}" for line in lines),
            *(f"- {k}: {v}" for k, v in facts.items())]


# -- figures: medians, spreads, targets, tables ----------------------------------------------


@dataclass(frozen=True)
class Stat:
    """One figure over rounds: its median and its spread (min–max). NaN and None are left
    out (a failed round)."""

    values: tuple[float, ...]

    @classmethod
    def of(cls, values: Iterable[float | None]) -> Stat:
        return cls(tuple(float(v) for v in values
                         if v is not None and not math.isnan(float(v))))

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def median(self) -> float:
        return statistics.median(self.values) if self.values else float("nan")

    @property
    def lo(self) -> float:
        return min(self.values, default=float("nan"))

    @property
    def hi(self) -> float:
        return max(self.values, default=float("nan"))

    def fmt(self, spec: str = ".1f") -> str:
        """`median (min–max)`, the spread shown when there is more than one round; "-" when
        nothing was measured."""
        if not self.values:
            return "-"
        shown = format(self.median, spec)
        if self.n > 1:
            shown += f" ({format(self.lo, spec)}–{format(self.hi, spec)})"
        return shown

    def all(self, ok: Callable[[float], bool]) -> bool | None:
        """Whether every round meets `ok` (the whole spread); None when nothing was
        measured."""
        return all(ok(v) for v in self.values) if self.values else None


def median(values: Iterable[float | None]) -> float:
    return Stat.of(values).median


def by_round(a: Iterable[Run], b: Iterable[Run]) -> list[tuple[Run, Run]]:
    """The runs of two sides paired by round (rounds where both were measured)."""
    second = {r.round: r for r in b}
    return [(r, second[r.round]) for r in a if r.round in second]


@dataclass
class Target:
    """A target and whether it was met: only when every round meets it (the whole min–max
    spread), never on the median alone. `median_met` tells, when it was not met, whether the
    median alone would have."""

    scenario: str
    text: str
    measured: str
    met: bool | None  # None: not measured in this run
    note: str = ""
    median_met: bool | None = None

    @classmethod
    def of(cls, scenario: str, text: str, stat: Stat, ok: Callable[[float], bool],
           measured: str, note: str = "") -> Target:
        """A target judged on `stat`: met when every round meets `ok`."""
        median_met = ok(stat.median) if stat.values else None
        return cls(scenario, text, measured if stat.values else "-", stat.all(ok), note,
                   median_met)

    def verdict(self, markdown: bool = True) -> str:
        if self.met is None:
            return "not measured" if markdown else "-"
        if self.met:
            return "yes"
        no = "**no**" if markdown else "NO"
        return f"{no} (the median meets it, not every round)" if self.median_met else no


def text_table(headers: list[str], rows: list[list[str]], align: str = "") -> str:
    """A plain-text table for a terminal or a ```text block; `align` has one letter per
    column, `l` or `r` (default: the first column left-aligned, the others right-aligned)."""
    align = align or "l" + "r" * (len(headers) - 1)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if a == "l" else c.rjust(w)
                         for c, w, a in zip(cells, widths, align, strict=True)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])


def markdown_table(headers: list[str], rows: Iterable[Sequence[object]], align: str = ""
                   ) -> list[str]:
    """A Markdown table as lines; `align` has one letter per column, `l` or `r` (default
    all `l`)."""
    align = align or "l" * len(headers)
    rule = "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"

    def line(cells: Sequence[object]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return [line(headers), rule, *(line(r) for r in rows)]


def rows_cell(rows: list[int | None], expected: int | None, fetched: bool = False) -> str:
    """Rows landed against rows expected, the worst round shown; `!!` when they differ."""
    if not rows or any(r is None for r in rows):
        return "?"
    worst = min(rows, key=lambda r: (r == expected, r))
    word = "fetched, no DB" if fetched else "ok"
    return f"{worst:,}/{expected:,} {word}" if worst == expected else f"{worst:,}/{expected:,} !!"


SPREAD_NOTE = "median (min–max) over the rounds"


def side_row(runs: list[Run], label: str, size: str, bound: float | None = None) -> list[str]:
    """One row of `side_table`: wall s, ids/s, [% of bound,] CPU ms/id, peak RSS, each the
    median and the spread over rounds, and the rows landed."""
    if not runs:
        return [label, size, *["-"] * (5 if bound else 4), "failed"]
    ids_s = Stat.of(r.ids_per_s for r in runs)
    row = [label, size, Stat.of(r.wall_s for r in runs).fmt(".2f"), ids_s.fmt(".1f")]
    if bound:
        row.append(Stat.of(v / bound for v in ids_s.values).fmt(".1%"))
    row += [Stat.of(r.cpu_ms_per_id for r in runs).fmt(".3f"),
            Stat.of(r.rss_mb for r in runs).fmt(".1f"),
            rows_cell([r.rows for r in runs], runs[0].expected,
                      fetched=runs[0].extra.get("fetched_only", False))]
    return row


def side_table(rows: list[list[str]], bound: float | None = None, first: str = "side") -> str:
    """The table of measured sides, from `side_row`s."""
    headers = [first, "ids", "wall s", "ids/s"] + (["% of bound"] if bound else [])
    headers += ["CPU ms/id", "peak RSS MB", "rows landed"]
    return text_table(headers, rows)


# -- scenarios -------------------------------------------------------------------------------


@dataclass
class Run:
    """One measured child of a scenario (a side at a size in a round)."""

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


@dataclass
class Section:
    title: str
    text: str  # plain text: a table and lines under it


@dataclass
class Results:
    """What a scenario hands back, for its script's report: titled sections (plain-text
    tables), targets, every measured run, failures, figures (pictures the report links:
    caption and path) and `records`, rows of the script's own kind (reliability.py: one
    `Result` per judged run). `Results.merge` adds one to another."""

    sections: list[Section] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    runs: list[Run] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    figures: list[tuple[str, Path]] = field(default_factory=list)
    records: list[Any] = field(default_factory=list)

    def merge(self, other: Results) -> Results:
        for name in ("sections", "targets", "runs", "failures", "figures", "records"):
            getattr(self, name).extend(getattr(other, name))
        return self

    def section(self, title: str, *texts: str) -> None:
        self.sections.append(Section(title, "\n".join(texts)))

    def fail(self, what: str) -> None:
        self.failures.append(what)
        log(f"  FAILED {what}")

    def attempt(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """fn(*args, **kwargs); a BenchError is recorded as a failure (None returned) and the
        scenario goes on."""
        try:
            return fn(*args, **kwargs)
        except BenchError as exc:
            self.fail(f"{what}: {exc}")
            return None

    def record(self, what: str, fn: Callable[..., Run], *args: Any, **kwargs: Any
               ) -> Run | None:
        """`attempt` of a measurement that returns a Run: the Run is kept, logged, and a
        failure recorded when its rows landed are not the ones expected."""
        run = self.attempt(what, fn, *args, **kwargs)
        if run is not None:
            self.add(run)
        return run

    def add(self, run: Run, strict: bool = True) -> None:
        """Keep a run and log it; a failure is recorded when its rows landed are not the
        ones expected, unless not `strict` (a peer whose shortfall is a finding: dlt giving up
        on ids under a rate limit, say)."""
        self.runs.append(run)
        check = "ok" if run.rows_ok else f"EXPECTED {run.expected}"
        log(f"  [{run.scenario} round {run.round}] {run.side:<13} {run.size:>7} ids: "
            f"{run.wall_s:7.2f} s {run.ids_per_s:8.1f} ids/s  {run.cpu_ms_per_id:6.3f} ms "
            f"CPU/id  {run.rss_mb:6.1f} MB  rows {run.rows} {check}")
        if strict and not run.rows_ok:
            self.failures.append(f"{run.scenario} round {run.round} {run.side} {run.size} ids: "
                                 f"{run.rows} rows landed, expected {run.expected}")

    def select(self, scenario: str, side: str | None = None, size: int | None = None
               ) -> list[Run]:
        return [r for r in self.runs if r.scenario == scenario
                and (side is None or r.side == side) and (size is None or r.size == size)]


@dataclass(frozen=True)
class Scenario:
    """A named piece of a benchmark script: `run(ctx)` does the work with the script's
    Context and returns its Results. `requires`: modules it imports in its children (dlt,
    matplotlib), checked before anything runs."""

    name: str
    run: Callable[[Any], Results]
    help: str = ""
    requires: tuple[str, ...] = ()


class Registry:
    """A script's scenarios, in the order they were added:

        SCENARIOS = Registry()

        @SCENARIOS.add("latency", "one line for --help", requires=("dlt",))
        def latency(ctx: Bench) -> Results: ...
    """

    def __init__(self) -> None:
        self._scenarios: dict[str, Scenario] = {}

    def add(self, name: str, help: str = "", requires: tuple[str, ...] = ()
            ) -> Callable[[Callable[[Any], Results]], Callable[[Any], Results]]:
        def register(fn: Callable[[Any], Results]) -> Callable[[Any], Results]:
            if name in self._scenarios:
                raise ValueError(f"scenario {name!r} added twice")
            self._scenarios[name] = Scenario(name, fn, help, requires)
            return fn
        return register

    def names(self) -> list[str]:
        return list(self._scenarios)

    def __getitem__(self, name: str) -> Scenario:
        return self._scenarios[name]

    def help(self) -> str:
        """The scenarios and their help, for a script's --help."""
        width = max((len(n) for n in self._scenarios), default=0) + 2
        return "\n".join(textwrap.fill(s.help, 92, initial_indent=f"  {s.name:<{width}}",
                                        subsequent_indent=" " * (width + 2),
                                        break_on_hyphens=False)
                          for s in self._scenarios.values())

    def select(self, only: str | None) -> list[Scenario]:
        """The scenarios of a comma-separated `--only` (all when empty), in its order;
        ValueError naming the unknown ones."""
        if not only:
            return list(self._scenarios.values())
        names = [s.strip() for s in only.split(",") if s.strip()]
        unknown = [n for n in names if n not in self._scenarios]
        if unknown:
            raise ValueError(f"unknown scenario(s) {', '.join(unknown)}; choose from "
                             f"{', '.join(self._scenarios)}")
        return [self._scenarios[n] for n in names]


def run_scenarios(scenarios: Iterable[Scenario], ctx: Any) -> Results:
    """Each scenario in turn over `ctx`, their Results merged. A BenchError that escapes a
    scenario (its simulator did not start, say) is a failure of that scenario; the next
    one runs."""
    results = Results()
    for scenario in scenarios:
        log(f"scenario {scenario.name}")
        started = time.perf_counter()
        try:
            results.merge(scenario.run(ctx))
        except BenchError as exc:
            results.fail(f"{scenario.name}: {exc}")
        log(f"  ({scenario.name} took {time.perf_counter() - started:.0f} s)")
    return results


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
        """Import etl's sync path (and `modules`) once, unmeasured, so the first measured run
        does not pay for cold files and bytecode compilation that later rounds skip."""
        imports = ["import etl.cli, etl.sync, etl.extract, etl.load, etl.db, alembic.command",
                   *(f"import {m}" for m in modules)]
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
