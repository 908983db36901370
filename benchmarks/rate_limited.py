"""Benchmark: syncing from an API that limits its rate (issue #12, adaptive concurrency).

    uv run --group bench python benchmarks/rate_limited.py            # both scenarios, ~10 min
    uv run --group bench python benchmarks/rate_limited.py --only rate-limited --dlt-workers 16
    uv run --group bench python benchmarks/rate_limited.py --only unlimited --rounds 5

Scenarios (`--only`, comma-separated):

  rate-limited  the simulator allows 300 requests/s (`etl simulate --rate-limit 300`: a token
                bucket of 30 tokens, 429 with Retry-After past it) at latency 50 ms; 20,000
                ids. Sides: ours (`etl sync --concurrency 64`, adaptive concurrency on, the
                default), ours with `api.adaptive_concurrency = false` (fixed at 64: what a
                sync did before), and dlt (benchmarks/dlt_pipeline.py) at each worker count
                of --dlt-workers (its extract workers and parallel items; the best is
                reported as dlt's figure).
  unlimited     no rate limit, latency 50 ms, concurrency 32, 4,000 ids (run.py's
                latency-bound scenario): ours with adaptive concurrency on and off, in turn,
                --rounds rounds (A B, B A, ...): the limiter must cost nothing when no 429
                comes.

Every run gets a simulator of its own (a subprocess, so its bucket starts full and its
counters at zero) and a fresh PostgreSQL database (`bench_run_*` beside --pg-url, dropped
afterwards); the client is measured as in run.py (wall time from start to exit, CPU of that
process). After a run the simulator's `GET /_stats` gives the requests it received, the 429s
its rate limit answered and a series per second since the first request (time zero).

Printed: ids/s (ids in the file / wall time) and as % of the limit; the share of requests
answered 429 overall and after the first 5 seconds. Saved beside this script (--out): a JSON
file with every run and its per-second series, and a CSV of the series (side, second,
requests, ids = answered 200 or 404, rate_limited) for plotting. Targets: ours at least 90% of
the limit in ids/s, at most 2% of requests answered 429 after the first 5 seconds; the
unlimited scenario within a few % of adaptive concurrency off. The exit code is 1 when a run of
ours failed or landed the wrong rows; a peer failing (dlt giving up on an id after its retries
of 429s, or ours with adaptive concurrency off failing ids) is shown, not an error.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import itertools
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
from run import HERE, PY, BenchError, _render, measure

from etl.simulator import DEFAULT_ACCESS_TOKEN, DEFAULT_TENANT_ID, payload_for

DB_PREFIX = "bench_run_"
SCENARIOS = ("rate-limited", "unlimited")
OURS, FIXED, DLT = "commubo-etl", "commubo-etl fixed", "dlt 1.31"

RATE_LIMIT = 300
LATENCY_MS = 50
CONCURRENCY = 64
IDS = 20_000
UNLIMITED = {"ids": 4_000, "concurrency": 32, "latency_ms": 50}
SETTLE_S = 5  # 429s are counted "after the first SETTLE_S seconds" too

TARGET_SHARE = 0.90
TARGET_429_AFTER = 0.02


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class Result:
    scenario: str
    side: str
    setting: str
    ids: int
    wall_s: float
    cpu_s: float
    exit_code: int
    pipeline_s: float | None
    rows: int
    expected_rows: int
    failed_ids: int | None
    requests: int
    rate_limited: int
    requests_after: int
    rate_limited_after: int
    per_second: list[dict] = field(default_factory=list)
    note: str = ""

    @property
    def ids_per_s(self) -> float:
        return self.ids / self.wall_s

    @property
    def share_429(self) -> float:
        return self.rate_limited / self.requests if self.requests else 0.0

    @property
    def share_429_after(self) -> float:
        return self.rate_limited_after / self.requests_after if self.requests_after else 0.0


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.work = Path(tempfile.mkdtemp(prefix="commubo-ratelimit-"))
        self.results: list[Result] = []
        self.failures: list[str] = []
        self.failed_runs: list[tuple[str, str, str, str]] = []  # scenario, side, setting, why
        self._seq = itertools.count(1)
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("ETL_", "COMMUBO_", "DLT_"))}
        self.env.update(COMMUBO_TENANT_ID=DEFAULT_TENANT_ID,
                        COMMUBO_ACCESS_TOKEN=DEFAULT_ACCESS_TOKEN,
                        RUNTIME__DLTHUB_TELEMETRY="false")
        self.fixed_config = self.work / "fixed.toml"
        self.fixed_config.write_text("[api]\nadaptive_concurrency = false\n")

    def close(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)

    # -- databases, ids, the simulator ---------------------------------------------------------

    @contextlib.contextmanager
    def fresh_db(self, tag: str) -> Iterator[str]:
        name = f"{DB_PREFIX}{os.getpid()}_{next(self._seq)}_{tag}"
        with psycopg.connect(self.args.pg_url, autocommit=True, connect_timeout=10) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        try:
            yield urlunsplit(urlsplit(self.args.pg_url)._replace(path="/" + name))
        finally:
            with psycopg.connect(self.args.pg_url, autocommit=True, connect_timeout=10) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def count_rows(self, db_url: str, table: str) -> int:
        with psycopg.connect(db_url, connect_timeout=10) as conn:
            return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]

    def ids_file(self, n: int) -> tuple[Path, int]:
        """n ordinary ids (about 3% answer 404) and how many the simulator serves."""
        path = self.work / f"ids-{n}.txt"
        ids = [f"rl-{i:07d}" for i in range(n)]
        path.write_text("\n".join(ids) + "\n")
        return path, sum(payload_for(i) is not None for i in ids)

    @contextlib.contextmanager
    def simulator(self, latency_ms: float, rate_limit: float) -> Iterator[str]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        logfile = open(self.work / f"simulator-{port}.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(
            [PY, "-m", "etl", "simulate", "--port", str(port), "--latency-ms", str(latency_ms),
             "--rate-limit", str(rate_limit)],
            stdout=logfile, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=self.env, cwd=self.work)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 30
            while True:  # ready when /_stats answers (it counts no request)
                if proc.poll() is not None:
                    raise BenchError(f"the simulator exited with code {proc.returncode}")
                with contextlib.suppress(OSError):
                    stats(url)
                    break
                if time.monotonic() > deadline:
                    raise BenchError("the simulator did not answer within 30 s")
                time.sleep(0.1)
            yield url
        finally:
            # SIGTERM, not Ctrl-C: a benchmark started in the background (`cmd &`) passes on
            # an ignored SIGINT. The simulator keeps no state worth a clean exit.
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            logfile.close()

    # -- one measured run ----------------------------------------------------------------------

    def run(self, scenario: str, side: str, setting: str, *, ids: int, latency_ms: float,
            rate_limit: float, workers: int) -> Result | None:
        ids_path, expected = self.ids_file(ids)
        timeout = 120 + 4 * ids / (rate_limit or 1000)
        try:
            with self.simulator(latency_ms, rate_limit) as url, \
                    self.fresh_db(side.split()[0].replace("-", "_")) as db_url:
                if side == DLT:
                    work_dir = self.work / f"dlt-{next(self._seq)}"
                    cmd = [PY, str(HERE / "dlt_pipeline.py"), str(ids_path), "--base-url", url,
                           "--db-url", db_url, "--concurrency", str(workers),
                           "--work-dir", str(work_dir)]
                else:
                    cmd = [PY, "-m", "etl", "sync", "--ids-file", str(ids_path), "--db-url",
                           db_url, "--base-url", url, "--concurrency", str(workers), "--json"]
                    if side == FIXED:
                        cmd[4:4] = ["--config", str(self.fixed_config)]
                child = measure(cmd, env=self.env, cwd=self.work, timeout_s=timeout)
                if side == DLT:
                    shutil.rmtree(work_dir, ignore_errors=True)
                served = stats(url)
                out = child.last_json()
                # Exit 1 is a finished sync with failed ids: measured, its failures shown.
                if not out or child.returncode not in (0, 1):
                    raise BenchError(f"{side} ({setting}): {child.why()}")
                table = "calls" if side != DLT else f"{out['dataset']}.{out['table']}"
                rows = self.count_rows(db_url, table)
        except BenchError as exc:
            self.failures.append(f"{scenario} {side} ({setting}): {exc}")
            self.failed_runs.append((scenario, side, setting, _reason(str(exc))))
            log(f"  FAILED {scenario} {side} ({setting}): {exc}")
            return None
        series = served["per_second"]
        after = [r for r in series if r["s"] >= SETTLE_S]
        result = Result(
            scenario, side, setting, ids, child.wall_s, child.cpu_s, child.returncode,
            out.get("duration_s"), rows, expected,
            out.get("failed") if side != DLT else None,
            served["requests"], served["rate_limited"],
            sum(r["requests"] for r in after), sum(r["rate_limited"] for r in after), series)
        self.results.append(result)
        limit = f" = {result.ids_per_s / rate_limit:6.1%} of the limit" if rate_limit else ""
        log(f"  [{scenario}] {side:<17} {setting:<13} {result.wall_s:6.2f} s "
            f"{result.ids_per_s:7.1f} ids/s{limit}; 429 {result.share_429:6.2%} overall, "
            f"{result.share_429_after:6.2%} after {SETTLE_S} s; rows {rows}/{expected}"
            + (f"; {result.failed_ids} failed" if result.failed_ids else ""))
        return result

    # -- scenarios -----------------------------------------------------------------------------

    def scenario_rate_limited(self) -> list[str]:
        a = self.args
        log(f"rate-limited: limit {a.rate_limit:g}/s, latency {a.latency_ms:g} ms, "
            f"concurrency {a.concurrency}, {a.ids} ids")
        common = dict(ids=a.ids, latency_ms=a.latency_ms, rate_limit=a.rate_limit)
        if "ours" in a.sides:
            self.run("rate-limited", OURS, f"concurrency {a.concurrency}",
                     workers=a.concurrency, **common)
        if "fixed" in a.sides:
            self.run("rate-limited", FIXED, f"concurrency {a.concurrency}",
                     workers=a.concurrency, **common)
        for w in a.dlt_workers if "dlt" in a.sides else ():
            self.run("rate-limited", DLT, f"workers {w}", workers=w, **common)
        return self.report_rate_limited()

    def report_rate_limited(self) -> list[str]:
        a = self.args
        runs = [r for r in self.results if r.scenario == "rate-limited"]
        rows = []
        for r in runs:
            inner = a.ids / r.pipeline_s if r.pipeline_s else None
            rows.append([r.side, r.setting, f"{r.wall_s:.2f}", f"{r.ids_per_s:.1f}",
                         f"{r.ids_per_s / a.rate_limit:.1%}",
                         f"{inner:.1f}" if inner else "-", f"{r.requests:,}",
                         f"{r.rate_limited:,}", f"{r.share_429:.2%}", f"{r.share_429_after:.2%}",
                         f"{1000 * r.cpu_s / r.ids:.2f}",
                         f"{r.rows:,}/{r.expected_rows:,}"
                         + ("" if r.rows == r.expected_rows else " !!")
                         + (f" ({r.failed_ids} ids failed)" if r.failed_ids else "")])
        for scenario, side, setting, why in self.failed_runs:
            if scenario == "rate-limited":
                rows.append([side, setting, "-", "-", "-", "-", "-", "-", "-", "-", "-",
                             f"run failed: {why}"])
        lines = [f"Rate-limited: limit {a.rate_limit:g} requests/s (bucket "
                 f"{max(1, a.rate_limit / 10):g}), latency {a.latency_ms:g} ms, {a.ids:,} ids",
                 _render(["side", "setting", "wall s", "ids/s", "% of limit", "in-pipeline",
                          "requests", "429s", "429 %", f"429 % after {SETTLE_S}s",
                          "CPU ms/id", "rows"], rows), ""]
        ours = next((r for r in runs if r.side == OURS), None)
        dlts = [r for r in runs if r.side == DLT]
        best = max(dlts, key=lambda r: r.ids_per_s, default=None)
        if best is not None:
            lines.append(f"dlt's best setting: {best.setting} ({best.ids_per_s:.1f} ids/s, "
                         f"{best.share_429_after:.2%} 429s after {SETTLE_S} s)")
        if ours is not None:
            share = ours.ids_per_s / a.rate_limit
            lines.append(f"target: {OURS} >= {TARGET_SHARE:.0%} of the limit: {share:.1%} "
                         f"{'met' if share >= TARGET_SHARE else 'NOT met'}")
            lines.append(f"target: <= {TARGET_429_AFTER:.0%} of requests answered 429 after "
                         f"the first {SETTLE_S} s: {ours.share_429_after:.2%} "
                         f"{'met' if ours.share_429_after <= TARGET_429_AFTER else 'NOT met'}")
            if best is not None:
                lines.append(f"{OURS} / dlt (best): throughput "
                             f"x{ours.ids_per_s / best.ids_per_s:.2f}")
        return lines

    def scenario_unlimited(self) -> list[str]:
        u = UNLIMITED
        log(f"unlimited: no rate limit, latency {u['latency_ms']} ms, concurrency "
            f"{u['concurrency']}, {u['ids']} ids, {self.args.rounds} round(s)")
        for rnd in range(1, self.args.rounds + 1):
            for side in (OURS, FIXED) if rnd % 2 else (FIXED, OURS):  # A B, B A, ...: no order bias
                self.run("unlimited", side, f"round {rnd}", ids=u["ids"],
                         latency_ms=u["latency_ms"], rate_limit=0, workers=u["concurrency"])
        bound = u["concurrency"] * 1000 / u["latency_ms"]
        rows, medians = [], {}
        for side, label in ((OURS, "adaptive on (default)"), (FIXED, "adaptive off")):
            runs = [r for r in self.results if r.scenario == "unlimited" and r.side == side]
            if not runs:
                continue
            medians[side] = statistics.median(r.ids_per_s for r in runs)
            inner = [u["ids"] / r.pipeline_s for r in runs if r.pipeline_s]
            rows.append([label, str(len(runs)), f"{medians[side]:.1f}",
                         f"{medians[side] / bound:.1%}",
                         f"{statistics.median(inner):.1f}" if inner else "-",
                         " ".join(f"{r.ids_per_s:.0f}" for r in runs)])
        lines = [f"Unlimited: latency {u['latency_ms']} ms, concurrency {u['concurrency']}, "
                 f"{u['ids']:,} ids, no rate limit (bound {bound:.0f} ids/s), medians",
                 _render(["commubo-etl", "runs", "ids/s", "% of bound", "in-pipeline",
                          "each run"], rows), ""]
        if len(medians) == 2:
            lines.append(f"adaptive on / off: {medians[OURS] / medians[FIXED]:.3f}")
        return lines

    # -- saving --------------------------------------------------------------------------------

    def save(self, out: Path, started: datetime) -> None:
        doc = {"started": started.isoformat(timespec="seconds"),
               "command": " ".join([os.path.relpath(sys.argv[0]), *sys.argv[1:]]),
               "settle_s": SETTLE_S,
               "args": {k: v for k, v in vars(self.args).items()
                        if k not in ("pg_url", "out")},
               "failed_runs": [dict(zip(("scenario", "side", "setting", "why"), f, strict=True))
                               for f in self.failed_runs],
               "runs": []}
        for r in self.results:
            run = asdict(r)
            run.update(ids_per_s=round(r.ids_per_s, 2), share_429=round(r.share_429, 5),
                       share_429_after=round(r.share_429_after, 5))
            doc["runs"].append(run)
        out.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
        with out.with_suffix(".csv").open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["scenario", "side", "setting", "second", "requests", "ids", "ok",
                        "not_found", "rate_limited"])
            for r in self.results:
                for row in r.per_second:
                    w.writerow([r.scenario, r.side, r.setting, row["s"], row["requests"],
                                row["ok"] + row["not_found"], row["ok"], row["not_found"],
                                row["rate_limited"]])


def _reason(text: str) -> str:
    """The gist of a failed run's error, for the table."""
    if "429" in text:
        return "an id got 429 on every attempt"
    return text.rsplit("|", 1)[-1].strip()[:60]


def stats(url: str) -> dict:
    with urllib.request.urlopen(url + "/_stats", timeout=5) as resp:
        return json.loads(resp.read())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--only", help=f"comma-separated scenarios: {','.join(SCENARIOS)}")
    p.add_argument("--ids", type=int, default=IDS)
    p.add_argument("--rate-limit", type=float, default=RATE_LIMIT)
    p.add_argument("--latency-ms", type=float, default=LATENCY_MS)
    p.add_argument("--concurrency", type=int, default=CONCURRENCY)
    p.add_argument("--dlt-workers", default="64,32,16",
                   help="dlt extract workers (= max parallel items) to try, comma-separated; "
                   "'' for none (default 64,32,16)")
    p.add_argument("--sides", default="ours,fixed,dlt",
                   help="sides of the rate-limited scenario: ours, fixed (ours with adaptive "
                   "concurrency off), dlt (default all)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of the unlimited scenario")
    p.add_argument("--pg-url", default=os.environ.get(
        "BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/test"),
        help="a database on the PostgreSQL server to use (env BENCH_PG_URL)")
    p.add_argument("--out", default=str(HERE / "rate_limited"),
                   help="where to save the runs: OUT.json and OUT.csv (default "
                   "benchmarks/rate_limited.*)")
    args = p.parse_args(argv)
    args.dlt_workers = [int(w) for w in args.dlt_workers.split(",") if w.strip()]
    args.sides = sorted({x.strip() for x in args.sides.split(",") if x.strip()})
    if unknown := set(args.sides) - {"ours", "fixed", "dlt"}:
        p.error(f"unknown side(s) {', '.join(sorted(unknown))}; choose from ours, fixed, dlt")
    scenarios = [s.strip() for s in (args.only or ",".join(SCENARIOS)).split(",") if s.strip()]
    if unknown := [s for s in scenarios if s not in SCENARIOS]:
        p.error(f"unknown scenario(s) {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}")

    started = datetime.now(UTC)
    load = os.getloadavg()[0]
    if load >= 1:
        log(f"warning: load average {load:.2f}: the machine is busy, figures will be noisy")
    bench = Bench(args)
    sections: list[list[str]] = []
    try:
        for name in scenarios:
            sections.append(getattr(bench, "scenario_" + name.replace("-", "_"))())
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        bench.close()
    print(f"\ncommubo-etl rate-limited benchmark, {started:%Y-%m-%d %H:%M} UTC, load average "
          f"{load:.2f} before, {os.getloadavg()[0]:.2f} after\n")
    for lines in sections:
        print("\n".join(lines) + "\n")
    if bench.failures:
        print("Failed runs:\n" + "\n".join(f"- {f}" for f in bench.failures) + "\n")
    out = Path(args.out)
    bench.save(out, started)
    print(f"runs and per-second series saved to {os.path.relpath(out.with_suffix('.json'))} "
          f"and {os.path.relpath(out.with_suffix('.csv'))}")
    # A peer failing under the rate limit is a finding, not a failure of the benchmark.
    ours_failed = any(side != DLT for _, side, _, _ in bench.failed_runs) or any(
        r.rows != r.expected_rows for r in bench.results if r.side == OURS)
    return 1 if ours_failed else 0


if __name__ == "__main__":
    sys.exit(main())
