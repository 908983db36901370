"""Benchmarks: commubo-etl's `etl sync` against the same sync written with dlt 1.31.

    uv run --group bench python benchmarks/run.py              # everything, ~65 minutes
    uv run --group bench python benchmarks/run.py --quick      # small sizes, ~5 minutes
    uv run --group bench python benchmarks/run.py --only latency,loader --rounds 5
    uv run --group bench python benchmarks/run.py --only scale-out,rate-limited --quick

The scenarios (`--only`, comma-separated) are the SCENARIOS registry below; `--help` lists
them; the longer ones live in modules of their own beside this file (rate_limited.py,
scale_out.py, rerun_writes.py; the first and the last also run alone as `python
benchmarks/rate_limited.py` and `python benchmarks/rerun_writes.py`, which are this script
with their --only). Each is a function over the harness (benchmarks/harness.py): it starts
the simulator (`python -m etl simulate`, a subprocess of its own, shared by every side, so its
CPU is not counted), measures each side as a child process (ours: `python -m etl sync ...
--json`; dlt: `benchmarks/dlt_pipeline.py`; wall time, user+sys CPU and ru_maxrss of that
child only, from os.wait4 by the tiny launcher measure.py) in a fresh database `bench_run_*` on
the PostgreSQL of --pg-url, dropped afterwards, and checks the rows landed against the ids the
simulator serves. Sides run in turn, A B A B, for --rounds rounds; tables show the median of
the rounds and their spread (min–max). The tables go to stdout (progress to stderr) and to
benchmarks/RESULTS.md (--results), with the machine, command and date, and the pictures
(benchmarks/plots.py, matplotlib) to img/ beside it.

A target is met only when every round meets it (the whole spread), never on the median alone.
Targets never change the exit code, which is 1 only when a run failed (non-zero exit, timeout,
or rows landed not as expected).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import plots
import rate_limited
import rerun_writes
import scale_out
from bench_base import HERE, PY, BenchError, log
from bench_db import drop_stale_databases
from bench_machine import command_line, load_average, machine_facts
from bench_proc import sync_timeout
from bench_render import (
    SPREAD_NOTE,
    Stat,
    Target,
    by_round,
    markdown_table,
    median,
    report_header,
    rows_cell,
    side_row,
    side_table,
    text_table,
)
from bench_scenarios import Registry, Results, Run, run_scenarios
from harness import BARE, CONCURRENCY, DLT, OURS, Context

LATENCY_MS = 50
DLT_IMPORTS = ("dlt", "dlt.destinations", "dlt.sources.helpers.requests")

# Sizes of the full run and of --quick (a smoke run: the targets' sizes are the full ones).
SIZES = {  # key: (full, --quick)
    "latency_ids": (4_000, 1_000),
    "steady_ids": (20_000, 3_000),
    "cpu_ids": (10_000, 2_000),
    "memory_ours": ((10_000, 100_000), (2_000, 10_000)),
    "memory_dlt": ((5_000, 20_000), (1_000, 3_000)),
    "loader_calls": (20_000, 4_000),
    "incremental_ids": (100_000, 10_000),
    "rate_ids": (20_000, 3_000),
    "scale_ids": (8_000, 2_000),
    "scale_rate_ids": (20_000, 3_000),
    "rerun_calls": (20_000, 2_000),
}
FULL = {key: full for key, (full, _) in SIZES.items()}
QUICK = {key: quick for key, (_, quick) in SIZES.items()}
DLT_WORKERS = "64,32,16"  # dlt's worker counts under the rate limit (--dlt-workers)
QUICK_DLT_WORKERS = "32"

TARGET_LATENCY_SHARE = 0.90
TARGET_STEADY_SHARE = 0.95
TARGET_CPU_RATIO = 0.35
TARGET_RSS_MB = 150
TARGET_RSS_GROWTH = 0.10
TARGET_LOADER_CALLS_S = 15_000
TARGET_INCREMENTAL_RATIO = 0.05


class Bench(Context):
    """The session of run.py: the harness's Context with the sizes of the mode."""

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(args.pg_url, rounds=args.rounds or (1 if args.quick else 3),
                         quick=args.quick, args=args)
        self.sizes = QUICK if args.quick else FULL
        workers = args.dlt_workers if args.dlt_workers is not None else (
            QUICK_DLT_WORKERS if args.quick else DLT_WORKERS)
        self.dlt_workers = [int(w) for w in workers.split(",") if w.strip()]
        self.etl_roots: list[str] = args.etl_root or []
        self.figure_dir = Path(args.results).resolve().parent / "img"

    def quick_note(self, key: str, what: str = "ids") -> str:
        """A target's note when this mode's size is not the target's."""
        n = self.sizes[key]
        return "" if n == FULL[key] else f"quick size: {n} {what}"


SCENARIOS = Registry()


def _ratio_lines(ours: list[Run], dlt: list[Run]) -> list[str]:
    if not ours or not dlt:
        return []
    o_ids, d_ids = median(r.ids_per_s for r in ours), median(r.ids_per_s for r in dlt)
    o_cpu, d_cpu = median(r.cpu_ms_per_id for r in ours), median(r.cpu_ms_per_id for r in dlt)
    o_rss, d_rss = median(r.rss_mb for r in ours), median(r.rss_mb for r in dlt)
    return [f"ratios of the medians, {OURS} / {DLT}: throughput x{o_ids / d_ids:.2f}, CPU per "
            f"id {o_cpu / d_cpu:.0%}, peak RSS {o_rss / d_rss:.0%}"]


@SCENARIOS.add("latency", f"simulator latency {LATENCY_MS} ms, concurrency {CONCURRENCY}, "
               "4,000 ids: ours, dlt and a bare requests thread pool (reference, no database) "
               "against the 640 ids/s bound (start-up included)", requires=("dlt",))
def latency(ctx: Bench) -> Results:
    return _latency_bound(ctx, "latency", "Latency-bound", "lat", TARGET_LATENCY_SHARE,
                          sides={OURS: ctx.sync, DLT: ctx.dlt, BARE: ctx.bare})


@SCENARIOS.add("steady", f"simulator latency {LATENCY_MS} ms, concurrency {CONCURRENCY}, "
               "20,000 ids: ours in a steady state (start-up a small part of the run) against "
               "the 640 ids/s bound")
def steady(ctx: Bench) -> Results:
    return _latency_bound(ctx, "steady", "Steady state", "steady", TARGET_STEADY_SHARE,
                          sides={OURS: ctx.sync}, over=True)


_SIDE_WORDS = {OURS: "ours", DLT: "dlt", BARE: "bare"}


def _latency_bound(ctx: Bench, scenario: str, title: str, prefix: str, target: float, *,
                   sides: dict[str, Callable[..., Run]], over: bool = False) -> Results:
    """`sides` (ours first) in turn over ctx.sizes[f"{scenario}_ids"] ids at latency
    LATENCY_MS and concurrency CONCURRENCY, against the bound CONCURRENCY / latency; the
    target: ours at least `target` of the bound end to end (`over`: the target's text names
    its size)."""
    res = Results()
    key = f"{scenario}_ids"
    n = ctx.sizes[key]
    bound = CONCURRENCY * 1000 / LATENCY_MS
    ids, expected = ctx.ids_file(prefix, n)
    log(f"{title.lower()}: latency {LATENCY_MS} ms, concurrency {CONCURRENCY}, {n} ids, "
        f"{ctx.rounds} round(s)")
    with ctx.simulator(latency_ms=LATENCY_MS) as url:
        for rnd in ctx.round_numbers():
            for side, measure in sides.items():
                res.record(f"{scenario} {_SIDE_WORDS[side]}", measure, scenario, rnd, url, ids,
                           n, expected)
    runs = {side: res.select(scenario, side) for side in sides}
    ours = runs[OURS]
    res.section(f"{title}: simulator latency {LATENCY_MS} ms, concurrency {CONCURRENCY}, "
                f"{n:,} ids (bound {bound:.0f} ids/s)",
                side_table([side_row(r, side, f"{n:,}", bound) for side, r in runs.items()],
                           bound), "",
                *_pipeline_lines(ours, n, bound), *_ratio_lines(ours, runs.get(DLT, [])))
    share = Stat.of(r.ids_per_s / bound for r in ours)
    others = ", ".join(f"{side} {median(r.ids_per_s / bound for r in peer):.1%}"
                       for side, peer in runs.items() if side != OURS and peer)
    res.targets.append(Target.of(
        scenario, f"end-to-end >= {target:.0%} of {bound:.0f} ids/s "
        f"({target * bound:.0f} ids/s)" + (f" over {FULL[key]:,} ids" if over else ""), share,
        lambda v: v >= target,
        f"{Stat.of(v * bound for v in share.values).fmt('.0f')} ids/s = {share.fmt('.1%')}"
        + (f" (medians: {others})" if others else ""), ctx.quick_note(key)))
    return res


def _pipeline_lines(runs: list[Run], n: int, bound: float) -> list[str]:
    inside = [r for r in runs if r.extra.get("pipeline_s")]
    if not inside:
        return []
    pipe = Stat.of(n / r.extra["pipeline_s"] for r in inside)
    startup = Stat.of(r.wall_s - r.extra["pipeline_s"] for r in inside)
    return [f"{OURS} inside its pipeline (summary duration_s): {pipe.fmt('.1f')} ids/s = "
            f"{Stat.of(v / bound for v in pipe.values).fmt('.1%')} of the bound; start-up, "
            f"migration and exit took {startup.fmt('.2f')} s of the wall time"]


@SCENARIOS.add("cpu", "simulator latency 0, 10,000 ids: client CPU (user+sys) per id, ours "
               "vs dlt, and a picture of it", requires=("dlt", "matplotlib"))
def cpu(ctx: Bench) -> Results:
    res = Results()
    n = ctx.sizes["cpu_ids"]
    ids, expected = ctx.ids_file("cpu", n)
    log(f"CPU per id: latency 0, concurrency {CONCURRENCY}, {n} ids, {ctx.rounds} round(s)")
    with ctx.simulator(latency_ms=0) as url:
        for rnd in ctx.round_numbers():
            res.record("cpu ours", ctx.sync, "cpu", rnd, url, ids, n, expected)
            res.record("cpu dlt", ctx.dlt, "cpu", rnd, url, ids, n, expected)
    ours, dlt = res.select("cpu", OURS), res.select("cpu", DLT)
    res.section(f"CPU per id: simulator latency 0, concurrency {CONCURRENCY}, {n:,} ids (whole "
                "client process: start-up, fetch, parse, transform, load)",
                side_table([side_row(ours, OURS, f"{n:,}"), side_row(dlt, DLT, f"{n:,}")]),
                "", *_ratio_lines(ours, dlt))
    ratio = Stat.of(a.cpu_ms_per_id / b.cpu_ms_per_id for a, b in by_round(ours, dlt))
    res.targets.append(Target.of(
        "cpu", f"client CPU per id <= {TARGET_CPU_RATIO:.0%} of dlt's (round by round)",
        ratio, lambda v: v <= TARGET_CPU_RATIO,
        f"{Stat.of(r.cpu_ms_per_id for r in ours).fmt('.3f')} vs "
        f"{Stat.of(r.cpu_ms_per_id for r in dlt).fmt('.3f')} ms/id = {ratio.fmt('.0%')} of "
        "dlt's", ctx.quick_note("cpu_ids")))
    stats = {side: Stat.of(r.cpu_ms_per_id for r in runs) for side, runs in ((OURS, ours),
                                                                           (DLT, dlt)) if runs}
    if stats:
        ctx.figure(res, "cpu-per-id.png", f"CPU per id, simulator latency 0, {n:,} ids: "
                   f"{' vs '.join(stats)} (median, spread min–max)", plots.cpu_per_id,
                   {side: (st.median, st.lo, st.hi) for side, st in stats.items()},
                   f"client CPU (user+sys) per id: {n:,} ids, latency 0, concurrency "
                   f"{CONCURRENCY} (whole process)")
    return res


@SCENARIOS.add("memory", "peak RSS: ours at 10,000 and 100,000 ids, dlt at 5,000 and 20,000 "
               "only", requires=("dlt",))
def memory(ctx: Bench) -> Results:
    res = Results()
    small, large = ctx.sizes["memory_ours"]
    dlt_sizes = ctx.sizes["memory_dlt"]
    log(f"memory: latency 0, ours at {small} and {large} ids, dlt at {dlt_sizes[0]} and "
        f"{dlt_sizes[1]} ids, {ctx.rounds} round(s)")
    plan = [(OURS, small), (DLT, dlt_sizes[0]), (OURS, large), (DLT, dlt_sizes[1])]
    files = {n: ctx.ids_file("mem", n) for _, n in plan}
    with ctx.simulator(latency_ms=0) as url:
        for rnd in ctx.round_numbers():
            for side, n in plan:
                ids, expected = files[n]
                fn = ctx.sync if side == OURS else ctx.dlt
                res.record(f"memory {side} {n}", fn, "memory", rnd, url, ids, n, expected)
    rows = [side_row(res.select("memory", side, n), side, f"{n:,}")
            for side, n in sorted(plan, key=lambda p: (p[0] != OURS, p[1]))]
    lines = [side_table(rows), ""]
    growth: dict[str, Stat] = {}
    marginal: dict[str, float] = {}
    for side, (a, b) in ((OURS, (small, large)), (DLT, dlt_sizes)):
        at_a, at_b = res.select("memory", side, a), res.select("memory", side, b)
        if not at_a or not at_b:
            continue  # a size failed
        growth[side] = Stat.of(y.rss_mb / x.rss_mb - 1 for x, y in by_round(at_a, at_b))
        marginal[side] = 1000 * (median(r.cpu_s for r in at_b)
                                 - median(r.cpu_s for r in at_a)) / (b - a)
        lines.append(f"{side}: peak RSS {Stat.of(r.rss_mb for r in at_a).fmt()} MB at {a:,} "
                     f"ids, {Stat.of(r.rss_mb for r in at_b).fmt()} MB at {b:,} ids: growth "
                     f"{growth[side].fmt('+.1%')}"
                     + (" (dlt is run at these smaller sizes only: its memory grows with the "
                        "ids)" if side == DLT else ""))
    if len(marginal) == 2:
        lines.append(f"marginal CPU per id between the two sizes (start-up cost removed, "
                     f"medians): {OURS} {marginal[OURS]:.3f} ms, {DLT} {marginal[DLT]:.3f} ms "
                     f"({marginal[OURS] / marginal[DLT]:.0%})")
    res.section(f"Memory: simulator latency 0, concurrency {CONCURRENCY}; dlt at "
                f"{dlt_sizes[0]:,} and {dlt_sizes[1]:,} ids only", *lines)
    note = ("" if large == FULL["memory_ours"][1]
            else f"quick sizes: {small} and {large} ids")
    rss = Stat.of(r.rss_mb for r in res.select("memory", OURS, large))
    res.targets.append(Target.of(
        "memory", f"peak RSS <= {TARGET_RSS_MB} MB at {FULL['memory_ours'][1]:,} ids", rss,
        lambda v: v <= TARGET_RSS_MB, f"{rss.fmt()} MB at {large:,} ids", note))
    ours_growth = growth.get(OURS, Stat.of([]))
    res.targets.append(Target.of(
        "memory", f"growth < {TARGET_RSS_GROWTH:.0%} from {FULL['memory_ours'][0]:,} to "
        f"{FULL['memory_ours'][1]:,} ids", ours_growth, lambda v: v < TARGET_RSS_GROWTH,
        f"{ours_growth.fmt('+.1%')} ({small:,} -> {large:,} ids)", note))
    return res


@SCENARIOS.add("loader", "Loader.load alone (payloads already fetched, half the rows "
               "conflicting) beside a raw COPY of the same call rows as the ceiling (and one "
               "into an indexed table)")
def loader(ctx: Bench) -> Results:
    res = Results()
    n = ctx.sizes["loader_calls"]
    log(f"loader alone: {n} calls in batches of 500, half conflicting, and a raw COPY; "
        f"{ctx.rounds} round(s)")
    rounds = [out for rnd in ctx.round_numbers()
              if (out := res.attempt("loader", _loader_round, ctx, res, rnd, n))]
    loads = [r["loader"] for r in rounds]
    rate = Stat.of(ld["calls"] / ld["seconds"] for ld in loads)
    copy_rate = {k: Stat.of(r["copy"][k]["rows"] / r["copy"][k]["seconds"] for r in rounds)
                 for k in ("bare", "indexed")}
    if rounds:
        rows = [["Loader.load (5 tables, upsert)", f"{n:,}",
                 Stat.of(ld["seconds"] for ld in loads).fmt(".3f"), rate.fmt(",.0f"),
                 Stat.of(1e6 * ld["client_cpu_s"] / ld["calls"] for ld in loads).fmt(".0f"),
                 rows_cell([ld["rows"] for ld in loads], n)]]
        for key, label in (("bare", "COPY of the call rows (ceiling)"),
                           ("indexed", "COPY, calls' PK and indexes")):
            rows.append([label, f"{n:,}",
                         Stat.of(r["copy"][key]["seconds"] for r in rounds).fmt(".3f"),
                         copy_rate[key].fmt(",.0f"), "-",
                         rows_cell([r["copy"][key]["rows"] for r in rounds], n)])
        table = text_table(["what", "calls", "seconds", "rows/s", "client CPU us/call",
                            "rows landed"], rows)
        res.section(f"Loader alone: {n:,} calls already fetched, batches of 500, half of them "
                    "conflicting", table, "",
                    f"Loader.load reaches {rate.median / copy_rate['bare'].median:.1%} of the "
                    f"COPY ceiling ({rate.median / copy_rate['indexed'].median:.1%} of a COPY "
                    "into a table with the calls table's primary key and indexes; medians). "
                    "The COPY tables have the calls table's columns (raw as jsonb, sent as JSON "
                    "text) and no foreign keys; client CPU is the loader process's (Python), "
                    "not the PostgreSQL server's.")
    res.targets.append(Target.of(
        "loader", f">= {TARGET_LOADER_CALLS_S:,} calls/s", rate,
        lambda v: v >= TARGET_LOADER_CALLS_S,
        f"{rate.fmt(',.0f')} calls/s (COPY ceiling {copy_rate['bare'].fmt(',.0f')} rows/s)",
        ctx.quick_note("loader_calls", "calls")))
    return res


def _loader_round(ctx: Bench, res: Results, rnd: int, n: int) -> dict:
    with ctx.fresh_db("loader") as load_url, ctx.fresh_db("copy") as copy_url:
        child = ctx.measure([PY, str(HERE / "loader_bench.py"), "--db-url", load_url,
                             "--copy-db-url", copy_url, "--calls", str(n), "--batch-size",
                             "500"], sync_timeout(n) + 120)
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
            res.failures.append(f"loader round {rnd}: {what} landed {got} rows, not {n}")
    return out


@SCENARIOS.add("incremental", "a first sync of 100,000 ids, then the same command with "
               "--skip-loaded")
def incremental(ctx: Bench) -> Results:
    res = Results()
    n = ctx.sizes["incremental_ids"]
    # "already-loaded ids": all servable, so the re-run has nothing to fetch (404 ids are
    # never `loaded` and --skip-loaded rightly fetches them again).
    ids, expected = ctx.ids_file("inc", n, servable_only=True)
    log(f"incremental re-run: {n} ids, latency 0, then --skip-loaded; {ctx.rounds} round(s)")
    pairs = []
    with ctx.simulator(latency_ms=0) as url:
        for rnd in ctx.round_numbers():
            with ctx.fresh_db("incr") as db_url:
                first = res.record("incremental first", ctx.sync, "incremental", rnd, url, ids,
                                   n, expected, db_url=db_url, side="first run")
                if first is None:
                    continue
                again = res.record("incremental skip", ctx.sync, "incremental", rnd, url, ids,
                                   n, expected, db_url=db_url, options=["--skip-loaded"],
                                   side="--skip-loaded")
                if again is not None:
                    pairs.append((first, again))
    ratio = Stat.of(b.wall_s / a.wall_s for a, b in pairs)
    if pairs:
        table = side_table([side_row([a for a, _ in pairs], "first run", f"{n:,}"),
                            side_row([b for _, b in pairs], "--skip-loaded", f"{n:,}")],
                           first="run")
        skipped = median(b.extra.get("skipped") or 0 for _, b in pairs)
        res.section(f"Incremental re-run: {n:,} ids already loaded, latency 0, same command "
                    "with --skip-loaded", table, "",
                    f"--skip-loaded took {ratio.fmt('.1%')} of the first run's wall time "
                    f"({skipped:,.0f} ids skipped as loaded)")
    res.targets.append(Target.of(
        "incremental", f"--skip-loaded over {FULL['incremental_ids']:,} loaded ids < "
        f"{TARGET_INCREMENTAL_RATIO:.0%} of the first run's time", ratio,
        lambda v: v < TARGET_INCREMENTAL_RATIO,
        f"{ratio.fmt('.1%')} ({Stat.of(b.wall_s for _, b in pairs).fmt('.2f')} s vs "
        f"{Stat.of(a.wall_s for a, _ in pairs).fmt('.2f')} s)",
        ctx.quick_note("incremental_ids")))
    return res


SCENARIOS.add("unlimited", rate_limited.HELP_UNLIMITED)(rate_limited.unlimited)
SCENARIOS.add("rate-limited", rate_limited.HELP_RATE_LIMITED,
              requires=("dlt", "matplotlib"))(rate_limited.rate_limited)
SCENARIOS.add("scale-out", scale_out.HELP, requires=("matplotlib",))(scale_out.scale_out)
SCENARIOS.add("rerun-writes", rerun_writes.HELP)(rerun_writes.rerun_writes)


# -- the report --------------------------------------------------------------------------------


def report(bench: Bench, results: Results, names: list[str], info: dict[str, str],
           command: str, started: datetime, elapsed_s: float, loads: tuple[float, float]
           ) -> str:
    mode = ("--quick (small sizes: a smoke run, not the targets' sizes)" if bench.quick
            else "full")
    out = report_header("Benchmark results", "run.py", started=started, took_s=elapsed_s,
                        command=command, facts=info, lines=[
                            f"mode: {mode}, {bench.rounds} round(s), scenarios: "
                            f"{', '.join(names)}",
                            f"load average (1 min) before / after: {loads[0]:.2f} / "
                            f"{loads[1]:.2f}"])
    out += ["", "## Targets", "",
            f"Figures are the {SPREAD_NOTE}; a target is met only when every round meets it.",
            ""]
    out += markdown_table(
        ["scenario", "target", "measured", "met"],
        [[t.scenario, t.text, t.measured + (f" ({t.note})" if t.note else ""), t.verdict()]
         for t in results.targets])
    if results.failures:
        out += ["", "## Failed runs", ""] + [f"- {f}" for f in results.failures]
    for s in results.sections:
        out += ["", f"## {s.title}", "", "```text", s.text, "```"]
    if results.figures:
        out += ["", "## Pictures"]
    for caption, path in results.figures:
        out += ["", f"![{caption}]({os.path.relpath(path, Path(bench.args.results).parent)})"]
    out += ["", "## All runs", ""]
    out += markdown_table(
        ["scenario", "round", "side", "ids", "wall s", "CPU s", "peak RSS MB", "rows",
         "in-process s"],
        [[r.scenario, r.round, r.side, r.size, f"{r.wall_s:.2f}", f"{r.cpu_s:.2f}",
          f"{r.rss_mb:.1f}", r.rows, _or_dash(r.extra.get("pipeline_s"))]
         for r in results.runs])
    out += ["", "## Method", "", METHOD.strip(), ""]
    return "\n".join(out)


METHOD = """
Run everything with `uv run --group bench python benchmarks/run.py` (about 65 minutes on 2
cores, of which rate-limited and scale-out take about 20 each; add `--quick` for a smoke run
of about 5 minutes, `--only latency,steady,cpu,...` for some scenarios (`--help` lists them),
`--rounds N`, `--results PATH` to write this file elsewhere, its pictures going to `img/`
beside it). dlt and matplotlib are in the `bench`
dependency group only, never in the package's own dependencies. The script is a list of
scenarios over the harness (`benchmarks/harness.py` and the `bench_*.py` modules beside it),
which holds the databases, the processes, the measuring and the tables; the longer scenarios
are in `rate_limited.py`, `scale_out.py` and `rerun_writes.py` beside it, the pictures in
`plots.py` (matplotlib's Agg backend).

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
  `python -c pass` reports. ids/s = ids in the file / wall time. Children get this process's
  environment less every `ETL_*`, `COMMUBO_*` and `DLT_*` variable. Before the first run the
  environment's and etl's bytecode is compiled (`compileall`) and the sync paths imported
  once, unmeasured: an installed tool has its `.pyc` files, and without them every child,
  ours and dlt's, would compile what it imports on each start (`uv run` does not compile,
  and PYTHONDONTWRITEBYTECODE, set on CI machines, keeps runs from writing them). The
  simulator (`python -m etl simulate`) is a separate process, one per scenario shared by
  every side, so its CPU is not counted; the machine's 2 cores are shared by the client,
  the simulator and PostgreSQL, as in the issue.
- **Databases.** Every run gets a fresh database (`CREATE DATABASE bench_run_...`, dropped
  afterwards) on the same local PostgreSQL. Rows landed are counted in `calls` (dlt:
  `commubo.calls`) and must equal the ids the simulator serves (about 3% of ids are 404).
- **Rounds.** Sides run in turn (A B A B) in the same run for every round; tables show the
  median of the rounds and, in parentheses, their spread (min–max); the "All runs" table
  every run. A target is met only when every round meets it: ratios (CPU against dlt's,
  memory growth, incremental) are taken round by round, and the whole spread must meet it.
- **Loader alone.** `benchmarks/loader_bench.py`, in a worker process so the payloads it holds
  do not inflate the driver: N outcomes built from `payload_for`, every other one loaded
  before the clock starts, then `Loader(engine, run_id).load` over all N in batches of 500
  (all five data tables plus the status rows; half the calls conflict), against a raw
  psycopg `COPY` of the same call rows (calls' columns, `raw` as JSON text) into a fresh
  table with those columns only: the ceiling. A second COPY into a table that also has the
  calls table's primary key and indexes (never foreign keys) shows what the indexes cost.
- **Incremental.** A first sync of the ids into a fresh database, then the same command with
  `--skip-loaded`; the ratio of the two wall times.
- **Latency-bound and steady state.** 4,000 ids at 50 ms and concurrency 32 (bound 640 ids/s)
  include the process's start-up, migration and exit, about a second: the target is 90% of the
  bound; 20,000 ids (`steady`, ours only) make start-up a small part: the target is 95%.
- **Rate limit.** `etl simulate --rate-limit 300`: a token bucket of 30 tokens shared by all
  connections, 429 with `Retry-After` past it. Every run gets a simulator of its own (its
  bucket full, its counters at zero); after the run its `GET /_stats` (counted nowhere) gives
  the requests, the 429s and a series per second since the first request, drawn in the
  picture. "429 % after 5 s" leaves out the first seconds, while a limiter finds the rate.
  A peer falling short (dlt giving up on an id after its retries of 429s, ours with adaptive
  concurrency off failing ids) is shown as a finding, not as a failed run.
- **Scale-out.** N shard processes (`--shard-index I --num-shards N`, concurrency 32 each)
  started at once into one fresh database; ids/s is the ids over the time from the first
  start to the last exit; client CPU is the processes' user+sys summed (wait4). Meanwhile the
  machine's busy CPU (`/proc/stat`), the simulator's and the PostgreSQL server's (postmaster
  and its children, from `/proc`) are measured, and the load average read after the run:
  where the curve bends, they tell whether the 2 cores, the simulator (one Python process) or
  start-up is why. Under the rate limit the shards share one simulator's limit, with
  `--max-rps 300` (each of N gets 300/N) and without (adaptive limiters alone).
- **Rerun writes.** A fresh database upgraded first (not measured), `etl sync` over 20,000
  ids the simulator all serves, and the same command again; WAL from `pg_current_wal_lsn()`
  before and after, and, with pg_walinspect, by relation of this database (other databases
  cannot inflate it; a temporary replication slot keeps the WAL until it is read); row counts
  from `pg_stat_user_tables` once the run's sessions have ended. Once right after the first
  load, once with a `CHECKPOINT` before each run (full-page images, as hours later).
- **Noise.** Another busy process on the machine skews every figure: the load average before
  and after is recorded above; run on an otherwise idle machine.
"""


def _or_dash(value: object) -> object:
    return "-" if value is None else value


def _epilog() -> str:
    """The docstring after its first line, with the scenarios of the registry."""
    usage, rest = __doc__.split("\n\n", 2)[1:]
    return f"{usage}\n\nscenarios (--only):\n{SCENARIOS.help()}\n\n{rest}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=_epilog())
    p.add_argument("--rounds", type=int, help="rounds per scenario (default 3, --quick 1)")
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    p.add_argument("--only", help=f"comma-separated scenarios: {','.join(SCENARIOS.names())}")
    p.add_argument("--pg-url", default=os.environ.get(
        "BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/test"),
        help="a database on the PostgreSQL server to use; bench_run_* databases are created "
        "and dropped beside it (env BENCH_PG_URL)")
    p.add_argument("--results", default=str(HERE / "RESULTS.md"),
                   help="where to write the Markdown report (default benchmarks/RESULTS.md); "
                   "the pictures go to img/ beside it")
    p.add_argument("--dlt-workers", metavar="N,N,..",
                   help=f"rate-limited: dlt's worker counts to try (default {DLT_WORKERS}, "
                   f"--quick {QUICK_DLT_WORKERS}; '' for no dlt)")
    p.add_argument("--etl-root", action="append", metavar="PATH",
                   help="rerun-writes: also measure etl from this copy of the repository "
                   "(repeatable)")
    args = p.parse_args(argv)
    try:
        [int(w) for w in (args.dlt_workers or "").split(",") if w.strip()]
    except ValueError:
        p.error(f"--dlt-workers takes numbers separated by commas, not {args.dlt_workers!r}")
    try:
        chosen = SCENARIOS.select(args.only)
    except ValueError as exc:
        p.error(str(exc))
    if args.rounds is not None and args.rounds < 1:
        p.error("--rounds must be at least 1")
    needed = sorted({m for s in chosen for m in s.requires})
    missing = [m for m in needed if importlib.util.find_spec(m) is None]
    if missing:
        p.error(f"{', '.join(missing)} not installed: run with `uv run --group bench python "
                "benchmarks/run.py`")

    command = command_line("--group bench")
    started = datetime.now(UTC)
    load_before = load_average(warn=True)
    bench = Bench(args)
    t0 = time.perf_counter()
    try:
        info = machine_facts(bench.pg_url, versions=("dlt",))
        drop_stale_databases(bench.pg_url)
        info["peak RSS floor"] = (f"{bench.spawn_floor():.1f} MB (ru_maxrss of a measured "
                                  "`python -c pass`)")
        log("machine: " + "; ".join(f"{k} {v}" for k, v in info.items()))
        bench.warm_up(DLT_IMPORTS if "dlt" in needed else ())
        results = run_scenarios(chosen, bench)
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
          f"{'quick' if args.quick else 'full'}, {bench.rounds} round(s), {SPREAD_NOTE}\n")
    for s in results.sections:
        print(f"== {s.title}\n{s.text}\n")
    print("== Targets (met only when every round meets it)")
    print(text_table(["scenario", "target", "measured", "met"],
                     [[t.scenario, t.text, t.measured + (f" ({t.note})" if t.note else ""),
                       t.verdict(markdown=False)] for t in results.targets], align="llll"))
    if results.failures:
        print("\n== Failed runs")
        for f in results.failures:
            print(f"- {f}")
    if results.figures:
        print("\n== Pictures")
        for caption, path in results.figures:
            print(f"- {os.path.relpath(path)}: {caption}")
    loads = (load_before, load_average())
    Path(args.results).write_text(report(bench, results, [s.name for s in chosen], info,
                                         command, started, elapsed, loads))
    print(f"\nwritten to {os.path.relpath(args.results)} in {elapsed / 60:.1f} min")
    return 1 if results.failures else 0


if __name__ == "__main__":
    sys.exit(main())
