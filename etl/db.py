"""Engines, and the schema's migrations (Alembic) run from code or from `etl db ...`."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Engine, create_engine, event, inspect, text
from sqlalchemy.engine import URL, Connection
from sqlalchemy.exc import DBAPIError, NoSuchModuleError, SQLAlchemyError

from .config import display_url
from .errors import ConfigError, DatabaseError, EtlError, InputError
from .schema import SCHEMA_REVISION, metadata

if TYPE_CHECKING:
    from alembic.config import Config

log = logging.getLogger(__name__)

# pg_advisory_xact_lock key shared by every etl process that upgrades the schema:
# the first one migrates, the others wait and then find nothing to do.
MIGRATION_LOCK_KEY = 0x636F6D6D75626F  # "commubo"


class SchemaNotCurrent(InputError):
    """`--no-migrate` was given and the schema is not at the newest migration."""


def make_engine(url: URL) -> Engine:
    try:
        if url.get_backend_name() == "sqlite":
            engine = create_engine(url, connect_args={"timeout": 30})
            event.listen(engine, "connect", _sqlite_pragmas)
            return engine
        return create_engine(
            url,
            pool_pre_ping=True,
            connect_args={"connect_timeout": 10, "application_name": "commubo-etl"},
        )
    except (NoSuchModuleError, ImportError):
        # A driver that is not installed (config refuses other PostgreSQL drivers already).
        raise ConfigError(
            f"database driver {url.drivername!r} is not installed: commubo-etl uses psycopg 3, "
            "write postgresql://... (or postgresql+psycopg://...)") from None


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA journal_mode=WAL")  # readers (analysts) do not block the sync
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


# What the operator must fix rather than wait for. Before a session exists libpq gives no
# SQLSTATE, only its message; afterwards the SQLSTATE says it.
_MUST_FIX_SQLSTATES = frozenset({
    "28000",  # invalid authorization (role does not exist, no pg_hba.conf entry)
    "28P01",  # password authentication failed
    "3D000",  # database does not exist
    "3F000",  # schema does not exist / none selected to create in
    "42501",  # permission denied
})
_MUST_FIX_MESSAGES = (
    "does not exist",  # database "x" / role "x"
    "authentication failed",
    "no pg_hba.conf entry",
    "no password supplied",
    "permission denied",
    "unable to open database file",  # SQLite: the folder does not exist
    "readonly database",
)


def classify_db_error(exc: BaseException, url: URL, doing: str) -> EtlError:
    """The error to raise for a database failure while `doing` something: ConfigError (exit 2)
    for what the operator must fix (unknown database or role, authentication, privileges),
    DatabaseError (exit 3) for what may heal by itself (refused, dropped, timeouts, a server
    restarting)."""
    reason = describe_db_error(exc, url)
    sqlstate = getattr(getattr(exc, "orig", None) or exc, "sqlstate", None)
    message = f"{doing} {display_url(url)}: {reason}"
    if sqlstate in _MUST_FIX_SQLSTATES or any(m in reason.lower() for m in _MUST_FIX_MESSAGES):
        return ConfigError(message)
    return DatabaseError(message)


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
        raise classify_db_error(exc, engine.url, "cannot connect to the database") from None
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
    """Upgrade to the newest migration; safe when several processes start at once, and when
    one is killed halfway (the whole migration is one transaction, on SQLite too).
    Returns (revision before, revision after)."""
    with connect(engine) as conn:
        if current_revision(conn) == SCHEMA_REVISION:
            conn.rollback()
            return SCHEMA_REVISION, SCHEMA_REVISION  # the common case: nothing to do
        conn.rollback()
        try:
            with migration_transaction(conn):
                # Read again under the lock: whoever held it first may have migrated already.
                before = current_revision(conn)
                if before != SCHEMA_REVISION:
                    from alembic import command

                    command.upgrade(alembic_config(conn), "head")
                after = current_revision(conn)
        except DBAPIError as exc:
            raise classify_db_error(exc, engine.url, "schema upgrade failed on") from None
    if before != after:
        log.info("schema upgraded from %s to %s", before or "(empty)", after)
    return before, after


@contextmanager
def migration_transaction(conn: Connection) -> Iterator[None]:
    """One transaction around a whole migration, which other upgraders wait for: a process
    killed halfway leaves the schema as it was, and the next one in line either migrates or
    finds nothing to do. `conn` must hold no transaction. Also used by migrations/env.py."""
    if conn.dialect.name == "sqlite":
        with _sqlite_write_transaction(conn):
            yield
        return
    with conn.begin():
        if conn.dialect.name == "postgresql":
            # Held to the end of this transaction, which also holds the DDL:
            # PostgreSQL's DDL is transactional, so waiters see the finished schema.
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": MIGRATION_LOCK_KEY})
        yield


@contextmanager
def _sqlite_write_transaction(conn: Connection) -> Iterator[None]:
    # Python's sqlite3 (legacy transaction control) begins a transaction only before INSERT,
    # UPDATE and DELETE, so each CREATE TABLE commits on its own and a first run killed
    # halfway leaves tables with no alembic_version row. For this connection alone, sqlite3's
    # own BEGIN is switched off and one is emitted by hand (the recipe of SQLAlchemy's SQLite
    # docs, kept off the engine: a BEGIN before every read would make concurrent loads more
    # prone to "database is locked"). sqlite3's commit() and rollback() still end it.
    # IMMEDIATE takes the file's write lock at once, so a concurrent first run waits for it
    # (the busy timeout) instead of racing to create the same tables; a deferred BEGIN would
    # read first and then fail at once with "database is locked" when its snapshot is stale.
    # In WAL mode readers go on. A lock held by a killed process goes with it. `:memory:`
    # needs no lock, and takes this one at no cost.
    dbapi_conn = conn.connection.dbapi_connection
    saved = dbapi_conn.isolation_level
    dbapi_conn.isolation_level = None  # commits nothing: no transaction is open here
    try:
        with conn.begin():
            conn.exec_driver_sql("BEGIN IMMEDIATE")
            yield
    finally:
        dbapi_conn.isolation_level = saved


def preflight(engine: Engine, migrate: bool) -> None:
    """What a sync checks before its first request: the database answers (exit 3 if not),
    this role may do what a sync does, and under --no-migrate the schema is current (exit 2
    for both): a run must not spend API calls and then fail on a privilege."""
    with connect(engine) as conn:
        try:
            postgres = conn.dialect.name == "postgresql"
            if postgres:
                _check_privileges(conn)
            current = current_revision(conn)
            if postgres and migrate and current != SCHEMA_REVISION:
                _check_may_create(conn)
        except DBAPIError as exc:
            raise classify_db_error(exc, engine.url, "cannot check the database") from None
    if not migrate and current != SCHEMA_REVISION:
        raise SchemaNotCurrent(
            f"database schema is at revision {current or '(none)'}, this version needs "
            f"{SCHEMA_REVISION}: run `etl db upgrade`, or drop --no-migrate")


def _check_privileges(conn: Connection) -> None:
    """PostgreSQL: a schema to write in, TEMP for the staging tables, and read/write on etl's
    tables that exist."""
    schema, database, role = conn.execute(
        text("SELECT current_schema(), current_database(), current_user")).one()
    if schema is None:
        path = conn.execute(text("SHOW search_path")).scalar()
        raise ConfigError(
            f"no schema of the search_path ({path}) exists in database {database}: create it, "
            "or fix search_path (options=-csearch_path=... in the URL, or the role's setting)")
    missing = []
    if not conn.execute(text("SELECT has_database_privilege(current_database(), 'TEMP')")
                        ).scalar():
        missing.append(f"TEMP on database {database} (GRANT TEMP ON DATABASE {database} TO "
                       f"{role})")
    # has_table_privilege with a list is true when ANY is held: ask for each.
    denied = conn.execute(text(
        "SELECT t FROM unnest(CAST(:tables AS text[])) AS t, "
        "LATERAL (SELECT quote_ident(current_schema()) || '.' || quote_ident(t) AS q) AS n "
        "WHERE to_regclass(n.q) IS NOT NULL AND NOT (has_table_privilege(n.q, 'SELECT') AND "
        "has_table_privilege(n.q, 'INSERT') AND has_table_privilege(n.q, 'UPDATE') AND "
        "has_table_privilege(n.q, 'DELETE'))"),
        {"tables": ["alembic_version", *(t.name for t in metadata.sorted_tables)]}
    ).scalars().all()
    if denied:
        missing.append(f"SELECT, INSERT, UPDATE, DELETE on {', '.join(denied)} (GRANT SELECT, "
                       f"INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {schema} TO {role})")
    if missing:
        raise ConfigError(f"role {role} lacks privileges a sync needs: {'; '.join(missing)}")


def _check_may_create(conn: Connection) -> None:
    """PostgreSQL: CREATE in the current schema, when the schema is to be created or upgraded."""
    if not conn.execute(text("SELECT has_schema_privilege(current_schema(), 'CREATE')")
                        ).scalar():
        schema, role = conn.execute(text("SELECT current_schema(), current_user")).one()
        raise ConfigError(
            f"role {role} lacks privileges a sync needs: CREATE on schema {schema} to create or "
            f"upgrade the tables (GRANT CREATE ON SCHEMA {schema} TO {role}, or run `etl db "
            "upgrade` as the owner and sync with --no-migrate)")
