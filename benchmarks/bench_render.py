"""Figures and tables of the benchmark reports: `Stat` (median and spread min–max over rounds),
`Target` (met only when the whole spread meets it), `median`, `by_round`, `text_table`,
`markdown_table`, `rows_cell`, `side_row` and `side_table` (the table of measured sides), and
`report_header` (the top of a Markdown report)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bench_scenarios import Run


@dataclass(frozen=True)
class Stat:
    """One figure over rounds: its median and its spread (min–max). NaN and None are left
    out (a failed round)."""

    values: tuple[float, ...]

    @classmethod
    def of(cls, values: Iterable[float | None]) -> Stat:
        return cls(tuple(float(v) for v in values
                         if v is not None and not math.isnan(float(v))))

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def median(self) -> float:
        return statistics.median(self.values) if self.values else float("nan")

    @property
    def lo(self) -> float:
        return min(self.values, default=float("nan"))

    @property
    def hi(self) -> float:
        return max(self.values, default=float("nan"))

    def fmt(self, spec: str = ".1f") -> str:
        """`median (min–max)`, the spread shown when there is more than one round; "-" when
        nothing was measured."""
        if not self.values:
            return "-"
        shown = format(self.median, spec)
        if self.n > 1:
            shown += f" ({format(self.lo, spec)}–{format(self.hi, spec)})"
        return shown

    def all(self, ok: Callable[[float], bool]) -> bool | None:
        """Whether every round meets `ok` (the whole spread); None when nothing was
        measured."""
        return all(ok(v) for v in self.values) if self.values else None


def median(values: Iterable[float | None]) -> float:
    return Stat.of(values).median


def by_round(a: Iterable[Run], b: Iterable[Run]) -> list[tuple[Run, Run]]:
    """The runs of two sides paired by round (rounds where both were measured)."""
    second = {r.round: r for r in b}
    return [(r, second[r.round]) for r in a if r.round in second]


@dataclass
class Target:
    """A target and whether it was met: only when every round meets it (the whole min–max
    spread), never on the median alone. `median_met` tells, when it was not met, whether the
    median alone would have."""

    scenario: str
    text: str
    measured: str
    met: bool | None  # None: not measured in this run
    note: str = ""
    median_met: bool | None = None

    @classmethod
    def of(cls, scenario: str, text: str, stat: Stat, ok: Callable[[float], bool],
           measured: str, note: str = "") -> Target:
        """A target judged on `stat`: met when every round meets `ok`."""
        median_met = ok(stat.median) if stat.values else None
        return cls(scenario, text, measured if stat.values else "-", stat.all(ok), note,
                   median_met)

    def verdict(self, markdown: bool = True) -> str:
        if self.met is None:
            return "not measured" if markdown else "-"
        if self.met:
            return "yes"
        no = "**no**" if markdown else "NO"
        return f"{no} (the median meets it, not every round)" if self.median_met else no


def text_table(headers: list[str], rows: list[list[str]], align: str = "") -> str:
    """A plain-text table for a terminal or a ```text block; `align` has one letter per
    column, `l` or `r` (default: the first column left-aligned, the others right-aligned)."""
    align = align or "l" + "r" * (len(headers) - 1)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if a == "l" else c.rjust(w)
                         for c, w, a in zip(cells, widths, align, strict=True)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])


def markdown_table(headers: list[str], rows: Iterable[Sequence[object]], align: str = ""
                   ) -> list[str]:
    """A Markdown table as lines; `align` has one letter per column, `l` or `r` (default
    all `l`)."""
    align = align or "l" * len(headers)
    rule = "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"

    def line(cells: Sequence[object]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return [line(headers), rule, *(line(r) for r in rows)]


def rows_cell(rows: list[int | None], expected: int | None, fetched: bool = False) -> str:
    """Rows landed against rows expected, the worst round shown; `!!` when they differ."""
    if not rows or any(r is None for r in rows):
        return "?"
    worst = min(rows, key=lambda r: (r == expected, r))
    word = "fetched, no DB" if fetched else "ok"
    return f"{worst:,}/{expected:,} {word}" if worst == expected else f"{worst:,}/{expected:,} !!"


SPREAD_NOTE = "median (min–max) over the rounds"


def side_row(runs: list[Run], label: str, size: str, bound: float | None = None) -> list[str]:
    """One row of `side_table`: wall s, ids/s, [% of bound,] CPU ms/id, peak RSS, each the
    median and the spread over rounds, and the rows landed."""
    if not runs:
        return [label, size, *["-"] * (5 if bound else 4), "failed"]
    ids_s = Stat.of(r.ids_per_s for r in runs)
    row = [label, size, Stat.of(r.wall_s for r in runs).fmt(".2f"), ids_s.fmt(".1f")]
    if bound:
        row.append(Stat.of(v / bound for v in ids_s.values).fmt(".1%"))
    row += [Stat.of(r.cpu_ms_per_id for r in runs).fmt(".3f"),
            Stat.of(r.rss_mb for r in runs).fmt(".1f"),
            rows_cell([r.rows for r in runs], runs[0].expected,
                      fetched=runs[0].extra.get("fetched_only", False))]
    return row


def side_table(rows: list[list[str]], bound: float | None = None, first: str = "side") -> str:
    """The table of measured sides, from `side_row`s."""
    headers = [first, "ids", "wall s", "ids/s"] + (["% of bound"] if bound else [])
    headers += ["CPU ms/id", "peak RSS MB", "rows landed"]
    return text_table(headers, rows)


def report_header(title: str, script: str, *, started: datetime, took_s: float,
                  command: str, lines: Iterable[str], facts: dict[str, str]) -> list[str]:
    """The top of a Markdown report: who wrote it, when, the command, the script's own
    bullet `lines`, and the machine's facts."""
    return [f"# {title}", "",
            f"Written by `benchmarks/{script}`; do not edit by hand, run it again (see "
            "[the method](#method)).", "",
            f"- date: {started:%Y-%m-%d %H:%M} UTC, took {took_s / 60:.1f} min",
            f"- command: `{command}`",
            *(f"- {line}" for line in lines),
            *(f"- {k}: {v}" for k, v in facts.items())]
