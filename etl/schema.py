"""The warehouse tables: the single source Alembic's env.py points at, and of the comments
every table and column carries in the database and in docs/data-dictionary.md.

Column names are the snake_case of the API keys. Timestamps are stored as instants
(`timestamptz` on PostgreSQL; UTC text on SQLite, which has no zoned type).
"""

from __future__ import annotations

from typing import Any

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
SCHEMA_REVISION = "0004"

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

# The call types the API doc lists (callType); `call_types` holds them, and the loader adds a
# code the doc does not list when one arrives (with a warning), so the foreign key holds.
CALL_TYPES = (
    (0, "incoming", "A call the AI operator answered"),
    (1, "outgoing", "A call the AI operator placed"),
    (2, "user call", "A call a user placed through the service"),
)
UTC_NOTE = ("stored as an instant (UTC; on SQLite as UTC text); the offset the API sent is kept "
            "in calls.raw")


def _at(what: str, api_key: str) -> str:
    return f"{what} (API {api_key}), {UTC_NOTE}."


def _text(name: str, api_key: str, what: str) -> Column:
    return Column(name, Text, comment=f"{what} (API {api_key}).")


def _org_columns(whose: str) -> list[Column]:
    """Organisation and department names, shared by customers and operators."""
    return [
        _text("org_name", f"{whose}.orgName", f"Name of the {whose}'s organisation"),
        _text("org_name_kana", f"{whose}.orgNameKana", "Reading of org_name in katakana"),
        _text("org_short_name", f"{whose}.orgShortName", "Short name of the organisation"),
        _text("org_short_name_kana", f"{whose}.orgShortNameKana",
              "Reading of org_short_name in katakana"),
        _text("dept_name", f"{whose}.deptName", f"Name of the {whose}'s department"),
        _text("dept_name_kana", f"{whose}.deptNameKana", "Reading of dept_name in katakana"),
        _text("dept_short_name", f"{whose}.deptShortName", "Short name of the department"),
        _text("dept_short_name_kana", f"{whose}.deptShortNameKana",
              "Reading of dept_short_name in katakana"),
    ]


def _customer_columns() -> list[Column]:
    """A customer snapshot's attributes: in `customers` (the newest) and `customer_versions`."""
    return [
        Column("created_date_time", Instant,
               comment=_at("When the customer record was created", "customer.createdDateTime")),
        _text("family_name", "customer.familyName", "Family name"),
        _text("family_name_kana", "customer.familyNameKana", "Reading of family_name in katakana"),
        _text("personal_name", "customer.personalName", "Given name"),
        _text("personal_name_kana", "customer.personalNameKana",
              "Reading of personal_name in katakana"),
        _text("middle_name", "customer.middleName", "Middle name"),
        _text("middle_name_kana", "customer.middleNameKana", "Reading of middle_name in katakana"),
        *_org_columns("customer"),
        _text("note", "customer.note", "Free-text note on the customer"),
    ]


def _operator_columns() -> list[Column]:
    """An operator snapshot's attributes: in `operators` (the newest) and `operator_versions`."""
    return [
        Column("created_date_time", Instant,
               comment=_at("When the operator record was created", "operator.createdDateTime")),
        Column("operator_voice_id", Integer,
               comment="Id of the synthetic voice the operator speaks with (API "
                       "operator.operatorVoiceId, also spelled operatorVocieId; sent as a "
                       "number or a numeric string)."),
        _text("name", "operator.name", "Display name of the operator; not unique: group by "
              "operator_id"),
        _text("name_kana", "operator.nameKana", "Reading of name in katakana"),
        _text("short_name", "operator.shortName", "Short display name"),
        _text("short_name_kana", "operator.shortNameKana", "Reading of short_name in katakana"),
        *_org_columns("operator"),
    ]


def _version_key(entity: str) -> list[Column]:
    """The key of a version table: the entity's id and the source's time of the version."""
    return [
        Column(f"{entity}_id", Text, nullable=False,
               comment=f"Id of the {entity} (API {entity}.{entity}Id)."),
        Column("updated_date_time", Instant, nullable=False,
               comment=_at(f"When the source changed the {entity} to this version; with "
                           f"{entity}_id the key of the version", f"{entity}.updatedDateTime")),
    ]


def _validity(entity: str) -> list[Any]:
    """When a version was valid, and the version table's keys."""
    return [
        Column("valid_from", Instant, nullable=False,
               comment="Start of the version's validity: its updated_date_time (UTC)."),
        Column("valid_to", Instant, comment="End of the validity: the next version's "
               "updated_date_time (UTC); NULL for the newest version."),
        PrimaryKeyConstraint(f"{entity}_id", "updated_date_time"),
        Index(None, f"{entity}_id", "valid_from"),
    ]


scenarios = Table(
    "scenarios",
    metadata,
    Column("scenario_id", Text, primary_key=True,
           comment="Id of the call scenario (API scenario.scenarioId)."),
    comment="The call scenarios (scripts) the AI operator followed, one row per scenario id "
            "seen in a call; the API sends no other attribute.",
)

call_types = Table(
    "call_types",
    metadata,
    Column("code", SmallInteger, primary_key=True,
           comment="The code as the API sends it in callType (calls.call_type)."),
    Column("name", Text, nullable=False, comment="Short label: incoming, outgoing, user call."),
    Column("description", Text, comment="What the code means, from the API doc."),
    comment="Labels of calls.call_type. Codes 0, 1 and 2 come from the API doc; a code the doc "
            "does not list is added as 'unknown' when a call brings it (and the call gets a "
            "warning in etl_call_status).",
)

customers = Table(
    "customers",
    metadata,
    Column("customer_id", Text, primary_key=True, comment="Id of the customer (API "
           "customer.customerId)."),
    Column("updated_date_time", Instant,
           comment=_at("When this snapshot of the customer was last changed at the source; the "
                       "stored row is the newest snapshot received", "customer.updatedDateTime")),
    *_customer_columns(),
    comment="Customers as of their newest snapshot (by updated_date_time) in any fetched "
            "call. Every snapshot received is in customer_versions.",
)

customer_phone_numbers = Table(
    "customer_phone_numbers",
    metadata,
    Column(
        "customer_id",
        Text,
        ForeignKey("customers.customer_id", ondelete="CASCADE"),
        nullable=False,
        comment="The customer (customers.customer_id).",
    ),
    Column("position", SmallInteger, nullable=False,
           comment="Position in the API's customer.phoneNumbers array, from 0."),
    Column("phone_number", Text, comment="The phone number as sent (API "
           "customer.phoneNumbers[position]); text, so leading zeros stay."),
    PrimaryKeyConstraint("customer_id", "position"),
    comment="The phone numbers of each customer's newest snapshot, in the API's order. A "
            "snapshot without a phoneNumbers key leaves them as they are.",
)

customer_versions = Table(
    "customer_versions",
    metadata,
    *_version_key("customer"),
    *_customer_columns(),
    Column("phone_numbers", Json, comment="The version's phone numbers as a JSON array of "
           "strings (API customer.phoneNumbers); NULL when the snapshot had no phoneNumbers."),
    *_validity("customer"),
    comment="Every distinct snapshot of every customer ever received (type 2 history), dated "
            "by the source's updatedDateTime, so snapshots arriving out of order or from "
            "concurrent runs land in their place. A snapshot without updatedDateTime cannot be "
            "dated and is not versioned (it may still update customers when no dated one is "
            "stored). A version is valid from valid_from (inclusive) to valid_to (exclusive).",
)

operators = Table(
    "operators",
    metadata,
    Column("operator_id", Text, primary_key=True, comment="Id of the operator (API "
           "operator.operatorId)."),
    Column("updated_date_time", Instant,
           comment=_at("When this snapshot of the operator was last changed at the source; the "
                       "stored row is the newest snapshot received", "operator.updatedDateTime")),
    *_operator_columns(),
    comment="The AI operators as of their newest snapshot (by updated_date_time) in any "
            "fetched call. Every snapshot received is in operator_versions. Names are not "
            "unique: group by operator_id.",
)

operator_versions = Table(
    "operator_versions",
    metadata,
    *_version_key("operator"),
    *_operator_columns(),
    *_validity("operator"),
    comment="Every distinct snapshot of every operator ever received (type 2 history), dated "
            "by the source's updatedDateTime; see customer_versions for the rules.",
)

calls = Table(
    "calls",
    metadata,
    Column("call_id", Text, primary_key=True, comment="Id of the call (API callId)."),
    Column("call_type", SmallInteger, ForeignKey("call_types.code"),
           comment="Kind of call (API callType, sent as a number or a numeric string): 0 "
                   "incoming, 1 outgoing, 2 user call; labels in call_types."),
    Column("related_call_id", Text,
           comment="The call this call derives from (API relatedCallId), e.g. a callback; "
                   "may name a call not in the warehouse (see the view call_links)."),
    Column("phone_number", Text, comment="The other party's phone number (API phoneNumber)."),
    Column("call_date_time", Instant,
           comment=_at("When the call started", "callDateTime") +
           " Count days in a stated time zone: date_trunc('day', call_date_time AT TIME ZONE "
           "'Asia/Tokyo')."),
    Column("connected_date_time", Instant,
           comment=_at("When the call was connected; NULL when it never was",
                       "connectedDateTime")),
    Column("talk_time", Integer,
           comment="Talk time in seconds (API talkTime, sent as a number or a numeric "
                   "string); NULL when not connected."),
    Column("connect_result", Text,
           comment="Outcome of the connection attempt as the service codes it (API "
                   "connectResult); the API doc lists no values, so it is kept as sent."),
    Column("check_point", Text,
           comment="Check point the operator or scenario set (API checkPoint); free codes, "
                   "kept as sent; NULL when absent."),
    Column("note", Text, comment="Free-text note on the call (API note)."),
    Column("customer_id", Text, ForeignKey("customers.customer_id"),
           comment="The customer of the call (API customer.customerId); NULL when none."),
    Column("customer_updated_date_time", Instant,
           comment="updated_date_time of the customer version delivered with this call: join "
                   "customer_versions on (customer_id, customer_updated_date_time)."),
    Column("operator_id", Text, ForeignKey("operators.operator_id"),
           comment="The operator of the call (API operator.operatorId); NULL when none."),
    Column("operator_updated_date_time", Instant,
           comment="updated_date_time of the operator version delivered with this call: join "
                   "operator_versions on (operator_id, operator_updated_date_time)."),
    Column("scenario_id", Text, ForeignKey("scenarios.scenario_id"),
           comment="The scenario followed (API scenario.scenarioId); NULL when none."),
    Column("raw", Json, nullable=False,
           comment="The call object exactly as the API sent it (JSON; U+0000 removed), with "
                   "every field, including ones the columns do not model and the original "
                   "time offsets."),
    # fetched_at and run_id are bookkeeping (etl.load.BOOKKEEPING_COLUMNS): a fetch that finds
    # the other columns unchanged leaves the row alone, so they name the fetch that brought
    # the content (last changed); etl_call_status records every fetch (last fetched).
    Column("fetched_at", Instant, nullable=False,
           comment="When the answer that brought this content arrived (UTC): the last change, "
                   "not the last fetch (etl_call_status.fetched_at). Other content replaces it "
                   "only when fetched at least as late as this and as the call's newest load."),
    Column("run_id", Text, nullable=False,
           comment="The run that brought this content (etl_runs.run_id); the run of the last "
                   "fetch is etl_call_status.run_id."),
    Index(None, "call_date_time"),
    Index(None, "customer_id"),
    Index(None, "operator_id"),
    Index(None, "related_call_id"),
    Index(None, "scenario_id"),
    comment="One row per call fetched from the commubo API (GET /v1/calls/{callId}), from its "
            "newest fetch.",
)

etl_runs = Table(
    "etl_runs",
    metadata,
    Column("run_id", Text, primary_key=True,
           comment="Id of the run: its UTC start time and a random suffix, sortable."),
    Column("started_at", Instant, nullable=False, comment="When the run started (UTC)."),
    Column("finished_at", Instant, comment="When the run ended (UTC); NULL while running or "
           "when abandoned."),
    Column("status", Text, nullable=False,
           comment="running, succeeded, partial (some ids failed), failed (the run stopped), "
                   "interrupted (Ctrl-C, SIGTERM, its caller), abandoned (its process is gone)."),
    Column("requested", Integer, nullable=False, default=0,
           comment="Ids the run was given (after sharding and duplicates)."),
    Column("loaded", Integer, nullable=False, default=0, comment="Ids loaded by the run."),
    Column("not_found", Integer, nullable=False, default=0,
           comment="Ids the API answered 404 for."),
    Column("failed", Integer, nullable=False, default=0,
           comment="Ids that failed (etl failures --run lists them)."),
    Column("skipped", Integer, nullable=False, default=0,
           comment="Ids not fetched because already loaded (--skip-loaded)."),
    Column("related", Integer,
           comment="Calls fetched because a fetched call derives from them (--follow-related; "
                   "set when the run ends): requested + related = loaded + not_found + failed "
                   "+ skipped for a run that completed."),
    Column("host", Text, comment="Host name the run ran on; NULL for runs before migration "
           "0002."),
    Column("pid", Integer, comment="Process id of the run on its host."),
    Column("heartbeat_at", Instant, comment="Last sign of life (UTC): every committed batch "
           "and every 30 s."),
    Column("error", Text, comment="Why a run did not succeed, in one line."),
    Column("warnings", Integer, comment="Ids loaded with values outside what the API doc "
           "allows (etl failures --warnings)."),
    Index(None, "started_at"),
    comment="One row per etl sync run: its counts, where it ran, and how it ended.",
)

# Written on every fetch of a call, so on a rerun that changes nothing it is the one table
# written: one row update per id. Its indexes hold no column a rerun changes (run_id,
# attempts, fetched_at, updated_at), and its pages are filled only to STATUS_FILLFACTOR, so
# that such an update finds room on its page and is HOT: no index entry, a small WAL record.
# Migration 0004 sets both on databases made before; benchmarks/rerun_writes.py measures it.
STATUS_FILLFACTOR = 50

etl_call_status = Table(
    "etl_call_status",
    metadata,
    Column("call_id", Text, primary_key=True, comment="The call id asked for."),
    Column("status", Text, nullable=False,
           comment="Outcome of the newest fetch: loaded, not_found (the API answered 404) or "
                   "failed (error says why)."),
    Column("http_status", SmallInteger, comment="HTTP status of the last answer; NULL when "
           "none came."),
    Column("error", Text, comment="Why the fetch or the load failed, in one line."),
    Column("attempts", SmallInteger, nullable=False,
           comment="Requests made for the id in its last run."),
    Column("run_id", Text, nullable=False,
           comment="The run of the newest fetch, whose outcome this is (etl_runs.run_id); not "
                   "indexed: etl failures --run finds a run's failures by status."),
    Column("updated_at", Instant, nullable=False,
           comment="When this status was last written (UTC; the loader's clock, a moment "
                   "after fetched_at)."),
    Column("warnings", Text, comment="Values outside what the API doc allows in the loaded "
           "call, '; '-separated; NULL when none."),
    Column("fetched_at", Instant, nullable=False,
           comment="When the newest fetch of the call ended (UTC): its answer arrived or its "
                   "last attempt failed. A status is replaced only by a fetch at least as new, "
                   "whichever run commits last. Statuses written before migration 0004: when "
                   "they were written (updated_at)."),
    Index(None, "status"),
    comment="The last outcome of every call id ever asked for: what etl failures, "
            "--skip-loaded and --retry-failed read.",
    postgresql_with={"fillfactor": STATUS_FILLFACTOR},
)

DATA_TABLES = (scenarios, call_types, customers, customer_phone_numbers, customer_versions,
               operators, operator_versions, calls)
