"""Values the API doc rules out are loaded when they can be, and counted: a warning per call
(in `etl_call_status.warnings`, the run's `warnings` counter, the summary, `etl failures
--warnings`), and unknown fields reported once per run by name (schema drift)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
from helpers import answer, etl_env, ids_file, make_settings, run_etl
from sqlalchemy import Engine, select
from test_load import FETCHED, call, customer, ok

from etl import runs
from etl.load import Loader
from etl.outcome import Outcome
from etl.schema import customer_phone_numbers, customers, etl_call_status, etl_runs
from etl.sync import run_sync
from etl.transform import transform

OLDER, NEWER = "2025-01-01T00:00:00Z", "2025-06-01T00:00:00Z"


def load(engine: Engine, *outcomes: Outcome) -> tuple[str, dict[str, int]]:
    recorder = runs.RunRecorder(engine, runs.new_run_id())
    recorder.start(requested=len(outcomes), skipped=0)
    counts = Loader(engine, recorder.run_id).load(list(outcomes))
    recorder.finish(runs.RunStatus.SUCCEEDED)
    return recorder.run_id, counts


def status(engine: Engine, call_id: str) -> dict[str, Any]:
    with engine.connect() as conn:
        return dict(conn.execute(select(etl_call_status).where(
            etl_call_status.c.call_id == call_id)).mappings().one())


def warnings_of(payload: dict[str, Any]) -> list[str]:
    return transform(payload, call_id=payload["callId"], fetched_at=FETCHED,
                     run_id="-").warnings


@pytest.mark.parametrize(("fields", "warning"), [
    ({"callType": 7}, "callType 7 is none of 0 (incoming), 1 (outgoing), 2 (user call)"),
    ({"callType": "-1"}, "callType -1 is none of 0 (incoming), 1 (outgoing), 2 (user call)"),
    ({"talkTime": -5}, "talkTime -5 is negative"),
    ({"customer": {"familyName": "x"}},
     "customer has no customerId: its attributes were not stored (see raw)"),
    ({"operator": {"name": "x"}},
     "operator has no operatorId: its attributes were not stored (see raw)"),
    ({"customer": {"customerId": "c", "phoneNumbers": [12345678901234567]}},
     "customer.phoneNumbers[0] is 12345678901234567, a JSON int, not a string (leading zeros "
     "and digits may be lost)"),
    ({"customer": {"customerId": "c", "phoneNumbers": ["1"] * 6}},
     "customer.phoneNumbers has 6 entries, more than 5"),
])
def test_each_value_the_api_doc_rules_out_is_one_warning(fields, warning) -> None:
    payload = {"callId": "c1", "callType": 1, **fields}
    assert warnings_of(payload) == [warning]


def test_a_documented_payload_has_no_warning_and_no_unknown_field() -> None:
    rows = transform(call("c1", customer(NEWER, "x", ["0312345678"])), call_id="c1",
                     fetched_at=FETCHED, run_id="-")
    assert (rows.warnings, rows.unknown_fields) == ([], [])


def test_unknown_fields_are_named_by_their_path() -> None:
    payload = {"callId": "c1", "recording": "x", "customer": {"customerId": "c", "email": "e"},
               "operator": {"operatorId": "o", "team": 3}, "scenario": {"scenarioId": "s",
                                                                       "version": 2}}
    rows = transform(payload, call_id="c1", fetched_at=FETCHED, run_id="-")
    assert rows.unknown_fields == ["recording", "customer.email", "operator.team",
                                   "scenario.version"]
    assert rows.warnings == []


def test_a_call_with_warnings_is_loaded_and_its_reasons_stored(engine: Engine) -> None:
    run_id, counts = load(engine, ok(call("c-odd", talkTime=-5, callType=7)),
                          ok(call("c-fine")))
    assert counts["loaded"] == 2
    assert counts["warnings"] == 1
    odd = status(engine, "c-odd")
    assert odd["status"] == "loaded"
    assert odd["warnings"] == ("callType 7 is none of 0 (incoming), 1 (outgoing), 2 (user "
                               "call); talkTime -5 is negative")
    assert status(engine, "c-fine")["warnings"] is None
    with engine.connect() as conn:
        assert conn.execute(select(etl_runs.c.warnings).where(
            etl_runs.c.run_id == run_id)).scalar_one() == 1


def test_a_customer_without_customer_id_is_a_warning_not_a_silent_drop(engine: Engine) -> None:
    load(engine, ok(call("c-anon", customer={"familyName": "名無し"})))
    assert "customer has no customerId" in status(engine, "c-anon")["warnings"]
    with engine.connect() as conn:
        assert conn.execute(select(customers)).all() == []


def test_a_snapshot_without_phone_numbers_leaves_the_stored_numbers(engine: Engine) -> None:
    load(engine, ok(call("c-1", customer(OLDER, "old", ["1", "2"]))))
    newer = customer(NEWER, "new")
    del newer["phoneNumbers"]
    load(engine, ok(call("c-2", newer)))
    with engine.connect() as conn:
        assert conn.execute(select(customers.c.family_name)).scalar_one() == "new"
        assert conn.execute(select(customer_phone_numbers.c.phone_number).order_by(
            customer_phone_numbers.c.position)).scalars().all() == ["1", "2"]
    # An empty list still says "no numbers now".
    load(engine, ok(call("c-3", customer("2025-09-01T00:00:00Z", "newest", []))))
    with engine.connect() as conn:
        assert conn.execute(select(customer_phone_numbers)).all() == []


def test_a_run_counts_warnings_and_reports_unknown_fields_once(
        route_server, sim, sqlite_url, caplog) -> None:
    def route(h, call_id: str) -> None:
        body = {"callId": call_id, "callType": 9 if call_id.endswith("odd") else 1,
                "sentiment": "calm", "customer": {"customerId": "c1", "email": "x@y"}}
        answer(h, 200, json.dumps(body).encode())

    server = route_server(route)
    ids = ["a-odd", "b", "c-odd", "d"]
    with caplog.at_level(logging.WARNING, logger="etl"):
        summary = run_sync(make_settings(sim, sqlite_url, base_url=server.url), ids)
    assert summary.warnings == 2
    assert summary.unknown_fields == ["customer.email", "sentiment"]
    drift = [r.getMessage() for r in caplog.records if "does not know" in r.getMessage()]
    assert drift == ["the API sent fields this version does not know (kept in calls.raw; has "
                     "the vendor added them?): customer.email, sentiment"]


def test_etl_failures_warnings_lists_the_calls_and_their_reasons(
        route_server, sim, sqlite_url, tmp_path: Path) -> None:
    server = route_server(lambda h, call_id: answer(h, 200, json.dumps(
        {"callId": call_id, "talkTime": -1 if call_id == "neg" else 3}).encode()))
    env = etl_env(sim, sqlite_url, COMMUBO_BASE_URL=server.url)
    proc = run_etl("sync", "--ids-file", str(ids_file(tmp_path, ["neg", "pos"])), "--json",
                   env=env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["warnings"] == 1
    shown = run_etl("failures", "--warnings", "--json", env=env)
    assert shown.returncode == 0, shown.stderr
    assert [(r["call_id"], r["status"], r["warnings"]) for r in json.loads(shown.stdout)] == [
        ("neg", "loaded", "talkTime -1 is negative")]
    plain = run_etl("failures", env=env)
    assert plain.stdout.strip() == "no failed ids"
