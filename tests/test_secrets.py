"""Secrets and transport (docs/design.md §2.3): the access token and the database password never
appear in stdout, stderr, logs, exception text or any table, whatever way a run ends; TLS
certificates are verified unless a config file says otherwise, loudly.

Every run here carries a recognisable token and database password, and every byte it prints
or stores is searched for them.
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import psycopg
import pytest
from helpers import etl_env, make_settings, run_etl
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.engine import URL

from etl.config import Secret
from etl.errors import AuthError, DatabaseError
from etl.simulator import Simulator, payload_for
from etl.sync import run_sync

TOKEN = "tok-RECOGNISABLE-5b1e9c"
PASSWORD = "pw-RECOGNISABLE-9d7c21"
SECRETS = (TOKEN, PASSWORD, "RECOGNISABLE")
IDS = [*(f"call-{n:06d}" for n in range(1, 41)), "nf-1", "broken-secret"]


def assert_no_secret(where: str, value: str) -> None:
    for secret in SECRETS:
        assert secret not in value, f"a secret in {where}"


@pytest.fixture
def db_url(pg_url: URL) -> Iterator[URL]:
    """`pg_url` reached as a role of its own with the recognisable password (the test server
    may trust 127.0.0.1 and not check it: the password still travels in the URL)."""
    role = f"etl_secret_{uuid.uuid4().hex[:8]}"
    admin = create_engine(pg_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"CREATE ROLE {role} LOGIN PASSWORD '{PASSWORD}'"))
        conn.execute(text(f'GRANT ALL ON DATABASE "{pg_url.database}" TO {role}'))
        conn.execute(text(f'ALTER DATABASE "{pg_url.database}" OWNER TO {role}'))
    try:
        yield pg_url.set(username=role, password=PASSWORD)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'ALTER DATABASE "{pg_url.database}" OWNER TO postgres'))
            conn.execute(text(f"DROP OWNED BY {role}"))
            conn.execute(text(f"DROP ROLE {role}"))
        admin.dispose()


@pytest.fixture
def api() -> Iterator[Simulator]:
    """A simulator that expects the recognisable token."""
    with Simulator(access_token=TOKEN, latency_ms=5) as simulator:
        yield simulator


@pytest.fixture
def ids_file(tmp_path: Path) -> Path:
    path = tmp_path / "ids.txt"
    path.write_text("\n".join(IDS) + "\n")
    return path


def sync(api: Simulator, db_url: URL, ids_file: Path, config: Path, **env: str
         ) -> subprocess.CompletedProcess[str]:
    """`etl -vv sync` (debug logs included) with the recognisable token."""
    return run_etl("-vv", "sync", "--config", str(config), "--ids-file", str(ids_file),
                   env=etl_env(api, db_url, COMMUBO_ACCESS_TOKEN=TOKEN, **env))


def assert_database_holds_no_secret(db_url: URL) -> None:
    """Every row of every table and view, as text."""
    engine = create_engine(db_url)
    try:
        names = inspect(engine).get_table_names() + inspect(engine).get_view_names()
        assert "calls" in names
        with engine.connect() as conn:
            for name in names:
                for (row,) in conn.execute(text(f'SELECT t::text FROM "{name}" t')):
                    assert_no_secret(f"table {name}", row)
    finally:
        engine.dispose()


def test_a_run_that_succeeds_and_the_commands_after_it_show_no_secret(
        api: Simulator, db_url: URL, ids_file: Path, fast_config: Path) -> None:
    proc = sync(api, db_url, ids_file, fast_config)
    env = etl_env(api, db_url, COMMUBO_ACCESS_TOKEN=TOKEN)
    others = [run_etl("-vv", *args, env=env) for args in
              (["failures"], ["runs", "--json"], ["db", "current"], ["db", "upgrade"])]

    assert proc.returncode == 1, proc.stderr  # broken-secret failed; the rest loaded
    assert "DEBUG" in proc.stderr  # debug logging was on
    assert "broken-secret" in others[0].stdout
    for p in (proc, *others):
        assert p.returncode in (0, 1), p.stderr
        assert_no_secret("stdout", p.stdout)
        assert_no_secret("stderr", p.stderr)
    assert "***" in others[3].stdout  # the URL is shown, its password masked
    assert_database_holds_no_secret(db_url)


def test_403_shows_no_secret(db_url: URL, ids_file: Path, fast_config: Path) -> None:
    with Simulator(access_token="another-token") as api:
        proc = sync(api, db_url, ids_file, fast_config)
    assert proc.returncode == 3
    assert "403" in proc.stderr
    assert_no_secret("stdout", proc.stdout)
    assert_no_secret("stderr", proc.stderr)
    assert_database_holds_no_secret(db_url)


def test_unreachable_database_shows_no_secret(api: Simulator, ids_file: Path,
                                              fast_config: Path) -> None:
    nowhere = URL.create("postgresql", username="etl", password=PASSWORD, host="127.0.0.1",
                         port=1, database="warehouse")
    proc = sync(api, nowhere, ids_file, fast_config)
    assert proc.returncode == 3
    assert "etl:***@127.0.0.1:1/warehouse" in proc.stderr
    assert_no_secret("stdout", proc.stdout)
    assert_no_secret("stderr", proc.stderr)


def test_database_lost_mid_run_shows_no_secret(api: Simulator, db_url: URL, ids_file: Path,
                                               fast_config: Path) -> None:
    conninfo = db_url.set(drivername="postgresql").render_as_string(hide_password=False)
    proc = subprocess.Popen(
        [sys.executable, "-m", "etl", "-vv", "sync", "--config", str(fast_config),
         "--batch-size", "5", "--ids-file", str(ids_file)],
        env=etl_env(api, db_url, COMMUBO_ACCESS_TOKEN=TOKEN), text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # Hold the calls table and terminate every session that waits for it, until etl gives up.
    with psycopg.connect(conninfo, autocommit=True) as watcher:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not watcher.execute(
                "SELECT to_regclass('etl_call_status') IS NOT NULL").fetchone()[0]:
            time.sleep(0.01)
        with psycopg.connect(conninfo) as lock:
            lock.execute("LOCK TABLE calls IN EXCLUSIVE MODE")
            while proc.poll() is None and time.monotonic() < deadline:
                watcher.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE "
                                "application_name = 'commubo-etl' AND wait_event_type = 'Lock'")
                time.sleep(0.01)
            lock.rollback()
    stdout, stderr = proc.communicate(timeout=30)

    assert proc.returncode == 3
    assert "failed 4 times writing a batch" in stderr
    assert f"{db_url.username}:***@" in stderr
    assert_no_secret("stdout", stdout)
    assert_no_secret("stderr", stderr)
    assert_database_holds_no_secret(db_url)


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
def test_a_run_killed_or_interrupted_midway_shows_no_secret(
        api: Simulator, db_url: URL, tmp_path: Path, fast_config: Path,
        how: signal.Signals) -> None:
    path = tmp_path / "many.txt"
    path.write_text("\n".join(f"call-{n:06d}" for n in range(1, 2001)) + "\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "etl", "-vv", "sync", "--config", str(fast_config),
         "--batch-size", "10", "--ids-file", str(path)],
        env=etl_env(api, db_url, COMMUBO_ACCESS_TOKEN=TOKEN), text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while api.total_requests < 50 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None
    proc.send_signal(how)
    stdout, stderr = proc.communicate(timeout=60)

    assert proc.returncode == (-signal.SIGKILL if how == signal.SIGKILL else 130)
    if how == signal.SIGINT:
        assert "etl: interrupted by Ctrl-C: run " in stderr
        assert "what was committed stays committed" in stderr
        assert "Traceback" not in stderr
    assert_no_secret("stdout", stdout)
    assert_no_secret("stderr", stderr)
    assert_database_holds_no_secret(db_url)


@pytest.mark.parametrize(
    ("token", "code"),
    [(f" {TOKEN}\n", 1), (f"{TOKEN}\r\nX-Injected: 1", 2), (f"{TOKEN}\nmore", 2),
     (f"{TOKEN}\x7f", 2)],
    ids=["surrounding-whitespace-trimmed", "header-injection", "line-break", "control-character"])
def test_a_token_no_http_header_can_carry_is_refused_without_showing_it(
        api: Simulator, db_url: URL, ids_file: Path, fast_config: Path, token: str,
        code: int) -> None:
    # requests refuses such a header value with an error that repeats it, token and all.
    proc = run_etl("sync", "--config", str(fast_config), "--ids-file", str(ids_file),
                   env=etl_env(api, db_url, COMMUBO_ACCESS_TOKEN=token))
    assert proc.returncode == code, proc.stderr
    if code == 2:
        assert "access token (COMMUBO_ACCESS_TOKEN or api.access_token) has a line break" in (
            proc.stderr)
        assert api.total_requests == 0
    assert_no_secret("stdout", proc.stdout)
    assert_no_secret("stderr", proc.stderr)


def test_exception_text_and_logs_of_the_library_show_no_secret(
        api: Simulator, db_url: URL, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    texts = []
    nowhere = db_url.set(host="127.0.0.1", port=1)
    for settings, error in [
        (make_settings(api, db_url, access_token=Secret("wrong-RECOGNISABLE")), AuthError),
        (make_settings(api, nowhere, access_token=Secret(TOKEN)), DatabaseError),
    ]:
        with pytest.raises(error) as caught:
            run_sync(settings, IDS)
        texts += ["".join(traceback.format_exception(caught.value)), repr(settings),
                  str(settings)]
        # Also the exceptions a `raise ... from None` hides from tracebacks but keeps.
        exc: BaseException | None = caught.value
        while exc is not None:
            texts += [str(exc), repr(exc), repr(getattr(exc, "args", ()))]
            exc = exc.__cause__ or exc.__context__
    summary = run_sync(make_settings(api, db_url, access_token=Secret(TOKEN)), IDS)
    texts.append(json.dumps(summary.to_dict()))

    assert summary.loaded > 30
    for n, value in enumerate(texts):
        assert_no_secret(f"exception or summary text {n}", value)
    assert_no_secret("the logs", caplog.text)
    assert_database_holds_no_secret(db_url)


# -- TLS ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (trusted by nobody) and its key."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    where = tmp_path_factory.mktemp("tls")
    cert, key = where / "cert.pem", where / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


@pytest.fixture
def https_api(certificate: tuple[Path, Path]) -> Iterator[str]:
    """An HTTPS API stand-in serving the simulator's payloads, with that certificate."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            payload = payload_for(unquote(self.path.rsplit("/", 1)[-1]))
            body = json.dumps(payload).encode() if payload else b"{}"
            self.send_response(200 if payload else 404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*certificate)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def tls_sync(url: str, db_url: URL, tmp_path: Path, config: str = "", **env: str
             ) -> subprocess.CompletedProcess[str]:
    ids = tmp_path / "tls-ids.txt"
    ids.write_text("call-000001\ncall-000002\n")
    toml = tmp_path / "tls.toml"
    toml.write_text(f"[api]\nmax_attempts = 2\nbackoff_s = 0.01\n{config}")
    return run_etl("sync", "--config", str(toml), "--json", "--ids-file", str(ids),
                   env=etl_env(None, db_url, COMMUBO_BASE_URL=url, COMMUBO_TENANT_ID="t",
                               COMMUBO_ACCESS_TOKEN=TOKEN, **env))


def test_tls_certificates_are_verified_by_default(https_api: str, pg_url: URL,
                                                  tmp_path: Path) -> None:
    proc = tls_sync(https_api, pg_url, tmp_path)

    assert proc.returncode == 3
    [line] = [x for x in proc.stderr.splitlines() if x.startswith("etl: ")]
    assert "TLS certificate verification failed" in line
    assert "verification is OFF" not in proc.stderr
    assert json.loads(proc.stdout)["loaded"] == 0


def test_a_trusted_certificate_loads_over_tls(https_api: str, pg_url: URL, tmp_path: Path,
                                              certificate: tuple[Path, Path]) -> None:
    proc = tls_sync(https_api, pg_url, tmp_path, REQUESTS_CA_BUNDLE=str(certificate[0]))

    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["loaded"] == 2
    assert "verification is OFF" not in proc.stderr


def test_turning_tls_verification_off_is_explicit_and_loud(https_api: str, pg_url: URL,
                                                           tmp_path: Path) -> None:
    proc = tls_sync(https_api, pg_url, tmp_path, config="verify_tls = false\n")

    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["loaded"] == 2
    [warning] = [x for x in proc.stderr.splitlines() if "WARNING" in x]
    assert "TLS certificate verification is OFF (api.verify_tls = false)" in warning
    assert_no_secret("stderr", proc.stderr)
