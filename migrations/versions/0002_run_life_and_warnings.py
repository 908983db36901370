"""Run life and anomalies: etl_runs gains host, pid, heartbeat_at, error and warnings;
etl_call_status gains warnings. Rows written before keep NULL there, which every reader
accepts.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

RUN_COLUMNS = (
    ("host", sa.Text()),
    ("pid", sa.Integer()),
    ("heartbeat_at", sa.DateTime(timezone=True)),
    ("error", sa.Text()),
    ("warnings", sa.Integer()),
)


def upgrade() -> None:
    with op.batch_alter_table("etl_runs") as batch:
        for name, type_ in RUN_COLUMNS:
            batch.add_column(sa.Column(name, type_))
    with op.batch_alter_table("etl_call_status") as batch:
        batch.add_column(sa.Column("warnings", sa.Text()))


def downgrade() -> None:
    with op.batch_alter_table("etl_call_status") as batch:
        batch.drop_column("warnings")
    with op.batch_alter_table("etl_runs") as batch:
        for name, _ in reversed(RUN_COLUMNS):
            batch.drop_column(name)
