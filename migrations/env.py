"""Alembic environment: the application's metadata is the target; a connection handed in by
`etl.db` is used as is, otherwise one is made from etl's own settings (so `alembic upgrade head`
from a checkout reads the same configuration as `etl db upgrade`)."""

from __future__ import annotations

import logging
from logging.config import fileConfig

from alembic import context

from etl.schema import metadata

config = context.config

# alembic.ini's logging sections are for `alembic ...` run from a checkout (README, Schema
# changes), whose command line configures no logging of its own. `etl db upgrade` and
# `etl sync` run migrations in-process with a Config built in code (no file name) after
# etl.logs has set up logging: fileConfig would replace the handlers, the format (JSON lines
# with --log-format json) and the levels of the application's logging. So only when Alembic
# runs standalone: a config file, and no handler on the root logger yet.
if config.config_file_name is not None and not logging.getLogger().handlers:
    fileConfig(config.config_file_name, disable_existing_loggers=False)


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        # Handed in by etl.db.upgrade() inside its migration_transaction(): Alembic sees the
        # transaction open and leaves beginning and ending it to the caller.
        _run(connection)
        return
    from etl.config import load_settings
    from etl.db import make_engine, migration_transaction

    url = config.get_main_option("sqlalchemy.url") or load_settings().database_url
    engine = make_engine(url if not isinstance(url, str) else load_settings(
        overrides={"database_url": url}).database_url)
    # The transaction etl.db.upgrade() uses too: `engine.begin()` alone would leave SQLite's
    # DDL autocommitted statement by statement, so a crash could leave half a migration.
    try:
        with engine.connect() as conn, migration_transaction(conn):
            _run(conn)
    finally:
        engine.dispose()


def _run(connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=connection.dialect.name == "sqlite",  # SQLite cannot ALTER most things
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    raise SystemExit("offline (--sql) migrations are not supported: run `etl db upgrade`")
run_migrations_online()
