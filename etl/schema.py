"""The warehouse tables (SPEC section 4): the single source Alembic's env.py points at.

Column names are the snake_case of the API keys. Timestamps are stored as instants
(`timestamptz` on PostgreSQL; UTC text on SQLite, which has no zoned type).
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    SmallInteger,
    Table,
    Text,
)
from sqlalchemy.dialects.postgresql import JSONB

# The newest migration in migrations/versions: bump it with every new migration (a test
# checks it against Alembic's head). It lets `etl sync` see "schema current" without
# importing Alembic.
SCHEMA_REVISION = "0002"

# Named constraints so that later migrations can refer to them on every backend.
metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

Instant = DateTime(timezone=True)
Json = JSON().with_variant(JSONB(), "postgresql")

# Text fields shared by customers and operators (organisation and department names).
_ORG_COLUMNS = (
    "org_name", "org_name_kana", "org_short_name", "org_short_name_kana",
    "dept_name", "dept_name_kana", "dept_short_name", "dept_short_name_kana",
)

scenarios = Table(
    "scenarios",
    metadata,
    Column("scenario_id", Text, primary_key=True),
)

customers = Table(
    "customers",
    metadata,
    Column("customer_id", Text, primary_key=True),
    Column("created_date_time", Instant),
    Column("updated_date_time", Instant),
    Column("family_name", Text),
    Column("family_name_kana", Text),
    Column("personal_name", Text),
    Column("personal_name_kana", Text),
    Column("middle_name", Text),
    Column("middle_name_kana", Text),
    *(Column(name, Text) for name in _ORG_COLUMNS),
    Column("note", Text),
)

customer_phone_numbers = Table(
    "customer_phone_numbers",
    metadata,
    Column(
        "customer_id",
        Text,
        ForeignKey("customers.customer_id", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("position", SmallInteger, nullable=False),
    Column("phone_number", Text),
    PrimaryKeyConstraint("customer_id", "position"),
)

operators = Table(
    "operators",
    metadata,
    Column("operator_id", Text, primary_key=True),
    Column("created_date_time", Instant),
    Column("updated_date_time", Instant),
    Column("operator_voice_id", Integer),
    Column("name", Text),
    Column("name_kana", Text),
    Column("short_name", Text),
    Column("short_name_kana", Text),
    *(Column(name, Text) for name in _ORG_COLUMNS),
)

calls = Table(
    "calls",
    metadata,
    Column("call_id", Text, primary_key=True),
    Column("call_type", SmallInteger),
    Column("related_call_id", Text),
    Column("phone_number", Text),
    Column("call_date_time", Instant),
    Column("connected_date_time", Instant),
    Column("talk_time", Integer),
    Column("connect_result", Text),
    Column("check_point", Text),
    Column("note", Text),
    Column("customer_id", Text, ForeignKey("customers.customer_id")),
    Column("operator_id", Text, ForeignKey("operators.operator_id")),
    Column("scenario_id", Text, ForeignKey("scenarios.scenario_id")),
    Column("raw", Json, nullable=False),
    Column("fetched_at", Instant, nullable=False),
    Column("run_id", Text, nullable=False),
    Index(None, "call_date_time"),
    Index(None, "customer_id"),
    Index(None, "operator_id"),
    Index(None, "related_call_id"),
    Index(None, "scenario_id"),
)

etl_runs = Table(
    "etl_runs",
    metadata,
    Column("run_id", Text, primary_key=True),
    Column("started_at", Instant, nullable=False),
    Column("finished_at", Instant),
    # running, succeeded, partial, failed, interrupted, abandoned (see etl.runs)
    Column("status", Text, nullable=False),
    Column("requested", Integer, nullable=False, default=0),
    Column("loaded", Integer, nullable=False, default=0),
    Column("not_found", Integer, nullable=False, default=0),
    Column("failed", Integer, nullable=False, default=0),
    Column("skipped", Integer, nullable=False, default=0),
    # Since 0002: where the run ran and that it is alive, why it did not succeed, and how
    # many calls loaded with anomalies. NULL in rows written before.
    Column("host", Text),
    Column("pid", Integer),
    Column("heartbeat_at", Instant),
    Column("error", Text),
    Column("warnings", Integer),
    Index(None, "started_at"),
)

etl_call_status = Table(
    "etl_call_status",
    metadata,
    Column("call_id", Text, primary_key=True),
    Column("status", Text, nullable=False),  # loaded, not_found, failed
    Column("http_status", SmallInteger),
    Column("error", Text),
    Column("attempts", SmallInteger, nullable=False),
    Column("run_id", Text, nullable=False),
    Column("updated_at", Instant, nullable=False),
    # Since 0002: what in the loaded payload falls outside the API doc, one reason per line.
    Column("warnings", Text),
    Index(None, "status"),
    Index(None, "run_id"),
)

DATA_TABLES = (scenarios, customers, customer_phone_numbers, operators, calls)
