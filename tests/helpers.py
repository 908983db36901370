"""Helpers shared by the test modules (fixtures live in conftest.py). Imported as
`from helpers import ...`: pytest puts tests/ on sys.path.

The expected-warehouse oracle (`Warehouse`, `expected_warehouse`, `stored_warehouse`,
`lost_ids`, `stale_entities`, `TimedSimulator`) lives in `etl.testing`, where the benchmark
scripts import it too; it is re-exported here for the test modules."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from sqlalchemy import create_engine, select, text
from sqlalchemy.engine import URL

from etl.config import Secret, Settings
from etl.schema import etl_call_status
from etl.simulator import DEFAULT_ACCESS_TOKEN, DEFAULT_TENANT_ID, Simulator
from etl.testing import (  # noqa: F401 - the oracle, re-exported for the test modules
    NEVER_SERVED,
    TimedSimulator,
    Warehouse,
    expected_warehouse,
    lost_ids,
    stale_entities,
    stored_warehouse,
)

ROOT = Path(__file__).resolve().parent.parent


@contextmanager
def fresh_database(server: URL, prefix: str = "etl_test") -> Iterator[URL]:
    """A new, empty database on `server` for as long as the block runs, then dropped (FORCE:
    sessions a killed process left behind do not keep it)."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = create_engine(server, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield server.set(database=name)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def stored_statuses(db_url: URL) -> dict[str, str]:
    """Every call id's status in etl_call_status."""
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            return dict(conn.execute(select(etl_call_status.c.call_id,
                                            etl_call_status.c.status)).all())
    finally:
        engine.dispose()


def make_settings(sim: Simulator, db_url: URL, **changes) -> Settings:
    """Settings for a test run: fast backoff so retries do not slow the suite down."""
    base = Settings(
        base_url=sim.url,
        tenant_id=DEFAULT_TENANT_ID,
        access_token=Secret(DEFAULT_ACCESS_TOKEN),
        database_url=db_url,
        concurrency=4,
        timeout_s=5.0,
        backoff_s=0.01,
        max_backoff_s=0.05,
        retry_after_cap_s=5.0,
        batch_size=50,
    )
    return replace(base, **changes)


def etl_env(sim: Simulator | None = None, db_url: URL | None = None, **extra: str
            ) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("COMMUBO_", "ETL_DATABASE_URL", "ETL_CONFIG"))}
    if sim is not None:
        env.update(COMMUBO_BASE_URL=sim.url, COMMUBO_TENANT_ID=DEFAULT_TENANT_ID,
                   COMMUBO_ACCESS_TOKEN=DEFAULT_ACCESS_TOKEN)
    if db_url is not None:
        env["ETL_DATABASE_URL"] = db_url.render_as_string(hide_password=False)
    env.update(extra)
    return env


def ids_file(tmp_path: Path, ids: list[str], name: str = "ids.txt") -> Path:
    path = tmp_path / name
    path.write_text("\n".join(ids) + "\n")
    return path


def run_etl(*args: str, env: dict[str, str], cwd: Path | None = None, input: str | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """The `etl` command in its own process: real exit codes, real stdout and stderr."""
    return subprocess.run(
        [sys.executable, "-m", "etl", *args],
        env=env, cwd=cwd, input=input, capture_output=True, text=True, timeout=timeout,
    )


# -- a server for what the simulator cannot say ---------------------------------------------


class RouteServer:
    """A threaded HTTP server on 127.0.0.1 answering /v1/calls/{id} with `route(handler, id)`
    (the fixture `route_server` makes them); `stop` ends it, and `stopping` is set for
    handlers that wait."""

    def __init__(self, route: Callable[[BaseHTTPRequestHandler, str], None]) -> None:
        self.stopping = threading.Event()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                route(self, self.path.rsplit("/", 1)[-1])

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            block_on_close = False

            def handle_error(self, request, client_address) -> None:
                pass  # clients hanging up on purpose

        self._server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self._server.shutdown()
        self._server.server_close()


def answer(h: BaseHTTPRequestHandler, status: int, body: bytes, *headers: tuple[str, str],
           reason: str | None = None) -> None:
    """A whole response with a Content-Length, from inside a RouteServer's route."""
    h.send_response(status, reason)
    h.send_header("Content-Length", str(len(body)))
    for name, value in headers:
        h.send_header(name, value)
    h.end_headers()
    h.wfile.write(body)
