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
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

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


# -- the vendor's documented example ---------------------------------------------------------


def documented_example() -> dict[str, Any]:
    """The vendor's documented example call (docs/design.md §1.2), a new copy at each call:
    every field, quirks included: numbers sent as strings, timestamps with +09:00 and Z
    offsets, the voice id under `operatorVoiceId` (as the example spells it). Its ids are none
    that the simulator serves, so it can share a batch with simulator payloads."""
    return {
        "callId": "call-doc-1",
        "callType": "0",
        "relatedCallId": "call-doc-0",
        "phoneNumber": "0312345678",
        "callDateTime": "2018-09-01T13:01:23+09:00",
        "connectedDateTime": "2018-09-01T13:01:30+09:00",
        "talkTime": "123",
        "connectResult": "0",
        "checkPoint": "A",
        "note": "折り返し希望",
        "customer": {
            "customerId": "cus-doc",
            "createdDateTime": "2018-01-01T09:00:00+09:00",
            "updatedDateTime": "2018-08-31T15:00:00Z",
            "familyName": "佐藤",
            "familyNameKana": "サトウ",
            "personalName": "太郎",
            "personalNameKana": "タロウ",
            "middleName": "ジョン",
            "middleNameKana": "ジョン",
            "phoneNumbers": ["09011112222", "0312345678"],
            "orgName": "株式会社サンプル商事",
            "orgNameKana": "カブシキガイシャサンプル",
            "orgShortName": "サンプル商事",
            "orgShortNameKana": "サンプル",
            "deptName": "営業部",
            "deptNameKana": "エイギョウブ",
            "deptShortName": "営業",
            "deptShortNameKana": "エイギョウ",
            "note": "VIP",
        },
        "operator": {
            "operatorId": "op-doc",
            "createdDateTime": "2017-04-01T00:00:00Z",
            "updatedDateTime": "2018-08-01T10:00:00+09:00",
            "operatorVoiceId": "7",
            "name": "鈴木 花子",
            "nameKana": "スズキ ハナコ",
            "shortName": "鈴木",
            "shortNameKana": "スズキ",
            "orgName": "コミューボ株式会社",
            "orgNameKana": "コミューボカブシキガイシャ",
            "orgShortName": "コミューボ",
            "orgShortNameKana": "コミューボ",
            "deptName": "第一コールセンター",
            "deptNameKana": "ダイイチコールセンター",
            "deptShortName": "第一CC",
            "deptShortNameKana": "ダイイチシーシー",
        },
        "scenario": {"scenarioId": "scn-01"},
    }


# The rows the example must become, every column written out by hand (not computed by
# etl.transform): the transformer's output and what the loader stores. The calls row is
# without `raw`, `fetched_at` and `run_id`, which each test adds.
DOCUMENTED_CALL_ROW = {
    "call_id": "call-doc-1",
    "call_type": 0,
    "related_call_id": "call-doc-0",
    "phone_number": "0312345678",
    "call_date_time": datetime(2018, 9, 1, 4, 1, 23, tzinfo=UTC),
    "connected_date_time": datetime(2018, 9, 1, 4, 1, 30, tzinfo=UTC),
    "talk_time": 123,
    "connect_result": "0",
    "check_point": "A",
    "note": "折り返し希望",
    "customer_id": "cus-doc",
    "customer_updated_date_time": datetime(2018, 8, 31, 15, 0, tzinfo=UTC),
    "operator_id": "op-doc",
    "operator_updated_date_time": datetime(2018, 8, 1, 1, 0, tzinfo=UTC),
    "scenario_id": "scn-01",
}
DOCUMENTED_CUSTOMER_ROW = {
    "customer_id": "cus-doc",
    "created_date_time": datetime(2018, 1, 1, 0, 0, tzinfo=UTC),
    "updated_date_time": datetime(2018, 8, 31, 15, 0, tzinfo=UTC),
    "family_name": "佐藤",
    "family_name_kana": "サトウ",
    "personal_name": "太郎",
    "personal_name_kana": "タロウ",
    "middle_name": "ジョン",
    "middle_name_kana": "ジョン",
    "org_name": "株式会社サンプル商事",
    "org_name_kana": "カブシキガイシャサンプル",
    "org_short_name": "サンプル商事",
    "org_short_name_kana": "サンプル",
    "dept_name": "営業部",
    "dept_name_kana": "エイギョウブ",
    "dept_short_name": "営業",
    "dept_short_name_kana": "エイギョウ",
    "note": "VIP",
}
DOCUMENTED_OPERATOR_ROW = {
    "operator_id": "op-doc",
    "created_date_time": datetime(2017, 4, 1, 0, 0, tzinfo=UTC),
    "updated_date_time": datetime(2018, 8, 1, 1, 0, tzinfo=UTC),
    "operator_voice_id": 7,
    "name": "鈴木 花子",
    "name_kana": "スズキ ハナコ",
    "short_name": "鈴木",
    "short_name_kana": "スズキ",
    "org_name": "コミューボ株式会社",
    "org_name_kana": "コミューボカブシキガイシャ",
    "org_short_name": "コミューボ",
    "org_short_name_kana": "コミューボ",
    "dept_name": "第一コールセンター",
    "dept_name_kana": "ダイイチコールセンター",
    "dept_short_name": "第一CC",
    "dept_short_name_kana": "ダイイチシーシー",
}


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
