"""Child processes of the benchmarks: their environment (`child_env`), the simulator as a
subprocess (`simulator_process`, `simulator_pid`, `simulator_stats`), measured children
(`measure`, `measure_all`: wall time, user+sys CPU and peak RSS of that child alone, through the
launcher measure.py), unmeasured ones (`start`, `finish`), `etl_command`, `summary_json`,
`sync_timeout`, `wait_for`."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from bench_base import HERE, PY, BenchError

from etl.simulator import DEFAULT_ACCESS_TOKEN, DEFAULT_TENANT_ID


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
