"""Helpers shared by the test modules (fixtures live in conftest.py). Imported as
`from helpers import ...`: pytest puts tests/ on sys.path."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, select, text
from sqlalchemy.engine import URL

from etl.config import Secret, Settings
from etl.errors import PayloadError
from etl.schema import (
    calls,
    customer_phone_numbers,
    customers,
    etl_call_status,
    operators,
    scenarios,
)
from etl.simulator import DEFAULT_ACCESS_TOKEN, DEFAULT_TENANT_ID, Simulator, payload_for
from etl.transform import CallRows, transform

ROOT = Path(__file__).resolve().parent.parent


@contextmanager
def fresh_database(server: URL, prefix: str = "etl_test") -> Iterator[URL]:
    """A new, empty database on `server` for as long as the block runs, then dropped (FORCE:
    sessions a killed process left behind do not keep it)."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = create_engine(server, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield server.set(database=name)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def stored_statuses(db_url: URL) -> dict[str, str]:
    """Every call id's status in etl_call_status."""
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            return dict(conn.execute(select(etl_call_status.c.call_id,
                                            etl_call_status.c.status)).all())
    finally:
        engine.dispose()


def make_settings(sim: Simulator, db_url: URL, **changes) -> Settings:
    """Settings for a test run: fast backoff so retries do not slow the suite down."""
    base = Settings(
        base_url=sim.url,
        tenant_id=DEFAULT_TENANT_ID,
        access_token=Secret(DEFAULT_ACCESS_TOKEN),
        database_url=db_url,
        concurrency=4,
        timeout_s=5.0,
        backoff_s=0.01,
        max_backoff_s=0.05,
        retry_after_cap_s=5.0,
        batch_size=50,
    )
    return replace(base, **changes)


def etl_env(sim: Simulator | None = None, db_url: URL | None = None, **extra: str
            ) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("COMMUBO_", "ETL_DATABASE_URL", "ETL_CONFIG"))}
    if sim is not None:
        env.update(COMMUBO_BASE_URL=sim.url, COMMUBO_TENANT_ID=DEFAULT_TENANT_ID,
                   COMMUBO_ACCESS_TOKEN=DEFAULT_ACCESS_TOKEN)
    if db_url is not None:
        env["ETL_DATABASE_URL"] = db_url.render_as_string(hide_password=False)
    env.update(extra)
    return env


def ids_file(tmp_path: Path, ids: list[str], name: str = "ids.txt") -> Path:
    path = tmp_path / name
    path.write_text("\n".join(ids) + "\n")
    return path


def run_etl(*args: str, env: dict[str, str], cwd: Path | None = None, input: str | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """The `etl` command in its own process: real exit codes, real stdout and stderr."""
    return subprocess.run(
        [sys.executable, "-m", "etl", *args],
        env=env, cwd=cwd, input=input, capture_output=True, text=True, timeout=timeout,
    )


# -- the warehouse as data, to compare a run with what it should have left ---------------------


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


def stored_warehouse(db_url: URL) -> Warehouse:
    """What the database holds (PostgreSQL or SQLite)."""
    engine = create_engine(db_url)
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


# Scripted ids the simulator never answers with a call object (but not with 404 either).
NEVER_SERVED = ("broken", "badjson", "array", "bomb", "huge", "endless", "escape")
_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)


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


# -- a server for what the simulator cannot say ---------------------------------------------


class RouteServer:
    """A threaded HTTP server on 127.0.0.1 answering /v1/calls/{id} with `route(handler, id)`
    (the fixture `route_server` makes them); `stop` ends it, and `stopping` is set for
    handlers that wait."""

    def __init__(self, route: Callable[[BaseHTTPRequestHandler, str], None]) -> None:
        self.stopping = threading.Event()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                route(self, self.path.rsplit("/", 1)[-1])

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            block_on_close = False

            def handle_error(self, request, client_address) -> None:
                pass  # clients hanging up on purpose

        self._server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self._server.shutdown()
        self._server.server_close()


def answer(h: BaseHTTPRequestHandler, status: int, body: bytes, *headers: tuple[str, str],
           reason: str | None = None) -> None:
    """A whole response with a Content-Length, from inside a RouteServer's route."""
    h.send_response(status, reason)
    h.send_header("Content-Length", str(len(body)))
    for name, value in headers:
        h.send_header(name, value)
    h.end_headers()
    h.wfile.write(body)
