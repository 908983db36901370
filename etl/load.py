"""Loading fetched calls into the warehouse: one transaction per batch, upserts in a fixed key
order, newest snapshot wins, the newest fetch of a call wins, and a bad row isolated instead of
failing its batch (SPEC section 5).

Dialect differences (PostgreSQL vs SQLite upsert) live in `_execute`/`_statement` and nowhere
else.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
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
    cast,
    delete,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import JSONB
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
from .outcome import FAILED, NOT_FOUND, OK, Outcome
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

LOADED = "loaded"
# Waits before retrying a batch whose connection dropped or that hit a transient error
# (deadlock, serialization failure, server restart); then the run stops with exit 3.
RECONNECT_DELAYS_S = (0.5, 2.0, 5.0)
# Call ids per IN (...) list when looking up stored fetch times.
_LOOKUP_CHUNK = 5000


@dataclass(slots=True)
class _Item:
    """One call id on its way into a transaction: its rows (if any) and its status row.
    `fetched_at` is when the answer arrived, or for an outcome that does not say (404s and
    failures), when the batch reached the loader: no earlier than the answer. `superseded` is
    set by the transaction that found a newer fetch of the call stored, or in the batch."""

    call_id: str
    status: str
    rows: CallRows | None
    http_status: int | None
    error: str | None
    attempts: int
    fetched_at: datetime
    superseded: bool = False
    warnings: str | None = None  # what falls outside the API doc, "; "-joined


class _Overtaken(Exception):
    """A newer fetch of a call whose 404 or failure this batch was recording committed while
    the batch wrote its statuses: the batch must be written again."""


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
        return _Item(o.call_id, LOADED, rows, o.http_status, None, o.attempts, fetched_at,
                     warnings="; ".join(rows.warnings) or None)

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
                    while True:
                        try:
                            with conn.begin():
                                self._write(conn, items)
                            break
                        except _Overtaken:
                            # Rolled back; written again, the newer fetch is now seen. Each
                            # round needs another newer fetch to commit meanwhile.
                            log.debug("a newer fetch committed meanwhile; writing the batch "
                                      "again")
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
            if r.customer is not None and r.customer["updated_date_time"] is not None:
                customer_versions_.setdefault(
                    (r.customer["customer_id"], r.customer["updated_date_time"]),
                    self._customer_version(r))
            if r.operator is not None and r.operator["updated_date_time"] is not None:
                operator_versions_.setdefault(
                    (r.operator["operator_id"], r.operator["updated_date_time"]),
                    _version(r.operator))
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
            self._execute(conn, scenarios, "scenario_id", "nothing",
                          [{"scenario_id": s} for s in sorted(scenario_ids)])
        unknown_types = call_types_.difference(code for code, *_ in CALL_TYPES)
        if unknown_types:
            # The foreign key holds for codes the API doc does not list (loaded, with a
            # warning): they get a row of their own.
            self._execute(conn, call_types, "code", "nothing", [
                {"code": code, "name": "unknown", "description": "Not in the API doc; first "
                 "seen in a fetched call."} for code in sorted(unknown_types)])
        if customer_rows:
            ordered = [customer_rows[k] for k in sorted(customer_rows)]
            won = self._execute(conn, customers, "customer_id", "newest",
                                [r.customer for r in ordered])
            # A customer's phone numbers go with its winning snapshot, and only then; a
            # snapshot without the phoneNumbers key says nothing about them.
            renumbered = {r.customer["customer_id"] for r in ordered
                          if r.phones_given and r.customer["customer_id"] in won}
            if renumbered:
                conn.execute(delete(customer_phone_numbers).where(
                    customer_phone_numbers.c.customer_id.in_(sorted(renumbered))))
                phones = [p for r in ordered if r.customer["customer_id"] in renumbered
                          for p in r.phone_numbers]
                if phones:
                    self._execute(conn, customer_phone_numbers, "customer_id", "insert", phones)
        if customer_versions_:
            # After `customers`, whose row lock serialises writers of one customer: this
            # transaction's valid_to sees every version a concurrent run committed.
            self._add_versions(conn, customer_versions, "customer_id", customer_versions_)
        if operator_rows:
            self._execute(conn, operators, "operator_id", "newest",
                          [operator_rows[k] for k in sorted(operator_rows)])
        if operator_versions_:
            self._add_versions(conn, operator_versions, "operator_id", operator_versions_)
        if call_rows:
            # Two runs fetching one call may commit in the opposite order of their fetches:
            # the stored row is replaced only by a fetch at least as new.
            written = self._execute(conn, calls, "call_id", "newest_fetch",
                                    [call_rows[k] for k in sorted(call_rows)]) or set()
            for call_id in call_rows.keys() - written:
                newest[call_id].superseded = True

        # A call's status follows the same rule: it tells the outcome of the newest fetch and
        # names the run that wrote the row (`etl failures`, --retry-failed and --skip-loaded
        # must not act on a 404 or failure older than a stored load). A loaded status goes
        # with its row: a row not written writes no status. A 404 or failure writes none over
        # a call fetched after it (its time is a bound, see _Item); a load that wins its row
        # does replace a 404 or failure, whose exact time is unknown. That lookup takes no
        # lock, so it is made again once the status rows are held: if a newer fetch
        # committed in between, the batch is written again (_Overtaken).
        pending = [i for i in newest.values() if i.rows is None]
        for call_id in self._fetched_after(conn, pending):
            newest[call_id].superseded = True
        pending = [i for i in pending if not i.superseded]
        now = datetime.now(UTC)
        statuses = {i.call_id: {"call_id": i.call_id, "status": i.status,
                                "http_status": i.http_status,
                                # A reason may quote what the server sent (a value, a phrase).
                                "error": printable(i.error, 500) if i.error else None,
                                "attempts": i.attempts, "warnings": i.warnings,
                                "run_id": self.run_id, "updated_at": now}
                    for i in newest.values() if not i.superseded}
        if statuses:
            self._execute(conn, etl_call_status, "call_id", "update",
                          [statuses[k] for k in sorted(statuses)])
        if self._fetched_after(conn, pending):
            raise _Overtaken
        superseded = sum(i.superseded for i in items)
        if superseded:
            log.debug("%d outcome(s) older than the stored fetch of their call: row and status "
                      "left as they were", superseded)
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

    def _add_versions(self, conn: Connection, table: Table, key: str,
                      versions: dict[tuple[str, datetime], dict[str, Any]]) -> None:
        """Insert the versions not stored yet (a snapshot fetched again adds nothing), then
        set valid_to of every version of those entities to the next version's valid_from,
        so an older snapshot arriving late lands in its place."""
        self._execute(conn, table, key, "nothing", [versions[k] for k in sorted(versions)])
        ids = sorted({entity for entity, _ in versions})
        for start in range(0, len(ids), _LOOKUP_CHUNK):
            chunk = ids[start:start + _LOOKUP_CHUNK]
            following = select(
                table.c[key], table.c.updated_date_time,
                func.lead(table.c.updated_date_time).over(
                    partition_by=table.c[key], order_by=table.c.updated_date_time,
                ).label("next_from"),
            ).where(table.c[key].in_(chunk)).subquery()
            conn.execute(update(table).where(
                table.c[key] == following.c[key],
                table.c.updated_date_time == following.c.updated_date_time,
                table.c.valid_to.is_distinct_from(following.c.next_from),
            ).values(valid_to=following.c.next_from))

    def _fetched_after(self, conn: Connection, items: list[_Item]) -> set[str]:
        """The ids of `items` whose stored call was fetched after the item."""
        when = {i.call_id: i.fetched_at for i in items}
        ids = sorted(when)
        found: set[str] = set()
        for start in range(0, len(ids), _LOOKUP_CHUNK):
            rows = conn.execute(select(calls.c.call_id, calls.c.fetched_at).where(
                calls.c.call_id.in_(ids[start:start + _LOOKUP_CHUNK])))
            found.update(call_id for call_id, fetched_at in rows
                         if _utc(fetched_at) > when[call_id])
        return found

    def _execute(self, conn: Connection, table: Table, key: str, mode: str,
                 rows: list[dict[str, Any]]) -> set[str] | None:
        """Write `rows` (already sorted by key) to `table`. Modes: "insert"; "nothing" (keep
        the stored row); "update" (the new row wins); "newest" (the newer snapshot by
        `updated_date_time` wins) and "newest_fetch" (the newer fetch by `fetched_at` wins),
        which return the keys actually written."""
        stmt = self._statements.get((table.name, mode))
        if stmt is None:
            stmt = self._statements[(table.name, mode)] = self._statement(table, key, mode)
        if self._postgres:
            # COPY the rows into a session-local staging table, then one INSERT ... SELECT
            # per table: a round trip per table and batch instead of one per row, and COPY is
            # the cheapest way into PostgreSQL on both ends.
            self._stage(conn, table, rows)
            result = conn.execute(stmt)
        else:
            result = conn.execute(stmt, rows)
        return set(result.scalars()) if mode in ("newest", "newest_fetch") else None

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

    def _statement(self, table: Table, key: str, mode: str):
        if self._postgres:
            stage = _STAGES[table.name]
            # JSON (`raw`: the body as received) is staged as text and parsed into jsonb here.
            source = select(*(cast(c, JSONB) if isinstance(table.c[c.name].type, JSON) else c
                              for c in stage.columns)
                            ).order_by(*(stage.c[k.name] for k in table.primary_key.columns))
            stmt = pg_insert(table).from_select([c.name for c in table.columns], source)
        else:
            stmt = sqlite_insert(table)
        if mode == "insert":
            return stmt
        if mode == "nothing":
            return stmt.on_conflict_do_nothing(
                index_elements=[c.name for c in table.primary_key.columns])
        # The primary key stays out of SET: PostgreSQL then takes the weaker row lock, which
        # does not conflict with the foreign-key checks of concurrent call inserts.
        changes = {c.name: stmt.excluded[c.name] for c in table.columns if c.name != key}
        if mode == "update":
            return stmt.on_conflict_do_update(index_elements=[key], set_=changes)
        if mode == "newest_fetch":
            # A stored row is replaced only by a fetch as new or newer (never NULL). The row
            # is locked even when it stays, so a later writer still waits for this one.
            where = table.c.fetched_at <= stmt.excluded.fetched_at
        else:
            # A stored row is replaced only by a snapshot as new or newer; NULL counts as
            # oldest.
            stored, incoming = table.c.updated_date_time, stmt.excluded.updated_date_time
            where = or_(stored.is_(None), and_(incoming.is_not(None), incoming >= stored))
        return stmt.on_conflict_do_update(
            index_elements=[key], set_=changes, where=where,
        ).returning(table.c[key])


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


def _version(snapshot: dict[str, Any], **more: Any) -> dict[str, Any]:
    """A version row: the snapshot's columns, valid from its updated_date_time; valid_to is
    set by `_add_versions`."""
    return {**snapshot, **more, "valid_from": snapshot["updated_date_time"], "valid_to": None}


def _same_or_newer(candidate: dict[str, Any], held: dict[str, Any]) -> bool:
    new, old = candidate["updated_date_time"], held["updated_date_time"]
    return old is None or (new is not None and new >= old)


def _counts(items: list[_Item]) -> dict[str, int]:
    """Outcomes by status, and "warnings": the loaded ones with warnings."""
    counts = {LOADED: 0, NOT_FOUND: 0, FAILED: 0, "warnings": 0}
    for i in items:
        counts[i.status] += 1
        if i.warnings and i.status == LOADED:
            counts["warnings"] += 1
    return counts


def _utc(value: datetime) -> datetime:
    """An instant as aware UTC: SQLite hands back naive UTC datetimes and stores instants as
    text without their offset, which must then be UTC for fetch times to compare."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
