from __future__ import annotations

from etl.db import head_revision
from etl.schema import SCHEMA_REVISION


def test_schema_revision_constant_is_alembics_head() -> None:
    # `etl sync` trusts SCHEMA_REVISION to skip importing Alembic when the schema is current.
    assert head_revision() == SCHEMA_REVISION
