"""Progress display for `etl sync`: a bar on a terminal, periodic log lines otherwise (cron,
Airflow and CI capture stderr, where a redrawn bar is noise)."""

from __future__ import annotations

import logging
import sys
import time

from .sync import SyncSummary

log = logging.getLogger("etl.progress")


class BarProgress:
    def __init__(self) -> None:
        self._bar = None
        self._shown = -1

    def start(self, total: int) -> None:
        from tqdm import tqdm

        self._bar = tqdm(total=total, unit="call", file=sys.stderr, dynamic_ncols=True,
                         leave=False)

    def advance(self, n: int, summary: SyncSummary) -> None:
        if self._bar is not None:
            self._bar.update(n)  # cheap: tqdm redraws at most every 0.1 s
            if summary.processed != self._shown:  # the counts move once per committed batch
                self._shown = summary.processed
                self._bar.set_postfix(loaded=summary.loaded, not_found=summary.not_found,
                                      failed=summary.failed, refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class LogProgress:
    """One INFO line every `interval_s` seconds."""

    def __init__(self, interval_s: float = 10.0) -> None:
        self.interval_s = interval_s
        self._total = 0
        self._done = 0
        self._last = 0.0

    def start(self, total: int) -> None:
        self._total = total
        self._last = time.monotonic()

    def advance(self, n: int, summary: SyncSummary) -> None:
        self._done += n
        now = time.monotonic()
        if now - self._last >= self.interval_s:
            self._last = now
            share = 100.0 * self._done / self._total if self._total else 100.0
            log.info("progress: %d/%d (%.0f%%), %d loaded, %d not found, %d failed, "
                     "%.0f calls/s", self._done, self._total, share, summary.loaded,
                     summary.not_found, summary.failed, summary.calls_per_s)

    def close(self) -> None:
        pass


def for_stream(stream=None):
    stream = stream or sys.stderr
    return BarProgress() if stream.isatty() else LogProgress()
