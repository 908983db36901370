"""Scenarios of benchmarks/run.py under an API that limits its rate (issue #12, adaptive
concurrency): `rate-limited` and `unlimited`. Run them with run.py, or with this file, which
is run.py with `--only rate-limited,unlimited` (its other options pass through):

    uv run --group bench python benchmarks/run.py --only rate-limited --dlt-workers 32,16
    uv run --group bench python benchmarks/rate_limited.py --quick

rate-limited: the simulator allows 300 requests/s (`etl simulate --rate-limit 300`: a token
bucket of 30 tokens, 429 with Retry-After past it) at latency 50 ms; 20,000 ids. Sides: ours
(`etl sync --concurrency 64`, adaptive concurrency on, the default), ours with
`api.adaptive_concurrency = false` (fixed at 64: what a sync did before), and dlt
(benchmarks/dlt_pipeline.py) at each worker count of --dlt-workers (its extract workers and
parallel items; the best is compared with ours). Every run gets a simulator of its own (its
bucket full, its counters at zero); after the run its `GET /_stats` gives the requests it
received, the 429s its limit answered and a series per second since the first request, drawn
as a picture (ids/s and 429s per second over time). Targets: ours at least 90% of the limit in
ids/s, at most 2% of requests answered 429 after the first 5 seconds. A peer falling short
(dlt giving up on an id after its retries of 429s, ours with adaptive concurrency off failing
ids) is a finding shown in the table, not a failed run.

unlimited: no rate limit, latency 50 ms, concurrency 32, run.py's latency-bound size: ours with
adaptive concurrency on and off, in turn (A B, B A, ...): the limiter must cost nothing when no
429 comes (target: on / off at least 95% round by round).

`limited_run` (one run against a fresh rate-limited simulator, its 429s attached) is shared
with the scale-out scenario (scale_out.py).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import plots
from bench_base import BenchError, log
from bench_proc import simulator_stats
from bench_render import Stat, Target, by_round, median, rows_cell, side_row, side_table, text_table
from bench_scenarios import Results, Run
from harness import CONCURRENCY, DLT, OURS

if TYPE_CHECKING:
    from run import Bench

RATE_LIMIT = 300
LATENCY_MS = 50
LIMITED_CONCURRENCY = 64
SETTLE_S = 5  # 429s are counted "after the first SETTLE_S seconds" too
FIXED = "commubo-etl fixed"

TARGET_SHARE = 0.90
TARGET_429_AFTER = 0.02
TARGET_UNLIMITED_RATIO = 0.95

HELP_RATE_LIMITED = (
    f"a simulator allowing {RATE_LIMIT} requests/s at latency {LATENCY_MS} ms, 20,000 ids: ours "
    f"(concurrency {LIMITED_CONCURRENCY}, adaptive), ours fixed, dlt at each --dlt-workers; "
    "ids/s, 429s, a picture of both per second")
HELP_UNLIMITED = (f"no rate limit, latency {LATENCY_MS} ms, concurrency {CONCURRENCY}, 4,000 "
                  "ids: ours with adaptive concurrency on and off (it must cost nothing)")


def limited_timeout(n: int, rate_limit: float = RATE_LIMIT) -> float:
    """Generous: four times what the limit allows, plus two minutes."""
    return 120 + 4 * n / rate_limit


def fixed_config(ctx: Bench) -> Path:
    """A config file turning adaptive concurrency off (`--config` of the fixed side)."""
    path = ctx.work / "adaptive-off.toml"
    path.write_text("[api]\nadaptive_concurrency = false\n")
    return path


def limited_run(ctx: Bench, res: Results, what: str, measure: Callable[[str], Run], *,
                findings: dict[str, list[str]] | None = None, key: str = "",
                rate_limit: float = RATE_LIMIT, latency_ms: float = LATENCY_MS) -> Run | None:
    """`measure(url)` against a simulator of its own allowing `rate_limit` requests/s; the
    simulator's counts go to the Run's extra: requests, rate_limited, the same after the
    first SETTLE_S seconds (`*_after`), and per_second. A run that fails (or lands other rows
    than expected) is a failure, or, given `findings` (a peer's shortfall is a finding), a
    reason appended to `findings[key]`."""
    strict = findings is None
    try:
        with ctx.simulator("--rate-limit", f"{rate_limit:g}", latency_ms=latency_ms) as url:
            run = measure(url)
            served = simulator_stats(url)
    except BenchError as exc:
        if findings is None:
            res.fail(f"{what}: {exc}")
        else:
            findings.setdefault(key, []).append(_reason(str(exc)))
            log(f"  {what} fell short: {exc}")
        return None
    series = served["per_second"]
    after = [r for r in series if r["s"] >= SETTLE_S]
    run.extra.update(requests=served["requests"], rate_limited=served["rate_limited"],
                     requests_after=sum(r["requests"] for r in after),
                     rate_limited_after=sum(r["rate_limited"] for r in after),
                     per_second=series, rate_limit=rate_limit)
    res.add(run, strict=strict)
    log(f"    {run.ids_per_s / rate_limit:.1%} of the limit; 429 {share_429(run):.2%} overall, "
        f"{share_429(run, after=True):.2%} after {SETTLE_S} s")
    if findings is not None and not run.rows_ok:
        failed = (run.extra.get("summary") or {}).get("failed")
        findings.setdefault(key, []).append(f"{run.rows:,}/{run.expected:,} rows landed"
                                            + (f", {failed} ids failed" if failed else ""))
    return run


def share_429(run: Run, after: bool = False) -> float:
    """The share of the requests a run sent that the rate limit answered with 429 (`after`:
    after the first SETTLE_S seconds)."""
    suffix = "_after" if after else ""
    sent = run.extra.get("requests" + suffix) or 0
    return run.extra.get("rate_limited" + suffix, 0) / sent if sent else 0.0


def _reason(text: str) -> str:
    """The gist of a failed run's error, for the table."""
    if "429" in text:
        return "an id got 429 on every attempt"
    return text.rsplit("|", 1)[-1].strip()[:80]


def median_run(runs: list[Run]) -> Run:
    """The run of the median ids/s (the lower middle one of an even count)."""
    return sorted(runs, key=lambda r: r.ids_per_s)[(len(runs) - 1) // 2]


def limited_row(label: str, setting: str, runs: list[Run], limit: float, expected: int
                ) -> list[str]:
    """A row of the rate-limited tables: wall, ids/s, % of the limit, requests, 429s, CPU,
    rows, each the median (spread) over rounds."""
    if not runs:
        return [label, setting, *["-"] * 7, "failed"]
    return [label, setting, Stat.of(r.wall_s for r in runs).fmt(".2f"),
            Stat.of(r.ids_per_s for r in runs).fmt(".1f"),
            Stat.of(r.ids_per_s / limit for r in runs).fmt(".1%"),
            Stat.of(r.extra["requests"] for r in runs).fmt(",.0f"),
            Stat.of(share_429(r) for r in runs).fmt(".2%"),
            Stat.of(share_429(r, after=True) for r in runs).fmt(".2%"),
            Stat.of(r.cpu_ms_per_id for r in runs).fmt(".3f"),
            rows_cell([r.rows for r in runs], expected)]


LIMITED_HEADERS = ["side", "setting", "wall s", "ids/s", "% of limit", "requests", "429 %",
                   f"429 % after {SETTLE_S} s", "CPU ms/id", "rows landed"]


def rate_limited(ctx: Bench) -> Results:
    res = Results()
    n = ctx.sizes["rate_ids"]
    ids, expected = ctx.ids_file("rl", n)
    config = fixed_config(ctx)
    timeout = limited_timeout(n)
    conc = LIMITED_CONCURRENCY
    log(f"rate-limited: limit {RATE_LIMIT}/s, latency {LATENCY_MS} ms, {n} ids; ours and ours "
        f"fixed at concurrency {conc}, dlt at {ctx.dlt_workers} workers; {ctx.rounds} round(s)")
    # (Run.side, table label, setting, measure(url, round), a peer whose shortfall is a finding)
    sides: list[tuple[str, str, str, Callable[[str, int], Run], bool]] = [
        (OURS, OURS, f"concurrency {conc}, adaptive",
         lambda url, rnd: ctx.sync("rate-limited", rnd, url, ids, n, expected, side=OURS,
                                   concurrency=conc, timeout_s=timeout), False),
        (FIXED, FIXED, f"concurrency {conc}, fixed",
         lambda url, rnd: ctx.sync("rate-limited", rnd, url, ids, n, expected, side=FIXED,
                                   concurrency=conc, timeout_s=timeout, ok_codes=(0, 1),
                                   options=["--config", str(config)]), True)]
    for w in ctx.dlt_workers:
        sides.append((f"{DLT} ({w} workers)", DLT, f"{w} workers",
                      lambda url, rnd, w=w: ctx.dlt("rate-limited", rnd, url, ids, n, expected,
                                                    side=f"{DLT} ({w} workers)", concurrency=w,
                                                    timeout_s=timeout), True))
    findings: dict[str, list[str]] = {}
    for rnd in ctx.round_numbers():
        for side, _, setting, fn, peer in sides:
            limited_run(ctx, res, f"rate-limited round {rnd} {side} ({setting})",
                        lambda url, fn=fn, rnd=rnd: fn(url, rnd),
                        findings=findings if peer else None, key=side)
    runs = {side: res.select("rate-limited", side) for side, *_ in sides}
    lines = [text_table(LIMITED_HEADERS, [
        limited_row(label, setting, runs[side], RATE_LIMIT, expected)
        for side, label, setting, *_ in sides]), ""]
    for side, whys in findings.items():
        lines.append(f"{side}: fell short in {len(whys)} of {ctx.rounds} round(s): "
                     + "; ".join(sorted(set(whys))))
    dlts = [side for side, *_ in sides if side.startswith(DLT) and runs[side]]
    best = max(dlts, key=lambda s: median(r.ids_per_s for r in runs[s]), default=None)
    ours = runs[OURS]
    if best and ours:
        speed = median(r.ids_per_s for r in ours) / median(r.ids_per_s for r in runs[best])
        lines.append(f"dlt's best setting: {best}; {OURS} / it: throughput x{speed:.2f}, 429s "
                     f"{median(share_429(r) for r in ours):.2%} vs "
                     f"{median(share_429(r) for r in runs[best]):.2%} of the requests")
    res.section(f"Rate-limited: a limit of {RATE_LIMIT} requests/s (bucket {RATE_LIMIT // 10}), "
                f"latency {LATENCY_MS} ms, {n:,} ids", *lines)
    share = Stat.of(r.ids_per_s / RATE_LIMIT for r in ours)
    note = ctx.quick_note("rate_ids")
    res.targets.append(Target.of(
        "rate-limited", f"ours >= {TARGET_SHARE:.0%} of the limit ({RATE_LIMIT}/s) in ids/s",
        share, lambda v: v >= TARGET_SHARE,
        f"{Stat.of(r.ids_per_s for r in ours).fmt('.1f')} ids/s = {share.fmt('.1%')}", note))
    after = Stat.of(share_429(r, after=True) for r in ours)
    res.targets.append(Target.of(
        "rate-limited", f"ours: <= {TARGET_429_AFTER:.0%} of requests answered 429 after the "
        f"first {SETTLE_S} s", after, lambda v: v <= TARGET_429_AFTER, after.fmt(".2%"), note))
    drawn = {label: median_run(runs[side]).extra["per_second"]
             for side, label in ((OURS, f"{OURS} (adaptive)"), (FIXED, FIXED), (best, best))
             if side and runs.get(side)}
    if drawn:
        ctx.figure(res, "rate-limited-series.png", f"Rate-limited ({RATE_LIMIT} requests/s, "
                   f"{n:,} ids): ids answered and 429s per second, the median round of each "
                   "side", plots.rate_series, drawn, RATE_LIMIT,
                   f"{RATE_LIMIT} requests/s allowed, latency {LATENCY_MS} ms, {n:,} ids "
                   "(median round of each side)")
    return res


def unlimited(ctx: Bench) -> Results:
    res = Results()
    n = ctx.sizes["latency_ids"]
    bound = CONCURRENCY * 1000 / LATENCY_MS
    ids, expected = ctx.ids_file("lat", n)
    config = fixed_config(ctx)
    log(f"unlimited: latency {LATENCY_MS} ms, concurrency {CONCURRENCY}, {n} ids, adaptive "
        f"concurrency on and off, {ctx.rounds} round(s)")
    with ctx.simulator(latency_ms=LATENCY_MS) as url:
        for rnd in ctx.round_numbers():
            order = (OURS, FIXED) if rnd % 2 else (FIXED, OURS)  # A B, B A: no order bias
            for side in order:
                options = ["--config", str(config)] if side == FIXED else []
                res.record(f"unlimited {side}", ctx.sync, "unlimited", rnd, url, ids, n,
                           expected, side=side, options=options)
    on, off = res.select("unlimited", OURS), res.select("unlimited", FIXED)
    ratio = Stat.of(a.ids_per_s / b.ids_per_s for a, b in by_round(on, off))
    res.section(f"Unlimited: no rate limit, latency {LATENCY_MS} ms, concurrency {CONCURRENCY}, "
                f"{n:,} ids (bound {bound:.0f} ids/s): adaptive concurrency on and off",
                side_table([side_row(on, "adaptive on (default)", f"{n:,}", bound),
                            side_row(off, "adaptive off", f"{n:,}", bound)], bound,
                           first=OURS), "",
                f"ids/s adaptive on / off, round by round: {ratio.fmt('.3f')}")
    res.targets.append(Target.of(
        "unlimited", f"adaptive concurrency on >= {TARGET_UNLIMITED_RATIO:.0%} of off's ids/s "
        "without 429s (round by round)", ratio, lambda v: v >= TARGET_UNLIMITED_RATIO,
        f"x{ratio.fmt('.3f')}", ctx.quick_note("latency_ids")))
    return res


def main(argv: list[str] | None = None) -> int:
    """run.py with `--only rate-limited,unlimited` first (a later --only wins)."""
    import run

    return run.main(["--only", "rate-limited,unlimited",
                     *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
