"""What a benchmark script is made of: `Run` (one measured child), `Results` (what a scenario
hands back: sections, targets, runs, failures, figures, records), `Scenario`, `Registry` (the
list a script runs, `--only` parsing) and `run_scenarios`."""

from __future__ import annotations

import textwrap
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench_base import BenchError, log
from bench_render import Target


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
