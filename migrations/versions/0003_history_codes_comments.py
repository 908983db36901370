"""The warehouse for analysts: etl_runs.related (calls fetched by --follow-related),
call_types (the labels of calls.call_type, referenced by it),
customer_versions and operator_versions (every snapshot, dated by the source; backfilled from
calls.raw), the version each call came with, the views call_details (now with the type's
label), call_details_as_of and call_links, and a comment on every table, view and column
(PostgreSQL; SQLite keeps no comments, docs/data-dictionary.md has them all).

Tables, views and comments are taken from etl.schema and etl.views as they are at this
revision; a later change to them comes with a migration of its own.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

from etl import schema, views
from etl.errors import PayloadError
from etl.transform import transform

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TZ = sa.DateTime(timezone=True)
NEW_TABLES = (schema.call_types, schema.customer_versions, schema.operator_versions)
# Calls read per round of the backfill.
CHUNK = 2000


def upgrade() -> None:
    bind = op.get_bind()
    # SQLite rebuilds `calls` below, which it refuses while a view names it.
    op.execute("DROP VIEW call_details")
    for table in NEW_TABLES:
        table.create(bind)
    op.bulk_insert(schema.call_types, [
        {"code": code, "name": name, "description": description}
        for code, name, description in schema.CALL_TYPES])
    # Codes the API doc does not list, already stored: the foreign key must hold for them.
    op.execute(
        "INSERT INTO call_types (code, name, description) SELECT DISTINCT call_type, "
        "'unknown', 'Not in the API doc; first seen in a fetched call.' FROM calls WHERE "
        "call_type IS NOT NULL AND call_type NOT IN (0, 1, 2)")
    with op.batch_alter_table("etl_runs") as batch:
        batch.add_column(sa.Column("related", sa.Integer()))
    with op.batch_alter_table("calls") as batch:
        batch.add_column(sa.Column("customer_updated_date_time", TZ))
        batch.add_column(sa.Column("operator_updated_date_time", TZ))
        batch.create_foreign_key(op.f("fk_calls_call_type_call_types"), "call_types",
                                 ["call_type"], ["code"])
    _backfill(bind)
    for view in views.VIEWS:
        op.execute(view.create_sql())
    if bind.dialect.name == "postgresql":
        _comment_everything()


def _backfill(bind: sa.engine.Connection) -> None:
    """Versions and the version each call came with, from the payloads in calls.raw: the same
    transform a sync applies, so a backfilled warehouse equals one synced afresh."""
    calls = schema.calls
    customer_versions: dict[tuple[str, Any], dict[str, Any]] = {}
    operator_versions: dict[tuple[str, Any], dict[str, Any]] = {}
    delivered: list[dict[str, Any]] = []
    last = ""
    while True:
        rows = bind.execute(sa.select(calls.c.call_id, calls.c.raw, calls.c.fetched_at)
                            .where(calls.c.call_id > last).order_by(calls.c.call_id)
                            .limit(CHUNK)).all()
        if not rows:
            break
        last = rows[-1].call_id
        for call_id, raw, fetched_at in rows:
            try:
                r = transform(raw, call_id=call_id, fetched_at=fetched_at, run_id="-")
            except PayloadError:
                continue  # stored before a check this version makes: keep as is
            if r.customer is not None and r.customer["updated_date_time"] is not None:
                numbers = ([p["phone_number"] for p in r.phone_numbers] if r.phones_given
                           else None)
                customer_versions.setdefault(
                    (r.customer["customer_id"], r.customer["updated_date_time"]),
                    {**r.customer, "phone_numbers": numbers})
            if r.operator is not None and r.operator["updated_date_time"] is not None:
                operator_versions.setdefault(
                    (r.operator["operator_id"], r.operator["updated_date_time"]), r.operator)
            if r.call["customer_updated_date_time"] or r.call["operator_updated_date_time"]:
                delivered.append({"id": call_id, **{k: r.call[k] for k in (
                    "customer_updated_date_time", "operator_updated_date_time")}})
    for table, versions in ((schema.customer_versions, customer_versions),
                            (schema.operator_versions, operator_versions)):
        if versions:
            bind.execute(table.insert(), _dated(versions))
    if delivered:
        bind.execute(calls.update().where(calls.c.call_id == sa.bindparam("id")).values(
            customer_updated_date_time=sa.bindparam("customer_updated_date_time"),
            operator_updated_date_time=sa.bindparam("operator_updated_date_time")),
            delivered)


def _dated(versions: dict[tuple[str, Any], dict[str, Any]]) -> list[dict[str, Any]]:
    """The versions with valid_from and valid_to (the next version's start) set."""
    out = []
    keys = sorted(versions)
    for n, key in enumerate(keys):
        following = keys[n + 1] if n + 1 < len(keys) else None
        valid_to = following[1] if following is not None and following[0] == key[0] else None
        out.append({**versions[key], "valid_from": key[1], "valid_to": valid_to})
    return out


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _comment_everything() -> None:
    inspector = sa.inspect(op.get_bind())
    for table in schema.metadata.sorted_tables:
        op.execute(f"COMMENT ON TABLE {table.name} IS {_quote(table.comment)}")
        # A column a later migration adds (etl_call_status.fetched_at, 0004) is not there yet:
        # that migration comments it.
        present = {c["name"] for c in inspector.get_columns(table.name)}
        for column in table.columns:
            if column.name in present:
                op.execute(f"COMMENT ON COLUMN {table.name}.{column.name} IS "
                           f"{_quote(column.comment)}")
    for view in views.VIEWS:
        op.execute(f"COMMENT ON VIEW {view.name} IS {_quote(view.comment)}")
        for name, _, comment in view.columns:
            op.execute(f"COMMENT ON COLUMN {view.name}.{name} IS {_quote(comment)}")


def downgrade() -> None:
    for view in reversed(views.VIEWS):
        op.execute(f"DROP VIEW {view.name}")
    with op.batch_alter_table("calls") as batch:
        batch.drop_constraint(op.f("fk_calls_call_type_call_types"), type_="foreignkey")
        batch.drop_column("operator_updated_date_time")
        batch.drop_column("customer_updated_date_time")
    with op.batch_alter_table("etl_runs") as batch:
        batch.drop_column("related")
    for table in reversed(NEW_TABLES):
        op.drop_table(table.name)
    # call_details as 0001 made it: without the type's label.
    op.execute(dataclasses.replace(
        views.CALL_DETAILS,
        source=views.CALL_DETAILS.source.replace(
            "LEFT JOIN call_types t ON t.code = c.call_type\n", ""),
        columns=tuple(c for c in views.CALL_DETAILS.columns if c[0] != "call_type_name"),
    ).create_sql())
