"""The expected-warehouse oracle: what a sync from the simulator must leave, and what it left.

For the test suite (`tests/`) and the benchmark scripts (`benchmarks/reliability.py`); `etl`
itself never imports it. It needs nothing beyond the package's own dependencies (no pytest),
so both import it normally:

    from etl.testing import expected_warehouse, lost_ids, stale_entities, stored_warehouse

    want = expected_warehouse(call_ids, seed, failing=ids_whose_faults_outlast_the_attempts)
    got = stored_warehouse(db_url)  # a SQLAlchemy URL: PostgreSQL or SQLite
    assert lost_ids(want, got) == [] and stale_entities(want, got) == []

The expectation is derived from what the simulator serves (`etl.simulator.payload_for` through
`etl.transform`), never from another run: every servable call, the newest snapshot of every
customer and operator (and that snapshot's phone numbers), `not_found` for 404s and `failed`
for what can never load.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import create_engine, select, text
from sqlalchemy.engine import URL

from etl.config import normalize_database_url
from etl.errors import PayloadError
from etl.schema import (
    calls,
    customer_phone_numbers,
    customers,
    etl_call_status,
    operators,
    scenarios,
)
from etl.simulator import Simulator, payload_for
from etl.transform import CallRows, transform

__all__ = [
    "NEVER_SERVED",
    "TimedSimulator",
    "Warehouse",
    "duplicated_rows",
    "expected_warehouse",
    "lost_ids",
    "stale_entities",
    "stored_warehouse",
]

# Scripted ids the simulator never answers with a call object (but not with 404 either).
NEVER_SERVED = ("broken", "badjson", "array", "bomb", "huge", "endless", "escape")
_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
# The key of every data and status table: rows beyond one per key are duplicates.
_KEYS = {"calls": "call_id", "customers": "customer_id", "operators": "operator_id",
         "scenarios": "scenario_id", "etl_call_status": "call_id",
         "customer_phone_numbers": "customer_id || ':' || position"}


@dataclass
class Warehouse:
    """The data tables and call statuses, without `fetched_at`, `run_id` and bookkeeping
    times: what must be equal after any two complete runs of the same ids."""

    calls: dict[str, dict[str, Any]] = field(default_factory=dict)
    customers: dict[str, dict[str, Any]] = field(default_factory=dict)
    phones: dict[str, list[str]] = field(default_factory=dict)
    operators: dict[str, dict[str, Any]] = field(default_factory=dict)
    scenarios: set[str] = field(default_factory=set)
    statuses: dict[str, str] = field(default_factory=dict)


def expected_warehouse(call_ids: Iterable[str], seed: int = 0, failing: Iterable[str] = ()
                       ) -> Warehouse:
    """What syncing `call_ids` from a simulator with `seed` must leave, derived from what the
    simulator serves: each servable call transformed, the newest snapshot of each customer
    and operator, `not_found` for 404s, `failed` for what can never load and for `failing`
    (ids whose faults outlast the attempts)."""
    want = Warehouse()
    newest_customer: dict[str, CallRows] = {}
    failing = set(failing)
    for call_id in dict.fromkeys(call_ids):
        payload = payload_for(call_id, seed)
        kind = call_id.split("-", 1)[0]
        if call_id in failing:
            want.statuses[call_id] = "failed"
            continue
        if payload is None:
            want.statuses[call_id] = "failed" if kind in NEVER_SERVED else "not_found"
            continue
        try:
            rows = transform(payload, call_id=call_id, fetched_at=_EPOCH, run_id="-")
        except PayloadError:
            want.statuses[call_id] = "failed"
            continue
        if kind == "bigint":  # transforms, but PostgreSQL's integer refuses it
            want.statuses[call_id] = "failed"
            continue
        want.statuses[call_id] = "loaded"
        want.calls[call_id] = _without(rows.call, "fetched_at", "run_id")
        if rows.customer is not None:
            held = newest_customer.get(rows.customer["customer_id"])
            if held is None or (rows.customer["updated_date_time"]
                                > held.customer["updated_date_time"]):
                newest_customer[rows.customer["customer_id"]] = rows
        if rows.operator is not None:
            held_op = want.operators.get(rows.operator["operator_id"])
            if held_op is None or (rows.operator["updated_date_time"]
                                   > held_op["updated_date_time"]):
                want.operators[rows.operator["operator_id"]] = rows.operator
        if rows.scenario is not None:
            want.scenarios.add(rows.scenario["scenario_id"])
    want.customers = {k: v.customer for k, v in newest_customer.items()}
    want.phones = {k: [p["phone_number"] for p in v.phone_numbers]
                   for k, v in newest_customer.items() if v.phone_numbers}
    return want


def stored_warehouse(db_url: URL | str) -> Warehouse:
    """What the database holds (PostgreSQL or SQLite; a URL as `etl` takes it)."""
    engine = create_engine(normalize_database_url(db_url))
    try:
        with engine.connect() as conn:
            got = Warehouse(
                calls={r["call_id"]: _without(_aware(r), "fetched_at", "run_id")
                       for r in conn.execute(select(calls)).mappings()},
                customers={r["customer_id"]: _aware(r)
                           for r in conn.execute(select(customers)).mappings()},
                operators={r["operator_id"]: _aware(r)
                           for r in conn.execute(select(operators)).mappings()},
                scenarios=set(conn.execute(select(scenarios.c.scenario_id)).scalars()),
                statuses=dict(conn.execute(select(etl_call_status.c.call_id,
                                                  etl_call_status.c.status)).all()),
            )
            for cid, number in conn.execute(
                    select(customer_phone_numbers.c.customer_id,
                           customer_phone_numbers.c.phone_number)
                    .order_by(customer_phone_numbers.c.customer_id,
                              customer_phone_numbers.c.position)):
                got.phones.setdefault(cid, []).append(number)
    finally:
        engine.dispose()
    return got


def duplicated_rows(db_url: URL | str) -> int:
    """Rows beyond one per key in every data table and etl_call_status (0 while the keys
    hold; counted anyway, so that a dropped constraint would show)."""
    engine = create_engine(normalize_database_url(db_url))
    try:
        with engine.connect() as conn:
            return sum(conn.execute(text(
                f"SELECT count(*) - count(DISTINCT {key}) FROM {table}")).scalar_one()
                for table, key in _KEYS.items())
    finally:
        engine.dispose()


def lost_ids(want: Warehouse, got: Warehouse) -> list[str]:
    """Ids that did not end as they should: a call missing or with other values, or a status
    other than the expected one."""
    return sorted(i for i in want.statuses
                  if got.statuses.get(i) != want.statuses[i]
                  or got.calls.get(i) != want.calls.get(i))


def stale_entities(want: Warehouse, got: Warehouse) -> list[str]:
    """Customers, phone lists and operators that are not the newest snapshot (or missing)."""
    return sorted(
        [f"customer {k}" for k in want.customers.keys() | got.customers.keys()
         if want.customers.get(k) != got.customers.get(k)]
        + [f"phones {k}" for k in want.phones.keys() | got.phones.keys()
           if want.phones.get(k) != got.phones.get(k)]
        + [f"operator {k}" for k in want.operators.keys() | got.operators.keys()
           if want.operators.get(k) != got.operators.get(k)]
        + [f"scenario {k}" for k in want.scenarios ^ got.scenarios])


def _without(row: dict[str, Any], *names: str) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k not in names}


def _aware(row: Any) -> dict[str, Any]:
    """A row as a dict, SQLite's naive datetimes made UTC."""
    return {k: (v.replace(tzinfo=UTC) if isinstance(v, datetime) and v.tzinfo is None else v)
            for k, v in dict(row).items()}


class TimedSimulator(Simulator):
    """The simulator, also noting when each request for an id arrived (to measure the waits
    between retries)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.arrivals: dict[str, list[float]] = defaultdict(list)

    def _count(self, call_id: str | None) -> int:
        if call_id is not None:
            self.arrivals[call_id].append(time.monotonic())
        return super()._count(call_id)

    def gaps(self, call_id: str) -> list[float]:
        times = self.arrivals[call_id]
        return [b - a for a, b in zip(times, times[1:], strict=False)]

    def shortest_gap(self, ids: list[str]) -> float | None:
        gaps = [gap for i in ids for gap in self.gaps(i)]
        return min(gaps) if gaps else None
