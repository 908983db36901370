"""Engines, and the schema's migrations (Alembic) run from code or from `etl db ...`."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Engine, create_engine, event, inspect, text
from sqlalchemy.engine import URL, Connection
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from .config import display_url
from .errors import DatabaseError, InputError
from .schema import SCHEMA_REVISION

if TYPE_CHECKING:
    from alembic.config import Config

log = logging.getLogger(__name__)

# pg_advisory_xact_lock key shared by every etl process that upgrades the schema:
# the first one migrates, the others wait and then find nothing to do.
MIGRATION_LOCK_KEY = 0x636F6D6D75626F  # "commubo"


class SchemaNotCurrent(InputError):
    """`--no-migrate` was given and the schema is not at the newest migration."""


def make_engine(url: URL) -> Engine:
    if url.get_backend_name() == "sqlite":
        engine = create_engine(url, connect_args={"timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(
        url,
        pool_pre_ping=True,
        connect_args={"connect_timeout": 10, "application_name": "commubo-etl"},
    )


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA journal_mode=WAL")  # readers (analysts) do not block the sync
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def describe_db_error(exc: BaseException, url: URL) -> str:
    """One line about a database error, with the password scrubbed should a driver repeat it."""
    orig = getattr(exc, "orig", None) or exc
    first = str(orig).strip().splitlines()[0] if str(orig).strip() else type(orig).__name__
    if url.password:
        first = first.replace(str(url.password), "***")
    return first


@contextmanager
def connect(engine: Engine) -> Iterator[Connection]:
    """A connection, with "cannot connect" turned into DatabaseError (exit 3)."""
    try:
        conn = engine.connect()
    except (DBAPIError, SQLAlchemyError, OSError) as exc:
        raise DatabaseError(
            f"cannot connect to the database {display_url(engine.url)}: "
            f"{describe_db_error(exc, engine.url)}"
        ) from None
    with conn:
        yield conn


def migrations_dir() -> Path:
    """Migrations ship inside the wheel as etl/migrations; a checkout keeps them at the top."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "migrations", here.parent / "migrations"):
        if (candidate / "env.py").is_file():
            return candidate
    raise DatabaseError("the migrations folder is missing from this installation")


def alembic_config(connection: Connection | None = None) -> Config:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def head_revision() -> str | None:
    """The newest migration, read from the migration scripts."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def current_revision(conn: Connection) -> str | None:
    """The revision the database is at (None for an empty database). Read with one query
    rather than through Alembic, whose import alone costs a third of a second of CPU on every
    `etl sync` start."""
    if not inspect(conn).has_table("alembic_version"):
        return None
    return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()


def upgrade(engine: Engine) -> tuple[str | None, str | None]:
    """Upgrade to the newest migration; safe when several processes start at once.
    Returns (revision before, revision after)."""
    with connect(engine) as conn:
        if current_revision(conn) == SCHEMA_REVISION:
            conn.rollback()
            return SCHEMA_REVISION, SCHEMA_REVISION  # the common case: nothing to do
        conn.rollback()
        try:
            with conn.begin():
                if conn.dialect.name == "postgresql":
                    # Held to the end of this transaction, which also holds the DDL:
                    # PostgreSQL's DDL is transactional, so waiters see the finished schema.
                    conn.execute(text("SELECT pg_advisory_xact_lock(:k)"),
                                 {"k": MIGRATION_LOCK_KEY})
                before = current_revision(conn)
                if before != SCHEMA_REVISION:
                    from alembic import command

                    command.upgrade(alembic_config(conn), "head")
                after = current_revision(conn)
        except DBAPIError as exc:
            raise DatabaseError(
                f"schema upgrade failed: {describe_db_error(exc, engine.url)}"
            ) from None
    if before != after:
        log.info("schema upgraded from %s to %s", before or "(empty)", after)
    return before, after


def check_reachable(engine: Engine) -> None:
    """Connect once (DatabaseError, exit 3, if that fails)."""
    with connect(engine) as conn:
        conn.execute(text("SELECT 1"))


def check_current(engine: Engine) -> None:
    with connect(engine) as conn:
        current = current_revision(conn)
    head = SCHEMA_REVISION
    if current != head:
        raise SchemaNotCurrent(
            f"database schema is at revision {current or '(none)'}, this version needs {head}: "
            "run `etl db upgrade`, or drop --no-migrate"
        )
