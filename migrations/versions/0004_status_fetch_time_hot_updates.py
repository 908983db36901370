"""Reruns that write little (issue #12): etl_call_status gains fetched_at, the time of the
newest fetch of the call, by which the newest fetch wins for statuses and for calls whose
content a later fetch found unchanged (the load no longer rewrites calls.fetched_at then);
statuses written before get the time they were written (updated_at), which is no earlier
than their fetch. The index on etl_call_status.run_id goes: the run_id of a status changes
on every fetch, and an update that changes an indexed column is never HOT. On PostgreSQL the
table's pages are filled to 50% (fillfactor), so that a rerun's update of a status finds
room on its page (HOT: no index entries, a small WAL record); the existing rows are rewritten
into such pages once, here. Comments that say what fetched_at and run_id mean change with it.

Self-contained: plain DDL, nothing from etl (0003 takes its tables and comments from
etl.schema). PostgreSQL 13 or later (ALTER COLUMN ... DROP EXPRESSION).

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-25
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

FILLFACTOR = 50
RUN_ID_INDEX = "ix_etl_call_status_run_id"

# (table, column): (comment from this revision on, comment before it).
COMMENTS = {
    ("calls", "fetched_at"): (
        "When the answer that brought this content arrived (UTC): the last change, not the "
        "last fetch (etl_call_status.fetched_at). Other content replaces it only when fetched "
        "at least as late as this and as the call's newest load.",
        "When the answer this row holds arrived (UTC); a row is replaced only by a fetch at "
        "least as new."),
    ("calls", "run_id"): (
        "The run that brought this content (etl_runs.run_id); the run of the last fetch is "
        "etl_call_status.run_id.",
        "The run that fetched it (etl_runs.run_id)."),
    ("etl_call_status", "run_id"): (
        "The run of the newest fetch, whose outcome this is (etl_runs.run_id); not indexed: "
        "etl failures --run finds a run's failures by status.",
        "The run that wrote this status."),
    ("etl_call_status", "updated_at"): (
        "When this status was last written (UTC; the loader's clock, a moment after "
        "fetched_at).",
        "When this status was written (UTC)."),
    ("etl_call_status", "fetched_at"): (
        "When the newest fetch of the call ended (UTC): its answer arrived or its last attempt "
        "failed. A status is replaced only by a fetch at least as new, whichever run commits "
        "last. Statuses written before migration 0004: when they were written (updated_at).",
        None),
}


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _comment(which: int) -> None:
    for (table, column), texts in COMMENTS.items():
        if texts[which] is not None:
            op.execute(f"COMMENT ON COLUMN {table}.{column} IS {_quote(texts[which])}")


@contextlib.contextmanager
def _views_set_aside() -> Iterator[None]:
    """SQLite: the views dropped while a table they read is rebuilt (SQLite refuses to rename
    the new table into place while a view names the old one), then made again from the very
    statements that made them."""
    views = op.get_bind().execute(sa.text(
        "SELECT name, sql FROM sqlite_master WHERE type = 'view' ORDER BY rowid")).all()
    for name, _ in views:
        op.execute(f'DROP VIEW "{name}"')
    yield
    for _, sql in views:
        op.execute(sql)


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        op.add_column("etl_call_status", sa.Column("fetched_at", sa.DateTime(timezone=True)))
        op.execute("UPDATE etl_call_status SET fetched_at = updated_at")
        with _views_set_aside(), op.batch_alter_table("etl_call_status") as batch:
            batch.alter_column("fetched_at", existing_type=sa.DateTime(timezone=True),
                               nullable=False)
            batch.drop_index(RUN_ID_INDEX)
        return
    op.drop_index(RUN_ID_INDEX, table_name="etl_call_status")
    op.execute(f"ALTER TABLE etl_call_status SET (fillfactor = {FILLFACTOR})")
    # A stored generated column makes PostgreSQL rewrite the table: every row gets its
    # fetched_at and lands in a page filled to the new fillfactor, and the indexes are built
    # afresh; an UPDATE would leave each row's old version and index entries behind. Then it
    # becomes a plain column, which keeps the values.
    op.execute("ALTER TABLE etl_call_status ADD COLUMN fetched_at timestamptz "
               "GENERATED ALWAYS AS (updated_at) STORED")
    op.execute("ALTER TABLE etl_call_status ALTER COLUMN fetched_at DROP EXPRESSION")
    op.execute("ALTER TABLE etl_call_status ALTER COLUMN fetched_at SET NOT NULL")
    _comment(0)


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        with _views_set_aside(), op.batch_alter_table("etl_call_status") as batch:
            batch.drop_column("fetched_at")
            batch.create_index(RUN_ID_INDEX, ["run_id"])
        return
    op.drop_column("etl_call_status", "fetched_at")
    op.execute("ALTER TABLE etl_call_status RESET (fillfactor)")
    op.create_index(RUN_ID_INDEX, "etl_call_status", ["run_id"])
    _comment(1)
