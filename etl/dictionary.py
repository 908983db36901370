"""docs/data-dictionary.md, written from the schema (`etl db docs`): every table, view and
column with its type, keys and comment, and the code values. A test regenerates it and fails
when the file and the schema disagree."""

from __future__ import annotations

from sqlalchemy import JSON, DateTime, Integer, SmallInteger, Table, Text

from .schema import (
    CALL_TYPES,
    UTC_NOTE,
    call_types,
    calls,
    customer_phone_numbers,
    customer_versions,
    customers,
    etl_call_status,
    etl_runs,
    operator_versions,
    operators,
    scenarios,
)
from .views import VIEWS

HEADER = """# Data dictionary

Written by `etl db docs` from `etl/schema.py` and `etl/views.py`; do not edit by hand. The
same comments are in the database (PostgreSQL: `\\d+ calls`, `obj_description`,
`col_description`; SQLite keeps no comments).

**Times** are {utc}. A day, week or month is counted in a time zone you state, for example
Japan's: `date_trunc('day', call_date_time AT TIME ZONE 'Asia/Tokyo')` (PostgreSQL).

**History**: `customers` and `operators` hold the newest snapshot; `customer_versions` and
`operator_versions` every snapshot, valid from `valid_from` (inclusive) to `valid_to`
(exclusive, NULL for the newest), dated by the source's `updatedDateTime`.
"""


# The data first, in the order an analyst meets them, then the run bookkeeping.
TABLES = (calls, call_types, customers, customer_phone_numbers, customer_versions, operators,
          operator_versions, scenarios, etl_runs, etl_call_status)


def _type(column) -> str:
    t = column.type
    for kind, name in ((JSON, "jsonb (json on SQLite)"), (DateTime, "timestamptz"),
                       (SmallInteger, "smallint"), (Integer, "integer"), (Text, "text")):
        if isinstance(t, kind):
            return name
    return str(t).lower()


def _cell(text: str | None) -> str:
    return (text or "").replace("|", "\\|").replace("\n", " ")


def _table(table: Table) -> list[str]:
    out = [f"## {table.name}", "", _cell(table.comment), "",
           "| column | type | null | key | meaning |", "|---|---|---|---|---|"]
    for c in table.columns:
        keys = []
        if c.primary_key:
            keys.append("PK")
        keys += [f"FK {fk.target_fullname}" for fk in c.foreign_keys]
        out.append(f"| `{c.name}` | {_type(c)} | {'yes' if c.nullable else 'no'} | "
                   f"{', '.join(keys)} | {_cell(c.comment)} |")
    return out + [""]


def render() -> str:
    """The data dictionary as Markdown."""
    out = [HEADER.format(utc=UTC_NOTE), "## Contents", ""]
    out += [f"- [{t.name}](#{t.name})" for t in TABLES]
    out += [f"- [{v.name}](#{v.name}) (view)" for v in VIEWS]
    out += ["- [Code values](#code-values)", ""]
    for table in TABLES:
        out += _table(table)
    for view in VIEWS:
        out += [f"## {view.name}", "", f"View. {_cell(view.comment)}", "",
                "| column | meaning |", "|---|---|"]
        out += [f"| `{name}` | {_cell(comment)} |" for name, _, comment in view.columns]
        out += ["", "```sql", view.create_sql(), "```", ""]
    out += ["## Code values", "", "`calls.call_type` (table `call_types`):", "",
            "| code | name | description |", "|---|---|---|"]
    out += [f"| {code} | {name} | {description} |" for code, name, description in CALL_TYPES]
    out += ["", "`connect_result` and `check_point` are kept as the API sends them: the API doc "
            "lists no values for them.", "", "`etl_call_status.status`: `loaded`, `not_found`, "
            "`failed`. `etl_runs.status`: `running`, `succeeded`, `partial`, `failed`, "
            "`interrupted`, `abandoned`.", ""]
    return "\n".join(out)
