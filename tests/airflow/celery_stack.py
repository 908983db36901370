"""Processes of the CeleryExecutor test (test_airflow_celery.py): Airflow's services and
Celery workers, each started in a session of its own with its output in a log file; bounded
waits that fail with the tail of every log; a stop that leaves no process behind.

A service's children stay in its session (the session id is the service's pid) even where
they move to a process group of their own, as Airflow's task processes do: so the stack finds
all of them by session, to measure their memory and to stop every one.

(A module with a name of its own: see conftest.py on `conftest` names.)
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

import pytest

T = TypeVar("T")

TAIL_LINES = 30
ERROR_LINES = 12  # at most this many lines that look like errors, per service, in a report
LINE_CHARS = 300
_ERROR = re.compile(r"error|exception|traceback|critical", re.IGNORECASE)
_NOT_ERROR = re.compile(r"\[uvicorn\.error\]|# Errors")  # a logger's name, a table header


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def listening(port: int) -> bool:
    """Whether something accepts connections on 127.0.0.1:`port`."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def redis_answers(port: int, timeout: float = 2.0) -> bool:
    """Whether a Redis on 127.0.0.1:`port` answers PING without a password."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name: state, ppid, pgrp, session, ..."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()


def session_members(*sids: int) -> list[int]:
    """Live processes (not zombies) of the sessions `sids`."""
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat(int(entry))
            if fields and int(fields[3]) in sids and fields[0] != "Z":
                members.append(int(entry))
    return members


def describe(pids: Sequence[int]) -> str:
    lines = []
    for pid in pids:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            cmd = "?"
        lines.append(f"  pid {pid}: {cmd.strip()[:200]}")
    return "\n".join(lines)


def memory_kib(pids: Sequence[int]) -> tuple[int, int]:
    """(sum of RSS, sum of PSS) of `pids`, in KiB. PSS shares pages that forked processes have
    in common among them, so it is the better measure of what the stack takes."""
    rss = pss = 0
    for pid in pids:
        try:
            text = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith("Rss:"):
                rss += int(line.split()[1])
            elif line.startswith("Pss:"):
                pss += int(line.split()[1])
    return rss, pss


_PR_SET_PDEATHSIG = 1
_prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here, not in a forked child


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the test process dies, even by SIGKILL (while
    it lives, it stops the service itself)."""
    _prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))


class Service:
    """One command in a new session, stdout and stderr to `<log_dir>/<name>.log`."""

    def __init__(self, name: str, argv: Sequence[str], *, env: Mapping[str, str], cwd: Path,
                 log_dir: Path, stop_wave: int = 1) -> None:
        self.name = name
        self.stop_wave = stop_wave  # services of a lower wave are stopped first
        self.oneshot = False  # a command run to its end, not a service that must keep running
        self.log_path = log_dir / f"{name}.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(list(argv), env=dict(env), cwd=cwd,
                                         stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True,
                                         preexec_fn=_die_with_parent)

    def running(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def tail(self, lines: int = TAIL_LINES) -> str:
        return "\n".join(line[:LINE_CHARS] for line in self.log().splitlines()[-lines:])

    def errors(self, lines: int = ERROR_LINES) -> str:
        """The first lines of the log that look like errors (an error early in a long log is
        where a failure starts, and the tail may not show it)."""
        found = [line[:LINE_CHARS] for line in self.log().splitlines()
                 if _ERROR.search(line) and not _NOT_ERROR.search(line)]
        return "\n".join(found[:lines])

    def kill(self) -> list[int]:
        """SIGKILL to every process of the service's session; returns their pids."""
        pids = self.members()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return pids

    def members(self) -> list[int]:
        """Live processes of the service's session: it and every descendant."""
        return session_members(self.proc.pid)

    def status(self) -> str:
        code = self.proc.poll()
        return f"pid {self.proc.pid}, " + ("running" if code is None else f"exit code {code}")


class Stack:
    """The services of one test, started with one environment; waits that watch them all."""

    def __init__(self, token: str, *, env: Mapping[str, str], cwd: Path, log_dir: Path) -> None:
        self.token = token  # names what the test makes: queue, workers, run
        self.env = dict(env)
        self.cwd = cwd
        self.log_dir = log_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        self.services: list[Service] = []
        self.ports: list[int] = []  # where the services listen: nothing may, after the stop
        self.peak_rss_kib = 0
        self.peak_pss_kib = 0
        self.peak_processes = 0
        self.stop_s: dict[str, float] = {}  # service -> seconds from SIGTERM to its last exit

    def start(self, name: str, argv: Sequence[str], *, stop_wave: int = 1,
              **extra_env: str) -> Service:
        """Start a service. `stop_wave`: services of a lower wave are stopped first (workers
        before the API server that their tasks report to)."""
        service = Service(name, argv, env={**self.env, **extra_env}, cwd=self.cwd,
                          log_dir=self.log_dir, stop_wave=stop_wave)
        self.services.append(service)
        return service

    def run(self, name: str, argv: Sequence[str], timeout: float) -> None:
        """Run a command to its end, as a service (its own session, its log with the others)."""
        service = self.start(name, argv)
        service.oneshot = True
        try:
            service.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.fail(f"`{' '.join(argv[2:])}` did not finish within {timeout:.0f} s")
        if service.proc.returncode != 0:
            self.fail(f"`{' '.join(argv[2:])}` failed")

    def report(self) -> str:
        """Each service's state, the lines of its log that look like errors, and its tail."""
        parts = []
        for service in self.services:
            errors = service.errors()
            if errors:
                parts.append(f"----- {service.name}: first lines that look like errors:\n"
                             f"{errors}")
            parts.append(f"----- {service.name} ({service.status()}); last {TAIL_LINES} lines "
                         f"of {service.log_path}:\n{service.tail()}")
        return "\n".join(parts)

    def fail(self, message: str, extra: str = "") -> None:
        pytest.fail(f"{message}\n{extra}{self.report()}", pytrace=False)

    def sample_memory(self) -> None:
        pids = self.members()
        rss, pss = memory_kib(pids)
        self.peak_rss_kib = max(self.peak_rss_kib, rss)
        self.peak_pss_kib = max(self.peak_pss_kib, pss)
        self.peak_processes = max(self.peak_processes, len(pids))

    def check_running(self, what: str) -> None:
        for service in self.services:
            if service.running() or service.oneshot:
                continue
            self.fail(f"{service.name} exited (code {service.proc.returncode}) while waiting "
                      f"for {what}")

    def wait_for(self, what: str, probe: Callable[[], T | None], timeout: float,
                 interval: float = 0.5, details: Callable[[], str] | None = None) -> T:
        """Poll `probe` until it returns something truthy; fail, with every log's tail, when a
        service exits first or `timeout` seconds pass."""
        deadline = time.monotonic() + timeout
        while True:
            self.check_running(what)
            result = probe()
            if result:
                return result
            self.sample_memory()
            if time.monotonic() > deadline:
                extra = f"{details()}\n" if details else ""
                self.fail(f"{what}: not within {timeout:.0f} s", extra)
            time.sleep(interval)

    def members(self) -> list[int]:
        """Live processes of every service's session."""
        return session_members(*(service.proc.pid for service in self.services))

    def stop(self, grace: float = 20.0) -> tuple[list[str], list[str]]:
        """Stop the services wave by wave (see `start`): SIGTERM to each, as an operator
        would stop it (its own children are its to stop), then SIGKILL to whatever is left of
        the wave's sessions after `grace` seconds. Returns (problems, warnings) as text: a
        problem is a process that survived SIGKILL or a port in `ports` still listening; a
        warning, a process that had to be killed."""
        problems: list[str] = []
        warned: list[str] = []
        for wave in sorted({service.stop_wave for service in self.services}):
            services = [service for service in self.services if service.stop_wave == wave]
            started = time.monotonic()
            for service in services:
                with contextlib.suppress(ProcessLookupError):
                    service.proc.send_signal(signal.SIGTERM)
            pending = list(services)
            while pending and time.monotonic() < started + grace:
                for service in list(pending):
                    if not service.members():
                        self.stop_s[service.name] = time.monotonic() - started
                        pending.remove(service)
                time.sleep(0.1)
            for service in pending:
                left = service.members()
                if left:
                    warned.append(f"{service.name}: still running {grace:.0f} s after SIGTERM, "
                                  f"killed:\n{describe(left)}")
                    service.kill()
        for service in self.services:
            with contextlib.suppress(subprocess.TimeoutExpired):
                service.proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and self.members():
            time.sleep(0.1)
        left = self.members()
        if left:
            problems.append(f"still running after SIGKILL:\n{describe(left)}")
        still = [port for port in self.ports if listening(port)]
        if still:
            problems.append(f"ports still listening after the stop: {still}")
        return problems, warned
