"""Pure functions from one API payload to the rows of the five data tables (docs/design.md §1.2).

No I/O and no clock: the fetch time and run id come in as arguments. Every vendor quirk is
absorbed here: numbers sent as strings, both spellings of the voice id key, offsets turned into
instants, absent fields as NULL, U+0000 stripped from every string.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from .errors import PayloadError

SMALLINT = (-(2**15), 2**15 - 1)
INT32 = (-(2**31), 2**31 - 1)


@dataclass(slots=True)
class CallRows:
    """The rows one call contributes. `customer`/`operator`/`scenario` are None when absent."""

    call: dict[str, Any]
    customer: dict[str, Any] | None = None
    phone_numbers: list[dict[str, Any]] = field(default_factory=list)
    # False when the customer snapshot has no phoneNumbers key: the stored numbers stay.
    phones_given: bool = False
    operator: dict[str, Any] | None = None
    scenario: dict[str, Any] | None = None
    # Values the API doc rules out, loaded anyway (the raw payload keeps the original).
    warnings: list[str] = field(default_factory=list)
    # Keys the API doc does not list ("customer.email"): the vendor added a field.
    unknown_fields: list[str] = field(default_factory=list)


def strip_nul(value: Any) -> Any:
    """The value with U+0000 removed from every string, keys included (PostgreSQL's text and
    jsonb cannot hold it)."""
    if isinstance(value, str):
        return value.replace("\x00", "") if "\x00" in value else value
    if isinstance(value, dict):
        return {strip_nul(k): strip_nul(v) for k, v in value.items()}
    if isinstance(value, list):
        return [strip_nul(v) for v in value]
    return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def to_text(value: Any, key: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)  # an id or code sent as a number keeps its digits
    raise PayloadError(f"{key}: expected a string, got {_short(value)}")


def _to_int(value: Any, key: str, bounds: tuple[int, int]) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool):
        raise PayloadError(f"{key}: expected an integer, got {_short(value)}")
    if isinstance(value, int):
        number = value
    elif isinstance(value, str):
        text = value.strip()
        if not text:
            return None  # "" stands for "no value" in the vendor's string-typed numbers
        try:
            number = int(text)
        except ValueError:
            raise PayloadError(f"{key}: expected an integer, got {_short(value)}") from None
    elif isinstance(value, float) and value.is_integer():
        number = int(value)
    else:
        raise PayloadError(f"{key}: expected an integer, got {_short(value)}")
    if not bounds[0] <= number <= bounds[1]:
        raise PayloadError(f"{key}: {number} is out of range")
    return number


def to_smallint(value: Any, key: str) -> int | None:
    return _to_int(value, key, SMALLINT)


def to_int(value: Any, key: str) -> int | None:
    return _to_int(value, key, INT32)


def to_instant(value: Any, key: str) -> datetime | None:
    """An ISO 8601 timestamp as an aware UTC datetime. A timestamp without an offset is taken
    as UTC (the vendor documents offsets always; see README)."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise PayloadError(f"{key}: expected an ISO 8601 timestamp, got {_short(value)}")
    text = value.strip()
    if not text:
        return None
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise PayloadError(f"{key}: not an ISO 8601 timestamp: {_short(value)}") from None
    if parsed.tzinfo is None:
        return parsed.replace(tzinfo=UTC)
    try:
        return parsed.astimezone(UTC)
    except OverflowError:  # e.g. 0001-01-01T00:00:00+01:00 falls before year 1 in UTC
        raise PayloadError(f"{key}: instant out of range: {_short(value)}") from None


Converter = Callable[[Any, str], Any]

# (API key, column, converter) per table; the column is the snake_case of the key.
CALL_FIELDS: tuple[tuple[str, str, Converter], ...] = (
    ("callType", "call_type", to_smallint),
    ("relatedCallId", "related_call_id", to_text),
    ("phoneNumber", "phone_number", to_text),
    ("callDateTime", "call_date_time", to_instant),
    ("connectedDateTime", "connected_date_time", to_instant),
    ("talkTime", "talk_time", to_int),
    ("connectResult", "connect_result", to_text),
    ("checkPoint", "check_point", to_text),
    ("note", "note", to_text),
)

_ORG_FIELDS: tuple[tuple[str, str, Converter], ...] = (
    ("orgName", "org_name", to_text),
    ("orgNameKana", "org_name_kana", to_text),
    ("orgShortName", "org_short_name", to_text),
    ("orgShortNameKana", "org_short_name_kana", to_text),
    ("deptName", "dept_name", to_text),
    ("deptNameKana", "dept_name_kana", to_text),
    ("deptShortName", "dept_short_name", to_text),
    ("deptShortNameKana", "dept_short_name_kana", to_text),
)

CUSTOMER_FIELDS: tuple[tuple[str, str, Converter], ...] = (
    ("createdDateTime", "created_date_time", to_instant),
    ("updatedDateTime", "updated_date_time", to_instant),
    ("familyName", "family_name", to_text),
    ("familyNameKana", "family_name_kana", to_text),
    ("personalName", "personal_name", to_text),
    ("personalNameKana", "personal_name_kana", to_text),
    ("middleName", "middle_name", to_text),
    ("middleNameKana", "middle_name_kana", to_text),
    *_ORG_FIELDS,
    ("note", "note", to_text),
)

OPERATOR_FIELDS: tuple[tuple[str, str, Converter], ...] = (
    ("createdDateTime", "created_date_time", to_instant),
    ("updatedDateTime", "updated_date_time", to_instant),
    ("name", "name", to_text),
    ("nameKana", "name_kana", to_text),
    ("shortName", "short_name", to_text),
    ("shortNameKana", "short_name_kana", to_text),
    *_ORG_FIELDS,
)


CALL_TYPES = {0: "incoming", 1: "outgoing", 2: "user call"}
MAX_PHONE_NUMBERS = 5  # the API doc: phoneNumbers[] (0..5)

# Every key the API doc lists, per object: anything else is schema drift.
_KNOWN_KEYS = {
    "": frozenset({"callId", "customer", "operator", "scenario", *(k for k, *_ in CALL_FIELDS)}),
    "customer.": frozenset({"customerId", "phoneNumbers", *(k for k, *_ in CUSTOMER_FIELDS)}),
    "operator.": frozenset({"operatorId", "operatorVoiceId", "operatorVocieId",
                            *(k for k, *_ in OPERATOR_FIELDS)}),
    "scenario.": frozenset({"scenarioId"}),
}


def _unknown(obj: dict[str, Any], where: str, into: list[str]) -> None:
    extra = obj.keys() - _KNOWN_KEYS[where]
    if extra:
        into.extend(where + str(k) for k in sorted(extra, key=str))


def _labelled(spec: tuple[tuple[str, str, Converter], ...], where: str
              ) -> tuple[tuple[str, str, Converter, str], ...]:
    # The key as error messages name it ("customer.talkTime"), built once rather than per value.
    return tuple((key, column, convert, where + key) for key, column, convert in spec)


_CALL_SPEC = _labelled(CALL_FIELDS, "")
_CUSTOMER_SPEC = _labelled(CUSTOMER_FIELDS, "customer.")
_OPERATOR_SPEC = _labelled(OPERATOR_FIELDS, "operator.")


def _convert(obj: dict[str, Any], spec: tuple[tuple[str, str, Converter, str], ...],
             row: dict[str, Any]) -> dict[str, Any]:
    get = obj.get
    for key, column, convert, label in spec:
        value = get(key)
        # Most values are absent or already strings: skip the call for those (per-call hot path).
        if value is None or (convert is to_text and type(value) is str):
            row[column] = value
        else:
            row[column] = convert(value, label)
    return row


def _object(payload: dict[str, Any], key: str) -> dict[str, Any] | None:
    value = payload.get(key)
    if value is None or isinstance(value, dict):
        return value
    raise PayloadError(f"{key}: expected an object, got {_short(value)}")


def _key(obj: dict[str, Any], key: str, where: str) -> str | None:
    value = to_text(obj.get(key), where + key)
    return value or None  # an empty id cannot key a row


def transform(payload: Any, *, call_id: str, fetched_at: datetime, run_id: str,
              nul_free: bool = False) -> CallRows:
    """The rows of one call. Raises PayloadError (a one-line reason) for a payload that is not a
    call object, whose callId is missing or not the id asked for, or whose fields have types that
    cannot be stored exactly. `nul_free=True` promises that no string holds U+0000 (the caller
    saw no \\u0000 in the JSON text), which skips a walk over the whole payload."""
    if not isinstance(payload, dict):
        raise PayloadError(f"payload is not a JSON object but {type(payload).__name__}")
    if not nul_free:
        try:
            payload = strip_nul(payload)
        except RecursionError:  # JSON nested nearly as deep as json.loads allows
            raise PayloadError("payload is nested too deeply") from None
    got = payload.get("callId")
    if got is None:
        raise PayloadError("payload has no callId")
    if got != call_id:
        raise PayloadError(f"payload callId {_short(got)} is not the requested id")

    call: dict[str, Any] = {"call_id": call_id}
    _convert(payload, _CALL_SPEC, call)
    rows = CallRows(call=call)
    warn = rows.warnings.append
    _unknown(payload, "", rows.unknown_fields)
    if call["call_type"] is not None and call["call_type"] not in CALL_TYPES:
        warn(f"callType {call['call_type']} is none of 0 (incoming), 1 (outgoing), 2 (user call)")
    if call["talk_time"] is not None and call["talk_time"] < 0:
        warn(f"talkTime {call['talk_time']} is negative")

    customer = _object(payload, "customer")
    customer_id = _key(customer, "customerId", "customer.") if customer else None
    if customer and not customer_id:
        warn("customer has no customerId: its attributes were not stored (see raw)")
    if customer and customer_id:
        _unknown(customer, "customer.", rows.unknown_fields)
        rows.customer = _convert(customer, _CUSTOMER_SPEC,
                                 {"customer_id": customer_id})
        numbers = customer.get("phoneNumbers")
        rows.phones_given = "phoneNumbers" in customer
        if numbers is not None:
            if not isinstance(numbers, list):
                raise PayloadError(
                    f"customer.phoneNumbers: expected an array, got {_short(numbers)}"
                )
            if len(numbers) > SMALLINT[1]:
                raise PayloadError("customer.phoneNumbers: too many entries")
            if len(numbers) > MAX_PHONE_NUMBERS:
                warn(f"customer.phoneNumbers has {len(numbers)} entries, more than "
                     f"{MAX_PHONE_NUMBERS}")
            for i, n in enumerate(numbers):
                if not isinstance(n, str) and n is not None:
                    warn(f"customer.phoneNumbers[{i}] is {_short(n)}, a JSON "
                         f"{type(n).__name__}, not a string (leading zeros and digits may be "
                         "lost)")
            rows.phone_numbers = [
                {"customer_id": customer_id, "position": i,
                 "phone_number": to_text(n, f"customer.phoneNumbers[{i}]")}
                for i, n in enumerate(numbers)
            ]

    operator = _object(payload, "operator")
    operator_id = _key(operator, "operatorId", "operator.") if operator else None
    if operator and not operator_id:
        warn("operator has no operatorId: its attributes were not stored (see raw)")
    if operator and operator_id:
        _unknown(operator, "operator.", rows.unknown_fields)
        row = _convert(operator, _OPERATOR_SPEC, {"operator_id": operator_id})
        # The vendor's field list spells it operatorVocieId, its example operatorVoiceId.
        voice = operator.get("operatorVoiceId", operator.get("operatorVocieId"))
        row["operator_voice_id"] = to_int(voice, "operator.operatorVoiceId")
        rows.operator = row

    scenario = _object(payload, "scenario")
    scenario_id = _key(scenario, "scenarioId", "scenario.") if scenario else None
    if scenario:
        _unknown(scenario, "scenario.", rows.unknown_fields)
    if scenario_id:
        rows.scenario = {"scenario_id": scenario_id}

    call["customer_id"] = rows.customer["customer_id"] if rows.customer else None
    call["operator_id"] = operator_id if rows.operator else None
    # Which version came with the call: one join to customer_versions / operator_versions.
    call["customer_updated_date_time"] = (rows.customer["updated_date_time"]
                                          if rows.customer else None)
    call["operator_updated_date_time"] = (rows.operator["updated_date_time"]
                                          if rows.operator else None)
    call["scenario_id"] = scenario_id
    call["raw"] = payload
    call["fetched_at"] = fetched_at
    call["run_id"] = run_id
    return rows
