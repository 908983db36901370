"""Hostile and malformed input (docs/design.md §1, §3 and §5): ids files with path tricks, odd
bytes and odd shapes; payloads with wrong types, wrong or missing ids, wrong shapes, huge
strings, U+0000 and deep nesting. Every case has a clear outcome (exit code, status, reason),
no traceback, and nothing already stored is damaged.

Payloads the simulator does not make come from `BodyServer`, a stand-in API that answers each
id with the bytes a test gives it.
"""

from __future__ import annotations

import json
import random
import re
import string
import subprocess
import sys
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
from helpers import etl_env, make_settings, stored_warehouse
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import create_engine, func, select
from sqlalchemy.engine import URL

from etl.errors import InputError, PayloadError
from etl.ids import CALL_ID_RE, read_ids
from etl.schema import etl_call_status, etl_runs
from etl.simulator import Simulator, payload_for
from etl.sync import run_sync
from etl.transform import transform

EPOCH = datetime(2000, 1, 1, tzinfo=UTC)


class BodyServer:
    """An API stand-in on 127.0.0.1: `GET /v1/calls/{id}` answers 200 with the bytes given for
    that id (404 for any other id)."""

    def __init__(self, bodies: dict[str, bytes]) -> None:
        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                body = bodies.get(unquote(self.path.rsplit("/", 1)[-1]))
                self.send_response(404 if body is None else 200)
                body = b'{"error": "not found"}' if body is None else body
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> BodyServer:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.shutdown()
        self._server.server_close()


def etl_process(args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "etl", *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def error_lines(stderr: str) -> list[str]:
    assert "Traceback" not in stderr
    return [line for line in stderr.splitlines() if line.startswith("etl: ")]


def count_runs(db_url: URL) -> int:
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            return conn.execute(select(func.count()).select_from(etl_runs)).scalar_one()
    finally:
        engine.dispose()


def servable(prefix: str, n: int) -> list[str]:
    """`n` ordinary ids the simulator serves (it answers ~3% of ordinary ids with 404)."""
    ids = (f"{prefix}-{i:04d}" for i in range(10 * n))
    return [i for i in ids if payload_for(i) is not None][:n]


# -- ids files ---------------------------------------------------------------------------------

BAD_LINES = {
    "parent-path": b"../etc/passwd",
    "url-escaped-slash": b"call%2F000001",
    "query-string": b"call-000001?x=1",
    "inner-space": b"call 000001",
    "inner-tab": b"call\t000001",
    "slash": b"calls/000001",
    "backslash": b"..\\call",
    "dot": b"call.000001",
    "hash-inside": b"call#1",
    "65-characters": b"a" * 65,
    "a-megabyte": b"a" * 1_000_000,
    "nul-byte": b"call\x00000001",
    "fullwidth-digit": "call-０００００１".encode(),
    "hyphen-lookalike": "call\u2010000001".encode(),
    "line-separator": "call-000001\u2028call-000002".encode(),
}


def test_ids_files_with_hostile_lines_exit_2_naming_the_line_before_any_request(
        sim: Simulator, pg_url: URL, fast_config: Path, tmp_path: Path) -> None:
    stored = servable("keep", 5)
    run_sync(make_settings(sim, pg_url), stored)
    before, runs_before = stored_warehouse(pg_url), count_runs(pg_url)
    sim.reset_counts()

    procs = {}
    for name, line in BAD_LINES.items():
        path = tmp_path / f"{name}.txt"
        path.write_bytes(b"call-000001\n" + line + b"\ncall-000002\n")
        procs[name] = (path, etl_process(["sync", "--config", str(fast_config), "--ids-file",
                                          str(path)], etl_env(sim, pg_url)))

    for name, (path, proc) in procs.items():
        stdout, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 2, (name, stderr)
        [line] = error_lines(stderr)
        assert f"{path}: invalid call id on line 2 " in line, name
        assert len(line) < 300, name  # the offending text is named by its line, not repeated
        assert stdout == ""
    assert sim.total_requests == 0
    assert count_runs(pg_url) == runs_before
    assert stored_warehouse(pg_url) == before


# (name, content: bytes, "mkdir" or None for no file, exit code, what the error line
# says, ids requested)
ODD_FILES = [
    ("bom-and-crlf", "\ufeffcall-000001\r\n# note\r\n  call-000002 \r\n".encode(), 0,
     None, 2),
    ("not-utf8", b"call-000001\ncall-\xff\xfe\n", 2, "line 2 is not UTF-8", None),
    ("latin1", "call-000001\ncafé\n".encode("latin-1"), 2, "line 2 is not UTF-8", None),
    ("utf16", "call-000001\n".encode("utf-16"), 2, "line 1 is not UTF-8", None),
    ("empty", b"", 0, None, 0),
    ("only-comments-and-blanks", b"# nothing today\n\n   \n#\n", 0, None, 0),
    ("directory", "mkdir", 2, "is a directory", None),
    ("missing", None, 2, "no such file", None),
]


@pytest.mark.parametrize(("name", "content", "code", "message", "requested"), ODD_FILES,
                         ids=[case[0] for case in ODD_FILES])
def test_odd_ids_files_have_a_clear_outcome(
        sim: Simulator, pg_url: URL, fast_config: Path, tmp_path: Path, name: str,
        content: bytes | str | None, code: int, message: str | None,
        requested: int | None) -> None:
    path = tmp_path / name
    if content == "mkdir":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    proc = etl_process(["sync", "--config", str(fast_config), "--json", "--ids-file",
                        str(path)], etl_env(sim, pg_url))
    stdout, stderr = proc.communicate(timeout=60)

    assert proc.returncode == code, stderr
    if message is None:
        assert error_lines(stderr) == []
        summary = json.loads(stdout)
        assert (summary["requested"], summary["failed"]) == (requested, 0)
        assert sim.total_requests == requested
    else:
        [line] = error_lines(stderr)
        assert str(path) in line and message in line
        assert sim.total_requests == 0


# -- payloads ----------------------------------------------------------------------------------

_rng = random.Random(7)
HUGE = "".join(_rng.choice(string.ascii_letters) for _ in range(20_000))  # does not compress
FUTURE = "2099-01-01T00:00:00Z"


def hostile(call_id: str, change: Callable[[dict], object] | None = None, **fields: Any
            ) -> bytes:
    """The simulator's payload for `call_id`, its customer and operator replaced by newer
    snapshots named DAMAGED (so that any write of this record shows), then changed."""
    payload = payload_for(call_id)
    payload["customer"] = {**payload.get("customer", {"customerId": "cus-00001"}),
                           "updatedDateTime": FUTURE, "familyName": "DAMAGED",
                           "phoneNumbers": ["000-DAMAGED"]}
    payload["operator"] = {**payload.get("operator", {"operatorId": "op-001"}),
                           "updatedDateTime": FUTURE, "name": "DAMAGED"}
    payload.update(fields)
    if change is not None:
        change(payload)
    return json.dumps(payload).encode()


def _deep(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def _with_deep_field(body: bytes, depth: int) -> bytes:
    return body[:-1] + b', "deep": ' + _deep(depth) + b"}"


# name: (the body for a given call id, what etl_call_status.error says)
BAD_PAYLOADS: dict[str, tuple[Callable[[str], bytes], str]] = {
    "call-type-object": (lambda i: hostile(i, callType={"a": 1}), "callType"),
    "call-type-boolean": (lambda i: hostile(i, callType=True), "callType"),
    "call-type-fraction": (lambda i: hostile(i, callType=1.5), "callType"),
    "talk-time-array": (lambda i: hostile(i, talkTime=[1]), "talkTime"),
    "talk-time-beyond-int32": (lambda i: hostile(i, talkTime=10**30), "out of range"),
    "talk-time-4301-digits": (lambda i: hostile(i, talkTime=0)
                              .replace(b'"talkTime": 0', b'"talkTime": ' + b"9" * 4301),
                              "not JSON"),
    "timestamp-words": (lambda i: hostile(i, callDateTime="yesterday"), "callDateTime"),
    "timestamp-number": (lambda i: hostile(i, callDateTime=1700000000), "callDateTime"),
    "customer-array": (lambda i: hostile(i, customer=[]), "customer"),
    "operator-string": (lambda i: hostile(i, operator="op-001"), "operator"),
    "scenario-number": (lambda i: hostile(i, scenario=7), "scenario"),
    "phone-numbers-object": (lambda i: hostile(
        i, lambda p: p["customer"].update(phoneNumbers={"0": "x"})), "phoneNumbers"),
    "phone-number-object": (lambda i: hostile(
        i, lambda p: p["customer"].update(phoneNumbers=[{"n": 1}])), "phoneNumbers[0]"),
    "customer-id-object": (lambda i: hostile(
        i, lambda p: p["customer"].update(customerId={"id": 1})), "customerId"),
    "no-call-id": (lambda i: hostile(i, lambda p: p.pop("callId")), "no callId"),
    "another-stored-call-id": (lambda i: hostile(i, callId=STORED_ELSEWHERE),
                               "not the requested id"),
    "numeric-call-id": (lambda i: hostile(i, callId=12345), "not the requested id"),
    "call-id-with-nul": (lambda i: hostile(i, callId=i + "\x00x"), "not the requested id"),
    "array-of-the-call": (lambda i: b"[" + hostile(i) + b"]", "not a JSON object"),
    "null": (lambda i: b"null", "not a JSON object"),
    "string": (lambda i: b'"call"', "not a JSON object"),
    "empty-body": (lambda i: b"", "not JSON"),
    "html": (lambda i: b"<html>oops</html>", "not JSON"),
    "truncated-json": (lambda i: hostile(i)[:40], "not JSON"),
    "not-utf8": (lambda i: hostile(i, note="\udcff").replace(b"\\udcff", b"\xff"),
                 "not JSON"),
    "nested-100000-deep": (lambda i: _deep(100_000), "nested too deeply"),
    "nested-600-deep-with-nul": (lambda i: _with_deep_field(hostile(i, note="a\x00b"), 600),
                                 "nested too deeply"),
    "huge-related-call-id": (lambda i: hostile(i, relatedCallId=HUGE),
                             "database rejected the record: index row"),
    "huge-customer-id": (lambda i: hostile(
        i, lambda p: p["customer"].update(customerId=HUGE)),
        "database rejected the record: index row"),
    "nan-in-an-extra-field": (lambda i: hostile(i, extra=float("nan")),
                              "database rejected the record"),
    "lone-surrogate": (lambda i: hostile(i, note="\ud800"), "database rejected the record"),
}
STORED_ELSEWHERE = "keep-elsewhere"


def odd(call_id: str, **fields: Any) -> dict:
    """A valid payload without customer and operator (so it changes no stored snapshot)."""
    payload = {k: v for k, v in payload_for(call_id).items() if k not in ("customer", "operator")}
    payload.update(fields)
    return payload


# Odd but valid: these load, with exactly what was sent (U+0000 stripped).
ODD_PAYLOADS: dict[str, Callable[[str], bytes]] = {
    "a-megabyte-note": lambda i: json.dumps(odd(i, note="メモ" * 500_000)).encode(),
    "nul-in-keys-and-values": lambda i: json.dumps(
        odd(i, note="a\x00b", extra={"k\x00": ["v\x00", {"\x00": None}]})).encode(),
    "nested-200-deep": lambda i: _with_deep_field(json.dumps(odd(i)).encode(), 200),
    "astral-and-bidi-text": lambda i: json.dumps(
        odd(i, note="📞 𠮷野家 \u202eevil\u202c"), ensure_ascii=False).encode(),
    "unknown-fields": lambda i: json.dumps(odd(i, extra=[1, {"b": None}], z=True)).encode(),
    "duplicate-keys-last-wins": lambda i: json.dumps(odd(i)).encode().replace(
        b"{", b'{"callType": {"bad": 1}, ', 1),
}


def test_hostile_payloads_fail_alone_with_a_reason_and_damage_nothing_stored(
        sim: Simulator, pg_url: URL, fast_config: Path, tmp_path: Path) -> None:
    targets = servable("keep", len(BAD_PAYLOADS))
    fresh = servable("odd", len(ODD_PAYLOADS))
    run_sync(make_settings(sim, pg_url), [*targets, STORED_ELSEWHERE])
    before = stored_warehouse(pg_url)
    assert set(before.calls) == {*targets, STORED_ELSEWHERE}

    bad = dict(zip(targets, BAD_PAYLOADS.items(), strict=True))
    good = dict(zip(fresh, ODD_PAYLOADS.items(), strict=True))
    bodies = {i: make(i) for i, (_, (make, _)) in bad.items()}
    bodies.update({i: make(i) for i, (_, make) in good.items()})
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text("\n".join(bodies) + "\n")
    with BodyServer(bodies) as api:
        env = etl_env(None, pg_url, COMMUBO_BASE_URL=api.url, COMMUBO_TENANT_ID="t",
                      COMMUBO_ACCESS_TOKEN="x")
        proc = etl_process(["sync", "--config", str(fast_config), "--json", "--batch-size",
                            "100", "--ids-file", str(ids_file)], env)
        stdout, stderr = proc.communicate(timeout=120)

    assert proc.returncode == 1, stderr
    assert error_lines(stderr) == []
    summary = json.loads(stdout)
    assert (summary["loaded"], summary["failed"]) == (len(good), len(bad))

    got = stored_warehouse(pg_url)
    engine = create_engine(pg_url)
    with engine.connect() as conn:
        errors = dict(conn.execute(select(etl_call_status.c.call_id, etl_call_status.c.error)
                                   .where(etl_call_status.c.status == "failed")).all())
    engine.dispose()
    for call_id, (name, (_, reason)) in bad.items():
        assert reason in (errors.get(call_id) or ""), (name, errors.get(call_id))
        assert len(errors[call_id]) < 300, name
        assert got.calls[call_id] == before.calls[call_id], name  # the stored call stays
    assert got.calls[STORED_ELSEWHERE] == before.calls[STORED_ELSEWHERE]
    assert got.customers == before.customers
    assert got.phones == before.phones
    assert got.operators == before.operators
    for call_id, (name, _) in good.items():
        want = transform(json.loads(bodies[call_id]), call_id=call_id, fetched_at=EPOCH,
                         run_id="-").call
        assert got.statuses[call_id] == "loaded", name
        assert got.calls[call_id] == {k: v for k, v in want.items()
                                      if k not in ("fetched_at", "run_id")}, name


# -- properties --------------------------------------------------------------------------------

valid_ids = st.from_regex(CALL_ID_RE, fullmatch=True)
# codec="utf-8": no lone surrogates, which no ids file can hold.
comments = st.text(alphabet=st.characters(blacklist_characters="\n", codec="utf-8"),
                   max_size=10).map(
    lambda t: "#" + t)
padding = st.sampled_from(["", " ", "\t", "  \t "])


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(st.one_of(valid_ids.map(lambda i: ("id", i)),
                                comments.map(lambda c: ("other", c)),
                                padding.map(lambda p: ("other", p))), max_size=30),
       pads=st.tuples(padding, padding), crlf=st.booleans(), bom=st.booleans(),
       final_newline=st.booleans())
def test_ids_files_read_back_the_unique_ids_in_order_whatever_the_layout(
        tmp_path: Path, lines: list[tuple[str, str]], pads: tuple[str, str], crlf: bool,
        bom: bool, final_newline: bool) -> None:
    end = "\r\n" if crlf else "\n"
    text = end.join(pads[0] + value + pads[1] if kind == "id" else value
                    for kind, value in lines)
    text = ("\ufeff" if bom else "") + text + (end if final_newline and lines else "")
    path = tmp_path / "ids.txt"
    path.write_text(text, encoding="utf-8", newline="")

    ids = [value for kind, value in lines if kind == "id"]
    assert read_ids(str(path)) == list(dict.fromkeys(ids))


not_an_id = st.text(alphabet=st.characters(blacklist_characters="\n\ufeff", codec="utf-8"),
                    min_size=1).filter(
    lambda t: t.strip() and not t.strip().startswith("#") and not CALL_ID_RE.fullmatch(t.strip()))


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(before=st.lists(valid_ids, max_size=5), bad=not_an_id, after=st.lists(valid_ids,
                                                                             max_size=5))
def test_a_line_that_is_no_call_id_is_named_by_its_number(
        tmp_path: Path, before: list[str], bad: str, after: list[str]) -> None:
    path = tmp_path / "ids.txt"
    path.write_text("\n".join([*before, bad, *after]) + "\n", encoding="utf-8",
                    errors="surrogatepass")
    with pytest.raises(InputError) as caught:
        read_ids(str(path))
    message = str(caught.value)
    assert message.startswith(f"{path}: ")
    if "not UTF-8" not in message:  # a lone surrogate is written as bytes no UTF-8 allows
        assert re.search(rf"\bline {len(before) + 1} ", message)


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=200) | st.lists(
    st.sampled_from([b"call-1", b"\n", b"\r\n", b" ", b"#", b"\xef\xbb\xbf", b"\xff", b"/",
                     b"\x00", b"\xe2\x80\xa8"]), max_size=20).map(b"".join))
def test_any_bytes_read_as_valid_ids_or_raise_an_input_error(tmp_path: Path,
                                                              data: bytes) -> None:
    path = tmp_path / "ids.txt"
    path.write_bytes(data)
    try:
        ids = read_ids(str(path))
    except InputError as exc:
        assert str(exc).startswith(f"{path}: ")
        return
    assert all(CALL_ID_RE.fullmatch(i) for i in ids)
    assert len(ids) == len(set(ids))


def _nested(depth: int, leaf: Any) -> Any:
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


@settings(max_examples=100, deadline=None)
@given(depth=st.integers(min_value=0, max_value=3000), nul=st.booleans(),
       where=st.sampled_from(["extra", "note", "customer", "scenario"]))
def test_payloads_nested_to_any_depth_transform_or_raise_payload_error(
        depth: int, nul: bool, where: str) -> None:
    payload = payload_for("call-000001")
    payload[where] = _nested(depth, "a\x00b" if nul else "ab")
    try:
        rows = transform(payload, call_id="call-000001", fetched_at=EPOCH, run_id="-")
    except PayloadError as exc:
        assert str(exc)
        return
    assert rows.call["call_id"] == "call-000001"
