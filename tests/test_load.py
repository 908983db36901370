"""The Loader against a real database: upserts, newest snapshot wins, bad rows isolated
(docs/design.md §4 and §5)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from helpers import (
    DOCUMENTED_CALL_ROW,
    DOCUMENTED_CUSTOMER_ROW,
    DOCUMENTED_OPERATOR_ROW,
    documented_example,
)
from sqlalchemy import Engine, and_, delete, func, select, text, update

from etl import runs
from etl.load import Loader
from etl.outcome import FAILED, NOT_FOUND, OK, Outcome
from etl.schema import (
    DATA_TABLES,
    calls,
    customer_phone_numbers,
    customer_versions,
    customers,
    etl_call_status,
    etl_runs,
    operators,
)
from etl.simulator import payload_for
from etl.testing import inconsistencies
from etl.transform import strip_nul

FETCHED = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)

# The vendor's documented example, the voice id moved under the key its field list spells
# (operatorVocieId): the loader's quirks are those of the example and that misspelling.
DOCUMENTED = documented_example()
DOCUMENTED["operator"]["operatorVocieId"] = DOCUMENTED["operator"].pop("operatorVoiceId")

# A textual comparison of these two would pick the wrong one: 18:30+09:00 is 09:30Z.
OLDER = "2026-01-01T18:30:00+09:00"
NEWER = "2026-01-01T10:00:00Z"


# -- helpers -----------------------------------------------------------------------------------


def loader(engine: Engine, run_id: str | None = None) -> Loader:
    run_id = run_id or runs.new_run_id()
    runs.RunRecorder(engine, run_id).start(requested=0, skipped=0)
    return Loader(engine, run_id)


def ok(payload: Any, call_id: str | None = None) -> Outcome:
    call_id = call_id or payload["callId"]
    return Outcome(call_id, OK, payload=payload, http_status=200, attempts=1, fetched_at=FETCHED)


def call(call_id: str, customer: dict | None = None, operator: dict | None = None,
         **fields: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {"callId": call_id, "callType": 1,
                               "callDateTime": "2026-02-01T10:00:00Z", **fields}
    if customer is not None:
        payload["customer"] = customer
    if operator is not None:
        payload["operator"] = operator
    return payload


def customer(updated: str | None, name: str, phones: list[str] | None = None,
             customer_id: str = "cus-1") -> dict[str, Any]:
    snap: dict[str, Any] = {"customerId": customer_id, "familyName": name,
                            "phoneNumbers": phones if phones is not None else []}
    if updated is not None:
        snap["updatedDateTime"] = updated
    return snap


def operator(updated: str | None, name: str, operator_id: str = "op-1") -> dict[str, Any]:
    snap: dict[str, Any] = {"operatorId": operator_id, "name": name, "operatorVoiceId": 3}
    if updated is not None:
        snap["updatedDateTime"] = updated
    return snap


def utc(value: Any) -> Any:
    """SQLite hands back naive UTC datetimes; PostgreSQL aware ones."""
    if isinstance(value, datetime) and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def one(engine: Engine, table, **where: Any) -> dict[str, Any] | None:
    query = select(table).where(*(table.c[k] == v for k, v in where.items()))
    with engine.connect() as conn:
        rows = conn.execute(query).mappings().all()
    assert len(rows) <= 1
    return {k: utc(v) for k, v in rows[0].items()} if rows else None


def phones(engine: Engine, customer_id: str = "cus-1") -> list[str]:
    with engine.connect() as conn:
        return list(conn.execute(
            select(customer_phone_numbers.c.phone_number)
            .where(customer_phone_numbers.c.customer_id == customer_id)
            .order_by(customer_phone_numbers.c.position)
        ).scalars())


def statuses(engine: Engine) -> dict[str, dict[str, Any]]:
    with engine.connect() as conn:
        return {r["call_id"]: dict(r) for r in conn.execute(select(etl_call_status)).mappings()}


def dump(engine: Engine) -> dict[str, list[dict[str, Any]]]:
    """Every data table, rows sorted, without the per-run bookkeeping columns."""
    out = {}
    with engine.connect() as conn:
        for table in DATA_TABLES:
            rows = conn.execute(select(table).order_by(*table.primary_key.columns)).mappings()
            out[table.name] = [{k: utc(v) for k, v in r.items()
                                if k not in ("fetched_at", "run_id")} for r in rows]
    return out


def assert_run_counters_match_statuses(engine: Engine, run_id: str) -> None:
    with engine.connect() as conn:
        run = conn.execute(select(etl_runs).where(etl_runs.c.run_id == run_id)).mappings().one()
        by_status = dict(conn.execute(
            select(etl_call_status.c.status, func.count())
            .where(etl_call_status.c.run_id == run_id)
            .group_by(etl_call_status.c.status)
        ).all())
    assert {k: run[k] for k in runs.COUNTERS} == {
        "loaded": by_status.get("loaded", 0),
        "not_found": by_status.get("not_found", 0),
        "failed": by_status.get("failed", 0),
    }


def ordinary_batch(n: int, start: int = 1) -> list[Outcome]:
    """`n` servable simulator payloads (ids that the simulator does not answer with 404)."""
    out: list[Outcome] = []
    number = start
    while len(out) < n:
        call_id = f"call-{number:06d}"
        payload = payload_for(call_id)
        if payload is not None:
            out.append(ok(payload))
        number += 1
    return out


# -- values and types --------------------------------------------------------------------------


def test_documented_payload_is_stored_with_exact_values(engine: Engine) -> None:
    load = loader(engine)
    assert load.load([ok(DOCUMENTED)]) == {"loaded": 1, "not_found": 0, "failed": 0,
                                          "warnings": 0}

    row = one(engine, calls, call_id="call-doc-1")
    assert row is not None
    assert {k: v for k, v in row.items() if k != "raw"} == {
        **DOCUMENTED_CALL_ROW,
        "fetched_at": FETCHED,
        "run_id": load.run_id,
    }
    assert row["raw"] == DOCUMENTED
    assert one(engine, customers, customer_id="cus-doc") == DOCUMENTED_CUSTOMER_ROW
    assert phones(engine, "cus-doc") == ["09011112222", "0312345678"]
    assert one(engine, operators, operator_id="op-doc") == DOCUMENTED_OPERATOR_ROW
    status = statuses(engine)["call-doc-1"]
    assert (status["status"], status["http_status"], status["error"], status["attempts"],
            status["run_id"]) == ("loaded", 200, None, 1, load.run_id)


def test_numbers_are_stored_as_integers_and_times_as_instants(engine: Engine) -> None:
    loader(engine).load([ok(DOCUMENTED)])
    with engine.connect() as conn:
        if engine.dialect.name == "postgresql":
            types = conn.execute(text(
                "SELECT pg_typeof(c.call_type)::text, pg_typeof(c.talk_time)::text, "
                "pg_typeof(c.call_date_time)::text, pg_typeof(c.raw)::text, "
                "pg_typeof(o.operator_voice_id)::text, pg_typeof(cu.updated_date_time)::text "
                "FROM calls c JOIN operators o USING (operator_id) "
                "JOIN customers cu USING (customer_id)"
            )).one()
            assert tuple(types) == ("smallint", "integer", "timestamp with time zone", "jsonb",
                                    "integer", "timestamp with time zone")
        else:
            types = conn.execute(text(
                "SELECT typeof(c.call_type), typeof(c.talk_time), typeof(o.operator_voice_id) "
                "FROM calls c JOIN operators o USING (operator_id)"
            )).one()
            assert tuple(types) == ("integer", "integer", "integer")


def test_absent_optional_fields_are_null(engine: Engine) -> None:
    loader(engine).load([ok({"callId": "call-bare", "connectResult": "2"})])
    row = one(engine, calls, call_id="call-bare")
    assert row is not None
    assert row["connect_result"] == "2"
    for column in ("call_type", "related_call_id", "connected_date_time", "talk_time",
                   "check_point", "customer_id", "operator_id", "scenario_id"):
        assert row[column] is None, column


# -- idempotence -------------------------------------------------------------------------------


def test_loading_the_same_batch_again_leaves_the_same_rows(engine: Engine) -> None:
    batch = [ok(DOCUMENTED), *ordinary_batch(30)]
    first_loader = loader(engine)
    first_loader.load(batch)
    first = dump(engine)
    second_loader = loader(engine)
    assert second_loader.load(batch) == {"loaded": 31, "not_found": 0, "failed": 0,
                                        "warnings": 0}

    assert dump(engine) == first
    assert len(first["calls"]) == 31
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(etl_call_status)).scalar() == 31
        # Nothing changed: the rows still name the run that brought their content, the
        # statuses the run that fetched it last (tests/test_rerun_writes.py).
        assert set(conn.execute(select(calls.c.run_id)).scalars()) == {first_loader.run_id}
        assert set(conn.execute(select(etl_call_status.c.run_id)).scalars()) == {
            second_loader.run_id}


# -- newest snapshot wins ----------------------------------------------------------------------


def _load_in(engine: Engine, scope: str, batches: list[list[Outcome]]) -> None:
    """Load outcomes as one batch, as successive batches of one run, or in successive runs."""
    if scope == "batch":
        loader(engine).load([o for b in batches for o in b])
    elif scope == "batches":
        load = loader(engine)
        for b in batches:
            load.load(b)
    else:
        for b in batches:
            loader(engine).load(b)


SCOPES = ["batch", "batches", "runs"]


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("newer_first", [False, True], ids=["older-then-newer",
                                                            "newer-then-older"])
def test_newest_customer_snapshot_wins_whatever_the_arrival_order(
        engine: Engine, scope: str, newer_first: bool) -> None:
    older = ok(call("call-a", customer(OLDER, "old", ["111", "112", "113"])))
    newer = ok(call("call-b", customer(NEWER, "new", ["999"])))
    order = [[newer], [older]] if newer_first else [[older], [newer]]
    _load_in(engine, scope, order)

    row = one(engine, customers, customer_id="cus-1")
    assert row is not None
    assert (row["family_name"], row["updated_date_time"]) == (
        "new", datetime(2026, 1, 1, 10, 0, tzinfo=UTC))
    assert phones(engine) == ["999"]
    # Both calls are stored and point at the one customer.
    assert one(engine, calls, call_id="call-a")["customer_id"] == "cus-1"
    assert one(engine, calls, call_id="call-b")["customer_id"] == "cus-1"


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("newer_first", [False, True], ids=["older-then-newer",
                                                            "newer-then-older"])
def test_newest_operator_snapshot_wins_whatever_the_arrival_order(
        engine: Engine, scope: str, newer_first: bool) -> None:
    older = ok(call("call-a", operator=operator(OLDER, "old")))
    newer = ok(call("call-b", operator=operator(NEWER, "new")))
    _load_in(engine, scope, [[newer], [older]] if newer_first else [[older], [newer]])

    row = one(engine, operators, operator_id="op-1")
    assert row is not None
    assert (row["name"], row["updated_date_time"]) == (
        "new", datetime(2026, 1, 1, 10, 0, tzinfo=UTC))


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("dated_first", [False, True], ids=["undated-first", "dated-first"])
def test_snapshot_without_updated_time_never_overwrites_a_dated_one(
        engine: Engine, scope: str, dated_first: bool) -> None:
    dated = ok(call("call-a", customer(NEWER, "dated", ["1"]), operator(NEWER, "dated")))
    undated = ok(call("call-b", customer(None, "undated", ["2", "3"]), operator(None, "undated")))
    _load_in(engine, scope, [[dated], [undated]] if dated_first else [[undated], [dated]])

    assert one(engine, customers, customer_id="cus-1")["family_name"] == "dated"
    assert one(engine, operators, operator_id="op-1")["name"] == "dated"
    assert phones(engine) == ["1"]


def test_same_updated_time_replaces_the_stored_snapshot(engine: Engine) -> None:
    loader(engine).load([ok(call("call-a", customer(NEWER, "first", ["1"])))])
    loader(engine).load([ok(call("call-b", customer(NEWER, "second", ["2"])))])
    assert one(engine, customers, customer_id="cus-1")["family_name"] == "second"
    assert phones(engine) == ["2"]


def test_losing_snapshot_leaves_phone_numbers_untouched(engine: Engine) -> None:
    loader(engine).load([ok(call("call-a", customer(NEWER, "new", ["1", "2"])))])
    loader(engine).load([ok(call("call-b", customer(OLDER, "old", [])))])
    loader(engine).load([ok(call("call-c", customer(OLDER, "old", ["7", "8", "9"])))])
    assert phones(engine) == ["1", "2"]


def test_winning_snapshot_with_empty_phone_list_clears_the_numbers(engine: Engine) -> None:
    loader(engine).load([ok(call("call-a", customer(OLDER, "old", ["1", "2", "3"])))])
    assert phones(engine) == ["1", "2", "3"]
    loader(engine).load([ok(call("call-b", customer(NEWER, "new", [])))])
    assert phones(engine) == []


def test_phone_numbers_keep_their_array_positions(engine: Engine) -> None:
    numbers = ["0", "1", "2", "3", "4"]
    loader(engine).load([ok(call("call-a", customer(NEWER, "n", numbers[::-1])))])
    with engine.connect() as conn:
        rows = conn.execute(select(customer_phone_numbers.c.position,
                                   customer_phone_numbers.c.phone_number)
                            .order_by(customer_phone_numbers.c.position)).all()
    assert [tuple(r) for r in rows] == [(0, "4"), (1, "3"), (2, "2"), (3, "1"), (4, "0")]


def test_newest_snapshot_wins_among_many_in_one_shuffled_batch(engine: Engine) -> None:
    # Ten snapshots of three customers, shuffled: each customer ends up at its newest one.
    batch = []
    newest: dict[str, int] = {}
    for n, version in enumerate((3, 9, 1, 7, 0, 8, 2, 5, 4, 6)):
        cid = f"cus-{n % 3}"
        newest[cid] = max(newest.get(cid, -1), version)
        batch.append(ok(call(f"call-{n}", customer(
            f"2026-01-01T00:{version:02d}:00Z", f"v{version}", [f"{version}"] * (version % 4),
            customer_id=cid))))
    loader(engine).load(batch)
    assert newest == {"cus-0": 7, "cus-1": 9, "cus-2": 8}
    for cid, version in newest.items():
        assert one(engine, customers, customer_id=cid)["family_name"] == f"v{version}"
        assert phones(engine, cid) == [f"{version}"] * (version % 4)


# -- not found ---------------------------------------------------------------------------------


def test_not_found_after_an_earlier_load_keeps_the_call(engine: Engine) -> None:
    loader(engine).load([ok(DOCUMENTED)])
    stored = one(engine, calls, call_id="call-doc-1")

    second = loader(engine)
    counts = second.load([Outcome("call-doc-1", NOT_FOUND, http_status=404, attempts=1)])

    assert counts == {"loaded": 0, "not_found": 1, "failed": 0, "warnings": 0}
    assert one(engine, calls, call_id="call-doc-1") == stored
    status = statuses(engine)["call-doc-1"]
    assert (status["status"], status["http_status"], status["run_id"]) == (
        "not_found", 404, second.run_id)
    assert_run_counters_match_statuses(engine, second.run_id)


def test_fetch_failure_is_recorded_with_its_reason(engine: Engine) -> None:
    load = loader(engine)
    load.load([Outcome("broken-1", FAILED, http_status=500, attempts=5,
                       error="HTTP 500 (gave up after 5 attempts)"), *ordinary_batch(3)])
    status = statuses(engine)["broken-1"]
    assert (status["status"], status["http_status"], status["attempts"], status["error"]) == (
        "failed", 500, 5, "HTTP 500 (gave up after 5 attempts)")
    assert one(engine, calls, call_id="broken-1") is None
    assert_run_counters_match_statuses(engine, load.run_id)


# -- bad records are isolated ------------------------------------------------------------------


def _assert_isolated(engine: Engine, run_id: str, bad_id: str, good: list[Outcome],
                     counts: dict[str, int], reason: str) -> None:
    assert counts == {"loaded": len(good), "not_found": 0, "failed": 1,
                      "warnings": 0}
    got = statuses(engine)
    assert got[bad_id]["status"] == "failed"
    assert reason in got[bad_id]["error"]
    assert one(engine, calls, call_id=bad_id) is None
    for o in good:
        assert got[o.call_id]["status"] == "loaded"
        assert one(engine, calls, call_id=o.call_id) is not None
    assert_run_counters_match_statuses(engine, run_id)


def test_row_the_database_rejects_fails_alone(pg_engine: Engine) -> None:
    # json.loads accepts NaN, the transformer leaves unknown keys alone, and jsonb refuses
    # NaN: a record only PostgreSQL can reject.
    bad = call("call-nan", customer(NEWER, "n", ["1"]), extra=float("nan"))
    good = ordinary_batch(12)
    load = loader(pg_engine)
    counts = load.load([*good[:7], ok(bad), *good[7:]])
    _assert_isolated(pg_engine, load.run_id, "call-nan", good, counts,
                     "database rejected the record")


def test_record_rejected_by_the_transformer_fails_alone(engine: Engine) -> None:
    bad = payload_for("bigint-1")
    assert bad is not None
    good = ordinary_batch(10)
    load = loader(engine)
    counts = load.load([*good[:4], ok(bad), *good[4:]])
    _assert_isolated(engine, load.run_id, "bigint-1", good, counts, "talkTime")


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        ([], "not a JSON object"),
        ("call-x", "not a JSON object"),
        ({"callId": "other-call-x", "note": "n"}, "is not the requested id"),
        ({"note": "no id"}, "no callId"),
        ({"callId": "call-x", "talkTime": "not-a-number"}, "talkTime"),
        ({"callId": "call-x", "customer": "cus-1"}, "customer"),
    ],
    ids=["array", "string", "wrong-call-id", "no-call-id", "poison-talk-time", "customer-text"],
)
def test_payload_errors_are_recorded_failed_with_the_reason(
        engine: Engine, payload: Any, reason: str) -> None:
    good = ordinary_batch(3)
    load = loader(engine)
    counts = load.load([good[0], ok(payload, call_id="call-x"), *good[1:]])
    _assert_isolated(engine, load.run_id, "call-x", good, counts, reason)
    assert statuses(engine)["call-x"]["error"].startswith("bad payload: ")


def test_timestamp_out_of_range_in_utc_fails_alone(engine: Engine) -> None:
    # datetime.min with a +09:00 offset is before datetime.min in UTC.
    bad = call("call-min", callDateTime="0001-01-01T00:00:00+09:00")
    good = ordinary_batch(4)
    load = loader(engine)
    counts = load.load([*good[:2], ok(bad), *good[2:]])
    _assert_isolated(engine, load.run_id, "call-min", good, counts, "callDateTime")


def test_unpaired_surrogate_in_text_fails_alone(engine: Engine) -> None:
    bad = json.loads('{"callId": "call-sur", "note": "a\\ud800b"}')
    good = ordinary_batch(4)
    load = loader(engine)
    counts = load.load([*good[:2], ok(bad), *good[2:]])
    _assert_isolated(engine, load.run_id, "call-sur", good, counts,
                     "text the database cannot encode: surrogates not allowed")
    assert statuses(engine)["call-sur"]["error"] == (
        "database rejected the record: text the database cannot encode: surrogates not allowed")


# -- the response body as raw -----------------------------------------------------------------




@pytest.mark.parametrize(
    ("encoding", "note"),
    [
        ("utf-8", "plain"),
        ("utf-8", "a\x00b"),
        ("utf-8-sig", "plain"),
        ("utf-16", "a\x00b"),
    ],
    ids=["utf-8", "utf-8-with-nul", "utf-8-bom", "utf-16-with-nul"],
)
def test_call_with_its_response_body_is_stored_like_the_parsed_payload(
        pg_engine: Engine, encoding: str, note: str) -> None:
    payload = call("call-body", customer(NEWER, "佐藤", ["1"]), note=note)
    body = json.dumps(payload, ensure_ascii=False).encode(encoding)
    outcome = ok(json.loads(body))  # what the extractor does with the bytes it received
    outcome.body = body
    good = ordinary_batch(3)
    counts = loader(pg_engine).load([good[0], outcome, *good[1:]])

    assert counts == {"loaded": 4, "not_found": 0, "failed": 0, "warnings": 0}
    row = one(pg_engine, calls, call_id="call-body")
    assert row["note"] == note.replace("\x00", "")
    assert row["raw"] == strip_nul(payload)


# -- U+0000 ------------------------------------------------------------------------------------


def test_nul_characters_are_stripped_from_text_and_raw(engine: Engine) -> None:
    payload = call(
        "call-nul",
        customer(NEWER, "佐\x00藤", ["090\x001234"]),
        operator(NEWER, "\x00op"),
        note="折り返し\x00希望",
        checkPoint="\x00",
        extra={"ke\x00y": ["v\x00al"]},
    )
    counts = loader(engine).load([ok(payload)])
    assert counts["loaded"] == 1

    row = one(engine, calls, call_id="call-nul")
    assert (row["note"], row["check_point"]) == ("折り返し希望", "")
    assert one(engine, customers, customer_id="cus-1")["family_name"] == "佐藤"
    assert one(engine, operators, operator_id="op-1")["name"] == "op"
    assert phones(engine) == ["0901234"]
    assert row["raw"]["note"] == "折り返し希望"
    assert row["raw"]["extra"] == {"key": ["val"]}
    assert "\\u0000" not in json.dumps(row["raw"])
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            note = conn.execute(text("SELECT raw->>'note' FROM calls")).scalar_one()
        assert note == "折り返し希望"


# -- the warehouse's invariants (etl.testing.inconsistencies) ---------------------------------

MIDDLE = "2026-01-01T09:45:00Z"  # between OLDER (09:30Z) and NEWER (10:00Z)


def _two_runs(engine: Engine) -> tuple[str, str]:
    """A finished run (partial: a 404 and a failure) whose customer and operator snapshots
    arrive newest first, then a running one bringing a version between the two: a warehouse
    every invariant holds in. The two run ids."""
    first = runs.new_run_id()
    recorder = runs.RunRecorder(engine, first)
    recorder.start(requested=4, skipped=0)
    Loader(engine, first).load([
        ok(call("call-b", customer(NEWER, "new", ["999", "998"]), operator(NEWER, "new"))),
        ok(call("call-a", customer(OLDER, "old", ["111"]), operator(OLDER, "old"))),
        Outcome("call-nf", NOT_FOUND, http_status=404, attempts=1, fetched_at=FETCHED),
        Outcome("call-x", FAILED, http_status=500, attempts=3, error="HTTP 500",
                fetched_at=FETCHED)])
    recorder.finish("partial")
    second = loader(engine)
    second.load([ok(call("call-c", customer(MIDDLE, "mid", ["555"]),
                         operator(MIDDLE, "mid")))])
    return first, second.run_id


def _broken(engine: Engine) -> dict[str, int]:
    return {k: n for k, n in inconsistencies(engine.url).items() if n}


def test_a_sound_warehouse_breaks_no_invariant(engine: Engine) -> None:
    _two_runs(engine)
    found = inconsistencies(engine.url)
    assert len(found) >= 20  # every check ran, on both backends
    assert {k: n for k, n in found.items() if n} == {}
    with engine.connect() as conn:  # and the history the checks read is there
        assert conn.execute(select(func.count()).select_from(customer_versions)
                            ).scalar_one() == 3


def _copy(engine: Engine, table, where, **changes: Any) -> None:
    """Insert a copy of the row of `table` matching `where`, with `changes`: a planted row."""
    with engine.begin() as conn:
        row = dict(conn.execute(select(table).where(where)).mappings().one())
        conn.execute(table.insert().values({**row, **changes}))


def _plant(engine: Engine, fault: str, first: str, second: str) -> None:
    newer = datetime(2026, 1, 1, 10, 0, tzinfo=UTC)
    middle = datetime(2026, 1, 1, 9, 45, tzinfo=UTC)
    newest_version = and_(customer_versions.c.customer_id == "cus-1",
                          customer_versions.c.updated_date_time == newer)
    if fault == "overlapping-version":
        # A newer version added as a double load would, leaving its predecessor open.
        later = newer + timedelta(hours=1)
        _copy(engine, customer_versions, newest_version, updated_date_time=later,
              valid_from=later, valid_to=None)
        return
    if fault == "second-version-same-moment":
        _copy(engine, customer_versions, newest_version,
              updated_date_time=newer + timedelta(seconds=1))
        return
    if fault == "orphan-call-row":
        _copy(engine, calls, calls.c.call_id == "call-a", call_id="call-orphan")
        return
    statements = {
        "lost-call-row": delete(calls).where(calls.c.call_id == "call-b"),
        "lost-version": delete(customer_versions).where(
            customer_versions.c.updated_date_time == middle),
        "phone-position-lost": delete(customer_phone_numbers).where(
            customer_phone_numbers.c.position == 0),
        "batch-counted-twice": update(etl_runs).where(etl_runs.c.run_id == first)
        .values(loaded=etl_runs.c.loaded * 2),
        "status-of-another-run": update(etl_call_status)
        .where(etl_call_status.c.call_id == "call-a").values(run_id=second),
        "call-of-no-run": update(calls).where(calls.c.call_id == "call-c")
        .values(run_id="gone"),
    }
    with engine.begin() as conn:
        assert conn.execute(statements[fault]).rowcount == 1


@pytest.mark.parametrize(("fault", "counted"), [
    ("overlapping-version", {
        "customer_versions whose valid_to is not the next version's valid_from": 1,
        "customers not at their newest version": 1}),
    ("second-version-same-moment", {
        "customer_versions not valid from their updated_date_time": 1,
        "customer_versions beyond one valid from the same moment": 1,
        "customer_versions whose valid_to is not the next version's valid_from": 1,
        "customers not at their newest version": 1}),
    ("orphan-call-row", {"call rows without a status": 1,
                         "call rows beyond their run's loaded count": 1}),
    ("lost-call-row", {"loaded statuses without a call row": 1}),
    ("lost-version", {
        "customer_versions whose valid_to is not the next version's valid_from": 1,
        "calls naming a customer version not stored": 1}),
    ("phone-position-lost", {"customers whose phone positions are not 0..n-1": 1}),
    ("batch-counted-twice", {"completed runs whose counts do not add up": 1}),
    ("status-of-another-run", {"statuses beyond their run's count": 1}),
    ("call-of-no-run", {"call rows naming no stored run": 1}),
])
def test_inconsistencies_count_a_planted_fault(engine: Engine, fault: str,
                                               counted: dict[str, int]) -> None:
    first, second = _two_runs(engine)
    _plant(engine, fault, first, second)
    assert _broken(engine) == counted
