"""Shared fixtures: a real PostgreSQL server, a fresh database per test, a simulator on a free
port, and a way to run the `etl` command as a separate process.

The PostgreSQL server is, in this order: ETL_TEST_DATABASE_URL when set (any database on that
server; tests create and drop their own databases beside it), a testcontainers PostgreSQL when
a Docker engine answers, else an embedded PostgreSQL from the `pgserver` wheel.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
from helpers import RouteServer, fresh_database
from sqlalchemy import Engine
from sqlalchemy.engine import URL

from etl import db
from etl.config import normalize_database_url
from etl.simulator import Simulator


def _docker_answers() -> bool:
    try:
        import docker

        client = docker.from_env(timeout=3)
        client.ping()
        return True
    except Exception:  # no client library, no socket, no engine: all mean "no Docker"
        return False


@pytest.fixture(scope="session")
def pg_server() -> Iterator[URL]:
    """URL of a database on a PostgreSQL server where tests may create databases."""
    env_url = os.environ.get("ETL_TEST_DATABASE_URL")
    if env_url:
        yield normalize_database_url(env_url)
        return
    if _docker_answers():
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("postgres:16-alpine", driver="psycopg") as pg:
            yield normalize_database_url(pg.get_connection_url())
        return
    import pgserver

    with tempfile.TemporaryDirectory(prefix="etl-pgserver-") as data_dir:
        server = pgserver.get_server(data_dir, cleanup_mode="stop")
        try:
            yield normalize_database_url(server.get_uri())
        finally:
            server.cleanup()


@pytest.fixture
def pg_url(pg_server: URL) -> Iterator[URL]:
    """A fresh, empty database for this test alone, dropped afterwards."""
    with fresh_database(pg_server) as url:
        yield url


@pytest.fixture
def sqlite_url(tmp_path: Path) -> URL:
    return normalize_database_url(f"sqlite:///{tmp_path / 'warehouse.db'}")


@pytest.fixture(params=["postgresql", "sqlite"])
def any_db_url(request: pytest.FixtureRequest) -> URL:
    """Both supported backends, for behaviour that must hold on each."""
    name = "pg_url" if request.param == "postgresql" else "sqlite_url"
    return request.getfixturevalue(name)


def _migrated_engine(url: URL) -> Iterator[Engine]:
    eng = db.make_engine(url)
    db.upgrade(eng)
    yield eng
    eng.dispose()


@pytest.fixture
def engine(any_db_url: URL) -> Iterator[Engine]:
    """An engine on a fresh, migrated database of each backend."""
    yield from _migrated_engine(any_db_url)


@pytest.fixture
def pg_engine(pg_url: URL) -> Iterator[Engine]:
    """An engine on a fresh, migrated PostgreSQL database."""
    yield from _migrated_engine(pg_url)


@pytest.fixture
def sim() -> Iterator[Simulator]:
    with Simulator(slow_s=1.5, retry_after_s=1) as simulator:
        yield simulator


@pytest.fixture
def route_server() -> Iterator[Callable[..., RouteServer]]:
    """Makes RouteServers (tests/helpers.py) for behaviour the simulator cannot produce; stops
    them after the test."""
    servers: list[RouteServer] = []

    def make(route: Callable[[BaseHTTPRequestHandler, str], None]) -> RouteServer:
        servers.append(RouteServer(route))
        return servers[-1]

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def fast_config(tmp_path: Path) -> Path:
    """A config file for `etl` processes in tests: quick retries, short timeouts."""
    path = tmp_path / "etl-test.toml"
    path.write_text(
        "[api]\nbackoff_s = 0.01\nmax_backoff_s = 0.05\ntimeout_s = 5\nretry_after_cap_s = 5\n"
        "concurrency = 4\n\n[sync]\nbatch_size = 50\n"
    )
    return path
