"""Tests for the local commubo connect API simulator (etl/simulator.py)."""

from __future__ import annotations

import http.client
import json
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

import pytest
import requests

from etl.simulator import (
    DEFAULT_ACCESS_TOKEN,
    DEFAULT_TENANT_ID,
    Simulator,
    payload_for,
)

HEADERS = {
    "x-commubo-tenantId": DEFAULT_TENANT_ID,
    "x-commubo-accessToken": DEFAULT_ACCESS_TOKEN,
}


@pytest.fixture
def sim() -> Iterator[Simulator]:
    with Simulator(slow_s=0.5) as s:
        yield s


@pytest.fixture
def session() -> Iterator[requests.Session]:
    with requests.Session() as s:
        s.headers.update(HEADERS)
        yield s


def get(session: requests.Session, sim: Simulator, call_id: str, **kw) -> requests.Response:
    return session.get(f"{sim.url}/v1/calls/{call_id}", timeout=kw.pop("timeout", 5), **kw)


def test_url_and_port(sim: Simulator) -> None:
    assert sim.port > 0
    assert sim.url == f"http://127.0.0.1:{sim.port}"


def test_payload_for_is_deterministic_and_seeded() -> None:
    a = payload_for("call-000001")
    assert a is not None
    assert a == payload_for("call-000001")
    assert a["callId"] == "call-000001"
    assert payload_for("call-000001", seed=1) != a
    # Fresh objects each time: callers may mutate what they get.
    a["callId"] = "mutated"
    assert payload_for("call-000001")["callId"] == "call-000001"


def test_served_body_equals_payload_for(sim: Simulator, session: requests.Session) -> None:
    r = get(session, sim, "call-000001")
    assert r.status_code == 200
    assert r.headers["Content-Type"] == "application/json"
    expected = payload_for("call-000001")
    assert r.json() == expected
    assert r.content == json.dumps(expected, ensure_ascii=False).encode()
    assert sim.requests_for("call-000001") == 1


def test_call_id_is_url_decoded(sim: Simulator, session: requests.Session) -> None:
    r = get(session, sim, "a%2Fb%20c")
    assert r.status_code == 200
    assert r.json()["callId"] == "a/b c"
    assert sim.requests_for("a/b c") == 1


def test_wrong_credentials_get_403(sim: Simulator) -> None:
    url = f"{sim.url}/v1/calls/call-1"
    wrong_token = {**HEADERS, "x-commubo-accessToken": "nope"}
    wrong_tenant = {**HEADERS, "x-commubo-tenantId": "other"}
    assert requests.get(url, headers=wrong_token, timeout=5).status_code == 403
    assert requests.get(url, headers=wrong_tenant, timeout=5).status_code == 403
    r = requests.get(url, timeout=5)
    assert r.status_code == 403
    assert "error" in r.json()
    assert sim.total_requests == 3


def test_not_found(sim: Simulator, session: requests.Session) -> None:
    r = get(session, sim, "nf-x")
    assert r.status_code == 404
    assert r.json() == {"error": "not found"}
    assert payload_for("nf-x") is None
    other = session.get(f"{sim.url}/v1/other", timeout=5)
    assert other.status_code == 404
    assert other.json() == {"error": "not found"}


def test_some_ordinary_ids_are_missing(sim: Simulator, session: requests.Session) -> None:
    missing = [f"call-{i}" for i in range(400) if payload_for(f"call-{i}") is None]
    assert 2 <= len(missing) <= 30  # ~3%
    assert get(session, sim, missing[0]).status_code == 404
    assert get(session, sim, missing[0]).status_code == 404


def test_e503_script(sim: Simulator, session: requests.Session) -> None:
    statuses = [get(session, sim, "e503-2-x").status_code for _ in range(3)]
    assert statuses == [503, 503, 200]
    assert sim.requests_for("e503-2-x") == 3
    assert get(session, sim, "e503-2-x").json() == payload_for("e503-2-x")
    sim.reset_counts()
    assert sim.requests_for("e503-2-x") == 0
    assert sim.total_requests == 0
    assert get(session, sim, "e503-2-x").status_code == 503  # the script starts over


@pytest.mark.parametrize(("kind", "status"), [("e500", 500), ("e502", 502), ("broken", 500)])
def test_other_statuses(sim: Simulator, session: requests.Session, kind: str, status: int) -> None:
    call_id = f"{kind}-1-x" if kind != "broken" else "broken-x"
    assert get(session, sim, call_id).status_code == status
    second = get(session, sim, call_id).status_code
    assert second == (500 if kind == "broken" else 200)


def test_e429_retry_after(sim: Simulator, session: requests.Session) -> None:
    r = get(session, sim, "e429d-1-x")
    assert r.status_code == 429
    when = parsedate_to_datetime(r.headers["Retry-After"])
    assert when.tzinfo is not None
    delta = (when - datetime.now(UTC)).total_seconds()
    assert -1.5 <= delta <= sim.retry_after_s + 1
    assert get(session, sim, "e429d-1-x").status_code == 200

    r = get(session, sim, "e429s-1-x")
    assert r.status_code == 429
    assert r.headers["Retry-After"] == str(sim.retry_after_s)


def test_cut_body_is_incomplete_read_then_ok(
    sim: Simulator, session: requests.Session, capfd: pytest.CaptureFixture[str]
) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", sim.port, timeout=5)
    conn.request("GET", "/v1/calls/cut-1-x", headers=HEADERS)
    resp = conn.getresponse()
    assert resp.status == 200
    with pytest.raises(http.client.IncompleteRead):
        resp.read()
    conn.close()
    r = get(session, sim, "cut-1-x")
    assert r.status_code == 200
    assert r.json() == payload_for("cut-1-x")
    # requests surfaces the same fault as ChunkedEncodingError.
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        get(session, sim, "cut-1-y")
    assert "Traceback" not in capfd.readouterr().err


def test_reset_is_connection_error_then_ok(
    sim: Simulator, session: requests.Session, capfd: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(requests.exceptions.ConnectionError) as info:
        get(session, sim, "reset-1-x")
    assert "reset" in str(info.value).lower() or "aborted" in str(info.value).lower()
    r = get(session, sim, "reset-1-x")
    assert r.status_code == 200
    assert sim.requests_for("reset-1-x") == 2
    assert "Traceback" not in capfd.readouterr().err


def test_slow_times_out_then_ok(sim: Simulator, session: requests.Session) -> None:
    with pytest.raises(requests.exceptions.Timeout):
        get(session, sim, "slow-1-x", timeout=0.1)
    r = get(session, sim, "slow-1-x")
    assert r.status_code == 200


def test_fixed_prefixes(sim: Simulator, session: requests.Session) -> None:
    r = get(session, sim, "badjson-x")
    assert r.status_code == 200
    assert r.headers["Content-Type"] == "application/json"
    with pytest.raises(ValueError):
        r.json()
    assert get(session, sim, "array-x").json() == []
    assert get(session, sim, "wrongid-x").json()["callId"] == "other-wrongid-x"
    assert "callId" not in get(session, sim, "nocallid-x").json()
    assert get(session, sim, "poison-x").json()["talkTime"] == "not-a-number"
    assert get(session, sim, "bigint-x").json()["talkTime"] == 2**40
    for call_id in ("badjson-x", "array-x", "broken-x"):
        assert payload_for(call_id) is None
    for call_id in ("wrongid-x", "nocallid-x", "poison-x", "bigint-x"):
        assert get(session, sim, call_id).json() == payload_for(call_id)


def test_random_faults_are_reproducible_and_eventually_succeed(
    session: requests.Session,
) -> None:
    def outcomes() -> list[object]:
        seen: list[object] = []
        with Simulator(fault_rate=0.5, seed=7) as s:
            for i in range(20):
                call_id = f"call-{i}"
                for _ in range(30):
                    try:
                        r = get(session, s, call_id)
                    except requests.exceptions.RequestException as exc:
                        seen.append(type(exc).__name__)
                        continue
                    seen.append(r.status_code)
                    if r.status_code in (200, 404):
                        if r.status_code == 200:
                            assert r.json() == payload_for(call_id, seed=7)
                        break
                else:
                    pytest.fail(f"{call_id} never succeeded")
        return seen

    first = outcomes()
    assert first == outcomes()
    assert len(set(first) - {200, 404}) >= 3  # several distinct fault kinds showed up


def test_quirks_across_ids() -> None:
    payloads = [p for i in range(300) if (p := payload_for(f"call-{i:06d}")) is not None]
    operators = [p["operator"] for p in payloads if "operator" in p]
    call_types = {type(p["callType"]) for p in payloads}
    talk_types = {type(p["talkTime"]) for p in payloads if "talkTime" in p}
    assert call_types == {int, str}
    assert talk_types == {int, str}
    assert any("operatorVoiceId" in o for o in operators)
    assert any("operatorVocieId" in o for o in operators)
    assert any("customer" not in p for p in payloads)
    assert any("operator" not in p for p in payloads)
    assert any("scenario" not in p for p in payloads)
    # Not-connected calls omit the keys instead of sending null.
    assert any("connectedDateTime" not in p and "talkTime" not in p for p in payloads)
    assert all(None not in p.values() for p in payloads)
    stamps = [p["callDateTime"] for p in payloads]
    assert any(s.endswith("Z") for s in stamps)
    assert any(s.endswith("+09:00") for s in stamps)
    for s in stamps:
        datetime.fromisoformat(s.replace("Z", "+00:00"))
    assert any("\x00" in p.get("note", "") for p in payloads)
    assert all(isinstance(p["connectResult"], str) for p in payloads)


def test_customer_snapshots_share_identity_and_version() -> None:
    by_customer: dict[str, list[dict]] = {}
    for i in range(2000):
        p = payload_for(f"call-{i}")
        if p and "customer" in p:
            by_customer.setdefault(p["customer"]["customerId"], []).append(p["customer"])
    assert len(by_customer) <= 500
    snaps = max(by_customer.values(), key=len)
    assert len(snaps) >= 3
    names = {(c["familyName"], c["personalName"], c.get("orgName")) for c in snaps}
    assert len(names) == 1  # names fixed per customer
    created = {datetime.fromisoformat(c["createdDateTime"].replace("Z", "+00:00")) for c in snaps}
    assert len(created) == 1
    for c in snaps:
        updated = datetime.fromisoformat(c["updatedDateTime"].replace("Z", "+00:00"))
        version = int(c["note"].removeprefix("snapshot v"))
        assert (updated - next(iter(created))).total_seconds() == version * 60
        assert len(c["phoneNumbers"]) <= 5
    assert len({c["updatedDateTime"] for c in snaps}) > 1


def test_concurrent_requests_overlap() -> None:
    with Simulator(latency_ms=200) as s:

        def fetch(i: int) -> int:
            url = f"{s.url}/v1/calls/e500-0-{i}"
            return requests.get(url, headers=HEADERS, timeout=5).status_code

        t0 = time.perf_counter()
        with ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(fetch, range(8)))
        elapsed = time.perf_counter() - t0
    assert codes == [200] * 8
    assert elapsed < 1.0  # 8 x 200 ms served in parallel, not one after another


def test_stop_with_idle_keepalive_connection_is_prompt(session: requests.Session) -> None:
    s = Simulator().start()
    assert get(session, s, "call-1").status_code == 200  # leaves a pooled connection open
    t0 = time.perf_counter()
    s.stop()
    assert time.perf_counter() - t0 < 2
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", s.port), timeout=1):
        pass


def test_refuses_non_loopback_host() -> None:
    with pytest.raises(ValueError):
        Simulator(host="0.0.0.0")
