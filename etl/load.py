"""Loading fetched calls into the warehouse: one transaction per batch, upserts in a fixed key
order, newest snapshot wins, the newest fetch of a call wins, and a bad row isolated instead of
failing its batch (docs/design.md §5).

Dialect differences (PostgreSQL vs SQLite upsert) live in `_execute`/`_statement` and nowhere
else.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import psycopg
from sqlalchemy import (
    JSON,
    Column,
    DateTime,
    Engine,
    Integer,
    MetaData,
    SmallInteger,
    Table,
    Text,
    and_,
    any_,
    bindparam,
    cast,
    delete,
    func,
    or_,
    select,
    text,
    tuple_,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
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
from sqlalchemy.schema import CreateTable

from . import runs
from .config import display_url
from .db import describe_db_error
from .errors import DatabaseError, PayloadError
from .outcome import FAILED, NOT_FOUND, OK, CallStatus, Outcome
from .schema import (
    CALL_TYPES,
    call_types,
    calls,
    customer_phone_numbers,
    customer_versions,
    customers,
    etl_call_status,
    operator_versions,
    operators,
    scenarios,
)
from .text import printable
from .transform import CallRows, transform

log = logging.getLogger(__name__)


class Upsert(StrEnum):
    """How `Loader._execute` writes rows whose key is stored already."""

    INSERT = "insert"  # no conflict expected (rows deleted first)
    NOTHING = "nothing"  # keep the stored row
    UPDATE = "update"  # the new row wins
    NEWEST = "newest"  # the newer snapshot (updated_date_time) wins
    NEWEST_FETCH = "newest_fetch"  # the newer fetch (fetched_at) wins

# Waits before retrying a batch whose connection dropped or that hit a transient error
# (deadlock, serialization failure, server restart); then the run stops with exit 3.
RECONNECT_DELAYS_S = (0.5, 2.0, 5.0)
# Keys per IN (...) list in a lookup.
_LOOKUP_CHUNK = 5000
# Columns of the data tables that record a fetch, not what was fetched (only `calls` has them).
# A stored row whose other columns all equal the incoming ones is left as it is: no new row
# version, index entries, WAL or dead tuple for vacuum, so a rerun that finds nothing changed
# writes no data row. These columns then tell when the content last changed (the fetch that
# brought it), not when it was last fetched; etl_call_status records every fetch. A new
# bookkeeping column on a data table belongs here, or every rerun rewrites every row again.
BOOKKEEPING_COLUMNS = frozenset({"fetched_at", "run_id"})


@dataclass(slots=True)
class _Item:
    """One call id on its way into a transaction: its rows (if any) and its status row.
    `fetched_at` is when the answer arrived, or for an outcome that does not say (404s and
    failures), when the batch reached the loader: no earlier than the answer. `superseded` is
    set by the transaction that found a newer fetch of the call stored (its status stays), or
    in the batch."""

    call_id: str
    status: str
    rows: CallRows | None
    http_status: int | None
    error: str | None
    attempts: int
    fetched_at: datetime
    superseded: bool = False
    warnings: str | None = None  # what falls outside the API doc, "; "-joined


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
        self._statements: dict[tuple[str, str], Any] = {}
        # Fields the API sent that the doc does not list, over every batch of this loader.
        self.unknown_fields: set[str] = set()

    def load(self, outcomes: Sequence[Outcome]) -> dict[str, int]:
        now = datetime.now(UTC)
        items = [self._prepare(o, now) for o in outcomes]
        return self._write_isolating(items)

    # -- preparing ---------------------------------------------------------------------------

    def _prepare(self, o: Outcome, now: datetime) -> _Item:
        fetched_at = _utc(o.fetched_at) if o.fetched_at is not None else now
        if o.status != OK:
            return _Item(o.call_id, o.status, None, o.http_status, o.error, o.attempts,
                         fetched_at)
        body_text = _nul_free_text(o.body)
        try:
            rows = transform(o.payload, call_id=o.call_id, fetched_at=fetched_at,
                             run_id=self.run_id, nul_free=body_text is not None)
        except PayloadError as exc:
            return _Item(o.call_id, FAILED, None, o.http_status, f"bad payload: {exc}",
                         o.attempts, fetched_at)
        if self._postgres:
            # `raw` is staged as JSON text: the body exactly as received when it is usable as
            # is, else the (U+0000-stripped) payload serialised again.
            rows.call["raw"] = body_text if body_text is not None else _json(rows.call["raw"])
        if rows.unknown_fields:
            self.unknown_fields.update(rows.unknown_fields)
        return _Item(o.call_id, CallStatus.LOADED, rows, o.http_status, None, o.attempts,
                     fetched_at, warnings="; ".join(rows.warnings) or None)

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
                with self.engine.connect() as conn:
                    if self._postgres:
                        self._ensure_stages(conn)
                    with conn.begin():
                        self._write(conn, items)
                return
            except (DataError, IntegrityError) as exc:
                raise _RowRejected(describe_db_error(exc, self.engine.url)) from None
            except (OperationalError, InterfaceError) as exc:
                _reraise_interrupt(exc)
                reason = describe_db_error(exc, self.engine.url)
                if (getattr(exc.orig, "sqlstate", None) or "").startswith("54"):
                    # program_limit_exceeded (an index row too large for a huge key, ...):
                    # the row is at fault, not the connection, and a retry cannot help.
                    raise _RowRejected(reason) from None
                if delay is None:
                    raise DatabaseError(
                        f"database {display_url(self.engine.url)} failed {attempt} times "
                        f"writing a batch: {reason}"
                    ) from None
                log.warning("database error (%s); retrying the batch in %.1fs", reason, delay)
                time.sleep(delay)
            except DBAPIError as exc:
                _reraise_interrupt(exc)
                raise DatabaseError(
                    f"database error writing a batch: {describe_db_error(exc, self.engine.url)}"
                ) from None
            except UnicodeError as exc:
                # A lone surrogate (the JSON escape \ud800) parses, but no driver can encode it.
                raise _RowRejected(f"text the database cannot encode: {exc.reason}") from None
            except StatementError as exc:
                # A value the driver could not even bind: a row problem, not a database one.
                raise _RowRejected(str(exc.orig) if exc.orig else str(exc)) from None

    # -- one transaction -----------------------------------------------------------------------

    def _write(self, conn: Connection, items: list[_Item]) -> None:
        # One outcome per call: the newest fetch wins inside the batch too (a library caller
        # may pass an id twice; customers and operators still go by their snapshot times).
        # Decided afresh by each try of the transaction.
        newest: dict[str, _Item] = {}
        for item in items:
            held_item = newest.get(item.call_id)
            item.superseded = held_item is not None and item.fetched_at < held_item.fetched_at
            if not item.superseded:
                if held_item is not None:
                    held_item.superseded = True
                newest[item.call_id] = item
        call_rows: dict[str, dict[str, Any]] = {}
        customer_rows: dict[str, CallRows] = {}
        operator_rows: dict[str, dict[str, Any]] = {}
        scenario_ids: set[str] = set()
        # Every dated snapshot is a version, the newest or not; the first of equal keys wins.
        customer_versions_: dict[tuple[str, datetime], dict[str, Any]] = {}
        operator_versions_: dict[tuple[str, datetime], dict[str, Any]] = {}
        call_types_: set[int] = set()
        for item in items:
            r = item.rows
            if r is None:
                continue
            if not item.superseded:
                call_rows[item.call_id] = r.call
                if r.call["call_type"] is not None:
                    call_types_.add(r.call["call_type"])
            # (Not setdefault: most calls bring a snapshot the batch holds already, and
            # building its version row again, phone numbers as JSON, is wasted.)
            if r.customer is not None and r.customer["updated_date_time"] is not None:
                version = (r.customer["customer_id"], r.customer["updated_date_time"])
                if version not in customer_versions_:
                    customer_versions_[version] = self._customer_version(r)
            if r.operator is not None and r.operator["updated_date_time"] is not None:
                version = (r.operator["operator_id"], r.operator["updated_date_time"])
                if version not in operator_versions_:
                    operator_versions_[version] = _version(r.operator)
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
            self._execute(conn, scenarios, "scenario_id", Upsert.NOTHING,
                          [{"scenario_id": s} for s in sorted(scenario_ids)])
        unknown_types = call_types_.difference(code for code, *_ in CALL_TYPES)
        if unknown_types:
            # The foreign key holds for codes the API doc does not list (loaded, with a
            # warning): they get a row of their own.
            self._execute(conn, call_types, "code", Upsert.NOTHING, [
                {"code": code, "name": "unknown", "description": "Not in the API doc; first "
                 "seen in a fetched call."} for code in sorted(unknown_types)])
        # A customer or operator this batch brings nothing new for is left alone, not even
        # locked (_settled); the others are upserted and so locked, also when their row stays.
        settled = self._settled(
            conn, customers, "customer_id", {k: r.customer for k, r in customer_rows.items()},
            customer_versions, customer_versions_,
            numbers={k: [p["phone_number"] for p in r.phone_numbers]
                     for k, r in customer_rows.items() if r.phones_given})
        customer_rows = {k: r for k, r in customer_rows.items() if k not in settled}
        customer_versions_ = {v: row for v, row in customer_versions_.items()
                              if v[0] not in settled}
        settled = self._settled(conn, operators, "operator_id", operator_rows,
                                operator_versions, operator_versions_)
        operator_rows = {k: r for k, r in operator_rows.items() if k not in settled}
        operator_versions_ = {v: row for v, row in operator_versions_.items()
                              if v[0] not in settled}
        if customer_rows:
            ordered = [customer_rows[k] for k in sorted(customer_rows)]
            self._execute(conn, customers, "customer_id", Upsert.NEWEST,
                          [r.customer for r in ordered])
            # A customer's phone numbers go with its winning snapshot, and only then; a
            # snapshot without the phoneNumbers key says nothing about them. Only lists that
            # differ from the stored one are written.
            renumbered = self._renumbered(conn, [r for r in ordered if r.phones_given])
            if renumbered:
                conn.execute(delete(customer_phone_numbers).where(self._among(
                    customer_phone_numbers.c.customer_id, sorted(renumbered))))
                phones = [p for r in ordered if r.customer["customer_id"] in renumbered
                          for p in r.phone_numbers]
                if phones:
                    self._execute(conn, customer_phone_numbers, "customer_id", Upsert.INSERT,
                                  phones)
        if customer_versions_:
            # After `customers`, whose row lock serialises writers of one customer: this
            # transaction's valid_to sees every version a concurrent run committed.
            self._add_versions(conn, customer_versions, "customer_id", customer_versions_)
        if operator_rows:
            self._execute(conn, operators, "operator_id", Upsert.NEWEST,
                          [operator_rows[k] for k in sorted(operator_rows)])
        if operator_versions_:
            self._add_versions(conn, operator_versions, "operator_id", operator_versions_)
        # The newest fetch of a call wins, whichever of two runs commits last: what it brought
        # stays, also when a later fetch found the same content and left the row alone (the
        # row then keeps the fetch that brought it: BOOKKEEPING_COLUMNS). The call's status
        # row is where runs writing one call meet. Each transaction writes its statuses first
        # (before its calls), each only over a status fetched no later (`fetched_at`), and
        # holds every one of those rows locked to its end, also where the status stays. So a
        # second transaction writing a call waits for the first, and then decides with the
        # first's status and row committed: no lookup can be overtaken by a newer fetch.
        now = datetime.now(UTC)
        statuses = [{"call_id": i.call_id, "status": i.status, "http_status": i.http_status,
                     # A reason may quote what the server sent (a value, a phrase).
                     "error": printable(i.error, 500) if i.error else None,
                     "attempts": i.attempts, "warnings": i.warnings, "run_id": self.run_id,
                     "updated_at": now, "fetched_at": i.fetched_at}
                    for i in sorted(newest.values(), key=lambda i: i.call_id)]
        written = self._execute(conn, etl_call_status, "call_id", Upsert.NEWEST_FETCH,
                                statuses) or set()
        gave_way = [i for i in newest.values() if i.call_id not in written]
        for item in gave_way:
            item.superseded = True
        # A load whose status gave way to a newer fetch brings its content all the same when
        # that fetch was a 404 or a failure: the row holds the newest content fetched (and
        # only over content fetched no later, by calls.fetched_at). After a newer load it
        # brings nothing: that load's content, or the same content if it left the row alone.
        newer_loads = self._loaded(conn, [i.call_id for i in gave_way if i.rows is not None])
        if call_rows.keys() - newer_loads:
            self._execute(conn, calls, "call_id", Upsert.NEWEST_FETCH,
                          [call_rows[k] for k in sorted(call_rows.keys() - newer_loads)])
        superseded = sum(i.superseded for i in items)
        if superseded:
            log.debug("%d outcome(s) older than the stored fetch of their call: status left "
                      "as it was", superseded)
        # The run's counters count each outcome as this run got it, committed once with its
        # batch, also when a newer fetch was already stored: an older load is still `loaded`
        # for this run (the call is in the warehouse, as of this fetch or newer) and an
        # older 404 `not_found`; `skipped` stays what it was, ids not fetched (--skip-loaded).
        # So the counters equal the run's summary, add up to what it requested, and do not
        # depend on when other runs commit; which run wrote a call is in its row and status.
        runs.add_counts(conn, self.run_id, _counts(items))

    def _customer_version(self, r: CallRows) -> dict[str, Any]:
        numbers = ([p["phone_number"] for p in r.phone_numbers] if r.phones_given else None)
        # Staged as JSON text for PostgreSQL's COPY; SQLite's JSON type takes the list.
        return _version(r.customer, phone_numbers=(
            _json(numbers) if self._postgres and numbers is not None else numbers))

    def _settled(self, conn: Connection, table: Table, key: str,
                 rows: dict[str, dict[str, Any]], versions_table: Table,
                 versions: dict[tuple[str, datetime], dict[str, Any]],
                 numbers: dict[str, list[str | None]] | None = None) -> set[str]:
        """The keys of `rows` (customers or operators) this batch has nothing to write for:
        the stored row has the same content (BOOKKEEPING_COLUMNS aside) or a newer snapshot,
        every version of them in the batch is stored, and (customers, same content) the
        stored phone numbers are those of `numbers`, where given. They are left out, so not
        locked: read without a lock, which is safe as nothing of them is written. A
        concurrent run changing one meanwhile holds a snapshot at least as new (or the same
        time: a tie, which the last writer wins anyway), and writes its row, versions and
        numbers under its own lock."""
        names = _content_columns(table)
        same: set[str] = set()
        older: set[str] = set()  # the stored snapshot is newer: this one writes no row
        for chunk in _chunks(sorted(rows)):
            for stored in conn.execute(select(table.c[key], *(table.c[n] for n in names))
                                       .where(self._among(table.c[key], chunk))).mappings():
                incoming = rows[stored[key]]
                if all(_comparable(stored[n]) == incoming[n] for n in names):
                    same.add(stored[key])
                elif not _same_or_newer(incoming, {"updated_date_time": _comparable(
                        stored["updated_date_time"])}):
                    older.add(stored[key])
        settled = same | older
        dated: dict[str, set[datetime]] = {}
        for entity, when in versions:
            if entity in settled:
                dated.setdefault(entity, set()).add(when)
        for chunk in _chunks(sorted(dated)):
            for entity, when in conn.execute(
                    select(versions_table.c[key], versions_table.c.updated_date_time)
                    .where(self._among(versions_table.c[key], chunk))):
                dated[entity].discard(_utc(when))
        settled.difference_update(entity for entity, missing in dated.items() if missing)
        if numbers:
            given = sorted(settled.intersection(same).intersection(numbers))
            stored_numbers: dict[str, list[str | None]] = {k: [] for k in given}
            for chunk in _chunks(given):
                for customer_id, number in conn.execute(
                        select(customer_phone_numbers.c.customer_id,
                               customer_phone_numbers.c.phone_number)
                        .where(self._among(customer_phone_numbers.c.customer_id, chunk))
                        .order_by(customer_phone_numbers.c.customer_id,
                                  customer_phone_numbers.c.position)):
                    stored_numbers[customer_id].append(number)
            settled.difference_update(k for k in given if stored_numbers[k] != numbers[k])
        return settled

    def _renumbered(self, conn: Connection, candidates: list[CallRows]) -> set[str]:
        """The customers among `candidates` (snapshots with a phoneNumbers key, just upserted)
        whose phone numbers must be replaced: the snapshot won (the stored row is the same
        snapshot or an older one's, as `_same_or_newer` decides; an unchanged row was not
        rewritten but still counts) and its list differs from the stored one. The customers'
        rows are locked by now, so what is read stays until the transaction ends."""
        incoming = {r.customer["customer_id"]: r for r in candidates}
        stored_at: dict[str, datetime | None] = {}
        stored_numbers: dict[str, list[str | None]] = {}
        joined = customers.outerjoin(
            customer_phone_numbers,
            customer_phone_numbers.c.customer_id == customers.c.customer_id)
        for chunk in _chunks(sorted(incoming)):
            for customer_id, updated, position, number in conn.execute(
                    select(customers.c.customer_id, customers.c.updated_date_time,
                           customer_phone_numbers.c.position,
                           customer_phone_numbers.c.phone_number)
                    .select_from(joined).where(self._among(customers.c.customer_id, chunk))
                    .order_by(customers.c.customer_id, customer_phone_numbers.c.position)):
                stored_at[customer_id] = _comparable(updated)
                numbers = stored_numbers.setdefault(customer_id, [])
                if position is not None:
                    numbers.append(number)
        return {customer_id for customer_id, r in incoming.items()
                if _same_or_newer(r.customer, {"updated_date_time": stored_at[customer_id]})
                and stored_numbers[customer_id] != [p["phone_number"] for p in r.phone_numbers]}

    def _add_versions(self, conn: Connection, table: Table, key: str,
                      versions: dict[tuple[str, datetime], dict[str, Any]]) -> None:
        """Insert the versions not stored yet (a snapshot fetched again adds nothing), then
        set valid_to of every version of those entities to the next version's valid_from,
        so an older snapshot arriving late lands in its place."""
        self._execute(conn, table, key, Upsert.NOTHING, [versions[k] for k in sorted(versions)])
        ids = sorted({entity for entity, _ in versions})
        for chunk in _chunks(ids):
            following = select(
                table.c[key], table.c.updated_date_time,
                func.lead(table.c.updated_date_time).over(
                    partition_by=table.c[key], order_by=table.c.updated_date_time,
                ).label("next_from"),
            ).where(self._among(table.c[key], chunk)).subquery()
            conn.execute(update(table).where(
                table.c[key] == following.c[key],
                table.c.updated_date_time == following.c.updated_date_time,
                table.c.valid_to.is_distinct_from(following.c.next_from),
            ).values(valid_to=following.c.next_from))

    def _loaded(self, conn: Connection, call_ids: list[str]) -> set[str]:
        """Which of `call_ids` have the status `loaded` (their rows are held by this
        transaction: what it reads stays until it ends)."""
        found: set[str] = set()
        for chunk in _chunks(sorted(call_ids)):
            found.update(conn.execute(select(etl_call_status.c.call_id).where(
                self._among(etl_call_status.c.call_id, chunk),
                etl_call_status.c.status == CallStatus.LOADED)).scalars())
        return found

    def _among(self, column: Column, keys: list[str]) -> Any:
        """`column IN keys`. On PostgreSQL `column = ANY(%(keys)s)`, one text[] parameter:
        the same SQL whatever the number of keys, so SQLAlchemy's and psycopg's caches hold it
        (and PostgreSQL prepares it), where an IN list is rendered, converted and parsed anew
        for each length (benchmarks/loader_bench.py: about 9% less client CPU)."""
        if self._postgres:
            return column == any_(bindparam(None, keys, type_=ARRAY(Text)))
        return column.in_(keys)

    def _execute(self, conn: Connection, table: Table, key: str, mode: Upsert,
                 rows: list[dict[str, Any]]) -> set[str] | None:
        """Write `rows` (already sorted by key) to `table` as `mode` says; NEWEST and
        NEWEST_FETCH return the keys actually written. In the data tables a row whose content
        is stored is not written by those two."""
        stmt = self._statements.get((table.name, mode))
        if stmt is None:
            stmt = self._statements[(table.name, mode)] = self._statement(table, key, mode)
        if self._postgres:
            # COPY the rows into a session-local staging table, then one INSERT ... SELECT
            # per table: a round trip per table and batch instead of one per row, and COPY is
            # the cheapest way into PostgreSQL on both ends.
            self._stage(conn, table, rows)
            if table is etl_call_status and mode is Upsert.NEWEST_FETCH:
                conn.execute(stmt)
                # The block leaves in the stage the statuses that gave way to a newer fetch.
                stage = _STAGES[table.name]
                return {r[key] for r in rows} - set(conn.execute(select(stage.c[key])).scalars())
            result = conn.execute(stmt)
        else:
            result = conn.execute(stmt, rows)
        return set(result.scalars()) if mode in (Upsert.NEWEST, Upsert.NEWEST_FETCH) else None

    @staticmethod
    def _ensure_stages(conn: Connection) -> None:
        """Temporary tables live as long as the database session, so they are made once per
        pooled connection, in a transaction of their own (a batch that rolls back must not
        take them along); ON COMMIT DELETE ROWS empties them after each batch."""
        if conn.connection.info.get("etl_stages"):
            return
        with conn.begin():
            for stage in _STAGES.values():
                conn.execute(CreateTable(stage, if_not_exists=True))
        conn.connection.info["etl_stages"] = True

    def _stage(self, conn: Connection, table: Table, rows: list[dict[str, Any]]) -> None:
        stage = _STAGES[table.name]
        names = [c.name for c in stage.columns]
        sql = f"COPY {stage.name} ({', '.join(names)}) FROM STDIN (FORMAT BINARY)"
        try:
            with conn.connection.driver_connection.cursor() as cur, cur.copy(sql) as copy:
                # Binary COPY with the types named: no text escaping on either end.
                copy.set_types(_COPY_TYPES[table.name])
                for row in rows:
                    copy.write_row([row[n] for n in names])
        except psycopg.Error as exc:
            # COPY runs on the driver's connection, below SQLAlchemy: wrap its errors the way
            # SQLAlchemy would (DataError, OperationalError, ...) so they are told apart alike.
            raise DBAPIError.instance(sql, None, exc, psycopg.Error) from exc

    def _statement(self, table: Table, key: str, mode: Upsert):
        if self._postgres and table is etl_call_status and mode is Upsert.NEWEST_FETCH:
            return text(_status_block())
        if self._postgres:
            stage = _STAGES[table.name]
            # JSON (`raw`: the body as received) is staged as text and parsed into jsonb here.
            staged = {c.name: cast(c, JSONB) if isinstance(table.c[c.name].type, JSON) else c
                      for c in stage.columns}
            source = select(*staged.values()).order_by(
                *(stage.c[k.name] for k in table.primary_key.columns))
            if mode is Upsert.NEWEST_FETCH and table is calls:
                # A call whose stored row has the same content is left out: not written, and
                # not even locked, which would write WAL too (a full-page image of its page
                # after each checkpoint). Its status row, written before, is locked (_write).
                # A scalar subquery, looked up by the primary key for each staged row: a
                # NOT EXISTS would be planned as an anti-join hashing the whole table.
                names = _content_columns(table)
                stored = select(tuple_(*(table.c[n] for n in names))).where(
                    table.c[key] == stage.c[key]).scalar_subquery()
                source = source.where(stored.is_distinct_from(
                    tuple_(*(staged[n] for n in names))))
            stmt = pg_insert(table).from_select([c.name for c in table.columns], source)
        else:
            stmt = sqlite_insert(table)
        if mode is Upsert.INSERT:
            return stmt
        if mode is Upsert.NOTHING:
            return stmt.on_conflict_do_nothing(
                index_elements=[c.name for c in table.primary_key.columns])
        # The primary key stays out of SET: PostgreSQL then takes the weaker row lock, which
        # does not conflict with the foreign-key checks of concurrent call inserts.
        changes = {c.name: stmt.excluded[c.name] for c in table.columns if c.name != key}
        if mode is Upsert.UPDATE:
            return stmt.on_conflict_do_update(index_elements=[key], set_=changes)
        if mode is Upsert.NEWEST_FETCH:
            # A stored row is replaced only by a fetch as new or newer (never NULL).
            where = table.c.fetched_at <= stmt.excluded.fetched_at
            if table is etl_call_status:
                # SQLite (PostgreSQL: _status_block). Every fetch writes its status, changed
                # or not; on PostgreSQL a status that stays would be locked all the same.
                return stmt.on_conflict_do_update(
                    index_elements=[key], set_=changes, where=where,
                ).returning(table.c[key])
        else:
            # A stored row is replaced only by a snapshot as new or newer; NULL counts as
            # oldest.
            stored, incoming = table.c.updated_date_time, stmt.excluded.updated_date_time
            where = or_(stored.is_(None), and_(incoming.is_not(None), incoming >= stored))
        # ...and only when its content differs (PostgreSQL: a call with the same content is
        # already left out of `source`). A row that stays is locked all the same, so a later
        # writer still waits for this one; RETURNING names the rows written.
        return stmt.on_conflict_do_update(
            index_elements=[key], set_=changes, where=and_(where, _changed(table, stmt)),
        ).returning(table.c[key])


def _status_block() -> str:
    """PostgreSQL: write the staged statuses, each over a status fetched no later, in key
    order, and delete from the stage those written (a temporary table: no WAL).

    A plain UPDATE of a stored status, not INSERT ... ON CONFLICT DO UPDATE, which first locks
    the row and so writes a WAL record of its own (XLOG_HEAP_LOCK) before the update's: on a
    rerun, one status update per id is most of what is written (benchmarks/rerun_writes.py).
    Row by row, so that the rows are locked in key order, as everywhere in a batch (a joined
    UPDATE would lock them in the order of its plan). A status not there to update is
    inserted; ON CONFLICT catches one a concurrent run inserted (and then waits for it), and
    one that gives way to a newer fetch: that row is locked all the same, which is what
    serialises the writers of one call (_write)."""
    stage = _STAGES[etl_call_status.name].name
    names = [c.name for c in etl_call_status.columns]
    set_from_row = ", ".join(f"{n} = r.{n}" for n in names if n != "call_id")
    set_from_excluded = ", ".join(f"{n} = excluded.{n}" for n in names if n != "call_id")
    return f"""DO $etl$
DECLARE
    r record;
BEGIN
    FOR r IN SELECT ctid AS staged, * FROM {stage} ORDER BY call_id LOOP
        UPDATE etl_call_status SET {set_from_row}
            WHERE call_id = r.call_id AND fetched_at <= r.fetched_at;
        IF NOT FOUND THEN
            INSERT INTO etl_call_status ({", ".join(names)})
                VALUES ({", ".join(f"r.{n}" for n in names)})
                ON CONFLICT (call_id) DO UPDATE SET {set_from_excluded}
                WHERE etl_call_status.fetched_at <= excluded.fetched_at;
        END IF;
        IF FOUND THEN
            DELETE FROM {stage} WHERE ctid = r.staged;
        END IF;
    END LOOP;
END
$etl$"""


def _reraise_interrupt(exc: BaseException) -> None:
    """Ctrl-C in the middle of a COPY leaves the connection unusable, so the rollback that
    follows fails too and its error replaces the KeyboardInterrupt: an interrupted batch must
    stop the run, not be retried as if the connection had dropped."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, KeyboardInterrupt | SystemExit):
            raise seen
        seen = seen.__context__


def _nul_free_text(body: bytes | None) -> str | None:
    """The response body as text when it holds no U+0000, else None. JSON can carry U+0000
    only as the escape \\u0000, so such a UTF-8 body needs no stripping and can be stored as
    `raw` exactly as received. Bodies in another encoding or with a byte-order mark (json.loads
    accepts both) return None and take the slow path."""
    if body is None:
        return None
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if text.startswith("\ufeff") or "\\u0000" in text:
        return None
    return text


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _stage_table(table: Table) -> Table:
    columns = (Column(c.name, Text if isinstance(c.type, JSON) else c.type)
               for c in table.columns)
    return Table(f"etl_stage_{table.name}", _STAGE_METADATA, *columns,
                 prefixes=["TEMPORARY"], postgresql_on_commit="DELETE ROWS")


def _copy_type(sql_type: Any) -> str:
    for kind, name in ((SmallInteger, "int2"), (Integer, "int4"), (DateTime, "timestamptz"),
                       (Text, "text")):
        if isinstance(sql_type, kind):
            return name
    raise TypeError(f"no COPY type for {sql_type!r}")


# Session-local staging tables (PostgreSQL path), one per target table; not part of the
# warehouse schema, so kept out of `schema.metadata` and of the migrations.
_STAGE_METADATA = MetaData()
_STAGES = {t.name: _stage_table(t) for t in (
    scenarios, call_types, customers, customer_phone_numbers, customer_versions, operators,
    operator_versions, calls, etl_call_status)}
_COPY_TYPES = {name: [_copy_type(c.type) for c in stage.columns]
               for name, stage in _STAGES.items()}


def _chunks(keys: list[str]) -> Iterator[list[str]]:
    """`keys` in lists short enough for one IN (...) each."""
    for start in range(0, len(keys), _LOOKUP_CHUNK):
        yield keys[start:start + _LOOKUP_CHUNK]


def _comparable(value: Any) -> Any:
    """A stored value as the transform makes it: SQLite hands back naive UTC datetimes."""
    return _utc(value) if isinstance(value, datetime) else value


def _content_columns(table: Table) -> list[str]:
    """The columns that hold what was fetched: all but the key and the bookkeeping."""
    return [c.name for c in table.columns
            if c.name not in BOOKKEEPING_COLUMNS and not c.primary_key]


def _changed(table: Table, stmt: Any) -> Any:
    """Whether the incoming row (`excluded`) differs from the stored one in content: one row
    comparison, NULLs equal to each other. `raw` compares as jsonb on PostgreSQL (the same
    JSON value in other text is equal, and so are key orders and numbers such as 1 and 1.0:
    the stored text then stays) and as JSON text on SQLite."""
    names = _content_columns(table)
    return tuple_(*(table.c[n] for n in names)).is_distinct_from(
        tuple_(*(stmt.excluded[n] for n in names)))


def _version(snapshot: dict[str, Any], **more: Any) -> dict[str, Any]:
    """A version row: the snapshot's columns, valid from its updated_date_time; valid_to is
    set by `_add_versions`."""
    return {**snapshot, **more, "valid_from": snapshot["updated_date_time"], "valid_to": None}


def _same_or_newer(candidate: dict[str, Any], held: dict[str, Any]) -> bool:
    new, old = candidate["updated_date_time"], held["updated_date_time"]
    return old is None or (new is not None and new >= old)


def _counts(items: list[_Item]) -> dict[str, int]:
    """Outcomes by status, and "warnings": the loaded ones with warnings."""
    counts = {CallStatus.LOADED: 0, NOT_FOUND: 0, FAILED: 0, "warnings": 0}
    for i in items:
        counts[i.status] += 1
        if i.warnings and i.status == CallStatus.LOADED:
            counts["warnings"] += 1
    return counts


def _utc(value: datetime) -> datetime:
    """An instant as aware UTC: SQLite hands back naive UTC datetimes and stores instants as
    text without their offset, which must then be UTC for fetch times to compare."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
