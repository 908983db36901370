"""The pictures of benchmarks/run.py, drawn with matplotlib's Agg backend (no display) from
what the scenarios measured: PNG files of about 800x450 pixels, saved beside the report by
`Context.figure` (benchmarks/img/ for benchmarks/RESULTS.md) and linked in it.

Each function takes the path to write and plain data (no Run objects), so a picture can be
drawn again from saved figures:

- `rate_series`: ids/s and 429s per second over time under a rate limit, one line per side.
- `scale_out`: aggregate ids/s against the number of processes, with the ideal linear line.
- `cpu_per_id`: CPU per id of the sides, side by side, median and spread.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

SIZE = (8, 4.5)  # inches at DPI: 800x450 pixels
DPI = 100
COLORS = {"commubo-etl": "#1f77b4", "dlt 1.31": "#d62728", "commubo-etl fixed": "#ff7f0e"}
OTHER_COLORS = ("#2ca02c", "#9467bd", "#8c564b", "#7f7f7f")


def _pyplot():
    """matplotlib.pyplot on the Agg backend, imported on first use (a bench dependency)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _color(label: str, i: int) -> str:
    """A side's colour whatever its label adds ("commubo-etl (adaptive)", "dlt 1.31 (32
    workers)"): the longest name of COLORS it starts with; else one of OTHER_COLORS."""
    names = [name for name in COLORS if label.startswith(name)]
    if names:
        return COLORS[max(names, key=len)]
    if label.startswith("dlt"):
        return COLORS["dlt 1.31"]
    return OTHER_COLORS[i % len(OTHER_COLORS)]


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    _pyplot().close(fig)


def rate_series(path: Path, series: Mapping[str, Sequence[Mapping[str, int]]], limit: float,
                title: str) -> None:
    """Two panels sharing the time axis: ids answered per second (200 or 404) and requests
    answered 429 per second, a line per side (`series`: label -> the simulator's per-second
    rows `{"s", "ok", "not_found", "rate_limited", ...}`), the limit as a dashed line."""
    plt = _pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=SIZE,
                                      gridspec_kw={"height_ratios": [3, 2]})
    for i, (label, rows) in enumerate(series.items()):
        seconds = [r["s"] for r in rows]
        color = _color(label, i)
        top.plot(seconds, [r["ok"] + r["not_found"] for r in rows], label=label, color=color,
                 linewidth=1.2)
        bottom.plot(seconds, [r["rate_limited"] for r in rows], label=label, color=color,
                    linewidth=1.2)
    top.axhline(limit, color="black", linestyle="--", linewidth=0.8,
                label=f"limit {limit:g} requests/s")
    top.set_ylabel("ids answered / s")
    top.set_ylim(bottom=0)
    top.set_title(title, fontsize=10)
    top.legend(fontsize=8, loc="lower left")
    top.grid(alpha=0.3)
    bottom.set_ylabel("429s / s")
    bottom.set_xlabel("seconds since the first request")
    bottom.set_ylim(bottom=0)
    bottom.grid(alpha=0.3)
    _save(fig, path)


def scale_out(path: Path, panels: Sequence[tuple[str, Mapping[str, Mapping[int, tuple[
        float, float, float]]], float | None]]) -> None:
    """One panel per (title, lines, ceiling): `lines` maps a label to {processes: (median,
    min, max) aggregate ids/s}; each panel also draws the ideal linear line from the first
    line's one-process median, and `ceiling` (a rate limit) as a dashed line when given."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=SIZE, squeeze=False)
    for ax, (title, lines, ceiling) in zip(axes[0], panels, strict=True):
        top = 0.0
        for i, (label, points) in enumerate(lines.items()):
            ns = sorted(points)
            med = [points[n][0] for n in ns]
            err = [[points[n][0] - points[n][1] for n in ns],
                   [points[n][2] - points[n][0] for n in ns]]
            ax.errorbar(ns, med, yerr=err, marker="o", capsize=3, label=label,
                        color=OTHER_COLORS[i % len(OTHER_COLORS)] if i else "#1f77b4")
            top = max(top, *(points[n][2] for n in ns))
        first = next(iter(lines.values()), {})
        if 1 in first:
            ns = sorted({n for points in lines.values() for n in points})
            ideal = [first[1][0] * n for n in ns]
            ax.plot(ns, ideal, color="gray", linestyle=":", label="linear (ideal)")
            top = max(top, *ideal)
            ax.set_xticks(ns)
        if ceiling:
            ax.axhline(ceiling, color="black", linestyle="--", linewidth=0.8,
                       label=f"limit {ceiling:g}/s")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("etl sync processes (shards)")
        ax.set_ylabel("aggregate ids/s")
        ax.set_ylim(0, top * 1.1 if top else None)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    _save(fig, path)


def cpu_per_id(path: Path, sides: Mapping[str, tuple[float, float, float]], title: str
               ) -> None:
    """A bar per side (`sides`: label -> (median, min, max) CPU ms per id), its spread as an
    error bar and its median written above it."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=SIZE)
    labels = list(sides)
    med = [sides[k][0] for k in labels]
    err = [[sides[k][0] - sides[k][1] for k in labels], [sides[k][2] - sides[k][0] for k in labels]]
    bars = ax.bar(labels, med, yerr=err, capsize=4, width=0.5,
                  color=[_color(k, i) for i, k in enumerate(labels)])
    for bar, value in zip(bars, med, strict=True):
        ax.annotate(f"{value:.3f} ms", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    xytext=(0, 4), textcoords="offset points", ha="center", fontsize=9)
    ax.set_ylabel("client CPU (user+sys) per id, ms")
    ax.set_title(title, fontsize=10)
    ax.set_ylim(0, max(v[2] for v in sides.values()) * 1.2 if sides else None)
    ax.grid(axis="y", alpha=0.3)
    _save(fig, path)
