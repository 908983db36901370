"""A rerun that finds nothing changed writes no data row (issue #12, item 3): a row whose
content (every column but the fetch bookkeeping, `fetched_at` and `run_id`) is what is stored
keeps its row version, a customer's phone numbers are not deleted and inserted again, and the
history gets no version nor a valid_to rewrite. `etl_call_status` still records every fetch.

PostgreSQL's `xmin` names the transaction that wrote a row version: it stays the same exactly
when the row was not rewritten (a row lock alone does not change it). Real databases, no
mocks."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from helpers import make_settings
from sqlalchemy import Engine, select, text
from sqlalchemy.engine import URL
from test_fetch_order import (
    conninfo,
    counts,
    expected_call,
    load_behind_a_held_batch,
    payload,
    start_run,
    status_of,
    stored_call,
)
from test_load import DOCUMENTED, call, customer, loader, operator, ordinary_batch, phones

from etl import db
from etl.load import Loader
from etl.outcome import OK, Outcome
from etl.schema import DATA_TABLES, calls, customer_versions, etl_call_status, operator_versions
from etl.simulator import Simulator
from etl.sync import run_sync

FIRST_AT = datetime(2026, 11, 3, 9, 0, tzinfo=UTC)
RERUN_AT = FIRST_AT + timedelta(hours=1)
LATER_AT = RERUN_AT + timedelta(hours=1)
NEWER = "2026-01-01T10:00:00Z"
NEWEST = "2026-02-01T10:00:00Z"

# -- helpers -----------------------------------------------------------------------------------


def answer(call_object: dict[str, Any], fetched_at: datetime, body: bool = True) -> Outcome:
    """An outcome as the extractor hands it over: the parsed payload and, with `body`, the
    bytes it came in (stored as `raw` as received)."""
    data = json.dumps(call_object, ensure_ascii=False).encode() if body else None
    return Outcome(call_object["callId"], OK, payload=call_object, http_status=200, attempts=1,
                   fetched_at=fetched_at, body=data)


def specials() -> list[dict[str, Any]]:
    """Payloads beside the simulator's: the documented example, an undated customer and
    operator (updated_date_time NULL), a customer without a phoneNumbers key, a call type the
    doc does not list, a customer in two versions (so one valid_to is set)."""
    no_phones_key = customer(NEWER, "nokey", customer_id="cus-nokey")
    del no_phones_key["phoneNumbers"]
    return [
        DOCUMENTED,
        call("call-undated", customer(None, "undated", ["5", "6"], customer_id="cus-undated"),
             operator(None, "undated", operator_id="op-undated")),
        call("call-nokey", no_phones_key, callType=7),
        call("call-v1", customer(NEWER, "old", ["1"], customer_id="cus-v"),
             operator(NEWER, "old", operator_id="op-v")),
        call("call-v2", customer(NEWEST, "new", ["1", "2"], customer_id="cus-v"),
             operator(NEWEST, "new", operator_id="op-v")),
    ]


def payloads(n: int = 150) -> list[dict[str, Any]]:
    return [*specials(), *(o.payload for o in ordinary_batch(n))]


def load(engine: Engine, answers: list[Outcome], batch_size: int = 50) -> str:
    """Load `answers` in batches as one run; its run id."""
    run = loader(engine)
    for start in range(0, len(answers), batch_size):
        counts = run.load(answers[start:start + batch_size])
        assert counts["failed"] == 0, counts
    return run.run_id


def row_versions(engine: Engine) -> dict[str, dict[tuple[Any, ...], str]]:
    """Every data table's rows by primary key, each with the xmin of its row version."""
    out = {}
    with engine.connect() as conn:
        for table in DATA_TABLES:
            keys = ", ".join(c.name for c in table.primary_key.columns)
            rows = conn.execute(text(f"SELECT {keys}, xmin::text FROM {table.name}"))
            out[table.name] = {tuple(r[:-1]): r[-1] for r in rows}
    return out


def rewritten(before: dict[str, dict[tuple[Any, ...], str]],
              after: dict[str, dict[tuple[Any, ...], str]]) -> dict[str, set[tuple[Any, ...]]]:
    """Per table, the keys whose row is new, gone or rewritten (only tables with any)."""
    out = {}
    for name in before:
        old, new = before[name], after[name]
        keys = {k for k in old.keys() | new.keys() if old.get(k) != new.get(k)}
        if keys:
            out[name] = keys
    return out


def status_rows(engine: Engine) -> dict[str, dict[str, Any]]:
    with engine.connect() as conn:
        return {r["call_id"]: dict(r) for r in conn.execute(select(etl_call_status)).mappings()}


def call_rows(engine: Engine) -> dict[str, dict[str, Any]]:
    with engine.connect() as conn:
        return {r["call_id"]: {k: (v.replace(tzinfo=UTC) if isinstance(v, datetime)
                                   and v.tzinfo is None else v) for k, v in r.items()}
                for r in conn.execute(select(calls)).mappings()}


# -- a rerun of the same answers ----------------------------------------------------------------


def test_a_rerun_of_the_same_answers_rewrites_no_data_row(pg_engine: Engine) -> None:
    answers = payloads()
    first = load(pg_engine, [answer(p, FIRST_AT) for p in answers])
    before = row_versions(pg_engine)
    assert len(before["customer_versions"]) > len(before["customers"])  # history was made
    assert before["customer_phone_numbers"] and before["scenarios"]

    # Another order and batch size, and `raw` from the parsed payload instead of the body as
    # received (other JSON text, the same JSON value).
    rerun = load(pg_engine, [answer(p, RERUN_AT, body=False) for p in reversed(answers)],
                 batch_size=7)

    assert rewritten(before, row_versions(pg_engine)) == {}
    # The rows still name the fetch that brought their content; the statuses the rerun.
    stored = call_rows(pg_engine)
    assert {(r["run_id"], r["fetched_at"]) for r in stored.values()} == {(first, FIRST_AT)}
    statuses = status_rows(pg_engine)
    assert {(s["status"], s["run_id"]) for s in statuses.values()} == {("loaded", rerun)}
    assert len(statuses) == len(stored) == len(answers)


def test_a_rerun_by_etl_sync_rewrites_no_data_row(sim: Simulator, pg_url: URL) -> None:
    # The whole path: the extractor's bodies, its batches, the run bookkeeping.
    call_ids = [f"call-{n:06d}" for n in range(1, 121)]
    first = run_sync(make_settings(sim, pg_url), call_ids)
    engine = db.make_engine(pg_url)
    try:
        before = row_versions(engine)
        assert len(before["calls"]) == first.loaded > 100

        second = run_sync(make_settings(sim, pg_url, batch_size=13), list(reversed(call_ids)))

        assert (second.loaded, second.not_found) == (first.loaded, first.not_found)
        assert rewritten(before, row_versions(engine)) == {}
        assert {s["run_id"] for s in status_rows(engine).values()} == {second.run_id}
    finally:
        engine.dispose()


# -- a rerun where something changed ------------------------------------------------------------


def test_a_changed_answer_rewrites_only_its_own_rows(pg_engine: Engine) -> None:
    answers = payloads(60)
    load(pg_engine, [answer(p, FIRST_AT) for p in answers])
    before = row_versions(pg_engine)

    changed = {p["callId"]: json.loads(json.dumps(p)) for p in answers[:5]}
    changed["call-doc-1"]["note"] = "another note"  # the call alone
    # The same snapshot time and attributes, other phone numbers: the numbers alone.
    changed["call-undated"]["customer"]["phoneNumbers"] = ["5", "7", "8"]
    # A call type that changed back to a listed one: the call alone.
    changed["call-nokey"]["callType"] = 1
    # A newer operator snapshot: the operator, a version, the valid_to of the one before.
    changed["call-v2"]["operator"] = operator("2026-03-01T00:00:00Z", "newer",
                                              operator_id="op-v")
    again = [answer(changed.get(p["callId"], p), RERUN_AT) for p in answers]
    # A new call, in the batch of call-v2 (whose customer snapshot is the stored one), with
    # an older snapshot of that customer: a version of its own, the customer row stays.
    late = call("call-late", customer("2025-12-01T00:00:00Z", "oldest", ["0"],
                                      customer_id="cus-v"))
    again.insert(5, answer(late, RERUN_AT))
    rerun = load(pg_engine, again)

    assert rewritten(before, row_versions(pg_engine)) == {
        "calls": {("call-doc-1",), ("call-undated",), ("call-nokey",), ("call-v2",),
                  ("call-late",)},
        "customer_versions": {("cus-v", datetime(2025, 12, 1, tzinfo=UTC))},
        "customer_phone_numbers": {("cus-undated", 0), ("cus-undated", 1),
                                   ("cus-undated", 2)},
        "operators": {("op-v",)},
        "operator_versions": {("op-v", datetime(2026, 2, 1, 10, 0, tzinfo=UTC)),
                              ("op-v", datetime(2026, 3, 1, 0, 0, tzinfo=UTC))},
    }
    assert phones(pg_engine, "cus-undated") == ["5", "7", "8"]
    assert phones(pg_engine, "cus-v") == ["1", "2"]
    stored = call_rows(pg_engine)
    assert stored["call-doc-1"]["note"] == "another note"
    assert (stored["call-doc-1"]["run_id"], stored["call-doc-1"]["fetched_at"]) == (rerun,
                                                                                  RERUN_AT)
    assert stored["call-nokey"]["call_type"] == 1
    with pg_engine.connect() as conn:
        history = conn.execute(select(operator_versions.c.name, operator_versions.c.valid_to)
                               .where(operator_versions.c.operator_id == "op-v")
                               .order_by(operator_versions.c.valid_from)).all()
    assert [tuple(r) for r in history] == [
        ("old", datetime(2026, 2, 1, 10, 0, tzinfo=UTC)),
        ("new", datetime(2026, 3, 1, 0, 0, tzinfo=UTC)),
        ("newer", None)]
    with pg_engine.connect() as conn:
        history = conn.execute(select(customer_versions.c.family_name,
                                      customer_versions.c.valid_to)
                               .where(customer_versions.c.customer_id == "cus-v")
                               .order_by(customer_versions.c.valid_from)).all()
    assert [tuple(r) for r in history] == [
        ("oldest", datetime(2026, 1, 1, 10, 0, tzinfo=UTC)),
        ("old", datetime(2026, 2, 1, 10, 0, tzinfo=UTC)),
        ("new", None)]


def test_a_rerun_writes_the_status_and_a_change_the_row(engine: Engine) -> None:
    # Both backends: what fetched_at and run_id of a row and of its status then say.
    body = call("call-x", customer(NEWER, "n", ["1"]), operator(NEWER, "o"), note="one")
    first = load(engine, [answer(body, FIRST_AT)])
    written = status_rows(engine)["call-x"]["updated_at"]

    rerun = load(engine, [answer(body, RERUN_AT)])
    row, status = call_rows(engine)["call-x"], status_rows(engine)["call-x"]
    # The row: when its content last changed. The status: the last fetch.
    assert (row["run_id"], row["fetched_at"]) == (first, FIRST_AT)
    assert (status["status"], status["run_id"]) == ("loaded", rerun)
    assert status["updated_at"] > written

    # A fetch older than the stored content is still older: it writes no status either.
    load(engine, [answer(body, FIRST_AT - timedelta(minutes=1))])
    assert status_rows(engine)["call-x"]["run_id"] == rerun

    # A changed answer rewrites the row, and its history gets the new customer version.
    changed = {**body, "note": "two", "customer": customer(NEWEST, "m", ["2"])}
    third = load(engine, [answer(changed, LATER_AT)])
    row = call_rows(engine)["call-x"]
    assert (row["note"], row["run_id"], row["fetched_at"]) == ("two", third, LATER_AT)
    assert status_rows(engine)["call-x"]["run_id"] == third
    assert phones(engine) == ["2"]
    with engine.connect() as conn:
        assert len(conn.execute(select(customer_versions)).all()) == 2


# -- the statuses: one update per id, in place ---------------------------------------------


def status_pages(engine: Engine) -> dict[str, tuple[int, str]]:
    """Each status's heap page (from its ctid) and the fetch it tells."""
    with engine.connect() as conn:
        return {call_id: (int(ctid.strip("()").split(",")[0]), run_id)
                for call_id, ctid, run_id in conn.execute(text(
                    "SELECT call_id, ctid::text, run_id FROM etl_call_status"))}


def test_a_rerun_updates_each_status_on_its_page_and_no_index(pg_engine: Engine) -> None:
    # What makes the status updates of a rerun HOT (heap-only: no index entry, a small WAL
    # record): no index of etl_call_status holds a column a rerun changes, and its pages keep
    # room for a new version of every row they hold (fillfactor). HOT is then exactly an
    # update whose new version stays on the page of the old one, which ctid shows.
    with pg_engine.connect() as conn:
        indexed = set(conn.execute(text(
            "SELECT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid "
            "AND a.attnum = ANY(i.indkey) WHERE i.indrelid = 'etl_call_status'::regclass")
            ).scalars())
        options = conn.execute(text("SELECT reloptions FROM pg_class WHERE oid = "
                                    "'etl_call_status'::regclass")).scalar_one()
    assert indexed == {"call_id", "status"}
    assert options == ["fillfactor=50"]

    answers = payloads(300)
    first = load(pg_engine, [answer(p, FIRST_AT) for p in answers])
    before = status_pages(pg_engine)
    assert len({page for page, _ in before.values()}) > 5  # several pages, each filled

    rerun = load(pg_engine, [answer(p, RERUN_AT) for p in answers])
    after = status_pages(pg_engine)
    assert {run for _, run in before.values()} == {first}
    assert {run for _, run in after.values()} == {rerun}
    assert {k: page for k, (page, _) in after.items()} == {
        k: page for k, (page, _) in before.items()}


# -- an unchanged call is not locked: its status gives way to a newer fetch all the same -------


def test_a_rerun_whose_status_waits_for_a_newer_fetch_gives_way(pg_engine: Engine,
                                                               pg_url: URL) -> None:
    # The rerun's status write waits for a newer fetch (other content) whose batch holds the
    # call's status row; once that commits, the rerun finds a newer fetch's status stored and
    # gives way, and writes no row either: it would have found other content than its own.
    first_run, rerun, newer_run = (start_run(pg_engine) for _ in range(3))
    Loader(pg_engine, first_run).load([answer(payload(1), FIRST_AT)])
    # The newer fetch's batch writes its call and status, then waits at its counters.
    newer_counts, rerun_counts = load_behind_a_held_batch(
        pg_engine, pg_url, (newer_run, [answer(payload(2), LATER_AT)]),
        (rerun, [answer(payload(1), RERUN_AT)]))

    assert stored_call(pg_engine) == expected_call(payload(2), LATER_AT, newer_run)
    status = status_of(pg_engine)
    assert (status["status"], status["run_id"]) == ("loaded", newer_run)
    assert (newer_counts, rerun_counts) == (counts(loaded=1), counts(loaded=1))


def test_a_rerun_locks_no_data_row(pg_engine: Engine, pg_url: URL) -> None:
    # Not even a row lock, which writes WAL too (and a full-page image of its page after a
    # checkpoint): with every data row locked elsewhere, the rerun still goes through. One
    # call per batch, so that some batches hold a customer's or operator's older snapshot
    # only (call-v1): it writes nothing either.
    answers = payloads(40)
    load(pg_engine, [answer(p, FIRST_AT) for p in answers])
    rerun = loader(pg_engine)
    before = row_versions(pg_engine)

    def one_by_one() -> int:
        return sum(rerun.load([answer(p, RERUN_AT)])["loaded"] for p in answers)

    with (ThreadPoolExecutor(1) as pool,
          psycopg.connect(conninfo(pg_url)) as lock):
        for table in DATA_TABLES:
            lock.execute(f"SELECT 1 FROM {table.name} FOR UPDATE")
        try:
            loaded = pool.submit(one_by_one).result(timeout=30)
        finally:
            lock.rollback()
    assert loaded == len(answers)
    assert rewritten(before, row_versions(pg_engine)) == {}
    assert {s["run_id"] for s in status_rows(pg_engine).values()} == {rerun.run_id}
