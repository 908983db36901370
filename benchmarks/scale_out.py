"""The scale-out scenario of benchmarks/run.py (`--only scale-out`): 1, 2 and 4 concurrent
shard processes of one ids file against one PostgreSQL database.

Each process is `etl sync --ids-file F --shard-index I --num-shards N --concurrency 32
--json`, all N started at once (harness `Context.sync_shards`, over `measure_all`) into one
fresh database; the run's wall time is from the first start to the last exit, so ids/s is the
aggregate; its CPU is the sum of the children's user+sys (wait4). Meanwhile the machine's busy
CPU (/proc/stat), the simulator's and the PostgreSQL server's (its postmaster and children,
when it runs on this machine) are measured (`CpuMeter`), with the load average after the run:
the report says where the curve bends and whether the cores, the simulator (one Python
process) or start-up is why.

- latency: simulator latency 50 ms (no rate limit), 8,000 ids, one simulator for all runs; the
  process counts in turn (1 2 4, 4 2 1, ...).
- rate-limited: a simulator of its own per run allowing 300 requests/s (as the rate-limited
  scenario), 20,000 ids, shared by the shards; once with `--max-rps 300` (each of N shards
  gets 1/N of it: together they stay at the limit) and once without (each process's adaptive
  limiter alone finds its share); ids/s and the share of requests answered 429.

A picture: aggregate ids/s against processes, beside the ideal linear line, for both.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import plots
from bench_base import log
from bench_machine import CpuUse
from bench_render import Stat, Target, median, rows_cell, text_table
from bench_scenarios import Results, Run
from harness import CONCURRENCY
from rate_limited import (
    RATE_LIMIT,
    SETTLE_S,
    TARGET_429_AFTER,
    TARGET_SHARE,
    limited_run,
    limited_timeout,
    median_run,
    share_429,
)

if TYPE_CHECKING:
    from run import Bench

SHARDS = (1, 2, 4)
LATENCY_MS = 50
TARGET_TWO = 1.5  # two processes at least this many times one's ids/s (latency-bound)
BENT = 0.90  # a process count whose ids/s is below this share of linear: the curve bends
MODES = {  # the rate-limited runs: scenario of their Runs -> label, options of every shard
    "scale-out max-rps": (f"--max-rps {RATE_LIMIT}", ["--max-rps", str(RATE_LIMIT)]),
    "scale-out adaptive": ("adaptive only", []),
}
HELP = (f"1, 2 and 4 concurrent `etl sync --shard-index I --num-shards N` processes "
        f"(concurrency {CONCURRENCY} each) of one ids file into one database: latency "
        f"{LATENCY_MS} ms with 8,000 ids, and a {RATE_LIMIT} requests/s limit with 20,000 ids "
        f"(with --max-rps {RATE_LIMIT} and without); aggregate ids/s, CPU, the machine's "
        "saturation, 429s; a picture of the curve")


def scale_out(ctx: Bench) -> Results:
    res = Results()
    n = ctx.sizes["scale_ids"]
    ids, expected = ctx.ids_file("scale", n)
    log(f"scale-out, latency {LATENCY_MS} ms: {n} ids in {SHARDS} processes at concurrency "
        f"{CONCURRENCY} each, {ctx.rounds} round(s)")
    with ctx.simulator(latency_ms=LATENCY_MS) as url:
        for rnd in ctx.round_numbers():
            for k in SHARDS if rnd % 2 else SHARDS[::-1]:  # no order bias
                res.record(f"scale-out {k} processes", ctx.sync_shards, "scale-out latency",
                           rnd, url, ids, n, expected, k)
    latency = {k: res.select("scale-out latency", size=n, side=_side(k)) for k in SHARDS}
    lines = _latency_lines(latency, n, expected)
    res.section(f"Scale-out, latency-bound: simulator latency {LATENCY_MS} ms, {n:,} ids in 1, "
                f"2 and 4 shard processes at concurrency {CONCURRENCY} each, one database "
                f"(one process's bound {CONCURRENCY * 1000 / LATENCY_MS:.0f} ids/s)", *lines)
    two = Stat.of(_scaling(latency, 2))
    res.targets.append(Target.of(
        "scale-out", f"latency-bound: 2 processes >= {TARGET_TWO:g}x the ids/s of one "
        "(round by round)", two, lambda v: v >= TARGET_TWO,
        f"x{two.fmt('.2f')} (4 processes: x{Stat.of(_scaling(latency, 4)).fmt('.2f')})",
        ctx.quick_note("scale_ids")))

    rl_n = ctx.sizes["scale_rate_ids"]
    rl_ids, rl_expected = ctx.ids_file("scale-rl", rl_n)
    log(f"scale-out, rate limit {RATE_LIMIT}/s: {rl_n} ids in {SHARDS} processes, with "
        f"--max-rps {RATE_LIMIT} and without, {ctx.rounds} round(s)")
    for rnd in ctx.round_numbers():
        for scenario, (_, options) in MODES.items():
            for k in SHARDS if rnd % 2 else SHARDS[::-1]:
                limited_run(ctx, res, f"{scenario} round {rnd} {k} processes",
                            lambda url, scenario=scenario, options=options, k=k, rnd=rnd:
                            ctx.sync_shards(scenario, rnd, url, rl_ids, rl_n, rl_expected, k,
                                            options=options,
                                            timeout_s=limited_timeout(rl_n)))
    limited = {scenario: {k: res.select(scenario, side=_side(k)) for k in SHARDS}
               for scenario in MODES}
    rows = [_limited_row(label, k, limited[scenario][k], rl_expected)
            for scenario, (label, _) in MODES.items() for k in SHARDS]
    res.section(f"Scale-out, rate-limited: a limit of {RATE_LIMIT} requests/s shared by 1, 2 "
                f"and 4 shard processes, latency {LATENCY_MS} ms, {rl_n:,} ids, concurrency "
                f"{CONCURRENCY} each", text_table(
                    ["limiter", "processes", "wall s", "ids/s", "% of limit", "429 %",
                     f"429 % after {SETTLE_S} s", "client CPU s", "cores busy", "rows landed"],
                    rows, align="llrrrrrrrl"), "",
                f"With --max-rps {RATE_LIMIT} each of N processes sends at most {RATE_LIMIT}/N "
                "requests/s; without it each process's adaptive limiter reacts to the 429s "
                "alone. 'cores busy': the machine's busy CPU over what its cores had (median "
                "round).")
    for scenario, (label, _) in MODES.items():
        runs = [r for k in SHARDS for r in limited[scenario][k]]
        note = ctx.quick_note("scale_rate_ids")
        share = Stat.of(r.ids_per_s / RATE_LIMIT for r in runs)
        res.targets.append(Target.of(
            "scale-out", f"rate-limited, {label}: >= {TARGET_SHARE:.0%} of the limit in "
            "aggregate ids/s with 1, 2 and 4 processes", share, lambda v: v >= TARGET_SHARE,
            _per_k(limited[scenario], lambda r: r.ids_per_s / RATE_LIMIT, ".1%"), note))
        after = Stat.of(share_429(r, after=True) for r in runs)
        res.targets.append(Target.of(
            "scale-out", f"rate-limited, {label}: <= {TARGET_429_AFTER:.0%} of requests "
            f"answered 429 after the first {SETTLE_S} s with 1, 2 and 4 processes", after,
            lambda v: v <= TARGET_429_AFTER,
            _per_k(limited[scenario], lambda r: share_429(r, after=True), ".2%"), note))

    panels = [(f"latency {LATENCY_MS} ms, {n:,} ids", {"commubo-etl": _points(latency)}, None),
              (f"limit {RATE_LIMIT} requests/s, {rl_n:,} ids",
               {label: _points(limited[scenario]) for scenario, (label, _) in MODES.items()},
               RATE_LIMIT)]
    panels = [p for p in panels if any(p[1].values())]
    if panels:
        ctx.figure(res, "scale-out.png", "Scale-out: aggregate ids/s of 1, 2 and 4 shard "
                   "processes against the ideal linear line (median, spread min–max)",
                   plots.scale_out, panels)
    return res


def _side(k: int) -> str:
    return f"{k} process{'es' if k > 1 else ''}"


def _scaling(by_k: dict[int, list[Run]], k: int) -> list[float]:
    """ids/s of k processes over one process's, round by round."""
    one = {r.round: r for r in by_k.get(1, [])}
    return [r.ids_per_s / one[r.round].ids_per_s for r in by_k.get(k, []) if r.round in one]


def _points(by_k: dict[int, list[Run]]) -> dict[int, tuple[float, float, float]]:
    stats = {k: Stat.of(r.ids_per_s for r in runs) for k, runs in by_k.items() if runs}
    return {k: (s.median, s.lo, s.hi) for k, s in stats.items()}


def _per_k(by_k: dict[int, list[Run]], value: Callable[[Run], float], spec: str) -> str:
    return ", ".join(f"{k}: {Stat.of(value(r) for r in runs).fmt(spec)}"
                     for k, runs in by_k.items() if runs)


def _cpu(runs: list[Run]) -> CpuUse:
    """The machine's CPU use during the median round."""
    return median_run(runs).extra["cpu"]


def _fmt(value: float, spec: str) -> str:
    return "-" if value is None or math.isnan(value) else format(value, spec)


def _latency_lines(by_k: dict[int, list[Run]], n: int, expected: int) -> list[str]:
    rows = []
    for k, runs in by_k.items():
        if not runs:
            rows.append([_side(k), *["-"] * 11, "failed"])
            continue
        use = _cpu(runs)
        scale = Stat.of(_scaling(by_k, k))
        rows.append([
            _side(k), Stat.of(r.wall_s for r in runs).fmt(".2f"),
            Stat.of(r.ids_per_s for r in runs).fmt(".1f"),
            Stat.of(n / r.extra["pipeline_s"] for r in runs if r.extra["pipeline_s"]).fmt(".1f"),
            f"x{scale.fmt('.2f')}", Stat.of(v / k for v in scale.values).fmt(".0%"),
            Stat.of(r.cpu_s for r in runs).fmt(".1f"),
            Stat.of(r.cpu_ms_per_id for r in runs).fmt(".3f"),
            _fmt(use.simulator_s, ".1f"), _fmt(use.postgres_s, ".1f"),
            _fmt(use.busy_share, ".0%"), f"{use.load1:.2f}", rows_cell([r.rows for r in runs],
                                                                    expected)])
    table = text_table(["processes", "wall s", "ids/s", "in-pipeline", "x one", "% linear",
                        "client CPU s", "CPU ms/id", "simulator CPU s", "PostgreSQL CPU s",
                        "cores busy", "load 1m", "rows landed"], rows, align="l" + "r" * 11 + "l")
    lines = [table, "",
             "ids/s: ids / wall time from the first start to the last exit; in-pipeline: ids / "
             "the longest shard's own duration_s (start-up, migration and exit left out); "
             "client CPU: the shard processes' user+sys summed; simulator, PostgreSQL and "
             "cores busy (the machine's busy CPU over what its cores had), load 1m (after "
             "the run): of the median round."]
    lines += _bend(by_k)
    return lines


def _bend(by_k: dict[int, list[Run]]) -> list[str]:
    """Where the curve bends (the first process count below BENT of linear) and why, from
    what the machine did meanwhile."""
    if not by_k.get(1):
        return []
    out, verdict = [], None
    for k in SHARDS[1:]:
        if not by_k.get(k):
            continue
        eff = median(_scaling(by_k, k)) / k
        use = _cpu(by_k[k])
        wall = median(r.wall_s for r in by_k[k])
        sim_core = use.simulator_s / use.wall_s if use.wall_s else math.nan
        startup = median(r.wall_s - r.extra["pipeline_s"] for r in by_k[k])
        out.append(f"{k} processes: {eff:.0%} of linear; {use.breakdown()}; simulator "
                   f"{_fmt(sim_core, '.0%')} of one core; start-up and exit {startup:.1f} s of "
                   f"{wall:.1f} s wall; load average {use.load1:.2f}")
        if eff >= BENT or verdict:
            continue
        if use.busy_share >= 0.9:
            why = (f"the machine's {use.cores} cores are saturated ({use.busy_share:.0%} busy): "
                   "more processes add CPU demand (clients, simulator, PostgreSQL) it does not "
                   "have")
        elif not math.isnan(sim_core) and sim_core >= 0.85:
            why = (f"the simulator, one Python process, uses {sim_core:.0%} of a core: it "
                   "serves no faster")
        elif startup >= 0.2 * wall:
            why = ("start-up, migration and exit, paid by every process, are a large part of "
                   "a short run")
        else:
            why = (f"neither the cores ({use.busy_share:.0%} busy) nor the simulator "
                   f"({_fmt(sim_core, '.0%')} of a core) are saturated: waiting elsewhere "
                   "(PostgreSQL locks, I/O)")
        verdict = f"The curve bends at {k} processes ({eff:.0%} of linear): {why}."
    out.append(verdict or f"The curve does not bend up to {SHARDS[-1]} processes (each at "
               f"least {BENT:.0%} of linear).")
    return out


def _limited_row(label: str, k: int, runs: list[Run], expected: int) -> list[str]:
    if not runs:
        return [label, str(k), *["-"] * 7, "failed"]
    use = _cpu(runs)
    return [label, str(k), Stat.of(r.wall_s for r in runs).fmt(".2f"),
            Stat.of(r.ids_per_s for r in runs).fmt(".1f"),
            Stat.of(r.ids_per_s / RATE_LIMIT for r in runs).fmt(".1%"),
            Stat.of(share_429(r) for r in runs).fmt(".2%"),
            Stat.of(share_429(r, after=True) for r in runs).fmt(".2%"),
            Stat.of(r.cpu_s for r in runs).fmt(".1f"), _fmt(use.busy_share, ".0%"),
            rows_cell([r.rows for r in runs], expected)]
