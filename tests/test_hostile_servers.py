"""Servers that misbehave: trickling, bombs, huge or endless bodies, escape sequences, dead
or wrong endpoints, and the signals an operator sends meanwhile.

Each case ends in a bounded time with one clear line and the documented exit code, and leaves
the warehouse as it should. The simulator produces most of these faults; a small server in
this module produces the ones it cannot (a hostile 403, a redirect, compressed answers).
"""

from __future__ import annotations

import gzip
import signal
import subprocess
import sys
import time
import zlib
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
from helpers import answer, etl_env, ids_file, make_settings, run_etl, stored_statuses
from sqlalchemy import create_engine, select
from sqlalchemy.engine import URL

from etl.errors import ApiUnreachable, RemoteConfigError
from etl.extract import Extractor
from etl.outcome import FAILED, NOT_FOUND, OK
from etl.schema import etl_call_status, etl_runs
from etl.simulator import (
    DEFAULT_ACCESS_TOKEN,
    DEFAULT_TENANT_ID,
    ESCAPE_BODY,
    ESCAPE_REASON,
    Simulator,
    payload_for,
)
from etl.sync import run_sync

CONTROL = [chr(c) for c in range(32) if chr(c) != "\n"] + ["\x7f"]


def fetch(settings, ids: list[str]) -> dict:
    return {o.call_id: o for o in Extractor(settings).fetch(ids) if o is not None}


def no_control(text: str) -> bool:
    return not any(c in text for c in CONTROL)


def run_rows(db_url: URL) -> list[dict]:
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            return [dict(r) for r in conn.execute(select(etl_runs)).mappings()]
    finally:
        engine.dispose()


def config_file(tmp_path: Path, **api: object) -> Path:
    """A config for `etl` processes: quick retries, then the given [api] keys."""
    values = {"backoff_s": 0.01, "max_backoff_s": 0.05, "retry_after_cap_s": 5,
              "timeout_s": 5, "concurrency": 4, **api}
    path = tmp_path / "hostile.toml"
    path.write_text("[api]\n" + "".join(f"{k} = {v}\n" for k, v in values.items())
                    + "\n[sync]\nbatch_size = 20\n")
    return path


def payload_bytes(call_id: str) -> bytes:
    import json

    return json.dumps(payload_for(call_id), ensure_ascii=False).encode()  # as the simulator


# -- a deadline for the whole exchange ------------------------------------------------------


@pytest.mark.parametrize("kind", ["trickle", "trickleb"])
def test_a_trickling_answer_is_cut_off_at_the_deadline_and_retried(sim, sqlite_url, kind):
    sim.trickle_s = 0.2  # a byte every 0.2 s: each read succeeds, the answer never completes
    call_id = f"{kind}-1-x"
    started = time.monotonic()
    o = fetch(make_settings(sim, sqlite_url, timeout_s=1.0), [call_id])[call_id]
    assert o.status == OK
    assert o.payload == payload_for(call_id)
    assert o.attempts == 2
    assert sim.requests_for(call_id) == 2
    assert time.monotonic() - started >= 1.0  # the first attempt waited for its deadline


@pytest.mark.parametrize("kind", ["trickle", "trickleb"])
def test_a_server_that_always_trickles_fails_the_id_after_its_attempts(sim, sqlite_url, kind):
    sim.trickle_s = 0.2
    call_id = f"{kind}-99-x"
    started = time.monotonic()
    o = fetch(make_settings(sim, sqlite_url, timeout_s=1.0, max_attempts=3), [call_id])[call_id]
    took = time.monotonic() - started
    assert o.status == FAILED
    assert o.error == "timed out: no complete answer within 1s (gave up after 3 attempts)"
    assert o.attempts == 3
    # timeout_s x max_attempts plus backoff; without a deadline this would never end.
    assert 3.0 <= took < 3.0 + 30


# -- a size cap on the body -------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "reason"), [
    ("bomb", "response body larger than 10,485,760 bytes once decompressed"),
    ("huge", "response body larger than 10,485,760 bytes"),
    ("endless", "response body larger than 10,485,760 bytes"),
])
def test_a_body_past_the_cap_fails_the_id_without_a_retry(sim, sqlite_url, kind, reason):
    ids = [f"{kind}-x", "call-000001"]
    outcomes = fetch(make_settings(sim, sqlite_url), ids)
    o = outcomes[f"{kind}-x"]
    assert o.status == FAILED
    assert o.error == f"{reason} (api.max_response_bytes)"
    assert o.attempts == 1
    assert sim.requests_for(f"{kind}-x") == 1
    assert outcomes["call-000001"].status == OK


def test_the_cap_is_a_setting(sim, sqlite_url):
    call_id = "call-000001"
    size = len(payload_bytes(call_id))
    o = fetch(make_settings(sim, sqlite_url, max_response_bytes=size - 1), [call_id])[call_id]
    assert o.status == FAILED
    assert o.error.startswith(f"response body larger than {size - 1:,} bytes")
    o = fetch(make_settings(sim, sqlite_url, max_response_bytes=size), [call_id])[call_id]
    assert o.status == OK


@pytest.mark.parametrize("coding", ["gzip", "deflate", "raw-deflate"])
def test_compressed_answers_are_decoded(route_server, sim, sqlite_url, coding):
    def route(h: BaseHTTPRequestHandler, call_id: str) -> None:
        body = payload_bytes(call_id)
        if coding == "gzip":
            packed = gzip.compress(body)
        elif coding == "deflate":
            packed = zlib.compress(body)
        else:
            d = zlib.compressobj(wbits=-15)
            packed = d.compress(body) + d.flush()
        name = "gzip" if coding == "gzip" else "deflate"
        assert "gzip" in h.headers["Accept-Encoding"]
        answer(h, 200, packed, ("Content-Encoding", name), ("Content-Type", "application/json"))

    server = route_server(route)
    settings = make_settings(sim, sqlite_url, base_url=server.url)
    o = fetch(settings, ["call-000007"])["call-000007"]
    assert o.status == OK
    assert o.payload == payload_for("call-000007")


@pytest.mark.parametrize(("coding", "body", "reason"), [
    ("br", b"\x00" * 10, "response uses Content-Encoding 'br', which was not asked for"),
    ("gzip", b"not gzip at all", "gzip body does not decode"),
    ("gzip", gzip.compress(b'{"callId": "x"}')[:-12], "gzip body ends before its end marker"),
])
def test_a_body_that_does_not_decode_fails_the_id(route_server, sim, sqlite_url, coding, body,
                                                  reason):
    server = route_server(lambda h, _id: answer(h, 200, body, ("Content-Encoding", coding)))
    o = fetch(make_settings(sim, sqlite_url, base_url=server.url), ["x"])["x"]
    assert o.status == FAILED
    assert o.error == reason
    assert o.attempts == 1


# -- text from the server is data -------------------------------------------------------------


def test_escape_sequences_from_the_server_never_reach_the_terminal_or_the_table(
        sim, pg_url, tmp_path):
    env = etl_env(sim, pg_url)
    path = ids_file(tmp_path, ["escape-1", "call-000001"])
    proc = run_etl("sync", "--config", str(config_file(tmp_path)), "--ids-file", str(path),
                   env=env)
    assert proc.returncode == 1
    assert no_control(proc.stdout + proc.stderr)

    engine = create_engine(pg_url)
    with engine.connect() as conn:
        error = conn.execute(select(etl_call_status.c.error).where(
            etl_call_status.c.call_id == "escape-1")).scalar_one()
    engine.dispose()
    assert no_control(error)
    assert error.startswith("400 ")
    assert "\\x1b]0;pwned" in error  # escaped, still readable
    assert "\\r" in error
    assert ESCAPE_REASON not in error
    assert ESCAPE_BODY.decode() not in error
    assert '{"error": "bad request \\x1b]0;pwned' in error  # the body, escaped

    shown = run_etl("failures", env=env)
    assert shown.returncode == 0
    assert "escape-1" in shown.stdout
    assert no_control(shown.stdout + shown.stderr)


def test_a_hostile_403_is_one_clean_line(route_server, sqlite_url, tmp_path):
    server = route_server(lambda h, _id: answer(
        h, 403, b'{"error": "\x1b[2J\x1b]0;owned\x07"}', reason="Forbidden\x1b]0;owned\x07\rOK"))
    env = etl_env(None, sqlite_url, COMMUBO_BASE_URL=server.url,
                  COMMUBO_TENANT_ID=DEFAULT_TENANT_ID, COMMUBO_ACCESS_TOKEN=DEFAULT_ACCESS_TOKEN)
    proc = run_etl("sync", "--ids-file", str(ids_file(tmp_path, ["a", "b"])), env=env)
    assert proc.returncode == 3
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("etl: error: 403 Forbidden\\x1b]0;owned\\x07\\rOK from the API")
    assert no_control(proc.stdout + proc.stderr)


def test_a_redirect_stops_the_run_as_a_configuration_error_and_is_not_followed(
        route_server, sqlite_url, tmp_path):
    followed = []

    def route(h: BaseHTTPRequestHandler, call_id: str) -> None:
        if call_id == "elsewhere":
            followed.append(h.headers.get("x-commubo-accessToken"))
            answer(h, 200, b"{}")
        else:
            answer(h, 301, b"", ("Location", "/v1/calls/elsewhere"), reason="Moved Permanently")

    server = route_server(route)
    env = etl_env(None, sqlite_url, COMMUBO_BASE_URL=server.url,
                  COMMUBO_TENANT_ID=DEFAULT_TENANT_ID, COMMUBO_ACCESS_TOKEN=DEFAULT_ACCESS_TOKEN)
    proc = run_etl("sync", "--ids-file", str(ids_file(tmp_path, ["a", "b", "c"])), env=env)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "etl: error: the API answered 301 Moved Permanently, redirecting to "
        "/v1/calls/elsewhere: redirects are not followed; check the base URL "
        "(COMMUBO_BASE_URL or api.base_url)")
    assert followed == []


# -- a dead API -------------------------------------------------------------------------------


def test_a_dead_api_stops_a_3000_id_run_within_a_minute_with_exit_3(pg_url, tmp_path):
    """The default settings, against a port that refuses every connection."""
    with Simulator(refuse=True) as dead:
        path = ids_file(tmp_path, [f"call-{n:06d}" for n in range(1, 3001)])
        env = etl_env(dead, pg_url)
        started = time.monotonic()
        proc = run_etl("sync", "--ids-file", str(path), env=env, timeout=120)
        took = time.monotonic() - started
        assert dead.total_requests == 0
    assert proc.returncode == 3
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith(f"etl: error: cannot reach the API at {dead.url}: connection "
                           "refused (no answer for 2")
    assert took < 60
    [run] = run_rows(pg_url)
    assert run["status"] == "failed"
    # Ids that gave up before the breaker tripped are not recorded: the API was at fault.
    assert stored_statuses(pg_url) == {}


def test_an_unknown_host_stops_the_run_naming_the_cause(sim, sqlite_url):
    settings = make_settings(sim, sqlite_url, base_url="http://no-such-host.invalid",
                             unreachable_after_s=1, max_backoff_s=0.2)
    with pytest.raises(ApiUnreachable, match=r"^cannot reach the API at "
                       r"http://no-such-host.invalid: API host name not found \(no answer"):
        run_sync(settings, [f"call-{n:06d}" for n in range(1, 500)])


def test_what_loaded_before_the_api_died_stays(sim, pg_url):
    settings = make_settings(sim, pg_url, unreachable_after_s=1, max_backoff_s=0.2,
                             batch_size=5)
    first = [f"call-{n:06d}" for n in range(1, 41)]
    run_sync(settings, first)
    before = stored_statuses(pg_url)
    sim.refuse_connections()
    with pytest.raises(ApiUnreachable) as caught:
        run_sync(settings, first + [f"call-{n:06d}" for n in range(41, 400)])
    assert caught.value.summary.status == "failed"
    assert caught.value.summary.loaded == 0
    assert stored_statuses(pg_url) == before


def test_a_flaky_api_that_still_answers_some_requests_does_not_trip_the_breaker(sim, sqlite_url):
    # Every other id resets its connection before any answer, for as long as the run lasts
    # (about 3 s at 100 requests/s, three times the window): the answers between keep the
    # circuit closed.
    ids = [i for n in range(150) for i in (f"reset-99-{n}", f"call-{n + 1:06d}")]
    settings = make_settings(sim, sqlite_url, unreachable_after_s=1, max_attempts=1,
                             max_requests_per_s=100)
    summary = run_sync(settings, ids)
    assert summary.failed == 150
    assert summary.loaded + summary.not_found == 150


# -- a wrong endpoint -------------------------------------------------------------------------


def test_a_run_where_every_answer_is_404_fails_and_downgrades_nothing(sim, pg_url):
    ids = [f"call-{n:06d}" for n in range(1, 81)]
    good = make_settings(sim, pg_url)
    run_sync(good, ids)
    before = stored_statuses(pg_url)
    assert list(before.values()).count("loaded") > 70

    wrong = make_settings(sim, pg_url, base_url=sim.url + "/api")  # the simulator: 404
    with pytest.raises(RemoteConfigError, match="every id answered so far was 404 Not Found "
                       r"\(50 not known as not found before\): check the base URL"):
        run_sync(wrong, ids)
    assert stored_statuses(pg_url) == before
    [_, second] = sorted(run_rows(pg_url), key=lambda r: r["started_at"])
    assert second["status"] == "failed"
    assert second["not_found"] == 0


def test_a_short_run_of_only_404s_fails_too(sim, sqlite_url):
    with pytest.raises(RemoteConfigError, match=r"\(6 not known"):
        run_sync(make_settings(sim, sqlite_url), [f"nf-{n}" for n in range(6)])
    assert stored_statuses(sqlite_url) == {}


def test_a_few_404s_or_404s_already_known_are_recorded_as_usual(sim, sqlite_url):
    settings = make_settings(sim, sqlite_url)
    summary = run_sync(settings, ["nf-1", "nf-2"])  # too few to say anything
    assert (summary.status, summary.not_found) == ("succeeded", 2)
    # A rerun over ids stored as not_found expects 404s, however many.
    known = [f"nf-{n}" for n in range(60)]
    run_sync(settings, ["call-000001", *known])
    summary = run_sync(settings, known)
    assert (summary.status, summary.not_found) == ("succeeded", 60)


def test_one_answer_that_is_not_404_releases_the_held_404s(sim, sqlite_url):
    ids = [f"nf-{n}" for n in range(30)] + ["call-000001"]
    summary = run_sync(make_settings(sim, sqlite_url, concurrency=1), ids)
    assert summary.not_found == 30
    assert stored_statuses(sqlite_url)["nf-29"] == NOT_FOUND


# -- stopping promptly ------------------------------------------------------------------------


@pytest.mark.parametrize(("sig", "code", "said"), [
    (signal.SIGTERM, 143, "etl: stopped by SIGTERM: run "),
    (signal.SIGINT, 130, "etl: interrupted by Ctrl-C: run "),
])
def test_a_signal_stops_a_run_whose_requests_hang_within_seconds(sim, pg_url, tmp_path, sig,
                                                                 code, said):
    sim.trickle_s = 1.0
    ordinary = [f"call-{n:06d}" for n in range(1, 41)]
    path = ids_file(tmp_path, ordinary + [f"trickle-99-{n}" for n in range(20)])
    proc = subprocess.Popen(
        [sys.executable, "-m", "etl", "sync", "--config",
         str(config_file(tmp_path, timeout_s=300, concurrency=4)), "--ids-file", str(path)],
        env=etl_env(sim, pg_url), text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while sum(sim.requests_for(f"trickle-99-{n}") for n in range(20)) < 4 and \
            time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # every worker now hangs on a trickling answer
    sent = time.monotonic()
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    took = time.monotonic() - sent

    assert proc.returncode == code
    assert took < 10  # a trickle would hold it for timeout_s = 300 s per attempt
    assert stderr.strip().splitlines()[-1].startswith(said)
    assert "Traceback" not in stderr
    assert "interrupted" in stdout  # the summary line
    [run] = run_rows(pg_url)
    assert run["status"] == "interrupted"
    stored = stored_statuses(pg_url)
    # What was fetched before the signal was committed, with counts that match the rows.
    assert set(ordinary) <= set(stored)
    assert run["loaded"] + run["not_found"] + run["failed"] == len(stored)


def test_a_403_elsewhere_stops_a_run_whose_other_requests_hang(route_server, sqlite_url,
                                                               tmp_path):
    def route(h: BaseHTTPRequestHandler, call_id: str) -> None:
        if call_id == "deny":
            time.sleep(0.5)  # after the trickles have started
            answer(h, 403, b"{}", reason="Forbidden")
            return
        h.send_response(200)
        h.send_header("Content-Length", "100")
        h.end_headers()
        while not server.stopping.wait(0.5):
            h.wfile.write(b" ")
            h.wfile.flush()

    server = route_server(route)
    env = etl_env(None, sqlite_url, COMMUBO_BASE_URL=server.url,
                  COMMUBO_TENANT_ID=DEFAULT_TENANT_ID, COMMUBO_ACCESS_TOKEN=DEFAULT_ACCESS_TOKEN)
    path = ids_file(tmp_path, ["slow-a", "slow-b", "slow-c", "deny"])
    started = time.monotonic()
    proc = run_etl("sync", "--config", str(config_file(tmp_path, timeout_s=300)),
                   "--ids-file", str(path), env=env, timeout=60)
    assert proc.returncode == 3
    assert time.monotonic() - started < 30
    assert proc.stderr.strip().splitlines()[-1].startswith("etl: error: 403 Forbidden from the")


# -- settings the extractor reads from the environment ----------------------------------------


def test_a_ca_bundle_that_does_not_exist_is_refused_before_any_request(sim, sqlite_url,
                                                                        tmp_path):
    env = etl_env(sim, sqlite_url, REQUESTS_CA_BUNDLE=str(tmp_path / "missing-ca.pem"))
    proc = run_etl("sync", "--ids-file", str(ids_file(tmp_path, ["call-000001"])), env=env)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"etl: error: the CA bundle '{tmp_path / 'missing-ca.pem'}' (from REQUESTS_CA_BUNDLE "
        "or CURL_CA_BUNDLE) does not exist"]
    assert sim.total_requests == 0
    assert not (tmp_path / "warehouse.db").exists() or run_rows(sqlite_url) == []


def test_a_reason_that_quotes_the_payload_is_stored_escaped(route_server, sim, sqlite_url):
    # A valid JSON string may hold any control character; a reason quoting it must not.
    server = route_server(lambda h, _id: answer(
        h, 200, b'{"callId": "other\\u001b]0;pwned\\u0007\\r"}'))
    run_sync(make_settings(sim, sqlite_url, base_url=server.url), ["a"])
    engine = create_engine(sqlite_url)
    with engine.connect() as conn:
        error = conn.execute(select(etl_call_status.c.error)).scalar_one()
    engine.dispose()
    assert error.startswith("bad payload: ")
    assert "other\\x1b]0;pwned\\x07\\r" in error
    assert no_control(error)
