"""Reliability report: inject faults, hostile servers, a dead API, kills, signals, terminated
connections and concurrent runs into `etl sync`, then check every row. Writes
docs/reliability.md.

    uv run python benchmarks/reliability.py            # the default run, about 2.5 minutes
    uv run python benchmarks/reliability.py --quick    # fewer ids and kills, under 2 minutes
    uv run python benchmarks/reliability.py --seed 7 --kills 20 --only kills,concurrent

The scenarios (`--only`, comma-separated) are the SCENARIOS registry below; `--help` lists
them. Each is a function over the harness (benchmarks/harness.py and bench_*.py).

Every `etl sync` is a process of its own (`python -m etl sync --json`, measured through
benchmarks/measure.py when it runs to its end), against the simulator (`etl.simulator`)
running in this process and the PostgreSQL of --pg-url, where each scenario gets a fresh
database `bench_run_<pid>_<n>_<scenario>`, dropped afterwards. What each scenario should
leave is derived from what the simulator serves (`etl.testing.expected_warehouse`: its
payloads through `etl.transform`; the newest snapshot of every customer and operator), not
from another run, and compared with every row:

- lost: ids whose call row is missing or differs, or whose status is not the expected one
  (`loaded`, `not_found`, or `failed` for what can never load);
- inconsistent: rows that break an invariant the loader keeps (`etl.testing.inconsistencies`):
  a call row without its status or a `loaded` status without its row, rows naming a run that
  does not exist or beyond what their run counted, a completed run whose counters do not add
  up (a batch counted twice), overlapping or gapped validity in the history tables or two
  versions valid from one moment (a version written twice), rows naming a customer, operator,
  scenario or version not stored;
- stale: customers, phone lists, operators and scenarios that are not the newest snapshot.

The exit code is 1 when anything was lost, inconsistent or stale, a check failed (an exit
code, an attempt limit, a Retry-After wait, a kill that missed the run, an error text, a raw
control character, a peak RSS, the time a stop took) or a scenario could not run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import psycopg
from bench_base import REPO, log
from bench_db import drop_stale_databases
from bench_machine import command_line, load_average, machine_facts
from bench_proc import child_env, etl_command, finish, summary_json, wait_for
from bench_proc import start as start_child
from bench_render import markdown_table, report_header
from bench_scenarios import Registry, Results, run_scenarios
from harness import Context

from etl.simulator import ESCAPE_REASON, Simulator, payload_for, random_fault
from etl.testing import (
    TimedSimulator,
    Warehouse,
    expected_warehouse,
    inconsistencies,
    lost_ids,
    stale_entities,
    stored_warehouse,
)

FAULT_KINDS = {
    "e500": "HTTP 500 bursts",
    "e502": "HTTP 502 bursts",
    "e503": "HTTP 503 bursts",
    "e429s": "HTTP 429, Retry-After in seconds",
    "e429d": "HTTP 429, Retry-After as an HTTP date",
    "reset": "connection reset (TCP RST)",
    "cut": "body cut short",
    "slow": "answer slower than the timeout",
    "trickle": "whole answer trickled, a byte every 0.2 s",
    "trickleb": "headers at once, body trickled a byte every 0.2 s",
}
BAD_ANSWERS = ("nf", "broken", "badjson", "wrongid", "nocallid", "array", "poison", "bigint")
APP = "commubo-etl"
MAX_ATTEMPTS = 4
RETRY_AFTER_S = 2
TIMEOUT_S = 0.5  # api.timeout_s of the fault runs: the deadline of a whole exchange
TRICKLE_S = 0.2  # the simulator's pause between the bytes of a trickled answer
CAP = "10,485,760 bytes"  # the default api.max_response_bytes, as etl writes it
# Hostile bodies: kind -> (what the simulator sends, the error etl must record).
HOSTILE_KINDS = {
    "bomb": ("gzip bomb (300 KB inflating to 300 MiB)",
             f"response body larger than {CAP} once decompressed (api.max_response_bytes)"),
    "huge": ("100 MiB body with Content-Length",
             f"response body larger than {CAP} (api.max_response_bytes)"),
    "endless": ("chunked body that never ends",
                f"response body larger than {CAP} (api.max_response_bytes)"),
    # Escaped here by hand, not with etl's own function: \x1b, \x07 and \r as text.
    "escape": ("HTTP 400 with terminal escape sequences in the reason and the body",
               "400 Bad Request\\x1b]0;pwned\\x07\\x1b[2J\\rall calls synced OK"),
}
HOSTILE_EACH = 3
RSS_LIMIT_MB = 150
DEAD_API_IDS = 3000
DEAD_API_LIMIT_S = 60
SIGNAL_LIMIT_S = 10
SIGNALS = {signal.SIGTERM: (143, "etl: stopped by SIGTERM: run "),
           signal.SIGINT: (130, "etl: interrupted by Ctrl-C: run ")}
# -- results -----------------------------------------------------------------------------------


@dataclass
class Result:
    scenario: str
    injected: str
    times: int
    requested: int = 0
    loaded: int = 0
    failed_expected: int = 0
    not_found: int = 0
    lost: int = 0
    inconsistent: int = 0
    stale: int = 0
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    duration_s: float = 0.0

    def check(self, ok: bool, problem: str) -> None:
        if not ok:
            self.problems.append(problem)

    def no_traceback(self, *stderr: str) -> None:
        self.check("Traceback" not in "".join(stderr), "a traceback on stderr")

    @property
    def ok(self) -> bool:
        return not self.problems and not (self.lost or self.inconsistent or self.stale)


def tally(result: Result, want: Warehouse, got: Warehouse, broken: dict[str, int]) -> Result:
    """Fill the row counts of `result` from the expected and the stored warehouse, and from
    the invariants the stored one breaks (`etl.testing.inconsistencies`)."""
    result.requested = len(want.statuses)
    result.loaded = sum(1 for i, s in want.statuses.items()
                        if s == "loaded" and got.statuses.get(i) == "loaded")
    result.failed_expected = sum(1 for i, s in want.statuses.items()
                                 if s == "failed" and got.statuses.get(i) == "failed")
    result.not_found = sum(1 for i, s in want.statuses.items()
                           if s == "not_found" and got.statuses.get(i) == "not_found")
    lost = lost_ids(want, got)
    stale = stale_entities(want, got)
    broken = {what: n for what, n in broken.items() if n}
    result.lost, result.stale = len(lost), len(stale)
    result.inconsistent = sum(broken.values())
    if lost:
        result.notes.append(f"lost ids (first 5): {', '.join(lost[:5])}")
    if stale:
        result.notes.append(f"stale (first 5): {', '.join(stale[:5])}")
    if broken:
        result.notes.append("inconsistent: " + ", ".join(f"{n} {what}"
                                                         for what, n in broken.items()))
    return result


# -- the session -------------------------------------------------------------------------------


class Rel(Context):
    """The session of reliability.py: the harness's Context, with config files and the
    `etl sync` runs of a scenario against an in-process simulator (`stage`)."""

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(args.pg_url, args=args, prefix="etl-reliability-")
        self.seed: int = args.seed

    def config(self, name: str, **api: object) -> Path:
        values = {"backoff_s": 0.01, "max_backoff_s": 0.05, "timeout_s": 5,
                  "max_attempts": MAX_ATTEMPTS, "concurrency": 4, "retry_after_cap_s": 10,
                  **api}
        batch = values.pop("batch_size", 50)
        path = self.work / f"{name}.toml"
        path.write_text("[api]\n" + "".join(f"{k} = {v}\n" for k, v in values.items())
                        + f"\n[sync]\nbatch_size = {batch}\n")
        return path

    def default_config(self, name: str) -> Path:
        """A config file that sets nothing: every api and sync setting at its default."""
        path = self.work / f"{name}.toml"
        path.write_text("# every setting at its default\n")
        return path

    def shuffled(self, ids: list[str]) -> list[str]:
        """`ids` in the order of the run's seed (a new list)."""
        ids = list(ids)
        random.Random(self.seed).shuffle(ids)
        return ids

    @contextlib.contextmanager
    def stage(self, name: str, ids: list[str], sim: Simulator | None = None, *,
              config: Path | None = None, **api: object) -> Iterator[Stage]:
        """What a scenario's runs share: the simulator `sim` (by default one with the run's
        seed and nothing else) serving in this process, a fresh database `name`, the config
        file `config` (by default `self.config(name, **api)`) and the ids file of `ids`."""
        with contextlib.ExitStack() as stack:
            sim = stack.enter_context(Simulator(seed=self.seed) if sim is None else sim)
            db = stack.enter_context(self.fresh_db(name))
            yield Stage(self, sim, db, config or self.config(name, **api),
                        self.write_ids(name, ids), ids, stack)

    def batched_stage(self, name: str, prefix: str, *, poison: bool, latency_ms: float = 5,
                      **api: object) -> contextlib.AbstractContextManager[Stage]:
        """The stage of the scenarios that kill, stop or cut off a run between or inside its
        batches: --ids ordinary ids `<prefix>-NNNNN`, a 404 `nf-<prefix>` and, with `poison`,
        `poison-<prefix>` (it never loads), answered in `latency_ms`, in batches of 20."""
        ids = [*numbered(prefix, self.args.ids), f"nf-{prefix}",
               *([f"poison-{prefix}"] if poison else [])]
        return self.stage(name, ids, Simulator(latency_ms=latency_ms, seed=self.seed),
                          batch_size=20, **api)

    def sync_cmd(self, config: Path, ids: Path, *extra: str) -> list[str]:
        return etl_command("sync", "--config", str(config), "--ids-file", str(ids), "--json",
                           *extra)

    def start(self, api: Simulator, db: str, config: Path, ids: Path, *extra: str
              ) -> subprocess.Popen[str]:
        """`etl sync` unmeasured, to signal or kill while it runs (end it with `finish`)."""
        return start_child(self.sync_cmd(config, ids, *extra),
                           env=child_env(base_url=api.url, db_url=db), cwd=self.work)

    def run_measured(self, api: Simulator, db: str, config: Path, ids: Path, *extra: str
                     ) -> tuple[int, str, str, float]:
        """`etl sync` to its end: exit code, stdout, stderr, and the peak RSS of the process
        in MB: the kernel's high-water mark (ru_maxrss of wait4 by the launcher measure.py),
        not a sample that could miss a spike."""
        child = self.measure(self.sync_cmd(config, ids, *extra), 600,
                             env=child_env(base_url=api.url, db_url=db))
        return child.returncode, child.stdout, child.stderr, child.rss_mb

    def etl(self, db: str, *args: str) -> tuple[int, str, str]:
        """Another `etl` command on a scenario's database (`etl failures`, say)."""
        child = self.measure(etl_command(*args), 120, env=child_env(db_url=db))
        return child.returncode, child.stdout, child.stderr

    def timed(self, fn: Callable[..., Result], *args: object) -> Result:
        """`fn(*args)`, its Result recorded with the time the call took."""
        started = time.monotonic()
        return self.record(fn(*args), started)

    def record(self, result: Result, started: float, finished: float | None = None) -> Result:
        result.duration_s = (finished or time.monotonic()) - started
        state = "ok" if result.ok else "PROBLEM: " + "; ".join(result.problems)
        log(f"{result.scenario}: {result.times} x {result.injected}; lost {result.lost}, "
            f"inconsistent {result.inconsistent}, stale {result.stale}; {state}")
        return result


@dataclass
class Stage:
    """A scenario's simulator, database, config file and ids (`Rel.stage`), and its `etl
    sync` runs against them; `watcher`, a Watcher session on the database, opens at its
    first use and closes with the stage."""

    ctx: Rel
    sim: Simulator
    db: str
    config: Path
    ids_file: Path
    ids: list[str]
    _stack: contextlib.ExitStack
    _watcher: Watcher | None = None

    @property
    def watcher(self) -> Watcher:
        if self._watcher is None:
            self._watcher = self._stack.enter_context(Watcher(self.db))
        return self._watcher

    def start(self, *extra: str, config: Path | None = None, ids_file: Path | None = None
              ) -> subprocess.Popen[str]:
        """`etl sync` unmeasured (`Rel.start`), with the stage's config and ids unless
        given."""
        return self.ctx.start(self.sim, self.db, config or self.config,
                              ids_file or self.ids_file, *extra)

    def run(self, *extra: str, config: Path | None = None, sim: Simulator | None = None
            ) -> tuple[int, str, str]:
        """`etl sync` to its end: exit code, stdout, stderr."""
        code, stdout, stderr, _ = self.run_measured(*extra, config=config, sim=sim)
        return code, stdout, stderr

    def run_measured(self, *extra: str, config: Path | None = None,
                     sim: Simulator | None = None) -> tuple[int, str, str, float]:
        """`Rel.run_measured`, against the stage's simulator with its config unless
        given."""
        return self.ctx.run_measured(sim or self.sim, self.db, config or self.config,
                                     self.ids_file, *extra)

    def judge(self, result: Result, failing: Iterable[str] = (), *,
              want: Warehouse | None = None) -> Result:
        """`tally` of the stage's database against `want`, by default what the simulator
        serves for the stage's ids, `failing` never loading."""
        if want is None:
            want = expected_warehouse(self.ids, self.ctx.seed, failing)
        return tally(result, want, stored_warehouse(self.db), inconsistencies(self.db))


SCENARIOS = Registry()


def scenario(name: str, help: str) -> Callable[[Callable[[Rel], Result]],
                                               Callable[[Rel], Result]]:
    """A scenario of one judged run (a function returning its Result), added to SCENARIOS:
    timed and logged by `Rel.timed`."""
    def register(fn: Callable[[Rel], Result]) -> Callable[[Rel], Result]:
        def run(ctx: Rel) -> Results:
            return Results(records=[ctx.timed(fn, ctx)])
        SCENARIOS.add(name, help)(run)
        return fn
    return register


def numbered(prefix: str, n: int, width: int = 5) -> list[str]:
    """n ordinary ids `<prefix>-00000`, ..."""
    return [f"{prefix}-{i:0{width}d}" for i in range(n)]


@SCENARIOS.add("faults", "one run per fault kind the simulator injects: 5xx bursts, 429 with "
               "Retry-After in seconds and as an HTTP date, connection resets, bodies "
               "cut short, answers slower than the timeout, answers or bodies trickled "
               "a byte at a time")
def faults(ctx: Rel) -> Results:
    """One run per fault kind, all kinds at once (separate simulators and databases)."""
    n = ctx.args.ids // 25
    runs, done = [], []
    with contextlib.ExitStack() as stack:
        for kind in FAULT_KINDS:
            started = time.monotonic()
            bursts = [f"{kind}-{b}-b{j}" for b in range(1, MAX_ATTEMPTS) for j in range(3)]
            endless = [f"{kind}-{MAX_ATTEMPTS}-z{j}" for j in range(3)]
            st = stack.enter_context(ctx.stage(
                f"faults_{kind}", ctx.shuffled([*numbered(f"fault{kind}", n), *bursts,
                                                *endless]),
                TimedSimulator(slow_s=1.5, retry_after_s=RETRY_AFTER_S, trickle_s=TRICKLE_S,
                               seed=ctx.seed), timeout_s=TIMEOUT_S))
            runs.append((kind, st, bursts, endless, st.start(), started))
        # The runs go at once: collect each as it ends, so each row gets its own time.
        with ThreadPoolExecutor(len(runs)) as pool:
            ended = list(pool.map(_ended, [run[4] for run in runs]))
        for (kind, st, bursts, endless, proc, started), (stderr, finished) in zip(
                runs, ended, strict=True):
            sim = st.sim
            injected = sum(min(int(i.split("-")[1]), sim.requests_for(i))
                           for i in (*bursts, *endless))
            result = st.judge(Result(f"fault: {kind}", FAULT_KINDS[kind], injected),
                              failing=endless)
            result.check(proc.returncode == 1, f"exit {proc.returncode}, expected 1")
            result.no_traceback(stderr)
            over = [i for i in endless if sim.requests_for(i) != MAX_ATTEMPTS]
            result.check(not over, f"attempt limit not kept for {over}")
            result.notes.append(f"bursts of 1 to {MAX_ATTEMPTS - 1} faults loaded; "
                                f"{len(endless)} ids faulting {MAX_ATTEMPTS} times failed "
                                f"after exactly {MAX_ATTEMPTS} attempts; exit 1")
            if kind.startswith("trickle"):
                # No per-read timeout catches a byte every 0.2 s: only the deadline of
                # the whole exchange does, and the id fails as a timeout.
                said = (f"timed out: no complete answer within {TIMEOUT_S:g}s (gave up "
                        f"after {MAX_ATTEMPTS} attempts)")
                errors = st.watcher.errors(endless)
                wrong = {i: e for i, e in errors.items() if e != said}
                result.check(not wrong and len(errors) == len(endless),
                             f"errors of the always-trickling ids: {wrong or errors}")
                # A whole answer takes minutes at that pace: attempts that follow each
                # other within seconds were cut off at the deadline.
                gaps = [gap for i in (*bursts, *endless) for gap in sim.gaps(i)]
                result.check(bool(gaps) and min(gaps) >= TIMEOUT_S - 0.05
                             and max(gaps) < 10 * TIMEOUT_S,
                             f"attempts {min(gaps, default=0):.2f} to "
                             f"{max(gaps, default=0):.2f} s apart")
                result.notes.append(f"a byte every {TRICKLE_S:g} s against a "
                                    f"{TIMEOUT_S:g} s deadline: attempts "
                                    f"{min(gaps, default=0):.2f} to "
                                    f"{max(gaps, default=0):.2f} s apart, each cut off at "
                                    f"the deadline; error `{said}`")
            if kind.startswith("e429"):
                gap = sim.shortest_gap([*bursts, *endless])
                floor = RETRY_AFTER_S if kind == "e429s" else RETRY_AFTER_S - 1
                result.check(gap is not None and gap >= floor - 0.05,
                             f"a retry came {gap:.2f} s after a Retry-After of "
                             f"{RETRY_AFTER_S} s")
                result.notes.append(f"Retry-After {RETRY_AFTER_S} s: shortest wait between "
                                    f"attempts {gap:.2f} s"
                                    + (" (an HTTP date has whole seconds)"
                                       if kind == "e429d" else ""))
            done.append(ctx.record(result, started, finished))
    return Results(records=done)


@scenario("bad-answers", "404s, a persistently broken id, bodies that are not a call")
def bad_answers(ctx: Rel) -> Result:
    bad = [f"{prefix}-{j}" for prefix in BAD_ANSWERS for j in range(5)]
    ids = ctx.shuffled([*numbered("bad", ctx.args.ids // 10), *bad])
    with ctx.stage("bad_answers", ids, batch_size=20) as st:
        code, _, stderr = st.run()
        result = st.judge(Result("bad answers", "404, persistent 500, not JSON, wrong or no "
                                 "callId, array body, bad talkTime, int beyond int32",
                                 sum(st.sim.requests_for(i) for i in bad)))
    result.check(code == 1, f"exit {code}, expected 1")
    result.no_traceback(stderr)
    result.notes.append("each bad record failed alone with its reason, its batch loaded; "
                        "exit 1")
    return result


@scenario("hostile-bodies", "gzip bombs, huge and endless bodies, terminal escape sequences; "
          "the peak RSS of the run")
def hostile_bodies(ctx: Rel) -> Result:
    """Bodies that would take the memory or the terminal, among ordinary ids; the peak
    RSS of the run against the same ordinary ids alone, and with one kind at a time."""
    ordinary = numbered("hostile", ctx.args.ids // 5)
    hostile = {kind: [f"{kind}-{j}" for j in range(HOSTILE_EACH)] for kind in HOSTILE_KINDS}
    peaks: dict[str, float] = {}
    codes: dict[str, int] = {}
    # What the ordinary ids cost alone, and with only the bombs or the endless bodies:
    # separate processes, so each peak belongs to one kind.
    for label, extra in (("ordinary ids alone", []), ("bombs", hostile["bomb"]),
                         ("endless bodies", hostile["endless"])):
        with ctx.stage(f"hostile_{label.split()[0]}", ctx.shuffled([*ordinary, *extra])) as st:
            codes[label], _, _, peaks[label] = st.run_measured()
    ids = ctx.shuffled([*ordinary, *(i for kind_ids in hostile.values() for i in kind_ids)])
    with ctx.stage("hostile_bodies", ids) as st:
        watcher = st.watcher
        code, stdout, stderr, peak = st.run_measured()
        served = {i: st.sim.requests_for(i) for kind_ids in hostile.values() for i in kind_ids}
        errors = watcher.errors(list(served))
        stored_errors = watcher.all_errors()
        shown_code, shown, shown_err = ctx.etl(st.db, "failures")
        result = st.judge(Result("hostile bodies", "; ".join(what for what, _ in
                                                             HOSTILE_KINDS.values()),
                                 sum(served.values())))
    result.check(code == 1, f"exit {code}, expected 1")
    result.no_traceback(stderr)
    again = sorted(i for i, n in served.items() if n != 1)
    result.check(not again, f"hostile ids not requested exactly once: "
                 f"{[(i, served[i]) for i in again]}")
    for kind, kind_ids in hostile.items():
        said = HOSTILE_KINDS[kind][1]
        wrong = {i: errors.get(i) for i in kind_ids if errors.get(i) is None or not (
            errors[i].startswith(said) if kind == "escape" else errors[i] == said)}
        result.check(not wrong, f"{kind} errors: {wrong}")
    raw = {where: _controls(text) for where, text in (
        ("stdout", stdout), ("stderr", stderr), ("etl failures", shown + shown_err),
        ("etl_call_status.error", "\n".join(stored_errors)))}
    raw = {where: found for where, found in raw.items() if found}
    result.check(not raw, f"raw control characters: {raw}")
    result.check(ESCAPE_REASON not in "\n".join(stored_errors), "the raw reason was stored")
    result.check(shown_code == 0 and all(i in shown for i in hostile["escape"]),
                 f"etl failures exit {shown_code} or without the escape ids")
    result.check(codes == {"ordinary ids alone": 0, "bombs": 1, "endless bodies": 1},
                 f"exit codes of the runs by kind: {codes}")
    result.check(peak < RSS_LIMIT_MB, f"peak RSS {peak:.0f} MB, limit {RSS_LIMIT_MB} MB")
    reasons = {kind: said + ("…" if kind == "escape" else "")
               for kind, (_, said) in HOSTILE_KINDS.items()}
    result.notes.append(
        f"each of the {len(served)} hostile ids requested once and failed with its reason ("
        + "; ".join(f"{kind}: `{said}`" for kind, said in reasons.items()) + "); no raw "
        "control character in stdout, stderr, `etl failures` or the error column; exit 1")
    result.notes.append(
        f"peak RSS of `etl sync`: {peak:.0f} MB with every hostile kind (limit "
        f"{RSS_LIMIT_MB} MB), " + ", ".join(f"{peaks[label]:.0f} MB with {label}"
                                             for label in peaks)
        + f" ({len(ordinary)} ordinary ids each, concurrency 4)")
    return result


@scenario("random-faults", "every request fails with probability 0.3")
def random_faults(ctx: Rel) -> Result:
    rate, seed, attempts = 0.3, ctx.seed, 10
    ids = numbered("rnd", ctx.args.ids * 2, width=6)
    # Ids whose first `attempts` requests all fault cannot load: the simulator's choice is
    # a function of (seed, id, attempt), so they are known in advance.
    failing = [i for i in ids if payload_for(i, seed) is not None
               and all(random_fault(seed, i, a, rate) for a in range(attempts))]
    with ctx.stage("random_faults", ids, Simulator(fault_rate=rate, seed=seed, retry_after_s=0),
                   max_attempts=attempts, concurrency=8, batch_size=100) as st:
        code, _, stderr = st.run()
        kinds: Counter[str] = Counter()
        for i in ids:
            if payload_for(i, seed) is not None:
                for a in range(st.sim.requests_for(i)):
                    kinds[random_fault(seed, i, a, rate) or "none"] += 1
        kinds.pop("none", None)
        result = st.judge(Result("random faults", f"each request faulted with p = {rate}: "
                                 + ", ".join(f"{k} {n}" for k, n in sorted(kinds.items())),
                                 sum(kinds.values())), failing)
    result.check(code == (1 if failing else 0), f"exit {code}")
    result.no_traceback(stderr)
    result.notes.append(f"{attempts} attempts per id; {len(failing)} id(s) drew "
                        f"{attempts} faults in a row and failed as expected; exit {code}")
    return result


@scenario("dead-api", "every connection refused, default settings, until the run stops with "
          "exit 3")
def dead_api(ctx: Rel) -> Result:
    """Every connection refused, with the default settings: the circuit breaker's window
    (api.unreachable_after_s, 20 s) must stop the run long before the ids run out."""
    ids = numbered("dead", DEAD_API_IDS)
    with ctx.stage("dead_api", ids, Simulator(refuse=True, seed=ctx.seed),
                   config=ctx.default_config("dead_api")) as st:
        watcher = st.watcher
        began = time.monotonic()
        code, stdout, stderr = st.run()
        took = time.monotonic() - began
        status = watcher.run_status(summary_json(stdout).get("run_id"))
        # A run that reached nothing must leave nothing: judged against an empty warehouse.
        result = st.judge(Result("dead API", "every connection refused (the port bound, never "
                                 "listening), default api settings", 1), want=Warehouse())
        result.requested = len(ids)
        requests, stored = st.sim.total_requests, watcher.committed()
    line = _one_line(result, stderr)
    result.check(code == 3, f"exit {code}, expected 3")
    result.check(took < DEAD_API_LIMIT_S, f"stopped after {took:.0f} s, limit "
                 f"{DEAD_API_LIMIT_S} s")
    result.check(line.startswith(f"etl: error: cannot reach the API at {st.sim.url}: "
                                 "connection refused (no answer for ")
                 and "api.unreachable_after_s = 20)" in line, f"message: {line!r}")
    result.check(stored == 0, f"{stored} status rows, expected none")
    result.check(status == "failed", f"run status {status!r}, expected failed")
    result.check(requests == 0, f"{requests} requests reached the simulator")
    result.notes.append(f"{len(ids):,} ids; exit 3 {took:.1f} s after the start, one line "
                        f"(`{line}`); no status row, run `failed`")
    return result


@scenario("api-dies", "the API starts refusing in the middle of a run, then a rerun against a "
          "new one")
def api_dies(ctx: Rel) -> Result:
    """The API starts refusing every connection once some batches are committed; the run
    stops (a 2 s breaker window), and --skip-loaded against a new simulator finishes."""
    with ctx.batched_stage("api_dies", "dies", poison=True, unreachable_after_s=2) as st:
        ids, want, watcher = st.ids, expected_warehouse(st.ids, ctx.seed), st.watcher
        proc = st.start()
        wait_for(lambda: watcher.committed() >= 100 or proc.poll() is not None)
        st.sim.refuse_connections()
        died = time.monotonic()
        before = watcher.statuses()
        stdout, stderr = finish(proc)
        stopped_s = time.monotonic() - died
        after = watcher.statuses()
        with Simulator(latency_ms=5, seed=ctx.seed) as again:
            code, _, rerun_err = st.run("--skip-loaded", sim=again)
        result = st.judge(Result("API dies mid-run", "every connection refused from the "
                                 f"moment {len(before)} ids were committed "
                                 "(`refuse_connections()`), then --skip-loaded against a new "
                                 "simulator", 1), want=want)
    line = _one_line(result, stderr)
    changed = sorted(i for i, held in before.items() if after.get(i) != held)
    wrong = sorted(i for i, (status, _) in after.items() if status != want.statuses[i])
    result.check(proc.returncode == 3, f"exit {proc.returncode}, expected 3")
    result.check(line.startswith(f"etl: error: cannot reach the API at {st.sim.url}: ")
                 and "api.unreachable_after_s = 2)" in line, f"message: {line!r}")
    result.check(len(before) < len(ids), "the run had ended before the API died")
    result.check(not changed, f"committed ids changed or gone (first 5): {changed[:5]}")
    result.check(not wrong, f"ids stored with a status not theirs (first 5): {wrong[:5]}")
    result.check(code == 1, f"rerun exit {code}, expected 1 (poison-dies)")
    result.no_traceback(stderr, rerun_err)
    result.notes.append(
        f"the run stopped {stopped_s:.1f} s after the API died, exit 3, one line "
        f"(`{line}`); the {len(before)} ids committed before stayed as they were, "
        f"{len(after) - len(before)} more were committed from what was fetched, none "
        "recorded failed for want of an answer; the rerun with --skip-loaded against a "
        "new simulator (same seed) completed the work, exit 1 (poison-dies)")
    return result


@scenario("wrong-base-url", "the base URL with /v1 or /api after a good load")
def wrong_base_url(ctx: Rel) -> Result:
    """After a good load: the base URL with /v1 (refused before any request), then with
    /api (the simulator answers 404 for every id). Neither may touch a status."""
    with ctx.stage("wrong_base_url", numbered("base", ctx.args.ids // 5)) as st:
        sim, watcher = st.sim, st.watcher
        first, _, _ = st.run()
        before, served = watcher.statuses(), sim.total_requests
        v1, _, v1_err = st.run("--base-url", sim.url + "/v1")
        v1_requests, served = sim.total_requests - served, sim.total_requests
        api, _, api_err = st.run("--base-url", sim.url + "/api")
        api_requests = sim.total_requests - served
        after = watcher.statuses()
        result = st.judge(Result("wrong base URL", "the base URL + /v1, then + /api (404 for "
                                 "every id) after a good load", 2))
    v1_line, api_line = _one_line(result, v1_err), _one_line(result, api_err)
    result.check(first == 0, f"first load exit {first}, expected 0")
    result.check(v1 == 2, f"/v1 exit {v1}, expected 2")
    result.check(v1_requests == 0, f"{v1_requests} requests with /v1, expected none")
    result.check("must not include /v1" in v1_line, f"/v1 message: {v1_line!r}")
    result.check(api == 2, f"/api exit {api}, expected 2")
    result.check(api_line.startswith("etl: error: every id answered so far was 404 Not "
                                     "Found"), f"/api message: {api_line!r}")
    changed = sorted(i for i in before.keys() | after.keys()
                     if after.get(i, ("-",))[0] != before.get(i, ("-",))[0])
    result.check(not changed, f"{len(changed)} statuses changed (first 5): {changed[:5]}")
    # 404s for ids already stored as not_found are expected and recorded again (same
    # status, the stopped run's run_id); any other rewrite would be a change.
    rewritten = sorted(i for i in before if after.get(i) != before[i])
    others = [i for i in rewritten if before[i][0] != "not_found"]
    result.check(not others, f"rows rewritten by a wrong base URL (first 5): {others[:5]}")
    result.notes.append(
        f"/v1: exit 2 before any request (`{v1_line}`); /api: exit 2 after "
        f"{api_requests} requests answered 404 (`{api_line}`); every status stayed as the "
        f"first load left it ({len(rewritten)} ids already `not_found` were recorded "
        "`not_found` again by the /api run, as a rerun would; no other row was written)")
    return result


@scenario("kills", "SIGKILL at seeded random moments, run after run on one database")
def kills(ctx: Rel) -> Result:
    """SIGKILL at seeded random moments, run after run on one database, then one run to
    the end. Every other run is `--skip-loaded`."""
    rng = random.Random(ctx.seed)
    moments: Counter[str] = Counter()
    # 20 ms per answer and 2 at a time: a whole run takes ids / 100 seconds, longer than
    # the 0.2 to 1.6 s a killed run lives, so each kill hits a running sync.
    with ctx.batched_stage("kills", "kill", poison=True, latency_ms=20, concurrency=2) as st:
        watcher = st.watcher
        landed, torn = 0, 0
        for k in range(ctx.args.kills):
            proc = st.start(*(["--skip-loaded"] if k % 2 else []))
            time.sleep(rng.uniform(0.2, 1.6))
            if proc.poll() is not None:
                proc.communicate()
                log(f"kill {k}: the run had already ended")
                continue
            moments[watcher.moment()] += 1
            proc.send_signal(signal.SIGKILL)
            proc.communicate()
            landed += 1
            torn += not watcher.batches_whole()
        code, _, stderr = st.run("--skip-loaded")
        result = st.judge(Result("SIGKILL at random moments",
                                 "kill -9 of `etl sync`, then the next run (every other one "
                                 "--skip-loaded)", landed))
    result.check(landed == ctx.args.kills, f"only {landed} kills hit a running sync")
    result.check(torn == 0, f"{torn} kills left a call without its status or the reverse")
    result.check(code == 1, f"final run exit {code}, expected 1 (poison-kill)")
    result.notes.append("kills landed " + ", ".join(f"{n} {m}" for m, n in moments.items())
                        + "; after each, every call row had its `loaded` status and no "
                        "status lacked its row; the final run completed the work")
    return result


@scenario("kills-in-batch", "SIGKILL while a batch transaction is open, made certain by holding "
          "a lock the batch needs")
def kills_in_batch(ctx: Rel) -> Result:
    with ctx.batched_stage("kills_in_batch", "kib", poison=False) as st:
        landed, leaked = 0, 0
        for _ in range(ctx.args.batch_kills):
            outcome = _kill_inside_a_batch(st)
            if outcome is None:
                break
            landed += 1
            leaked += outcome
        code, _, _ = st.run("--skip-loaded")
        result = st.judge(Result("SIGKILL inside a batch transaction",
                                 "kill -9 while a batch had written customers and operators "
                                 "and waited at calls (a lock held by this script)", landed))
    result.check(landed == ctx.args.batch_kills, f"only {landed} kills inside a batch")
    result.check(leaked == 0, f"{leaked} killed batches left rows behind")
    result.check(code == 0, f"final run exit {code}, expected 0")
    result.notes.append("nothing of a killed batch stayed; the next run completed the work")
    return result


def _kill_inside_a_batch(st: Stage) -> bool | None:
    """Start a sync, kill it inside its next batch; whether the batch left rows behind
    (None: the run ended before it could be killed)."""
    watcher = st.watcher
    proc = st.start("--skip-loaded")
    done = watcher.committed()
    wait_for(lambda: watcher.committed() > done or proc.poll() is not None)
    killed = False
    with watcher.calls_locked():
        before = watcher.committed()
        wait_for(lambda: watcher.blocked_writers() or proc.poll() is not None)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            killed = True
    proc.communicate()
    if not killed:
        return None
    wait_for(lambda: not watcher.sessions())
    return watcher.committed() != before or not watcher.batches_whole()


@SCENARIOS.add("signals", "SIGTERM and SIGINT while every request hangs, then a rerun")
def signals(ctx: Rel) -> Results:
    return Results(records=[ctx.timed(_signal, ctx, sig) for sig in SIGNALS])


def _signal(ctx: Rel, sig: signal.Signals) -> Result:
    """A signal while every worker waits on an answer trickled a byte a second (with a
    300 s timeout); then --skip-loaded with a short timeout, where the trickles fail."""
    name = sig.name
    wanted, said = SIGNALS[sig]
    ordinary = numbered(name.lower(), ctx.args.ids // 5)
    trickling = [f"trickle-99-{name.lower()}{j}" for j in range(8)]
    ids = ctx.shuffled([*ordinary, *trickling])
    with ctx.stage(f"signal_{name}", ids, Simulator(trickle_s=1, seed=ctx.seed),
                   timeout_s=300) as st:
        sim, watcher = st.sim, st.watcher
        proc = st.start()
        # Four workers: once four trickling ids were asked for, every worker hangs.
        wait_for(lambda: sum(sim.requests_for(i) > 0 for i in trickling) >= 4
                 or proc.poll() is not None)
        time.sleep(0.5)
        hung = proc.poll() is None
        sent = time.monotonic()
        proc.send_signal(sig)
        stdout, stderr = finish(proc)
        took = time.monotonic() - sent
        fetched = [i for i in ordinary if sim.requests_for(i)]
        stored = watcher.statuses()
        status = watcher.run_status(summary_json(stdout).get("run_id"))
        rerun = ctx.config(f"signal_{name}_rerun", timeout_s=TIMEOUT_S)
        code, _, rerun_err = st.run("--skip-loaded", config=rerun)
        result = st.judge(Result(f"{name} while requests hang",
                                 f"{name} to `etl sync` while its 4 workers waited on answers "
                                 "trickled a byte a second (timeout_s 300)", int(hung)),
                          failing=trickling)
    line = stderr.strip().splitlines()[-1] if stderr.strip() else ""
    missing = [i for i in fetched if i not in stored]
    result.check(hung, "the run had ended before the signal")
    result.check(proc.returncode == wanted, f"exit {proc.returncode}, expected {wanted}")
    result.check(took < SIGNAL_LIMIT_S, f"stopped {took:.1f} s after the signal, limit "
                 f"{SIGNAL_LIMIT_S} s")
    result.check(line.startswith(said), f"last line {line!r}")
    result.check(status == "interrupted", f"run status {status!r}, expected interrupted")
    result.check(not missing, f"fetched but not committed (first 5): {missing[:5]}")
    result.check(code == 1, f"rerun exit {code}, expected 1 (the trickling ids)")
    result.no_traceback(stderr, rerun_err)
    result.notes.append(
        f"exit {proc.returncode} {took:.2f} s after the signal, last line `{line}`; run "
        f"`interrupted`; the {len(fetched)} ids fetched before were committed; the rerun "
        f"with --skip-loaded and timeout_s {TIMEOUT_S:g} completed the work (exit 1: the "
        f"trickling ids failed after {MAX_ATTEMPTS} attempts)")
    return result


@scenario("terminated", "pg_terminate_backend on the sync's sessions, between and inside "
          "batches")
def terminated(ctx: Rel) -> Result:
    with ctx.batched_stage("terminated", "term", poison=True) as st:
        watcher = st.watcher
        proc = st.start()
        between, inside = 0, 0
        for _ in range(ctx.args.terminations):
            done = watcher.committed()
            if not wait_for(lambda d=done: watcher.committed() > d or proc.poll() is not None):
                break
            wait_for(lambda: watcher.idle_sessions() or proc.poll() is not None, 5)
            between += sum(watcher.terminate(pid) for pid in watcher.idle_sessions())
            with watcher.calls_locked():
                if wait_for(lambda: watcher.blocked_writers() or proc.poll() is not None):
                    inside += sum(watcher.terminate(p) for p in watcher.blocked_writers())
        stdout, stderr = finish(proc)
        summary = json.loads(stdout)
        counted = watcher.run_counts(summary["run_id"])
        result = st.judge(Result("connections terminated",
                                 "pg_terminate_backend of etl's sessions: idle between batches "
                                 f"({between}) and inside a batch ({inside})", between + inside))
    result.check(inside == ctx.args.terminations,
                 f"only {inside} terminations inside a batch")
    result.check(proc.returncode == 1, f"exit {proc.returncode}, expected 1 (poison-term)")
    result.check(counted == (summary["loaded"], summary["not_found"], summary["failed"]),
                 f"run counters {counted} differ from the summary")
    result.notes.append(f"the run went on by itself ({stderr.count('retrying the batch')} "
                        "batches written again) and its counters match its rows")
    return result


@scenario("database-lost", "every session terminated until the run stops with exit 3, then a "
          "rerun")
def database_lost(ctx: Rel) -> Result:
    with ctx.batched_stage("database_lost", "lost", poison=False) as st:
        watcher = st.watcher
        proc = st.start()
        terminations = 0
        wait_for(lambda: watcher.committed() > 0 or proc.poll() is not None)
        with watcher.calls_locked():
            deadline = time.monotonic() + 120
            while proc.poll() is None and time.monotonic() < deadline:
                terminations += sum(watcher.terminate(p) for p in watcher.blocked_writers())
                time.sleep(0.01)
        _, stderr = finish(proc, 60)
        whole = watcher.batches_whole()
        code, _, _ = st.run("--skip-loaded")
        result = st.judge(Result("database lost for good",
                                 "every attempt at a batch terminated until etl gave up",
                                 terminations))
    line = next((x for x in stderr.splitlines() if x.startswith("etl: error:")), "")
    result.check(proc.returncode == 3, f"exit {proc.returncode}, expected 3")
    result.check("failed 4 times writing a batch" in line, f"message: {line!r}")
    result.check(whole, "the stopped run left a call without its status or the reverse")
    result.check(code == 0, f"rerun exit {code}, expected 0")
    result.notes.append(f"the run stopped with exit 3 and one line (`{line}`); the rerun "
                        "with --skip-loaded completed the work")
    return result


@scenario("concurrent", "several `etl sync` processes at once on overlapping ids, on an empty "
          "database")
def concurrent(ctx: Rel) -> Result:
    rng = random.Random(ctx.seed)
    universe = numbered("conc", ctx.args.ids)
    slices = [rng.sample(universe, k=int(0.6 * len(universe))) + ["nf-conc"]
              for _ in range(ctx.args.processes)]
    requested = sorted({i for ids in slices for i in ids})
    with ctx.stage("concurrent", requested) as st:
        procs = [st.start("--batch-size", str((1, 2, 3, 5)[n % 4]),
                          config=ctx.config(f"concurrent_{n}", concurrency=8),
                          ids_file=ctx.write_ids(f"concurrent_{n}", ids))
                 for n, ids in enumerate(slices)]
        outs = [finish(p) for p in procs]
        result = st.judge(Result("concurrent syncs",
                                 f"{ctx.args.processes} `etl sync` at once on an empty "
                                 "database, overlapping shuffled ids, batches of 1 to 5",
                                 ctx.args.processes))
    codes = [p.returncode for p in procs]
    errors = sum(err.lower().count("deadlock") + err.count("retrying the batch")
                 for _, err in outs)
    result.check(codes == [0] * len(procs), f"exit codes {codes}")
    result.check(errors == 0, f"{errors} deadlocks or retried batches")
    result.notes.append("every process exit 0; no deadlock, no batch retried; the newest "
                        "snapshot of every customer and operator won")
    return result


# -- small helpers -----------------------------------------------------------------------------


def _ended(proc: subprocess.Popen[str]) -> tuple[str, float]:
    """Wait for a process; its stderr and when it ended."""
    _, stderr = finish(proc)
    return stderr, time.monotonic()


def _one_line(result: Result, stderr: str) -> str:
    """The `etl: ...` line that stopped a run; checks it is the only one and the last."""
    lines = [x for x in stderr.splitlines() if x.startswith("etl: ")]
    last = stderr.strip().splitlines()[-1] if stderr.strip() else ""
    result.check(len(lines) == 1 and lines[0] == last,
                 f"expected one `etl:` line, last on stderr: {lines}")
    return lines[-1] if lines else ""


def _controls(text: str) -> list[str]:
    """The raw control characters in `text`, a newline aside (C0, DEL, C1)."""
    return sorted({repr(c) for c in text if c != "\n" and unicodedata.category(c) == "Cc"})




class Watcher:
    """An autocommit session beside the syncs of one database."""

    def __init__(self, db: str) -> None:
        self.db = db

    def __enter__(self) -> Watcher:
        self.conn = psycopg.connect(self.db, autocommit=True)
        self.name = self.conn.info.dbname
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.conn.close()

    def committed(self) -> int:
        if not self.conn.execute("SELECT to_regclass('etl_call_status')").fetchone()[0]:
            return 0
        return self.conn.execute("SELECT count(*) FROM etl_call_status").fetchone()[0]

    def sessions(self) -> list[tuple[int, str, str | None, bool]]:
        return self.conn.execute(
            "SELECT pid, state, wait_event_type, backend_xid IS NOT NULL FROM pg_stat_activity "
            "WHERE datname = %s AND application_name = %s", (self.name, APP)).fetchall()

    def moment(self) -> str:
        sessions = self.sessions()
        if not sessions:
            return "before any database session"
        if any(wrote or state != "idle" for _, state, _, wrote in sessions):
            return "with a statement or transaction open"
        return "between batches"

    def blocked_writers(self) -> list[int]:
        return [pid for pid, _, wait, wrote in self.sessions() if wait == "Lock" and wrote]

    def idle_sessions(self) -> list[int]:
        return [pid for pid, state, _, _ in self.sessions() if state == "idle"]

    def terminate(self, pid: int) -> bool:
        return self.conn.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone()[0]

    def batches_whole(self) -> bool:
        if not self.conn.execute("SELECT to_regclass('calls')").fetchone()[0]:
            return True
        return self.conn.execute(
            "SELECT NOT EXISTS (SELECT call_id FROM calls EXCEPT SELECT call_id FROM "
            "etl_call_status WHERE status = 'loaded') AND NOT EXISTS (SELECT call_id FROM "
            "etl_call_status WHERE status = 'loaded' EXCEPT SELECT call_id FROM calls)"
        ).fetchone()[0]

    def statuses(self) -> dict[str, tuple[str, str]]:
        """Every call's status and the run that wrote it."""
        if not self.conn.execute("SELECT to_regclass('etl_call_status')").fetchone()[0]:
            return {}
        return {i: (s, r) for i, s, r in self.conn.execute(
            "SELECT call_id, status, run_id FROM etl_call_status").fetchall()}

    def errors(self, ids: list[str]) -> dict[str, str]:
        return dict(self.conn.execute("SELECT call_id, error FROM etl_call_status WHERE "
                                      "call_id = ANY(%s) AND error IS NOT NULL", (ids,)
                                      ).fetchall())

    def all_errors(self) -> list[str]:
        return [e for (e,) in self.conn.execute(
            "SELECT error FROM etl_call_status WHERE error IS NOT NULL").fetchall()]

    def run_status(self, run_id: str | None) -> str | None:
        if not self.conn.execute("SELECT to_regclass('etl_runs')").fetchone()[0]:
            return None
        row = self.conn.execute("SELECT status FROM etl_runs WHERE run_id = %s",
                                (run_id,)).fetchone()
        return row[0] if row else None

    def run_counts(self, run_id: str) -> tuple[int, int, int]:
        return tuple(self.conn.execute("SELECT loaded, not_found, failed FROM etl_runs WHERE "
                                       "run_id = %s", (run_id,)).fetchone())

    @contextlib.contextmanager
    def calls_locked(self) -> Iterator[None]:
        """A batch then writes scenarios, customers, phone numbers and operators and waits
        at its insert into calls, its transaction open."""
        with psycopg.connect(self.db) as lock:
            lock.execute("LOCK TABLE calls IN EXCLUSIVE MODE")
            try:
                yield
            finally:
                lock.rollback()


# -- the report --------------------------------------------------------------------------------


def render(results: Results, info: dict[str, str], args: argparse.Namespace, command: str,
           started: datetime, took_s: float, loads: tuple[float, float]) -> str:
    rows: list[Result] = results.records
    lost = sum(r.lost for r in rows)
    inconsistent = sum(r.inconsistent for r in rows)
    stale = sum(r.stale for r in rows)
    problems = [f"{r.scenario}: {p}" for r in rows for p in r.problems]
    verdict = ("**Nothing was lost, inconsistent or left stale, and every check held.**"
               if not (lost or inconsistent or stale or problems or results.failures) else
               f"**FAILED: {lost} lost, {inconsistent} inconsistent, {stale} stale, "
               f"{len(problems)} failed check(s), {len(results.failures)} scenario(s) that "
               "could not run.**")
    out = report_header("Reliability report", "reliability.py", started=started,
                        took_s=took_s, command=command, facts=info, lines=[
        f"seed {args.seed}; --ids {args.ids} (random faults: {2 * args.ids:,}; each fault "
        f"kind: {args.ids // 25} ordinary ids and 12 scripted ones; bad answers: "
        f"{args.ids // 10} ordinary ids and 40 bad ones; hostile bodies: {args.ids // 5} "
        f"ordinary ids and {len(HOSTILE_KINDS) * HOSTILE_EACH} hostile ones; API dying: "
        f"{args.ids + 2:,}; wrong base URL: {args.ids // 5}; each signal: {args.ids // 5} "
        f"ordinary ids and 8 trickling ones; dead API: {DEAD_API_IDS:,} at any --ids), "
        f"{args.kills} random kills, {args.batch_kills} kills inside a batch, "
        f"{args.terminations} terminations between and {args.terminations} inside batches, "
        f"{args.processes} concurrent processes",
        f"load average (1 min) before / after: {loads[0]:.2f} / {loads[1]:.2f}"])
    out += ["", verdict, ""]
    out += markdown_table(
        ["scenario", "what was injected", "times", "ids requested", "loaded",
         "failed as expected", "not found", "lost", "inconsistent", "stale snapshots"],
        [[r.scenario, r.injected, f"{r.times:,}", f"{r.requested:,}", f"{r.loaded:,}",
          f"{r.failed_expected:,}", f"{r.not_found:,}", _mark(r.lost), _mark(r.inconsistent),
          _mark(r.stale)] for r in rows]
        + [["**total**", "", f"{sum(r.times for r in rows):,}",
            f"{sum(r.requested for r in rows):,}", f"{sum(r.loaded for r in rows):,}",
            f"{sum(r.failed_expected for r in rows):,}", f"{sum(r.not_found for r in rows):,}",
            _mark(lost), _mark(inconsistent), _mark(stale)]],
        align="llrrrrrrrr")
    if results.failures:
        out += ["", "## Scenarios that could not run", ""]
        out += [f"- {f}" for f in results.failures]
    out += ["", "## Checks beyond the rows", ""]
    for r in rows:
        checks = "; ".join(r.notes)
        state = "held" if not r.problems else "**FAILED: " + "; ".join(r.problems) + "**"
        out.append(f"- **{r.scenario}** ({r.duration_s:.0f} s): {checks}. Checks {state}.")
    out += ["", "## Method", "", *METHOD]
    return "\n".join(out) + "\n"


def _mark(n: int) -> str:
    return str(n) if n == 0 else f"**{n}**"


METHOD = [
    "Every `etl sync` runs as a process of its own (`python -m etl sync --json`; one that "
    "runs to its end is started by the launcher `benchmarks/measure.py` and killed with its "
    "process group after 10 minutes) against the simulator (`etl/simulator/`, in the "
    "script's process, on 127.0.0.1) and a database of its own on the local PostgreSQL, "
    "created for the scenario and dropped after it. Its environment is the script's, less "
    "every `ETL_*`, `COMMUBO_*` and `DLT_*` variable. The script is a list of scenarios over "
    "the harness (`benchmarks/harness.py` and the `bench_*.py` modules beside it).",
    "",
    "What a scenario should leave is derived from what the simulator serves, not from "
    "another run: every servable call through `etl.transform`, the newest snapshot of every "
    "customer and operator (and the phone numbers of that snapshot), `not_found` for 404s, "
    "`failed` for what can never load (a persistent 500, bodies that are not a call, values "
    "the columns cannot hold, ids whose faults outlast the attempts). Then every row is read "
    "back (`etl/testing.py`: `expected_warehouse`, `stored_warehouse`, `lost_ids`, "
    "`stale_entities`, `inconsistencies`, the same checks the test suite uses):",
    "",
    "- **times**: faults the simulator actually served (counted per request: a hostile body "
    "is one), kills that hit a running sync, signals that hit a hanging sync, sessions "
    "terminated, processes started, runs with a wrong base URL, APIs that died;",
    "- **loaded / failed as expected / not found**: ids whose status is the expected one;",
    "- **lost**: ids whose call row is missing or differs in any column (`fetched_at` and "
    "`run_id` aside), or whose status is not the expected one;",
    "- **inconsistent**: rows that break an invariant the loader keeps, whatever was "
    "killed or rerun (the primary keys rule out a second row per key, so that is not "
    "counted): a call row without its status or a `loaded` status without its call row; a "
    "call row or status naming a run not in `etl_runs`, or more of them naming a run than it "
    "counted; a completed run whose counters do not add up (requested + related = loaded + "
    "not found + failed + skipped: a batch written again and counted twice breaks it); in "
    "`customer_versions` and `operator_versions`, a version not valid from its own "
    "`updated_date_time`, two versions of one entity valid from the same moment, or a "
    "`valid_to` other than the next version's `valid_from` (an overlap, a gap, a second open "
    "version: what a version written twice or out of turn leaves); a customer or operator "
    "not at its newest version; a version, phone number or call naming a customer, "
    "operator, scenario or version not stored; phone positions other than 0..n-1;",
    "- **stale snapshots**: customers, phone lists, operators and scenarios that differ from "
    "the newest snapshot served.",
    "",
    "Scenarios:",
    "",
    "- **fault: KIND** — ordinary ids plus scripted ones whose first 1, 2 or 3 requests fail "
    f"with KIND (they must load) and ids failing {MAX_ATTEMPTS} times (they must fail after "
    f"exactly {MAX_ATTEMPTS} attempts, the configured limit); 429s carry a Retry-After of "
    f"{RETRY_AFTER_S} s, and the simulator's clock of each request shows the wait was kept; "
    f"`slow` answers after 1.5 s with a {TIMEOUT_S:g} s timeout. `trickle` sends the whole "
    f"answer, `trickleb` the body after the headers, a byte every {TRICKLE_S:g} s: every read "
    f"succeeds, so only the deadline of the whole exchange ({TIMEOUT_S:g} s) can cut an "
    "attempt off; the simulator's clock of each request shows the attempts followed each "
    "other at that deadline, and the always-trickling ids must fail with `timed out: no "
    f"complete answer within {TIMEOUT_S:g}s (gave up after {MAX_ATTEMPTS} attempts)`.",
    "- **bad answers** — 404s, a persistently broken id, bodies that are not JSON or not an "
    "object, a wrong or missing callId, a talkTime that is no number or beyond int32.",
    f"- **hostile bodies** — ordinary ids (--ids / 5) and {HOSTILE_EACH} each of `bomb-` (a "
    "gzip body of about 300 KB that inflates to 300 MiB), `huge-` (100 MiB announced by its "
    "Content-Length), `endless-` (a chunked body that never ends) and `escape-` (HTTP 400 "
    "whose reason phrase and body carry a terminal-title OSC, a clear-screen CSI and a bare "
    "CR), shuffled, in one run. A body past api.max_response_bytes (10 MiB) must fail its id "
    "after one request with `response body larger than 10,485,760 bytes[ once decompressed] "
    "(api.max_response_bytes)`, an escape id with `400 Bad Request\\x1b]0;…`, the control "
    "characters written out as text; no raw control character but the newline may reach "
    "stdout, stderr, `etl failures` or `etl_call_status.error`. The peak RSS of the `etl "
    "sync` process is the kernel's high-water mark (`ru_maxrss` from `os.wait4`, in MiB, "
    "the process forked by the tiny launcher so that the script's own size is not carried "
    "over), not a "
    f"sample; it must stay under {RSS_LIMIT_MB} MB, and is set beside runs (processes and "
    "databases of their own) of the same ordinary ids alone, with only the bombs and with "
    "only the endless bodies.",
    "- **random faults** — every request for an ordinary id fails with probability 0.3 (500, "
    "502, 503, 429 in seconds or as a date, reset, cut); the draw is a function of (seed, "
    "id, attempt), so the ids that draw a fault on every attempt are known before the run.",
    f"- **dead API** — {DEAD_API_IDS:,} ids against a simulator that refuses every connection "
    "(its port bound by a socket that never listens), every setting at its default: the run "
    f"must stop within {DEAD_API_LIMIT_S} s with exit 3 and one `etl: error: cannot reach the "
    "API …` line once nothing answered for api.unreachable_after_s (20 s), and record no "
    "status. Judged against an empty warehouse: a run that reached nothing leaves nothing.",
    "- **API dies mid-run** — --ids ids plus a 404 and a poison id, batches of 20, "
    "api.unreachable_after_s = 2; once 100 ids are committed the simulator refuses every "
    "connection (`refuse_connections()`). The run must stop with exit 3 and one line; what "
    "was committed before must stay as it was, and no id may be recorded `failed` for want "
    "of an answer (every stored status is the expected one). Then the same command with "
    "`--skip-loaded` against a new simulator with the same seed completes (exit 1: the "
    "poison id), and every row is judged.",
    "- **wrong base URL** — a good load of --ids / 5 ids, then the same command with the base "
    "URL + `/v1` (refused before any request: exit 2, no request reaches the simulator) and "
    "+ `/api` (the simulator answers 404 for every id: exit 2 and one `etl: error: every id "
    "answered so far was 404 Not Found …` line once at least 50 ids not already stored as "
    "`not_found` answered so). No status may change, no row but those of ids already "
    "`not_found` may be written again; the rows are judged against the first load.",
    "- **SIGKILL at random moments** — one database; `etl sync` is started and killed with "
    "SIGKILL after a seeded random delay, again and again (every other run with "
    "`--skip-loaded`), then run to the end. Where each kill landed is read from "
    "`pg_stat_activity` just before it; after each kill, every call row must have its "
    "`loaded` status and the reverse (one transaction per batch).",
    "- **SIGKILL inside a batch transaction** — the script holds `LOCK TABLE calls IN "
    "EXCLUSIVE MODE`; the next batch writes scenarios, customers, phone numbers and operators "
    "and waits at calls; the sync is killed once PostgreSQL shows it waiting with rows "
    "written. Nothing of that batch may stay.",
    "- **SIGTERM / SIGINT while requests hang** — --ids / 5 ordinary ids shuffled with 8 "
    "`trickle-99-` ids (the whole answer a byte a second), timeout_s 300, concurrency 4: once "
    "four trickling ids were requested every worker hangs, and 0.5 s later the signal is "
    f"sent. The run must end within {SIGNAL_LIMIT_S} s of it with exit 143 (SIGTERM) or 130 "
    "(SIGINT), the last stderr line `etl: stopped by SIGTERM: run …` or `etl: interrupted by "
    "Ctrl-C: run …`, its `etl_runs.status` `interrupted`, and every ordinary id fetched before "
    f"the signal committed. Then `--skip-loaded` with timeout_s {TIMEOUT_S:g} completes (the "
    f"trickling ids fail after {MAX_ATTEMPTS} attempts), and every row is judged.",
    "- **connections terminated** — during one run, `pg_terminate_backend` on etl's idle "
    "pooled sessions between batches and on its session inside a batch (held by the lock as "
    "above). The run must go on by itself, and its counters in `etl_runs` must match its rows "
    "(a batch written again is counted once).",
    "- **database lost for good** — every attempt at a batch is terminated until etl stops "
    "with exit 3 and one line; the same command with `--skip-loaded` then completes.",
    "- **concurrent syncs** — several processes at once on an empty database (so the schema "
    "upgrade races too), each with a shuffled 60% of the ids and a batch size of 1 to 5: "
    "every customer and operator is written by several processes in different orders.",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="scenarios (--only):\n" + SCENARIOS.help())
    parser.add_argument("--pg-url", default=os.environ.get(
        "ETL_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test"),
        help="a PostgreSQL database on a server where bench_run_* databases may be created")
    parser.add_argument("--seed", type=int, default=20261125)
    parser.add_argument("--ids", type=int, default=1000, help="ids per scenario")
    parser.add_argument("--kills", type=int, default=10, help="random SIGKILLs")
    parser.add_argument("--batch-kills", type=int, default=3, help="SIGKILLs inside a batch")
    parser.add_argument("--terminations", type=int, default=5,
                        help="terminations between and inside batches, each")
    parser.add_argument("--processes", type=int, default=4, help="concurrent syncs")
    parser.add_argument("--only", help="comma-separated, of: " + ", ".join(SCENARIOS.names()))
    parser.add_argument("--quick", action="store_true",
                        help="300 ids, 4 kills, 2 in a batch, 2 terminations, 3 processes")
    parser.add_argument("--output", type=Path, default=REPO / "docs" / "reliability.md")
    args = parser.parse_args(argv)
    if args.quick:
        args.ids, args.kills, args.batch_kills = 300, 4, 2
        args.terminations, args.processes = 2, 3
    try:
        chosen = SCENARIOS.select(args.only)
    except ValueError as exc:
        parser.error(str(exc))

    command = command_line()
    started = datetime.now(UTC)
    t0 = time.monotonic()
    load_before = load_average(warn=True)
    with Rel(args) as ctx:
        info = machine_facts(ctx.pg_url)
        drop_stale_databases(ctx.pg_url)
        try:
            results = run_scenarios(chosen, ctx)
        except KeyboardInterrupt:
            log("interrupted")
            return 130
    report = render(results, info, args, command, started, time.monotonic() - t0,
                    (load_before, load_average()))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(report)
    log(f"wrote {args.output}")
    print(report)
    return 0 if all(r.ok for r in results.records) and not results.failures else 1


if __name__ == "__main__":
    sys.exit(main())
