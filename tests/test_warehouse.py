"""The warehouse for analysts: comments on everything, the data dictionary, call type labels,
history dated by the source (in any arrival order, from concurrent runs, backfilled), and
views that answer "as of the call" and "is the related call there"."""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, select, text
from sqlalchemy.engine import URL
from test_load import call, customer, loader, ok, operator

from etl import db
from etl.dictionary import TABLES, render
from etl.outcome import NOT_FOUND, Outcome
from etl.schema import call_types, calls, customer_versions, metadata, operator_versions
from etl.views import VIEWS

ROOT = Path(__file__).resolve().parent.parent
T1, T2, T3 = "2026-01-01T00:00:00Z", "2026-02-01T00:00:00+09:00", "2026-03-01T00:00:00Z"


def at(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp).astimezone(UTC)


def versions(engine: Engine, table=customer_versions, key: str = "customer_id"
             ) -> list[tuple[str, datetime, datetime | None, str | None]]:
    name = "family_name" if table is customer_versions else "name"
    with engine.connect() as conn:
        rows = conn.execute(select(table.c[key], table.c.valid_from, table.c.valid_to,
                                   table.c[name]).order_by(table.c[key], table.c.valid_from))
        return [(k, _utc(f), _utc(t), n) for k, f, t, n in rows]


def _utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# -- the schema explains itself -----------------------------------------------------------------


def test_every_table_view_and_column_has_a_comment_in_postgresql(pg_engine: Engine) -> None:
    with pg_engine.connect() as conn:
        missing = conn.execute(text("""
            SELECT c.relname || COALESCE('.' || a.attname, '') FROM pg_class c
            JOIN pg_namespace n ON n.oid = c.relnamespace AND n.nspname = current_schema()
            LEFT JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0
                AND NOT a.attisdropped
            WHERE c.relkind IN ('r', 'v') AND c.relname <> 'alembic_version'
              AND (a.attname IS NULL AND obj_description(c.oid, 'pg_class') IS NULL
                   OR a.attname IS NOT NULL AND col_description(c.oid, a.attnum) IS NULL)
        """)).scalars().all()
        views = set(conn.execute(text(
            "SELECT viewname FROM pg_views WHERE schemaname = current_schema()")).scalars())
        described = conn.execute(text(
            "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'v') AND "
            "obj_description(c.oid, 'pg_class') IS NOT NULL")).scalar()
    assert missing == []
    assert views == {v.name for v in VIEWS}
    assert described == len(metadata.tables) + len(VIEWS)


def test_every_comment_names_its_meaning_not_just_its_name() -> None:
    for table in metadata.tables.values():
        assert table.comment and len(table.comment) > 30, table.name
        for column in table.columns:
            assert column.comment and column.comment.endswith("."), f"{table.name}.{column}"
    for view in VIEWS:
        assert all(comment for _, _, comment in view.columns), view.name


def test_the_data_dictionary_is_the_one_the_schema_writes() -> None:
    committed = (ROOT / "docs" / "data-dictionary.md").read_text(encoding="utf-8")
    assert committed == render(), "run: uv run etl db docs"
    assert {t.name for t in TABLES} == set(metadata.tables)
    for table in metadata.tables.values():
        assert f"## {table.name}\n" in committed
        for column in table.columns:
            assert f"| `{column.name}` |" in committed
    assert "AT TIME ZONE 'Asia/Tokyo'" in committed


def test_etl_db_docs_writes_the_dictionary(tmp_path: Path) -> None:
    from helpers import etl_env, run_etl

    out = tmp_path / "dd.md"
    proc = run_etl("db", "docs", "--output", str(out), env=etl_env())
    assert proc.returncode == 0, proc.stderr
    assert out.read_text(encoding="utf-8") == render()


# -- call types -------------------------------------------------------------------------------


def test_call_types_label_the_codes_and_take_an_unknown_one(engine: Engine) -> None:
    loader(engine).load([ok(call("c-in", callType=0)), ok(call("c-odd", callType=7))])
    with engine.connect() as conn:
        labels = dict(conn.execute(select(call_types.c.code, call_types.c.name)).all())
        shown = dict(conn.execute(text(
            "SELECT call_id, call_type_name FROM call_details")).all())
    assert labels == {0: "incoming", 1: "outgoing", 2: "user call", 7: "unknown"}
    assert shown == {"c-in": "incoming", "c-odd": "unknown"}


# -- history, dated by the source ------------------------------------------------------------


def test_versions_land_in_their_place_whatever_the_arrival_order(engine: Engine) -> None:
    # The newest first, then the oldest, then the middle one; then the middle one again.
    for n, (stamp, name) in enumerate([(T3, "third"), (T1, "first"), (T2, "second"),
                                       (T2, "second")]):
        loader(engine).load([ok(call(f"c-{n}", customer(stamp, name)))])
    assert versions(engine) == [
        ("cus-1", at(T1), at(T2), "first"),
        ("cus-1", at(T2), at(T3), "second"),
        ("cus-1", at(T3), None, "third"),
    ]


def test_a_batch_holding_several_versions_keeps_each(engine: Engine) -> None:
    loader(engine).load([ok(call("c-1", operator=operator(T2, "b"))),
                         ok(call("c-2", operator=operator(T1, "a"))),
                         ok(call("c-3", operator=operator(T2, "b")))])
    assert versions(engine, operator_versions, "operator_id") == [
        ("op-1", at(T1), at(T2), "a"), ("op-1", at(T2), None, "b")]


def test_a_snapshot_without_updated_time_is_not_versioned(engine: Engine) -> None:
    loader(engine).load([ok(call("c-1", customer(None, "undated")))])
    assert versions(engine) == []


def test_a_version_carries_its_phone_numbers(engine: Engine) -> None:
    loader(engine).load([ok(call("c-1", customer(T1, "a", ["03-1", "03-2"])))])
    with engine.connect() as conn:
        assert conn.execute(select(customer_versions.c.phone_numbers)).scalar_one() == [
            "03-1", "03-2"]


def test_each_call_records_the_version_it_came_with(engine: Engine) -> None:
    loader(engine).load([ok(call("c-old", customer(T1, "a"))),
                         ok(call("c-new", customer(T2, "b")))])
    with engine.connect() as conn:
        came = dict(conn.execute(text(
            "SELECT c.call_id, v.family_name FROM calls c JOIN customer_versions v ON "
            "v.customer_id = c.customer_id AND v.updated_date_time = "
            "c.customer_updated_date_time")).all())
    assert came == {"c-old": "a", "c-new": "b"}


def test_concurrent_shards_writing_versions_of_one_customer_keep_the_chain(
        pg_engine: Engine) -> None:
    """Eight loaders at once, each with its own snapshots of the same customers: every
    version is stored once and valid_to always names the next one."""
    stamps = [f"2026-01-{day:02d}T00:00:00Z" for day in range(1, 25)]
    barrier = threading.Barrier(8)
    errors: list[BaseException] = []

    def shard(n: int) -> None:
        try:
            load = loader(pg_engine)
            barrier.wait()
            for stamp in stamps[n::8]:
                load.load([ok(call(f"c-{n}-{stamp}", customer(stamp, f"v{stamp[8:10]}",
                                                              customer_id=cid)))
                           for cid in ("cus-a", "cus-b")])
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=shard, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    got = versions(pg_engine)
    for cid in ("cus-a", "cus-b"):
        chain = [v for v in got if v[0] == cid]
        assert [v[1] for v in chain] == [at(s) for s in stamps]
        assert [v[2] for v in chain] == [at(s) for s in stamps[1:]] + [None]


# -- views --------------------------------------------------------------------------------------


def test_call_details_as_of_shows_the_attributes_at_the_call_beside_todays(
        engine: Engine) -> None:
    def at_time(call_id: str, when: str, snap: dict[str, Any]) -> Outcome:
        return ok(call(call_id, snap, callDateTime=when))

    loader(engine).load([
        at_time("c-jan", "2026-01-15T00:00:00Z", customer(T1, "Sato")),
        at_time("c-feb", "2026-02-15T00:00:00Z", customer(T2, "Suzuki")),
        # A later call that still carried the January snapshot (the source lagged).
        at_time("c-mar", "2026-03-15T00:00:00Z", customer(T1, "Sato")),
    ])
    with engine.connect() as conn:
        rows = {r.call_id: r for r in conn.execute(text(
            "SELECT call_id, customer_family_name_then, customer_family_name_now "
            "FROM call_details_as_of"))}
    assert {k: (r.customer_family_name_then, r.customer_family_name_now)
            for k, r in rows.items()} == {
        "c-jan": ("Sato", "Suzuki"), "c-feb": ("Suzuki", "Suzuki"), "c-mar": ("Suzuki", "Suzuki")}


def test_call_links_tell_not_fetched_from_does_not_exist(engine: Engine) -> None:
    load = loader(engine)
    load.load([
        ok(call("c-root")),
        ok(call("c-1", relatedCallId="c-root")),
        ok(call("c-2", relatedCallId="c-gone")),
        ok(call("c-3", relatedCallId="c-elsewhere")),
        Outcome("c-gone", NOT_FOUND, http_status=404, attempts=1),
    ])
    with engine.connect() as conn:
        states = dict(conn.execute(text(
            "SELECT call_id, related_state FROM call_links")).all())
    assert states == {"c-1": "loaded", "c-2": "not_found", "c-3": "not_fetched"}


# -- migration 0003 on a warehouse filled before it ---------------------------------------------


@pytest.mark.parametrize("backend", ["postgresql", "sqlite"])
def test_the_history_migration_backfills_from_calls_raw(backend: str, request) -> None:
    from alembic import command

    url: URL = request.getfixturevalue("pg_url" if backend == "postgresql" else "sqlite_url")
    engine = db.make_engine(url)
    with engine.connect() as conn, db.migration_transaction(conn):
        command.upgrade(db.alembic_config(conn), "0002")
    payloads = [call("c-1", customer(T1, "first", ["1"]), operator(T1, "op-a")),
                call("c-2", customer(T3, "third"), operator(T2, "op-b"), callType=9),
                call("c-3", customer(T2, "second", ["2"]))]
    import json

    with engine.begin() as conn:
        for p in payloads:
            conn.execute(text(
                "INSERT INTO calls (call_id, call_type, customer_id, operator_id, raw, "
                "fetched_at, run_id) VALUES (:id, :type, NULL, NULL, :raw, :at, 'old')"),
                {"id": p["callId"], "type": p["callType"], "raw": json.dumps(p),
                 "at": datetime(2026, 4, 1, tzinfo=UTC)})
    db.upgrade(engine)
    assert versions(engine) == [("cus-1", at(T1), at(T2), "first"),
                                ("cus-1", at(T2), at(T3), "second"),
                                ("cus-1", at(T3), None, "third")]
    assert versions(engine, operator_versions, "operator_id") == [
        ("op-1", at(T1), at(T2), "op-a"), ("op-1", at(T2), None, "op-b")]
    with engine.connect() as conn:
        came = dict(conn.execute(select(calls.c.call_id,
                                        calls.c.customer_updated_date_time)).all())
        assert conn.execute(select(call_types.c.name).where(call_types.c.code == 9)
                            ).scalar_one() == "unknown"
    assert {k: _utc(v) for k, v in came.items()} == {"c-1": at(T1), "c-2": at(T3),
                                                     "c-3": at(T2)}
    engine.dispose()


# -- the README's example queries run --------------------------------------------------------


def readme_queries() -> list[str]:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("### Example queries", 1)[1].split("\n## ", 1)[0]
    sql = section.split("```sql\n", 1)[1].split("```", 1)[0]
    return [q.strip() for q in sql.split(";\n") if q.strip()]


def test_the_readme_example_queries_run_on_a_synced_warehouse(sim, pg_url: URL) -> None:
    from helpers import make_settings

    from etl.sync import run_sync

    run_sync(make_settings(sim, pg_url), [f"call-{n:06d}" for n in range(1, 301)])
    queries = readme_queries()
    assert len(queries) >= 10
    engine = db.make_engine(pg_url)
    with engine.connect() as conn:
        results = [conn.execute(text(q)).all() for q in queries]
    engine.dispose()
    per_day, _, per_dept, per_operator = results[:4]
    assert sum(r.calls for r in per_day) > 250
    assert sum(r.calls for r in per_dept) > 0
    assert all(r.operator_id for r in per_operator)


def test_the_demo_query_counts_by_operator_id_on_both_backends(sim, engine: Engine) -> None:
    from helpers import make_settings

    from etl.demo import FIRST_QUERY
    from etl.sync import run_sync

    run_sync(make_settings(sim, engine.url), [f"call-{n:06d}" for n in range(1, 201)],
             engine=engine)
    with engine.connect() as conn:
        shown = conn.execute(text(FIRST_QUERY)).all()
        per_operator = dict(conn.execute(text(
            "SELECT operator_id, count(*) FROM calls WHERE operator_id IS NOT NULL "
            "GROUP BY operator_id")).all())
    assert len(shown) == 5
    assert len({r.operator_id for r in shown}) == 5
    assert [r.calls for r in shown] == sorted(per_operator.values(), reverse=True)[:5]
    assert all(r.calls == per_operator[r.operator_id] for r in shown)
