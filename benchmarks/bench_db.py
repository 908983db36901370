"""Databases on a PostgreSQL server for the benchmarks: `fresh_database(server, tag)` (a
context manager: a new `bench_run_<pid>_<n>_<tag>` database, dropped WITH (FORCE) afterwards),
`drop_stale_databases(server)` (those of killed earlier runs), `libpq_url`, `database_url`,
`redact`, `count_rows`."""

from __future__ import annotations

import contextlib
import itertools
import os
import re
from collections.abc import Iterator

import psycopg
from bench_base import log

from etl.config import display_url, normalize_database_url

DB_PREFIX = "bench_run_"


def libpq_url(url: str) -> str:
    """`url` (postgres://, postgresql:// or postgresql+psycopg://) as a libpq URL, which
    psycopg, `etl` and dlt all take."""
    return (normalize_database_url(url).set(drivername="postgresql")
            .render_as_string(hide_password=False))


def database_url(server: str, name: str) -> str:
    """The libpq URL of database `name` on the server of `server`."""
    return (normalize_database_url(server).set(drivername="postgresql", database=name)
            .render_as_string(hide_password=False))


def redact(url: str) -> str:
    """The URL for a report: the password masked."""
    return display_url(normalize_database_url(url).set(drivername="postgresql"))


_DB_SEQ = itertools.count(1)


@contextlib.contextmanager
def fresh_database(server: str, tag: str) -> Iterator[str]:
    """A new, empty database `bench_run_<pid>_<n>_<tag>` on the server of `server` (a libpq
    URL of any database there) for as long as the block runs; yields its libpq URL. Dropped
    WITH (FORCE) afterwards, so sessions of a killed child do not keep it."""
    tag = re.sub(r"[^a-z0-9_]", "_", tag.lower())
    name = f"{DB_PREFIX}{os.getpid()}_{next(_DB_SEQ)}_{tag}"[:63]
    with _admin(server) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield database_url(server, name)
    finally:
        with _admin(server) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def drop_stale_databases(server: str) -> list[str]:
    """Drop the databases of earlier benchmark runs that were killed before cleaning up (their
    process is gone); returns their names."""
    dropped = []
    with _admin(server) as conn:
        names = [r[0] for r in conn.execute(
            "SELECT datname FROM pg_database WHERE datname LIKE 'bench\\_run\\_%'")]
        for name in names:
            m = re.match(rf"{DB_PREFIX}(\d+)_", name)
            if m and not _pid_alive(int(m.group(1))):
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                log(f"dropped {name}, left over by an earlier benchmark run")
                dropped.append(name)
    return dropped


def count_rows(db_url: str, table: str) -> int:
    with psycopg.connect(db_url, connect_timeout=10) as conn:
        return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


def _admin(server: str) -> psycopg.Connection:
    return psycopg.connect(server, autocommit=True, connect_timeout=10)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
