"""What every module of the benchmark harness shares: where things are, the interpreter the
children run with, `BenchError` and `log` (see harness.py for the whole harness)."""

from __future__ import annotations

import sys
from datetime import datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PY = sys.executable


class BenchError(Exception):
    """A run could not be measured (exit code, timeout, no summary, a service that did not
    start). `Results.attempt` records it as a failure and the benchmark goes on."""


def log(msg: str) -> None:
    """Progress on stderr, with the time of day (stdout is for the report)."""
    print(f"[{datetime.now():%H:%M:%S}] {msg}", file=sys.stderr, flush=True)

