"""The analysts' views, as data: each column with the expression it is and the comment it
carries, so the SQL, the database comments and docs/data-dictionary.md come from one place.

The SQL is plain enough for both PostgreSQL and SQLite (instants compare as instants on
PostgreSQL and as UTC text of one format on SQLite).
"""

from __future__ import annotations

from dataclasses import dataclass

from .schema import calls


@dataclass(frozen=True)
class View:
    name: str
    comment: str
    source: str  # the FROM clause (and WHERE), after "FROM"
    columns: tuple[tuple[str, str, str], ...]  # (name, expression, comment)

    def create_sql(self) -> str:
        select = ",\n    ".join(f"{expr} AS {name}" for name, expr, _ in self.columns)
        return f"CREATE VIEW {self.name} AS\nSELECT\n    {select}\nFROM {self.source}"


def _call_columns(*names: str) -> tuple[tuple[str, str, str], ...]:
    """Columns taken from `calls` as they are, with the comment they have there."""
    return tuple((n, f"c.{n}", f"As calls.{n}: {calls.c[n].comment}") for n in names)


def _valid_at_call(alias: str) -> str:
    """The version `alias` was valid when the call started: from inclusive, to exclusive."""
    return (f"{alias}.valid_from <= c.call_date_time AND ({alias}.valid_to IS NULL OR "
            f"c.call_date_time < {alias}.valid_to)")

CALL_DETAILS = View(
    name="call_details",
    comment="Each call with its type's label and its customer's and operator's names as they "
            "are now (the newest snapshots); for names as they were at the call, see "
            "call_details_as_of.",
    source="calls c\n"
           "LEFT JOIN call_types t ON t.code = c.call_type\n"
           "LEFT JOIN customers cu ON cu.customer_id = c.customer_id\n"
           "LEFT JOIN operators o ON o.operator_id = c.operator_id",
    columns=(
        *_call_columns("call_id", "call_type"),
        ("call_type_name", "t.name", "call_types.name: incoming, outgoing, user call"),
        *_call_columns("call_date_time", "connected_date_time", "talk_time", "connect_result",
                       "check_point", "phone_number", "related_call_id", "customer_id"),
        ("customer_family_name", "cu.family_name", "customers.family_name (now)"),
        ("customer_personal_name", "cu.personal_name", "customers.personal_name (now)"),
        ("customer_org_name", "cu.org_name", "customers.org_name (now)"),
        *_call_columns("operator_id"),
        ("operator_name", "o.name", "operators.name (now); not unique: group by operator_id"),
        ("operator_short_name", "o.short_name", "operators.short_name (now)"),
        *_call_columns("scenario_id", "note"),
    ),
)

CALL_DETAILS_AS_OF = View(
    name="call_details_as_of",
    comment="Each call with its customer's and operator's attributes as they were at the "
            "call's time (the version valid at call_date_time, from customer_versions and "
            "operator_versions), beside today's. The *_then columns are NULL when no version "
            "received was valid then.",
    source="calls c\n"
           "LEFT JOIN call_types t ON t.code = c.call_type\n"
           "LEFT JOIN customer_versions cv ON cv.customer_id = c.customer_id AND "
           f"{_valid_at_call('cv')}\n"
           "LEFT JOIN customers cu ON cu.customer_id = c.customer_id\n"
           "LEFT JOIN operator_versions ov ON ov.operator_id = c.operator_id AND "
           f"{_valid_at_call('ov')}\n"
           "LEFT JOIN operators o ON o.operator_id = c.operator_id",
    columns=(
        *_call_columns("call_id", "call_date_time", "call_type"),
        ("call_type_name", "t.name", "call_types.name"),
        *_call_columns("talk_time", "customer_id"),
        ("customer_version", "cv.updated_date_time",
         "customer_versions.updated_date_time of the version valid at the call"),
        ("customer_family_name_then", "cv.family_name", "family name at the call"),
        ("customer_personal_name_then", "cv.personal_name", "given name at the call"),
        ("customer_org_name_then", "cv.org_name", "organisation at the call"),
        ("customer_dept_name_then", "cv.dept_name", "department at the call"),
        ("customer_family_name_now", "cu.family_name", "family name now"),
        ("customer_org_name_now", "cu.org_name", "organisation now"),
        ("customer_dept_name_now", "cu.dept_name", "department now"),
        *_call_columns("operator_id"),
        ("operator_version", "ov.updated_date_time",
         "operator_versions.updated_date_time of the version valid at the call"),
        ("operator_name_then", "ov.name", "operator's name at the call"),
        ("operator_dept_name_then", "ov.dept_name", "operator's department at the call"),
        ("operator_name_now", "o.name", "operator's name now"),
        ("operator_dept_name_now", "o.dept_name", "operator's department now"),
    ),
)

CALL_LINKS = View(
    name="call_links",
    comment="Each call that derives from another (related_call_id), and what the warehouse "
            "knows of that other call: loaded, not_found (the API answered 404: it does not "
            "exist), failed (fetching it failed), or not_fetched (never asked for: sync with "
            "--follow-related).",
    source="calls c\n"
           "LEFT JOIN calls r ON r.call_id = c.related_call_id\n"
           "LEFT JOIN etl_call_status s ON s.call_id = c.related_call_id\n"
           "WHERE c.related_call_id IS NOT NULL",
    columns=(
        ("call_id", "c.call_id", "calls.call_id of the deriving call"),
        ("related_call_id", "c.related_call_id", "calls.related_call_id: the call it derives "
         "from"),
        ("related_state", "CASE WHEN r.call_id IS NOT NULL THEN 'loaded' "
         "WHEN s.status = 'not_found' THEN 'not_found' WHEN s.status = 'failed' THEN 'failed' "
         "ELSE 'not_fetched' END",
         "loaded, not_found, failed or not_fetched (see the view's comment)"),
    ),
)

VIEWS = (CALL_DETAILS, CALL_DETAILS_AS_OF, CALL_LINKS)
