"""The transformer (etl/transform.py): one API payload in, the rows of the data tables out.

Pure functions, so these tests need neither a server nor a database.
"""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from helpers import (
    DOCUMENTED_CALL_ROW,
    DOCUMENTED_CUSTOMER_ROW,
    DOCUMENTED_OPERATOR_ROW,
    documented_example,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from etl.errors import PayloadError
from etl.transform import CallRows, transform

CALL_ID = documented_example()["callId"]
FETCHED_AT = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
RUN_ID = "run-test"


def run(payload: Any, call_id: str = CALL_ID) -> CallRows:
    return transform(payload, call_id=call_id, fetched_at=FETCHED_AT, run_id=RUN_ID)


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def assert_utc(value: datetime | None) -> None:
    assert value is not None
    assert value.utcoffset() == timedelta(0)


# -- the documented example, column by column -------------------------------------------------


def test_documented_example_call_row_has_every_column_exactly():
    payload = documented_example()
    rows = run(payload)

    assert rows.call == {
        **DOCUMENTED_CALL_ROW,
        "raw": documented_example(),
        "fetched_at": FETCHED_AT,
        "run_id": RUN_ID,
    }
    assert type(rows.call["call_type"]) is int
    assert type(rows.call["talk_time"]) is int
    assert_utc(rows.call["call_date_time"])
    assert_utc(rows.call["connected_date_time"])


def test_documented_example_customer_row_and_phone_numbers():
    rows = run(documented_example())

    assert rows.customer == DOCUMENTED_CUSTOMER_ROW
    assert_utc(rows.customer["created_date_time"])
    assert_utc(rows.customer["updated_date_time"])
    assert rows.phone_numbers == [
        {"customer_id": "cus-doc", "position": 0, "phone_number": "09011112222"},
        {"customer_id": "cus-doc", "position": 1, "phone_number": "0312345678"},
    ]


def test_documented_example_operator_and_scenario_rows():
    rows = run(documented_example())

    assert rows.operator == DOCUMENTED_OPERATOR_ROW
    assert type(rows.operator["operator_voice_id"]) is int
    assert rows.scenario == {"scenario_id": "scn-01"}


def test_transform_does_not_mutate_the_payload():
    payload = documented_example()
    payload["note"] = "a\x00b"
    before = copy.deepcopy(payload)
    run(payload)
    assert payload == before


# -- the documented quirks ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "sent", "column", "stored"),
    [
        ("callType", "0", "call_type", 0),
        ("callType", 0, "call_type", 0),
        ("callType", "2", "call_type", 2),
        ("callType", 1, "call_type", 1),
        ("talkTime", "123", "talk_time", 123),
        ("talkTime", 123, "talk_time", 123),
        ("talkTime", " 45 ", "talk_time", 45),
        ("talkTime", "0", "talk_time", 0),
        ("talkTime", 2**31 - 1, "talk_time", 2**31 - 1),
    ],
)
def test_numbers_sent_as_strings_or_ints_are_stored_as_ints(field, sent, column, stored):
    payload = documented_example()
    payload[field] = sent
    value = run(payload).call[column]
    assert value == stored
    assert type(value) is int


@pytest.mark.parametrize("key", ["operatorVoiceId", "operatorVocieId"])
@pytest.mark.parametrize("sent", ["7", 7])
def test_either_spelling_of_the_voice_id_key_is_accepted(key, sent):
    payload = documented_example()
    del payload["operator"]["operatorVoiceId"]
    payload["operator"][key] = sent
    voice = run(payload).operator["operator_voice_id"]
    assert voice == 7
    assert type(voice) is int


@pytest.mark.parametrize(
    ("sent", "instant"),
    [
        ("2018-09-01T13:01:23+09:00", utc(2018, 9, 1, 4, 1, 23)),
        ("2018-09-01T04:01:23Z", utc(2018, 9, 1, 4, 1, 23)),
        ("2018-09-01T04:01:23+00:00", utc(2018, 9, 1, 4, 1, 23)),
        ("2018-09-01T00:01:23-04:00", utc(2018, 9, 1, 4, 1, 23)),
        ("2018-09-01T08:01:23+09:00", utc(2018, 8, 31, 23, 1, 23)),  # the day before in UTC
        ("2018-09-01T13:01:23.250+09:00", datetime(2018, 9, 1, 4, 1, 23, 250000, tzinfo=UTC)),
    ],
)
def test_timestamps_with_any_offset_are_stored_as_the_utc_instant(sent, instant):
    payload = documented_example()
    payload["callDateTime"] = sent
    payload["customer"]["updatedDateTime"] = sent
    payload["operator"]["createdDateTime"] = sent
    rows = run(payload)
    for value in (rows.call["call_date_time"], rows.customer["updated_date_time"],
                  rows.operator["created_date_time"]):
        assert value == instant
        assert_utc(value)


@pytest.mark.parametrize(
    ("field", "column"),
    [
        ("relatedCallId", "related_call_id"),
        ("phoneNumber", "phone_number"),
        ("callDateTime", "call_date_time"),
        ("connectedDateTime", "connected_date_time"),
        ("talkTime", "talk_time"),
        ("connectResult", "connect_result"),
        ("checkPoint", "check_point"),
        ("note", "note"),
        ("callType", "call_type"),
    ],
)
@pytest.mark.parametrize("how", ["absent", "null"])
def test_absent_or_null_optional_call_field_is_none(field, column, how):
    payload = documented_example()
    if how == "absent":
        del payload[field]
    else:
        payload[field] = None
    call = run(payload).call
    assert call[column] is None
    assert call["call_id"] == CALL_ID


def test_not_connected_call_without_customer_operator_or_scenario_has_nulls():
    payload = {
        "callId": CALL_ID,
        "callType": "1",
        "phoneNumber": "0312345678",
        "callDateTime": "2018-09-01T13:01:23+09:00",
        "connectResult": "2",
    }
    rows = run(payload)
    assert rows.customer is None
    assert rows.operator is None
    assert rows.scenario is None
    assert rows.phone_numbers == []
    for column in ("related_call_id", "connected_date_time", "talk_time", "check_point", "note",
                   "customer_id", "operator_id", "scenario_id"):
        assert rows.call[column] is None, column
    assert rows.call["call_type"] == 1
    assert rows.call["raw"] == payload


@pytest.mark.parametrize("key", ["customer", "operator", "scenario"])
def test_null_embedded_object_means_no_row_and_null_foreign_key(key):
    payload = documented_example()
    payload[key] = None
    rows = run(payload)
    assert getattr(rows, key) is None
    assert rows.call[f"{key}_id"] is None
    if key == "customer":
        assert rows.phone_numbers == []


@pytest.mark.parametrize(
    ("where", "key", "column"),
    [
        ("customer", "familyName", "family_name"),
        ("customer", "middleName", "middle_name"),
        ("customer", "updatedDateTime", "updated_date_time"),
        ("customer", "note", "note"),
        ("operator", "operatorVoiceId", "operator_voice_id"),
        ("operator", "shortName", "short_name"),
        ("operator", "deptShortNameKana", "dept_short_name_kana"),
    ],
)
def test_absent_optional_field_of_embedded_object_is_none(where, key, column):
    payload = documented_example()
    del payload[where][key]
    row = getattr(run(payload), where)
    assert row is not None
    assert row[column] is None


@pytest.mark.parametrize("numbers", [[], None])
def test_customer_without_phone_numbers_has_no_phone_rows(numbers):
    payload = documented_example()
    if numbers is None:
        del payload["customer"]["phoneNumbers"]
    else:
        payload["customer"]["phoneNumbers"] = numbers
    rows = run(payload)
    assert rows.customer is not None
    assert rows.phone_numbers == []


def test_nul_is_stripped_from_every_string_including_raw_and_nested_objects():
    payload = documented_example()
    payload["note"] = "折り返し\x00希望"
    payload["phoneNumber"] = "\x000312345678"
    payload["customer"]["familyName"] = "山\x00田"
    payload["customer"]["phoneNumbers"] = ["090\x001111", "03\x00"]
    payload["operator"]["name"] = "佐藤\x00 花子"
    payload["scenario"]["scenarioId"] = "scn\x00-01"
    payload["extra"] = {"deep": ["x\x00y", {"k\x00ey": "v\x00"}]}

    rows = run(payload)

    assert rows.call["note"] == "折り返し希望"
    assert rows.call["phone_number"] == "0312345678"
    assert rows.customer["family_name"] == "山田"
    assert [p["phone_number"] for p in rows.phone_numbers] == ["0901111", "03"]
    assert rows.operator["name"] == "佐藤 花子"
    assert rows.scenario == {"scenario_id": "scn-01"}
    assert rows.call["scenario_id"] == "scn-01"
    raw = rows.call["raw"]
    assert raw["note"] == "折り返し希望"
    assert raw["customer"]["familyName"] == "山田"
    assert raw["customer"]["phoneNumbers"] == ["0901111", "03"]
    assert raw["extra"] == {"deep": ["xy", {"key": "v"}]}
    assert not _strings_with_nul(rows)


def test_raw_keeps_the_payload_as_received_apart_from_nul():
    payload = documented_example()
    payload["unknownVendorField"] = {"nested": [1, "two", None, True]}
    raw = run(payload).call["raw"]
    assert raw == payload
    assert raw["callType"] == "0"  # as received, not converted


# -- payloads that cannot become rows -----------------------------------------------------------


def _with(**changes: Any) -> dict[str, Any]:
    payload = documented_example()
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        target = payload
        for p in parents:
            target = target[p]
        target[last] = value
    return payload


def _without(key: str) -> dict[str, Any]:
    payload = documented_example()
    del payload[key]
    return payload


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        pytest.param("not an object", "not a JSON object", id="string"),
        pytest.param(None, "not a JSON object", id="null"),
        pytest.param(42, "not a JSON object", id="number"),
        pytest.param([], "not a JSON object", id="empty-array"),
        pytest.param([documented_example()], "not a JSON object", id="array-of-call"),
        pytest.param(_without("callId"), "callId", id="missing-callId"),
        pytest.param(_with(callId="other-" + CALL_ID), "callId", id="other-callId"),
        pytest.param(_with(callType="abc"), "callType", id="callType-abc"),
        pytest.param(_with(callType=True), "callType", id="callType-bool"),
        pytest.param(_with(callType=2**15), "callType", id="callType-out-of-smallint"),
        pytest.param(_with(talkTime=2**31), "talkTime", id="talkTime-above-int32"),
        pytest.param(_with(talkTime=-(2**31) - 1), "talkTime", id="talkTime-below-int32"),
        pytest.param(_with(talkTime=str(2**40)), "talkTime", id="talkTime-string-above-int32"),
        pytest.param(_with(talkTime="not-a-number"), "talkTime", id="talkTime-poison"),
        pytest.param(_with(talkTime=1.5), "talkTime", id="talkTime-fraction"),
        pytest.param(_with(callDateTime="yesterday"), "callDateTime", id="bad-timestamp"),
        pytest.param(_with(callDateTime=20180901), "callDateTime", id="timestamp-number"),
        pytest.param(_with(note={"a": 1}), "note", id="note-object"),
        pytest.param(_with(customer=[{"customerId": "c"}]), "customer", id="customer-list"),
        pytest.param(_with(customer="cus-1"), "customer", id="customer-string"),
        pytest.param(_with(operator=["op"]), "operator", id="operator-list"),
        pytest.param(_with(scenario="scn-01"), "scenario", id="scenario-string"),
        pytest.param(_with(customer__phoneNumbers="0312345678"), "phoneNumbers",
                     id="phoneNumbers-string"),
        pytest.param(_with(customer__phoneNumbers={"0": "03"}), "phoneNumbers",
                     id="phoneNumbers-object"),
        pytest.param(_with(customer__phoneNumbers=[["03"]]), "phoneNumbers",
                     id="phoneNumbers-nested-list"),
        pytest.param(_with(operator__operatorVoiceId="seven"), "operatorVoiceId",
                     id="voice-id-text"),
        pytest.param(_with(customer__customerId={"id": 1}), "customerId", id="customer-id-object"),
    ],
)
def test_payload_that_cannot_become_rows_raises_payload_error(payload, message):
    with pytest.raises(PayloadError, match=message):
        run(payload)


def test_payload_error_is_one_short_line():
    payload = _with(note={"long": "x" * 10_000})
    with pytest.raises(PayloadError) as info:
        run(payload)
    text = str(info.value)
    assert "\n" not in text
    assert len(text) < 200


@pytest.mark.parametrize("stamp", ["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00"])
def test_timestamp_outside_the_utc_range_raises_payload_error(stamp):
    with pytest.raises(PayloadError, match="callDateTime"):
        run(_with(callDateTime=stamp))


# -- properties ---------------------------------------------------------------------------------

texts = st.text(max_size=8) | st.text(alphabet="ab0\x00 ", max_size=6)
timestamps = st.builds(
    lambda dt, offset: dt.isoformat() + offset,
    st.datetimes(min_value=datetime(1900, 1, 1), max_value=datetime(2100, 1, 1)),
    st.sampled_from(["", "Z", "+09:00", "-05:30", "+00:00"]),
)
small_ints = st.integers(min_value=0, max_value=2)
int32s = st.integers(min_value=-(2**31), max_value=2**31 - 1)
scalars = (st.none() | st.booleans() | st.integers() | st.floats() | texts | timestamps
           | st.integers(min_value=-(2**42), max_value=2**42).map(str))
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(texts, children, max_size=4),
    max_leaves=12,
)


def _mostly(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Usually a plausible value for the field, sometimes anything JSON can carry."""
    return st.one_of(valid, valid, valid, json_values)


TEXT = _mostly(st.none() | texts)
STAMP = _mostly(st.none() | timestamps)
CALL_FIELDS = {
    "callType": _mostly(small_ints | small_ints.map(str)),
    "relatedCallId": TEXT, "phoneNumber": TEXT, "callDateTime": STAMP,
    "connectedDateTime": STAMP, "talkTime": _mostly(int32s | int32s.map(str)),
    "connectResult": TEXT, "checkPoint": TEXT, "note": TEXT,
}
CUSTOMER_FIELDS = {
    "customerId": TEXT, "createdDateTime": STAMP, "updatedDateTime": STAMP, "familyName": TEXT,
    "personalName": TEXT, "phoneNumbers": _mostly(st.lists(texts, max_size=6)), "orgName": TEXT,
    "note": TEXT,
}
OPERATOR_FIELDS = {
    "operatorId": TEXT, "createdDateTime": STAMP, "updatedDateTime": STAMP,
    "operatorVoiceId": _mostly(int32s | int32s.map(str)),
    "operatorVocieId": _mostly(int32s | int32s.map(str)), "name": TEXT,
    "deptShortNameKana": TEXT,
}


def _object_of(fields: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    known = st.builds(lambda a, b: {**b, **a}, st.fixed_dictionaries({}, optional=fields),
                      st.dictionaries(texts, json_values, max_size=3))
    return _mostly(known)


payloads = st.builds(
    lambda known, extra: {**extra, **known, "callId": CALL_ID},
    st.fixed_dictionaries(
        {},
        optional={
            **CALL_FIELDS,
            "customer": _object_of(CUSTOMER_FIELDS),
            "operator": _object_of(OPERATOR_FIELDS),
            "scenario": _object_of({"scenarioId": TEXT}),
        },
    ),
    st.dictionaries(texts, json_values, max_size=3),
)


def _strings_with_nul(value: Any) -> list[str]:
    """Every string containing U+0000 anywhere inside value (rows, dicts, lists, keys)."""
    if isinstance(value, CallRows):
        value = [value.call, value.customer, value.phone_numbers, value.operator, value.scenario]
    if isinstance(value, str):
        return [value] if "\x00" in value else []
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in _strings_with_nul(k) + _strings_with_nul(v)]
    if isinstance(value, list | tuple):
        return [s for v in value for s in _strings_with_nul(v)]
    return []


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payloads)
def test_any_payload_with_the_right_call_id_transforms_or_raises_payload_error(payload):
    try:
        rows = run(payload)
    except PayloadError as exc:
        assert str(exc)
        return
    assert rows.call["call_id"] == CALL_ID
    assert rows.call["run_id"] == RUN_ID
    for column in ("call_type", "talk_time"):
        assert rows.call[column] is None or type(rows.call[column]) is int
    for column in ("call_date_time", "connected_date_time"):
        value = rows.call[column]
        assert value is None or value.utcoffset() == timedelta(0)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payloads)
def test_rows_never_contain_nul(payload):
    try:
        rows = run(payload)
    except PayloadError:
        return
    assert _strings_with_nul(rows) == []


@settings(max_examples=200, deadline=None)
@given(json_values)
def test_arbitrary_json_value_without_the_call_id_raises_payload_error(value):
    # Generated strings are at most 8 characters, so none can be this id.
    with pytest.raises(PayloadError):
        run(value, call_id="x" * 20)
