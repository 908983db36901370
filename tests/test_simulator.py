"""Tests for the local commubo connect API simulator (etl/simulator/)."""

from __future__ import annotations

import errno
import http.client
import json
import socket
import threading
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

import pytest
import requests

from etl.simulator import (
    DEFAULT_ACCESS_TOKEN,
    DEFAULT_TENANT_ID,
    ESCAPE_BODY,
    ESCAPE_REASON,
    Simulator,
    customer_versions,
    operator_versions,
    payload_for,
    related_chain,
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


def raw_get(port: int, call_id: str) -> socket.socket:
    """A socket that has sent one GET for call_id and not read anything yet."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    lines = [f"GET /v1/calls/{call_id} HTTP/1.1", "Host: 127.0.0.1"]
    lines += [f"{name}: {value}" for name, value in HEADERS.items()]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    return sock


def recv_until(sock: socket.socket, marker: bytes, data: bytes = b"") -> bytes:
    """Read until ``marker`` shows up (the socket timeout bounds the wait)."""
    while marker not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before {marker!r}; got {data[:200]!r}"
        data += chunk
    return data


def hung_up(sock: socket.socket) -> bool:
    """Read away what the server still sends until it closes or resets the connection; if it
    keeps the connection open, the socket timeout raises and the test fails."""
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    return True


def only_handler(sim: Simulator) -> threading.Thread:
    threads = sim.handler_threads()
    assert len(threads) == 1, threads
    return threads[0]


def port_is_bound(port: int) -> bool:
    """Whether something holds 127.0.0.1:port (a plain bind, no SO_REUSEADDR, fails)."""
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as exc:
            assert exc.errno == errno.EADDRINUSE
            return True
    return False


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


class _GatedSimulator(Simulator):
    """Holds every request for a call until `n` of them have arrived: a server that serves
    them one after another answers none (the gate breaks after 30 s, failing the requests)."""

    def __init__(self, n: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.gate = threading.Barrier(n, timeout=30)

    def _count(self, call_id: str | None) -> int:
        attempt = super()._count(call_id)
        if call_id is not None:
            self.gate.wait()
        return attempt


def test_concurrent_requests_overlap() -> None:
    # Eight requests at once, each answered only once all eight are in the server: proof
    # they were served in parallel, by order of arrival rather than by wall time.
    with _GatedSimulator(8) as s:

        def fetch(i: int) -> int:
            url = f"{s.url}/v1/calls/e500-0-{i}"
            return requests.get(url, headers=HEADERS, timeout=60).status_code

        with ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(fetch, range(8)))
    assert codes == [200] * 8
    assert not s.gate.broken
    assert s.total_requests == 8


def test_stop_with_idle_keepalive_connection_is_prompt(session: requests.Session) -> None:
    s = Simulator().start()
    assert get(session, s, "call-1").status_code == 200  # leaves a pooled connection open
    [idle] = s.handler_threads()  # its handler, waiting for the client's next request
    s.stop()
    # stop() hung the idle connection up rather than waiting on it or leaving it open (the
    # client still holds it: only the server's hang-up ends that handler).
    idle.join(10)
    assert not idle.is_alive()
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", s.port), timeout=1):
        pass


def test_refuses_non_loopback_host() -> None:
    with pytest.raises(ValueError):
        Simulator(host="0.0.0.0")


# -- versions of customers and operators, chains of related calls ------------------------------

QUARTER_START = datetime(2026, 1, 1, tzinfo=UTC)
QUARTER_END = datetime(2026, 4, 1, tzinfo=UTC)
FILE_IDS = [f"call-{n:06d}" for n in range(1, 2001)]  # a typical ids file
CUSTOMERS = [f"cus-{n:05d}" for n in range(500)]
OPERATORS = [f"op-{n:03d}" for n in range(40)]
# What a change may touch; names, creation time and ids never change.
CUSTOMER_MUTABLE = {
    "familyName", "familyNameKana", "orgName", "orgNameKana", "orgShortName",
    "orgShortNameKana", "deptName", "deptNameKana", "deptShortName", "deptShortNameKana",
    "phoneNumbers", "note",
}
OPERATOR_MUTABLE = {
    "name", "nameKana", "shortName", "shortNameKana", "deptName", "deptNameKana",
    "deptShortName", "deptShortNameKana", "operatorVoiceId",
}


def instant(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def attributes(version: dict) -> dict:
    """A version without its dates (its offsets differ from version to version)."""
    return {k: v for k, v in version.items() if k not in ("createdDateTime", "updatedDateTime")}


def current(versions: list[dict], at: datetime) -> dict:
    """The newest version updated at or before ``at``."""
    return [v for v in versions if instant(v["updatedDateTime"]) <= at][-1]


def plain_operator(embedded: dict) -> dict:
    """An embedded operator with the call's voice-id quirks undone, as operator_versions has it."""
    op = dict(embedded)
    voice = op.pop("operatorVoiceId", None)
    voice = op.pop("operatorVocieId", voice)
    return {**op, "operatorVoiceId": int(voice)}


def served_file() -> dict[str, dict]:
    return {i: p for i in FILE_IDS if (p := payload_for(i)) is not None}


def test_a_share_of_customers_and_operators_change_during_the_quarter() -> None:
    for ids, versions_of, low, high in ((CUSTOMERS, customer_versions, 0.2, 0.4),
                                        (OPERATORS, operator_versions, 0.2, 0.4)):
        histories = {i: versions_of(i) for i in ids}
        changes = [len(h) - 1 for h in histories.values()]
        assert low <= sum(1 for n in changes if n) / len(ids) <= high
        assert set(changes) == {0, 1, 2, 3}  # one to three changes, or none
        for versions in histories.values():
            created = {instant(v["createdDateTime"]) for v in versions}
            assert len(created) == 1
            updated = [instant(v["updatedDateTime"]) for v in versions]
            # Version 0 predates the quarter, every change falls inside it, strictly in order.
            assert created.pop() <= updated[0] < QUARTER_START
            assert all(QUARTER_START <= u < QUARTER_END for u in updated[1:])
            assert updated == sorted(set(updated))
    # The offsets stay mixed, version by version.
    stamps = [v["updatedDateTime"] for c in CUSTOMERS[:50] for v in customer_versions(c)]
    assert any(s.endswith("Z") for s in stamps)
    assert any(s.endswith("+09:00") for s in stamps)


def test_consecutive_versions_differ_in_what_changed() -> None:
    seen: dict[str, set[str]] = {"customer": set(), "operator": set()}
    for kind, ids, versions_of, mutable in (
            ("customer", CUSTOMERS, customer_versions, CUSTOMER_MUTABLE),
            ("operator", OPERATORS, operator_versions, OPERATOR_MUTABLE)):
        for entity in ids:
            versions = [attributes(v) for v in versions_of(entity)]
            for old, new in zip(versions, versions[1:], strict=False):
                changed = {k for k in old.keys() | new.keys() if old.get(k) != new.get(k)}
                assert changed, (entity, old)
                assert changed <= mutable, (entity, changed - mutable)
                seen[kind] |= changed
                if "phoneNumbers" in changed:
                    assert len(new["phoneNumbers"]) <= 5
                    assert len(new["phoneNumbers"]) >= len(old["phoneNumbers"])
    # Every kind of change happens somewhere: moves, new numbers, renames, new voice ids.
    assert {"deptName", "orgName", "phoneNumbers", "familyName", "note"} <= seen["customer"]
    assert {"deptName", "name", "shortName", "operatorVoiceId"} <= seen["operator"]
    assert customer_versions("cus-00003") == customer_versions("cus-00003")  # deterministic
    assert customer_versions("cus-00003", seed=1) != customer_versions("cus-00003")


def test_a_call_embeds_the_versions_current_at_its_time() -> None:
    carried: dict[str, set[str]] = {}
    for call_id, payload in served_file().items():
        at = instant(payload["callDateTime"])
        assert QUARTER_START <= at < QUARTER_END
        if "customer" in payload:
            cid = payload["customer"]["customerId"]
            assert payload["customer"] == current(customer_versions(cid), at), call_id
            carried.setdefault(cid, set()).add(payload["customer"]["updatedDateTime"])
        if "operator" in payload:
            op = plain_operator(payload["operator"])
            assert op == current(operator_versions(op["operatorId"]), at), call_id
    # So calls made at different times carry different versions of one customer.
    assert sum(1 for stamps in carried.values() if len(stamps) > 1) > 50


def test_chains_of_related_calls_end_at_earlier_calls_and_some_links_404() -> None:
    served = served_file()
    linking = {i: p for i, p in served.items() if "relatedCallId" in p}
    assert 0.2 <= len(linking) / len(served) <= 0.4
    lengths = []
    linked: set[str] = set()
    for call_id, payload in linking.items():
        # Follow the payloads by hand: each link points at an earlier call, and it ends.
        followed, here = [], payload
        while here is not None and "relatedCallId" in here:
            assert len(followed) < 6, (call_id, followed)
            following = here["relatedCallId"]
            followed.append(following)
            there = payload_for(following)
            if there is not None:
                assert instant(there["callDateTime"]) < instant(here["callDateTime"])
            here = there
        assert related_chain(call_id) == followed
        lengths.append(len(followed))
        linked.update(followed)
    assert set(lengths) == {1, 2, 3, 4, 5, 6}
    missing = {i for i in linked if payload_for(i) is None}
    assert 0.02 <= len(missing) / len(linked) <= 0.1  # deleted calls, still referenced
    # Mostly outside the ids file, so following them has work to do; a few inside it.
    inside = sum(1 for p in linking.values() if p["relatedCallId"] in served)
    assert 0 < inside < 0.3 * len(linking)
    assert related_chain(next(i for i in served if i not in linking)) == []


def test_chain_members_tell_one_customers_story() -> None:
    versions_seen = 0
    for call_id, payload in served_file().items():
        own = f"call-r{call_id.removeprefix('call-')}-"
        # The call's own chain (after a link into the call-<digits> family, another root's).
        for member in related_chain(call_id):
            if not member.startswith(own):
                break
            there = payload_for(member)
            if there is None:
                continue
            assert there["phoneNumber"] == payload["phoneNumber"]
            assert ("customer" in there) == ("customer" in payload)
            if "customer" in payload:
                assert there["customer"]["customerId"] == payload["customer"]["customerId"]
                versions_seen += there["customer"] != payload["customer"]
    assert versions_seen > 0  # the customer changed between two calls of one chain


def test_related_ids_outside_a_chain_do_not_exist() -> None:
    root = next(i for i in FILE_IDS if related_chain(i)[:1] == [f"call-r{i[5:]}-1"])
    chain = related_chain(root)
    # Beyond the longest chain, aliases of members, a root without a chain: all 404.
    no_chain = next(i for i in FILE_IDS if not related_chain(i))
    for call_id in (f"call-r{root[5:]}-7", f"call-r{root[5:]}-01", f"call-r{root[5:]}-0",
                    f"call-r{no_chain[5:]}-1"):
        assert payload_for(call_id) is None, call_id
        assert related_chain(call_id) == []
    assert payload_for("call-rx-1") is not None  # not the family: an ordinary id
    # Not the numbered family: no relatedCallId at all.
    for call_id in ("same-0001", "e503-2-call-000013", "wrongid-x", "call-x2"):
        assert "relatedCallId" not in payload_for(call_id)
    # A member's own chain is the rest of its root's.
    assert related_chain(chain[0]) == chain[1:]
    assert related_chain(root, seed=1) != chain or payload_for(root, seed=1) is None


def test_the_simulator_serves_chains_and_404s_deleted_calls(
    sim: Simulator, session: requests.Session
) -> None:
    ending_in_404 = next(c for i in FILE_IDS if len(c := related_chain(i)) >= 2
                         and payload_for(c[-1]) is None)
    for member in ending_in_404[:-1]:
        r = get(session, sim, member)
        assert r.status_code == 200
        assert r.json() == payload_for(member)
        assert r.json()["relatedCallId"] in ending_in_404
    assert get(session, sim, ending_in_404[-1]).status_code == 404


# -- hostile-server faults ---------------------------------------------------------------------


def test_hostile_kinds_never_serve_a_payload() -> None:
    for call_id in ("bomb-x", "huge-x", "endless-x", "escape-x"):
        assert payload_for(call_id) is None
    # Trickles eventually serve the normal payload.
    for call_id in ("trickle-1-x", "trickleb-1-x"):
        assert payload_for(call_id) is not None


@pytest.mark.parametrize("kind", ["trickle", "trickleb"])
def test_trickled_responses_are_well_formed(kind: str) -> None:
    # trickle_s=0: still one byte per send, so the bytes are checked without the wait.
    with Simulator(trickle_s=0) as s:
        conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=10)
        for _ in range(2):  # the connection stays usable after a trickled response
            conn.request("GET", f"/v1/calls/{kind}-99-x", headers=HEADERS)
            resp = conn.getresponse()
            body = resp.read()
            assert resp.status == 200
            assert resp.getheader("Content-Type") == "application/json"
            assert int(resp.getheader("Content-Length")) == len(body)
            assert json.loads(body) == payload_for(f"{kind}-99-x")
        conn.close()
        assert s.requests_for(f"{kind}-99-x") == 2


def test_trickle_sends_one_byte_at_a_time_then_recovers(session: requests.Session) -> None:
    trickle_s = 0.5
    with Simulator(trickle_s=trickle_s) as s:
        t0 = time.monotonic()
        sock = raw_get(s.port, "trickle-1-x")
        data = sock.recv(4096)
        # Whatever the load, the server cannot have sent more than one byte per trickle_s
        # since the request went out (plus the first byte, sent at once).
        assert 1 <= len(data) <= 1 + (time.monotonic() - t0) / trickle_s
        assert b"HTTP/1.1 200 OK".startswith(data)
        while len(data) < 4:
            data += sock.recv(4096)
            assert len(data) <= 1 + (time.monotonic() - t0) / trickle_s
        assert b"HTTP/1.1 200 OK".startswith(data)

        # Hanging up ends the handler: the next writes fail and it returns quietly.
        handler = only_handler(s)
        sock.close()
        handler.join(10)
        assert not handler.is_alive()

        # Only the first request trickles.
        r = get(session, s, "trickle-1-x")
        assert r.status_code == 200
        assert r.json() == payload_for("trickle-1-x")
        assert s.requests_for("trickle-1-x") == 2


def test_trickleb_sends_the_head_at_once_then_trickles_the_body(
    session: requests.Session,
) -> None:
    trickle_s = 0.5
    with Simulator(trickle_s=trickle_s) as s:
        t0 = time.monotonic()
        sock = raw_get(s.port, "trickleb-1-x")
        data = recv_until(sock, b"\r\n\r\n")
        elapsed = time.monotonic() - t0
        head, _, body = data.partition(b"\r\n\r\n")
        # More bytes than a trickle could have sent by now: the head came in one go.
        assert len(head) > 1 + elapsed / trickle_s
        assert head.startswith(b"HTTP/1.1 200 OK\r\n")
        expected = json.dumps(payload_for("trickleb-1-x"), ensure_ascii=False).encode()
        assert f"\r\nContent-Length: {len(expected)}".encode() in head
        # ... while the body trickles.
        body += sock.recv(4096)
        assert 1 <= len(body) <= 1 + (time.monotonic() - t0) / trickle_s
        assert expected.startswith(body)

        handler = only_handler(s)
        sock.close()
        handler.join(10)
        assert not handler.is_alive()
        assert get(session, s, "trickleb-1-x").json() == payload_for("trickleb-1-x")


def test_bomb_is_small_on_the_wire_and_inflates_past_100_mb() -> None:
    with Simulator() as s:
        conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=30)
        conn.request("GET", "/v1/calls/bomb-x", headers=HEADERS)
        resp = conn.getresponse()
        wire = resp.read()  # http.client does not decode Content-Encoding
        assert resp.status == 200
        assert resp.getheader("Content-Type") == "application/json"
        assert resp.getheader("Content-Encoding") == "gzip"
        assert int(resp.getheader("Content-Length")) == len(wire)
        assert 0 < len(wire) < 2**20  # about 300 KB

        # Inflate a MiB at a time, so the test never holds the 300 MiB.
        inflater = zlib.decompressobj(31)
        first = inflater.decompress(wire, 2**20)
        total = len(first)
        pending = inflater.unconsumed_tail
        while pending:
            total += len(inflater.decompress(pending, 2**20))
            pending = inflater.unconsumed_tail
        total += len(inflater.flush())
        assert inflater.eof
        assert first.startswith(b'{"callId": "bomb"')
        assert first[-64:] == b" " * 64
        assert total == s.bomb_bytes == 300 * 2**20
        assert total > 100 * 2**20

        # Same answer every time (built once, then cached).
        conn.request("GET", "/v1/calls/bomb-x", headers=HEADERS)
        again = conn.getresponse()
        assert again.status == 200
        assert again.read() == wire
        conn.close()
        assert s.requests_for("bomb-x") == 2


def test_huge_announces_the_length_and_streams_it(session: requests.Session) -> None:
    size = 3 * 2**20 + 5  # not a whole number of blocks
    with Simulator(huge_bytes=size) as s:
        conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=30)
        conn.request("GET", "/v1/calls/huge-x", headers=HEADERS)
        resp = conn.getresponse()
        assert resp.status == 200
        assert resp.getheader("Content-Length") == str(size)
        first = resp.read(2**16)
        total = len(first)
        while chunk := resp.read(2**20):
            total += len(chunk)
        assert total == size
        assert first.startswith(b'{"callId": "huge"')
        # The body was complete, so the keep-alive connection is still in step.
        conn.request("GET", "/v1/calls/call-000001", headers=HEADERS)
        assert json.loads(conn.getresponse().read()) == payload_for("call-000001")
        conn.close()


def test_huge_default_announces_100_mib_and_stops_when_the_client_hangs_up() -> None:
    with Simulator() as s:
        conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=30)
        conn.request("GET", "/v1/calls/huge-x", headers=HEADERS)
        resp = conn.getresponse()
        assert resp.getheader("Content-Length") == str(100 * 2**20)
        got = 0
        while got < 2**20:
            got += len(resp.read(2**16))
        handler = only_handler(s)
        conn.close()
        handler.join(10)
        assert not handler.is_alive()


def test_endless_streams_until_the_client_hangs_up(session: requests.Session) -> None:
    with Simulator() as s:
        conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=30)
        conn.request("GET", "/v1/calls/endless-x", headers=HEADERS)
        resp = conn.getresponse()
        assert resp.status == 200
        assert resp.getheader("Transfer-Encoding") == "chunked"
        assert resp.getheader("Content-Length") is None
        first = resp.read(2**16)  # http.client takes the chunking apart
        assert first.startswith(b'{"callId": "endless"')
        got = len(first)
        while got <= 4 * 2**20:
            chunk = resp.read(2**16)
            assert chunk, "the endless body ended"
            got += len(chunk)
        handler = only_handler(s)
        conn.close()
        handler.join(10)
        assert not handler.is_alive()
        assert get(session, s, "call-000001").status_code == 200  # still serving


def test_escape_reason_and_body_arrive_with_control_characters(
    sim: Simulator, session: requests.Session
) -> None:
    for text in (ESCAPE_REASON, ESCAPE_BODY.decode()):
        assert "\x1b]0;pwned\x07" in text
        assert "\x1b[2J" in text
        assert "\r" in text
        assert "\n" not in text
    assert ESCAPE_REASON.strip() == ESCAPE_REASON  # http.client would strip the ends

    # The bytes on the wire: send_response writes the reason as given.
    sock = raw_get(sim.port, "escape-x")
    data = recv_until(sock, b"\r\n\r\n")
    head, _, body = data.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0]
    # Splitting on CRLF: the bare CR inside the reason does not end the line.
    assert status_line == b"HTTP/1.1 400 " + ESCAPE_REASON.encode("latin-1")
    while len(body) < len(ESCAPE_BODY):
        body += sock.recv(4096)
    assert body == ESCAPE_BODY
    sock.close()

    # What http.client (and so requests) makes of it.
    conn = http.client.HTTPConnection("127.0.0.1", sim.port, timeout=10)
    conn.request("GET", "/v1/calls/escape-x", headers=HEADERS)
    resp = conn.getresponse()
    assert resp.status == 400
    assert resp.reason == ESCAPE_REASON
    assert resp.read() == ESCAPE_BODY
    conn.close()
    r = get(session, sim, "escape-x")
    assert r.status_code == 400
    assert r.reason == ESCAPE_REASON
    assert r.content == ESCAPE_BODY
    assert sim.requests_for("escape-x") == 3


def test_refuse_from_the_start_keeps_the_port_until_stop() -> None:
    s = Simulator(refuse=True).start()
    try:
        assert s.refusing
        assert s.url == f"http://127.0.0.1:{s.port}"
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", s.port), timeout=5)
        with pytest.raises(requests.exceptions.ConnectionError):
            requests.get(f"{s.url}/v1/calls/call-1", headers=HEADERS, timeout=5)
        assert port_is_bound(s.port)
        # Not even an SO_REUSEADDR server (such as another simulator) can take it.
        with pytest.raises(OSError) as info:
            Simulator(port=s.port)
        assert info.value.errno == errno.EADDRINUSE
    finally:
        s.stop()
    assert not port_is_bound(s.port)


def test_refuse_connections_switches_a_running_simulator(session: requests.Session) -> None:
    s = Simulator(trickle_s=60).start()
    try:
        url = s.url
        assert get(session, s, "call-000001").status_code == 200
        keepalive = http.client.HTTPConnection("127.0.0.1", s.port, timeout=10)
        keepalive.request("GET", "/v1/calls/call-000002", headers=HEADERS)
        assert keepalive.getresponse().read()
        trickling = raw_get(s.port, "trickle-9-x")
        assert trickling.recv(1) == b"H"
        handlers = s.handler_threads()
        assert len(handlers) == 3  # the session's pooled connection, keepalive, trickling

        s.refuse_connections()
        assert s.refusing
        assert s.url == url
        # Open connections were hung up and their handlers have ended.
        assert hung_up(trickling)
        assert keepalive.sock is not None
        assert hung_up(keepalive.sock)
        for thread in handlers:
            thread.join(10)
            assert not thread.is_alive()
        # New ones are refused by the kernel, while the port stays ours.
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", s.port), timeout=5)
        assert port_is_bound(s.port)
        s.refuse_connections()  # already refusing: nothing changes
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", s.port), timeout=5)
        s.start()  # nothing to serve: stays refusing
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", s.port), timeout=5)
    finally:
        s.stop()
    with pytest.raises(RuntimeError):
        s.refuse_connections()
    # Released: a new simulator can listen on the same port (TIME_WAIT from the hung-up
    # connections rules out a plain bind, SO_REUSEADDR copes).
    Simulator(port=s.port).stop()


def test_stop_is_prompt_with_hostile_streams_open() -> None:
    s = Simulator(trickle_s=60, slow_s=60).start()
    trickle = raw_get(s.port, "trickle-9-x")
    assert trickle.recv(1) == b"H"
    trickleb = raw_get(s.port, "trickleb-9-x")
    recv_until(trickleb, b"\r\n\r\n")
    endless = raw_get(s.port, "endless-x")
    recv_until(endless, b'"callId": "endless"')  # then stop reading: the server blocks
    huge = raw_get(s.port, "huge-x")
    recv_until(huge, b'"callId": "huge"')
    slow = raw_get(s.port, "slow-9-x")
    deadline = time.monotonic() + 10
    while s.requests_for("slow-9-x") == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    handlers = s.handler_threads()
    assert len(handlers) == 5

    t0 = time.monotonic()
    s.stop()
    assert time.monotonic() - t0 < 5
    for thread in handlers:
        thread.join(10)
        assert not thread.is_alive()
    for sock in (trickle, trickleb, endless, huge, slow):
        assert hung_up(sock)
        sock.close()
    Simulator(port=s.port).stop()  # the port was released


def test_rejects_negative_hostile_settings() -> None:
    for kwargs in ({"trickle_s": -1}, {"bomb_bytes": -1}, {"huge_bytes": -1}):
        with pytest.raises(ValueError):
            Simulator(**kwargs)


def test_foreground_serve_forever_keeps_refusing_until_stop(session: requests.Session) -> None:
    # The `etl simulate` path: serve_forever() in its own thread (here not the main one).
    s = Simulator()
    foreground = threading.Thread(target=s.serve_forever, daemon=True)
    foreground.start()
    try:
        assert get(session, s, "call-000001", timeout=10).status_code == 200
        s.refuse_connections()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", s.port), timeout=5)
        foreground.join(0.2)
        assert foreground.is_alive()  # still holding the port, as a dead API would
        assert port_is_bound(s.port)
    finally:
        s.stop()
    foreground.join(10)
    assert not foreground.is_alive()
    Simulator(port=s.port).stop()  # the port was released


# -- the rate limit (Simulator(rate_limit=...), etl simulate --rate-limit) ------------------------


def test_rate_limit_serves_the_burst_then_429_with_an_integer_retry_after(
        session: requests.Session) -> None:
    with Simulator(rate_limit=1, burst=3) as s:
        answers = [get(session, s, "call-000001") for _ in range(5)]
        assert [r.status_code for r in answers] == [200, 200, 200, 429, 429]
        limited = answers[3]
        assert limited.json() == {"error": "too many requests"}
        assert limited.headers["Retry-After"] == "1"  # a token in up to 1 s, at least 1
        assert s.rate_limited == 2
        assert s.total_requests == 5
        assert s.requests_for("call-000001") == 3  # the 429s never reached the API
        # Checked before anything else: a request with wrong credentials gets 429 too.
        assert session.get(f"{s.url}/v1/calls/x", headers={"x-commubo-accessToken": "no"},
                           timeout=5).status_code == 429


def test_rate_limit_retry_after_is_the_wait_for_a_token_rounded_up(
        session: requests.Session) -> None:
    with Simulator(rate_limit=0.4, burst=1) as s:  # a token every 2.5 s
        assert get(session, s, "call-000001").status_code == 200
        r = get(session, s, "call-000001")
        assert (r.status_code, r.headers["Retry-After"]) == (429, "3")


def test_a_429_takes_no_token(session: requests.Session) -> None:
    with Simulator(rate_limit=1, burst=1) as s:
        assert get(session, s, "call-000001").status_code == 200
        assert [get(session, s, "call-000001").status_code for _ in range(5)] == [429] * 5
        time.sleep(1.1)  # one token back: had the 429s taken tokens, 5 would be owed
        assert get(session, s, "call-000001").status_code == 200


def test_rate_limit_is_shared_by_all_connections() -> None:
    with Simulator(rate_limit=0.5, burst=10) as s:
        def one(_: int) -> int:
            with requests.Session() as own:  # a connection of its own
                own.headers.update(HEADERS)
                return get(own, s, "call-000002").status_code

        with ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(one, range(16)))
    assert sorted(statuses) == [200] * 10 + [429] * 6
    assert s.rate_limited == 6


def test_stats_count_requests_and_429s_per_second(session: requests.Session) -> None:
    with Simulator(rate_limit=1, burst=2) as s:
        for call_id in ("call-000001", "nf-stats", "call-000003", "call-000004"):
            get(session, s, call_id)
        missing = next(f"call-{i:06d}" for i in range(1000)
                       if payload_for(f"call-{i:06d}") is None)
        s.reset_counts()  # zeroes everything and fills the bucket again
        assert s.stats()["requests"] == 0
        for call_id in ("call-000001", missing, "call-000003"):
            get(session, s, call_id)
        # /_stats: no headers needed, not counted, not rate-limited.
        r = requests.get(f"{s.url}/_stats", timeout=5)
        assert r.status_code == 200
        stats = r.json()
        assert stats == s.stats()
    assert {k: stats[k] for k in ("requests", "rate_limited", "rate_limit", "burst")} == {
        "requests": 3, "rate_limited": 1, "rate_limit": 1, "burst": 2}
    [second] = stats["per_second"]  # all within the first second
    assert second == {"s": 0, "requests": 3, "ok": 1, "not_found": 1, "rate_limited": 1}


def test_stats_without_a_rate_limit(sim: Simulator, session: requests.Session) -> None:
    get(session, sim, "call-000001")
    stats = requests.get(f"{sim.url}/_stats", timeout=5).json()
    assert (stats["rate_limit"], stats["burst"], stats["rate_limited"]) == (0, None, 0)
    assert stats["per_second"][0]["ok"] == 1
    assert sim.total_requests == 1


@pytest.mark.parametrize(("rate_limit", "burst"), [(300, 30), (5, 1), (0, None)])
def test_default_burst_is_a_tenth_of_a_second(rate_limit: float, burst: float | None) -> None:
    s = Simulator(rate_limit=rate_limit)
    try:
        assert s.burst == burst
    finally:
        s.stop()


@pytest.mark.parametrize("kwargs", [{"rate_limit": -1}, {"rate_limit": float("inf")},
                                    {"rate_limit": 10, "burst": 0.5}])
def test_rejects_bad_rate_limits(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        Simulator(**kwargs)
