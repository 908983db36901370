"""Loading fetched calls into the warehouse: one transaction per batch, upserts in a fixed key
order, newest snapshot wins, and a bad row isolated instead of failing its batch (SPEC section 5).

Dialect differences (PostgreSQL vs SQLite upsert) live in `_insert` and nowhere else.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, Table, and_, delete, or_
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection
from sqlalchemy.exc import (
    DataError,
    DBAPIError,
    IntegrityError,
    InterfaceError,
    OperationalError,
    StatementError,
)

from . import runs
from .config import display_url
from .db import describe_db_error
from .errors import DatabaseError, PayloadError
from .outcome import FAILED, NOT_FOUND, OK, Outcome
from .schema import calls, customer_phone_numbers, customers, etl_call_status, operators, scenarios
from .transform import CallRows, transform

log = logging.getLogger(__name__)

LOADED = "loaded"
# Waits before retrying a batch whose connection dropped or that hit a transient error
# (deadlock, serialization failure, server restart); then the run stops with exit 3.
RECONNECT_DELAYS_S = (0.5, 2.0, 5.0)


@dataclass(slots=True)
class _Item:
    """One call id on its way into a transaction: its rows (if any) and its status row."""

    call_id: str
    status: str
    rows: CallRows | None
    http_status: int | None
    error: str | None
    attempts: int


class _RowRejected(Exception):
    """The database refused a value of this batch (not the connection): isolate the row."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Loader:
    """Writes batches of `Outcome`s for one run. `load` returns the counts it committed."""

    def __init__(self, engine: Engine, run_id: str) -> None:
        self.engine = engine
        self.run_id = run_id
        self._postgres = engine.dialect.name == "postgresql"
        self._insert = pg_insert if self._postgres else sqlite_insert

    def load(self, outcomes: Sequence[Outcome]) -> dict[str, int]:
        now = datetime.now(UTC)
        items = [self._prepare(o, now) for o in outcomes]
        return self._write_isolating(items)

    # -- preparing ---------------------------------------------------------------------------

    def _prepare(self, o: Outcome, now: datetime) -> _Item:
        if o.status != OK:
            return _Item(o.call_id, o.status, None, o.http_status, o.error, o.attempts)
        try:
            rows = transform(o.payload, call_id=o.call_id, fetched_at=o.fetched_at or now,
                             run_id=self.run_id)
        except PayloadError as exc:
            return _Item(o.call_id, FAILED, None, o.http_status, f"bad payload: {exc}",
                         o.attempts)
        return _Item(o.call_id, LOADED, rows, o.http_status, None, o.attempts)

    # -- isolating bad rows --------------------------------------------------------------------

    def _write_isolating(self, items: list[_Item]) -> dict[str, int]:
        """Write the batch; if the database rejects a value, split it in halves and retry, so
        that only the offending rows end up `failed` (log2(batch) extra transactions)."""
        try:
            self._write_retrying(items)
            return _counts(items)
        except _RowRejected as exc:
            if len(items) == 1:
                item = items[0]
                log.warning("call %s rejected by the database: %s", item.call_id, exc.reason)
                item.status, item.rows = FAILED, None
                item.error = f"database rejected the record: {exc.reason}"
                self._write_retrying(items)
                return _counts(items)
        mid = len(items) // 2
        left = self._write_isolating(items[:mid])
        right = self._write_isolating(items[mid:])
        return {k: left.get(k, 0) + right.get(k, 0) for k in left.keys() | right.keys()}

    def _write_retrying(self, items: list[_Item]) -> None:
        for attempt, delay in enumerate((*RECONNECT_DELAYS_S, None), start=1):
            try:
                with self.engine.begin() as conn:
                    self._write(conn, items)
                return
            except (DataError, IntegrityError) as exc:
                raise _RowRejected(describe_db_error(exc, self.engine.url)) from None
            except (OperationalError, InterfaceError) as exc:
                reason = describe_db_error(exc, self.engine.url)
                if delay is None:
                    raise DatabaseError(
                        f"database {display_url(self.engine.url)} failed {attempt} times "
                        f"writing a batch: {reason}"
                    ) from None
                log.warning("database error (%s); retrying the batch in %.1fs", reason, delay)
                time.sleep(delay)
            except DBAPIError as exc:
                raise DatabaseError(
                    f"database error writing a batch: {describe_db_error(exc, self.engine.url)}"
                ) from None
            except StatementError as exc:
                # A value the driver could not even bind: a row problem, not a database one.
                raise _RowRejected(str(exc.orig) if exc.orig else str(exc)) from None

    # -- one transaction -----------------------------------------------------------------------

    def _write(self, conn: Connection, items: list[_Item]) -> None:
        call_rows: dict[str, dict[str, Any]] = {}
        customer_rows: dict[str, CallRows] = {}
        operator_rows: dict[str, dict[str, Any]] = {}
        scenario_ids: set[str] = set()
        for item in items:
            r = item.rows
            if r is None:
                continue
            call_rows[item.call_id] = r.call
            # PostgreSQL rejects ON CONFLICT DO UPDATE touching a row twice, and the newest
            # snapshot must win inside the batch too: keep one row per key, the newest.
            if r.customer is not None:
                key = r.customer["customer_id"]
                held = customer_rows.get(key)
                if held is None or _same_or_newer(r.customer, held.customer):
                    customer_rows[key] = r
            if r.operator is not None:
                key = r.operator["operator_id"]
                held_op = operator_rows.get(key)
                if held_op is None or _same_or_newer(r.operator, held_op):
                    operator_rows[key] = r.operator
            if r.scenario is not None:
                scenario_ids.add(r.scenario["scenario_id"])

        # Every transaction takes its row locks table by table in this order, and by key
        # inside a table, so concurrent runs wait for each other but never deadlock.
        if scenario_ids:
            conn.execute(
                self._insert(scenarios).on_conflict_do_nothing(),
                [{"scenario_id": s} for s in sorted(scenario_ids)],
            )
        if customer_rows:
            ordered = [customer_rows[k] for k in sorted(customer_rows)]
            won = self._upsert_newest(conn, customers, "customer_id",
                                      [r.customer for r in ordered])
            if won:
                # A customer's phone numbers go with its winning snapshot, and only then.
                winners = sorted(won)
                conn.execute(delete(customer_phone_numbers)
                             .where(customer_phone_numbers.c.customer_id.in_(winners)))
                phones = [p for r in ordered if r.customer["customer_id"] in won
                          for p in r.phone_numbers]
                if phones:
                    conn.execute(customer_phone_numbers.insert(), phones)
        if operator_rows:
            self._upsert_newest(conn, operators, "operator_id",
                                [operator_rows[k] for k in sorted(operator_rows)])
        if call_rows:
            self._upsert(conn, calls, "call_id", [call_rows[k] for k in sorted(call_rows)])

        now = datetime.now(UTC)
        statuses = sorted(
            ({"call_id": i.call_id, "status": i.status, "http_status": i.http_status,
              "error": i.error, "attempts": i.attempts, "run_id": self.run_id,
              "updated_at": now} for i in items),
            key=lambda s: s["call_id"],
        )
        self._upsert(conn, etl_call_status, "call_id", _last_per_key(statuses))
        runs.add_counts(conn, self.run_id, _counts(items))

    def _upsert(self, conn: Connection, table: Table, key: str, rows: list[dict]) -> None:
        stmt = self._insert(table)
        stmt = stmt.on_conflict_do_update(
            index_elements=[key],
            set_={c.name: stmt.excluded[c.name] for c in table.columns if c.name != key},
        )
        conn.execute(stmt, rows)

    def _upsert_newest(self, conn: Connection, table: Table, key: str, rows: list[dict]
                       ) -> set[str]:
        """Upsert keeping the newest snapshot by updated_date_time; a stored row is replaced
        only by one as new or newer (a NULL time counts as oldest). Returns the keys written."""
        stmt = self._insert(table)
        stored, incoming = table.c.updated_date_time, stmt.excluded.updated_date_time
        stmt = stmt.on_conflict_do_update(
            index_elements=[key],
            # The primary key stays out of SET: PostgreSQL then takes the weaker row lock,
            # which does not conflict with the foreign-key checks of concurrent call inserts.
            set_={c.name: stmt.excluded[c.name] for c in table.columns if c.name != key},
            where=or_(stored.is_(None), and_(incoming.is_not(None), incoming >= stored)),
        ).returning(table.c[key])
        return set(conn.execute(stmt, rows).scalars())


def _same_or_newer(candidate: dict[str, Any], held: dict[str, Any]) -> bool:
    new, old = candidate["updated_date_time"], held["updated_date_time"]
    return old is None or (new is not None and new >= old)


def _last_per_key(statuses: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # The same id twice in one batch (a caller's list with repeats): the later one stands.
    seen: dict[str, dict[str, Any]] = {}
    for s in statuses:
        seen[s["call_id"]] = s
    return list(seen.values()) if len(seen) != len(statuses) else statuses


def _counts(items: list[_Item]) -> dict[str, int]:
    counts = {LOADED: 0, NOT_FOUND: 0, FAILED: 0}
    for i in items:
        counts[i.status] += 1
    return counts
