"""Initial schema: the five data tables, run bookkeeping, analysts' indexes, call_details view.

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TZ = sa.DateTime(timezone=True)
ORG_COLUMNS = (
    "org_name", "org_name_kana", "org_short_name", "org_short_name_kana",
    "dept_name", "dept_name_kana", "dept_short_name", "dept_short_name_kana",
)

# Each call with its customer's and operator's names: the join analysts write first.
CALL_DETAILS = """
CREATE VIEW call_details AS
SELECT
    c.call_id,
    c.call_type,
    c.call_date_time,
    c.connected_date_time,
    c.talk_time,
    c.connect_result,
    c.check_point,
    c.phone_number,
    c.related_call_id,
    c.customer_id,
    cu.family_name AS customer_family_name,
    cu.personal_name AS customer_personal_name,
    cu.org_name AS customer_org_name,
    c.operator_id,
    o.name AS operator_name,
    o.short_name AS operator_short_name,
    c.scenario_id,
    c.note
FROM calls c
LEFT JOIN customers cu ON cu.customer_id = c.customer_id
LEFT JOIN operators o ON o.operator_id = c.operator_id
"""


def _text_columns(*names: str) -> list[sa.Column]:
    return [sa.Column(name, sa.Text()) for name in names]


def upgrade() -> None:
    op.create_table(
        "scenarios",
        sa.Column("scenario_id", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("scenario_id", name=op.f("pk_scenarios")),
    )
    op.create_table(
        "customers",
        sa.Column("customer_id", sa.Text(), nullable=False),
        sa.Column("created_date_time", TZ),
        sa.Column("updated_date_time", TZ),
        *_text_columns(
            "family_name", "family_name_kana", "personal_name", "personal_name_kana",
            "middle_name", "middle_name_kana", *ORG_COLUMNS, "note",
        ),
        sa.PrimaryKeyConstraint("customer_id", name=op.f("pk_customers")),
    )
    op.create_table(
        "customer_phone_numbers",
        sa.Column("customer_id", sa.Text(), nullable=False),
        sa.Column("position", sa.SmallInteger(), nullable=False),
        sa.Column("phone_number", sa.Text()),
        sa.ForeignKeyConstraint(
            ["customer_id"], ["customers.customer_id"],
            name=op.f("fk_customer_phone_numbers_customer_id_customers"), ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("customer_id", "position", name=op.f("pk_customer_phone_numbers")),
    )
    op.create_table(
        "operators",
        sa.Column("operator_id", sa.Text(), nullable=False),
        sa.Column("created_date_time", TZ),
        sa.Column("updated_date_time", TZ),
        sa.Column("operator_voice_id", sa.Integer()),
        *_text_columns("name", "name_kana", "short_name", "short_name_kana", *ORG_COLUMNS),
        sa.PrimaryKeyConstraint("operator_id", name=op.f("pk_operators")),
    )
    op.create_table(
        "calls",
        sa.Column("call_id", sa.Text(), nullable=False),
        sa.Column("call_type", sa.SmallInteger()),
        sa.Column("related_call_id", sa.Text()),
        sa.Column("phone_number", sa.Text()),
        sa.Column("call_date_time", TZ),
        sa.Column("connected_date_time", TZ),
        sa.Column("talk_time", sa.Integer()),
        *_text_columns("connect_result", "check_point", "note"),
        sa.Column("customer_id", sa.Text()),
        sa.Column("operator_id", sa.Text()),
        sa.Column("scenario_id", sa.Text()),
        sa.Column("raw", sa.JSON().with_variant(postgresql.JSONB(), "postgresql"), nullable=False),
        sa.Column("fetched_at", TZ, nullable=False),
        sa.Column("run_id", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(["customer_id"], ["customers.customer_id"],
                                name=op.f("fk_calls_customer_id_customers")),
        sa.ForeignKeyConstraint(["operator_id"], ["operators.operator_id"],
                                name=op.f("fk_calls_operator_id_operators")),
        sa.ForeignKeyConstraint(["scenario_id"], ["scenarios.scenario_id"],
                                name=op.f("fk_calls_scenario_id_scenarios")),
        sa.PrimaryKeyConstraint("call_id", name=op.f("pk_calls")),
    )
    for column in ("call_date_time", "customer_id", "operator_id", "related_call_id",
                   "scenario_id"):
        op.create_index(op.f(f"ix_calls_{column}"), "calls", [column])

    op.create_table(
        "etl_runs",
        sa.Column("run_id", sa.Text(), nullable=False),
        sa.Column("started_at", TZ, nullable=False),
        sa.Column("finished_at", TZ),
        sa.Column("status", sa.Text(), nullable=False),
        *(sa.Column(name, sa.Integer(), nullable=False)
          for name in ("requested", "loaded", "not_found", "failed", "skipped")),
        sa.PrimaryKeyConstraint("run_id", name=op.f("pk_etl_runs")),
    )
    op.create_index(op.f("ix_etl_runs_started_at"), "etl_runs", ["started_at"])
    op.create_table(
        "etl_call_status",
        sa.Column("call_id", sa.Text(), nullable=False),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("http_status", sa.SmallInteger()),
        sa.Column("error", sa.Text()),
        sa.Column("attempts", sa.SmallInteger(), nullable=False),
        sa.Column("run_id", sa.Text(), nullable=False),
        sa.Column("updated_at", TZ, nullable=False),
        sa.PrimaryKeyConstraint("call_id", name=op.f("pk_etl_call_status")),
    )
    op.create_index(op.f("ix_etl_call_status_status"), "etl_call_status", ["status"])
    op.create_index(op.f("ix_etl_call_status_run_id"), "etl_call_status", ["run_id"])
    op.execute(CALL_DETAILS)


def downgrade() -> None:
    op.execute("DROP VIEW call_details")
    for table in ("etl_call_status", "etl_runs", "calls", "customer_phone_numbers", "operators",
                  "customers", "scenarios"):
        op.drop_table(table)
