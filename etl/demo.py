"""`etl demo`: the whole job on a laptop in seconds, against the in-process simulator."""

from __future__ import annotations

import unicodedata
from collections.abc import Callable
from dataclasses import replace

from sqlalchemy import text

from . import db
from .config import Secret, Settings, display_url
from .progress import for_stream
from .simulator import DEFAULT_ACCESS_TOKEN, DEFAULT_TENANT_ID, Simulator
from .sync import run_sync

# An analyst's first question: who handles the calls, and how long do they talk? By operator
# id (names are not unique), with the name beside; plain SQL that SQLite runs too.
FIRST_QUERY = """\
SELECT operator_id,
       MAX(operator_name) AS operator_name,
       COUNT(*) AS calls,
       SUM(CASE WHEN connected_date_time IS NOT NULL THEN 1 ELSE 0 END) AS connected,
       ROUND(AVG(talk_time), 1) AS avg_talk_s
FROM call_details
WHERE operator_id IS NOT NULL
GROUP BY operator_id
ORDER BY calls DESC, operator_id
LIMIT 5"""


# The demo's own file: the configured warehouse (ETL_DATABASE_URL, database.url) is not used.
DEMO_DATABASE_URL = "sqlite:///commubo-demo.db"


def run_demo(settings: Settings, calls: int, echo: Callable[[str], None]) -> None:
    with Simulator(latency_ms=5, tenant_id=DEFAULT_TENANT_ID,
                   access_token=DEFAULT_ACCESS_TOKEN) as sim:
        settings = replace(settings, base_url=sim.url, tenant_id=DEFAULT_TENANT_ID,
                           access_token=Secret(DEFAULT_ACCESS_TOKEN))
        ids = [f"call-{n:06d}" for n in range(1, calls + 1)]
        echo(f"syncing {calls} simulated calls from {sim.url} into "
             f"{display_url(settings.database_url)}")
        # Following the chains, so that the call_links view shows them whole.
        summary = run_sync(settings, ids, progress=for_stream(), follow_related=True)
    echo(f"run {summary.run_id} {summary.status}: {summary.loaded} loaded, {summary.not_found} "
         f"not found (the simulator's 404s), {summary.failed} failed, in "
         f"{summary.duration_s:.1f}s; {summary.related} of them were related calls, fetched to "
         "complete the call chains")
    engine = db.make_engine(settings.database_url)
    try:
        with engine.connect() as conn:
            counts = {t: conn.execute(text(f"SELECT COUNT(*) FROM {t}")).scalar_one()
                      for t in ("calls", "customers", "customer_versions", "operators",
                                "operator_versions", "scenarios")}
            changed = conn.execute(text(
                "SELECT COUNT(*) FROM (SELECT customer_id FROM customer_versions "
                "GROUP BY customer_id HAVING COUNT(*) > 1) AS c")).scalar_one()
            links = dict(conn.execute(text(
                "SELECT related_state, COUNT(*) FROM call_links GROUP BY related_state")).all())
            rows = conn.execute(text(FIRST_QUERY)).all()
    finally:
        engine.dispose()
    echo("rows now in the warehouse: " + ", ".join(f"{t} {n}" for t, n in counts.items()))
    echo(f"history: {changed} customers changed while calling (SELECT * FROM customer_versions; "
         "call_details_as_of shows each call with the customer as it was then)")
    echo("call chains (call_links): " + ", ".join(f"{n} {state}" for state, n in
                                                   sorted(links.items())))
    echo("")
    echo("an analyst's first query:")
    echo("  " + FIRST_QUERY.replace("\n", "\n  "))
    echo("")
    header = ("operator_id", "operator_name", "calls", "connected", "avg_talk_s")
    cells = [header, *[tuple("-" if v is None else str(v) for v in row) for row in rows]]
    widths = [max(_width(r[i]) for r in cells) for i in range(len(header))]
    for r in cells:
        echo(("  " + "  ".join(v + " " * (w - _width(v)) for v, w in zip(r, widths, strict=True))
              ).rstrip())


def _width(text: str) -> int:
    """Columns a string takes on a terminal: East Asian wide characters (the names) take two."""
    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)
