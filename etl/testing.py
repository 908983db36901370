"""The expected-warehouse oracle: what a sync from the simulator must leave, and what it left.

For the test suite (`tests/`) and the benchmark scripts (`benchmarks/reliability.py`); `etl`
itself never imports it. It needs nothing beyond the package's own dependencies (no pytest),
so both import it normally:

    from etl.testing import (expected_warehouse, inconsistencies, lost_ids, stale_entities,
                             stored_warehouse)

    want = expected_warehouse(call_ids, seed, failing=ids_whose_faults_outlast_the_attempts)
    got = stored_warehouse(db_url)  # a SQLAlchemy URL: PostgreSQL or SQLite
    assert lost_ids(want, got) == [] and stale_entities(want, got) == []
    assert not any(inconsistencies(db_url).values())  # the loader's invariants hold

The expectation is derived from what the simulator serves (`etl.simulator.payload_for` through
`etl.transform`), never from another run: every servable call, the newest snapshot of every
customer and operator (and that snapshot's phone numbers), `not_found` for 404s and `failed`
for what can never load.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Select, Table, create_engine, exists, func, or_, select
from sqlalchemy.engine import URL

from etl.config import normalize_database_url
from etl.errors import PayloadError
from etl.outcome import CallStatus
from etl.runs import COUNTERS, RunStatus
from etl.schema import (
    calls,
    customer_phone_numbers,
    customer_versions,
    customers,
    etl_call_status,
    etl_runs,
    operator_versions,
    operators,
    scenarios,
)
from etl.simulator import Simulator, payload_for
from etl.transform import CallRows, transform

__all__ = [
    "NEVER_SERVED",
    "TimedSimulator",
    "Warehouse",
    "expected_warehouse",
    "inconsistencies",
    "lost_ids",
    "stale_entities",
    "stored_warehouse",
]

# Scripted ids the simulator never answers with a call object (but not with 404 either).
NEVER_SERVED = ("broken", "badjson", "array", "bomb", "huge", "endless", "escape")
_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)


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


def inconsistencies(db_url: URL | str) -> dict[str, int]:
    """Rows that break an invariant the loader keeps, by invariant: every count is 0 in a
    sound warehouse, whatever was synced, killed or rerun (PostgreSQL or SQLite).

    The primary keys make a second row per key impossible, so counting those would count
    nothing. These are what a batch written twice, half a batch, a lost or an orphan row, or
    a version added without its neighbours being updated would break instead:

    - a call row and its status go together: no call row without a status, no `loaded`
      status without its call row;
    - rows name runs that exist, and no run has more call rows or statuses naming it than it
      counted (each is written in the transaction that counts it);
    - a run that completed (succeeded, partial) adds up: requested + related = loaded +
      not_found + failed + skipped, so a batch written again was counted once;
    - the history tables: each version valid from its own updated_date_time, never two
      versions of an entity valid from the same moment, and each one's valid_to the next
      one's valid_from (NULL for the newest): no overlap, no gap, one open version;
    - every version, phone number and call names a customer, operator or scenario that is
      stored; a call's customer and operator version is stored; customers and operators are
      at their newest version; a customer's phone numbers are at positions 0..n-1."""
    engine = create_engine(normalize_database_url(db_url))
    try:
        with engine.connect() as conn:
            return _inconsistencies(conn)
    finally:
        engine.dispose()


def _inconsistencies(conn: Connection) -> dict[str, int]:
    def rows(query: Select) -> int:
        return conn.execute(select(func.count()).select_from(query.subquery())).scalar_one()

    status = etl_call_status
    found: dict[str, int] = {
        "call rows without a status": rows(select(calls.c.call_id).where(
            ~exists().where(status.c.call_id == calls.c.call_id))),
        "loaded statuses without a call row": rows(select(status.c.call_id).where(
            status.c.status == CallStatus.LOADED,
            ~exists().where(calls.c.call_id == status.c.call_id))),
        "call rows naming no stored run": rows(select(calls.c.call_id).where(
            ~exists().where(etl_runs.c.run_id == calls.c.run_id))),
        "statuses naming no stored run": rows(select(status.c.call_id).where(
            ~exists().where(etl_runs.c.run_id == status.c.run_id))),
    }
    counted = {r["run_id"]: r for r in conn.execute(select(etl_runs)).mappings()}
    beyond = 0
    for run_id, n in conn.execute(select(calls.c.run_id, func.count()).group_by(
            calls.c.run_id)):
        if run_id in counted:
            beyond += max(0, n - counted[run_id]["loaded"])
    found["call rows beyond their run's loaded count"] = beyond
    beyond = 0
    for run_id, what, n in conn.execute(select(status.c.run_id, status.c.status, func.count())
                                        .group_by(status.c.run_id, status.c.status)):
        if run_id in counted and what in COUNTERS:
            beyond += max(0, n - counted[run_id][what])
        elif run_id in counted:  # a status no run counts
            beyond += n
    found["statuses beyond their run's count"] = beyond
    found["completed runs whose counts do not add up"] = sum(
        1 for r in counted.values() if r["status"] in (RunStatus.SUCCEEDED, RunStatus.PARTIAL)
        and r["requested"] + (r["related"] or 0)
        != r["loaded"] + r["not_found"] + r["failed"] + r["skipped"])
    for entity, versions, current in (("customer", customer_versions, customers),
                                      ("operator", operator_versions, operators)):
        found.update(_version_inconsistencies(rows, entity, versions, current))
    phones = customer_phone_numbers
    found["phone numbers of no stored customer"] = rows(select(phones.c.customer_id).where(
        ~exists().where(customers.c.customer_id == phones.c.customer_id)))
    found["customers whose phone positions are not 0..n-1"] = rows(
        select(phones.c.customer_id).group_by(phones.c.customer_id).having(or_(
            func.min(phones.c.position) != 0,
            func.max(phones.c.position) + 1 != func.count())))
    found["calls of no stored scenario"] = rows(select(calls.c.call_id).where(
        calls.c.scenario_id.is_not(None),
        ~exists().where(scenarios.c.scenario_id == calls.c.scenario_id)))
    return found


def _version_inconsistencies(rows: Callable[[Select], int], entity: str, versions: Table,
                             current: Table) -> dict[str, int]:
    key, name = f"{entity}_id", versions.name
    following = select(
        versions.c.valid_to,
        func.lead(versions.c.valid_from).over(
            partition_by=versions.c[key],
            order_by=(versions.c.valid_from, versions.c.updated_date_time)).label("next_from"),
    ).subquery()
    newest = (select(func.max(versions.c.updated_date_time))
              .where(versions.c[key] == current.c[key]).scalar_subquery())
    return {
        f"{name} not valid from their updated_date_time": rows(select(versions.c[key]).where(
            versions.c.valid_from.is_distinct_from(versions.c.updated_date_time))),
        f"{name} beyond one valid from the same moment": rows(
            select(versions.c[key]).group_by(versions.c[key], versions.c.valid_from)
            .having(func.count() > 1)),
        f"{name} whose valid_to is not the next version's valid_from": rows(
            select(following.c.valid_to).where(
                following.c.valid_to.is_distinct_from(following.c.next_from))),
        f"{name} of no stored {entity}": rows(select(versions.c[key]).where(
            ~exists().where(current.c[key] == versions.c[key]))),
        f"{current.name} not at their newest version": rows(select(current.c[key]).where(
            newest.is_not(None), current.c.updated_date_time.is_distinct_from(newest))),
        f"calls of no stored {entity}": rows(select(calls.c.call_id).where(
            calls.c[key].is_not(None),
            ~exists().where(current.c[key] == calls.c[key]))),
        f"calls naming a {entity} version not stored": rows(select(calls.c.call_id).where(
            calls.c[f"{entity}_updated_date_time"].is_not(None),
            ~exists().where(versions.c[key] == calls.c[key],
                            versions.c.updated_date_time
                            == calls.c[f"{entity}_updated_date_time"]))),
    }


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
