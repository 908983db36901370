"""Facts about the machine and the run: `machine_facts(pg_url)` (CPUs, memory, OS, Python,
PostgreSQL, versions, the git commit), `git_state`, `load_average`, `command_line`, and
`CpuMeter` (the CPU the machine, the simulator and the PostgreSQL server spent while a block
ran: is the machine saturated?)."""

from __future__ import annotations

import contextlib
import importlib.metadata
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import psycopg
from bench_base import REPO, log
from bench_db import redact
from bench_proc import simulator_pid


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
