"""Facts about the machine and the checkout, for the reports the benchmark scripts write."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
from pathlib import Path

import psycopg

REPO = Path(__file__).resolve().parent.parent


def facts(pg_url: str) -> dict[str, str]:
    """CPUs, memory, OS, Python and the PostgreSQL server's version."""
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
    return {
        "CPUs": f"{os.cpu_count()} x {model}",
        "memory": memory,
        "OS": f"{platform.system()} {platform.release()}",
        "Python": f"{platform.python_implementation()} {platform.python_version()}",
        "PostgreSQL": server,
    }


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
