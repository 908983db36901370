"""Assets, lineage and the operator's runtime behaviour under a real Airflow: asset events with
counts after `dag.test()` of the example DAG, shard names in the UI, the asset alias of an
unmapped task, OpenLineage facets, templated fields, max_rps shared by shards, on_kill."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("airflow.sdk")

from airflow.sdk import Asset, AssetAlias  # noqa: E402
from airflow_helpers import RecordingTI, load_dag, return_values, warehouse_uri  # noqa: E402
from sqlalchemy import create_engine, select  # noqa: E402
from sqlalchemy.engine import URL  # noqa: E402

from etl.airflow import (  # noqa: E402
    CommuboSyncOperator,
    shard_ids,
    warehouse_asset,
    warehouse_assets,
)
from etl.config import normalize_database_url  # noqa: E402
from etl.schema import etl_runs  # noqa: E402
from etl.simulator import Simulator  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")

TABLES = {"calls", "customers", "customer_phone_numbers", "customer_versions", "operators",
          "operator_versions", "scenarios", "etl_call_status"}
NUM_SHARDS = 4  # the example DAG's


def _asset_events(dag_id: str, run_id: str) -> list[tuple[str, int, dict]]:
    """(asset uri, source map index, extra) of the asset events a DAG run's tasks emitted."""
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session

    with create_session() as session:
        rows = session.execute(
            select(AssetModel.uri, AssetEvent.source_map_index, AssetEvent.extra)
            .join(AssetModel, AssetModel.id == AssetEvent.asset_id)
            .where(AssetEvent.source_dag_id == dag_id, AssetEvent.source_run_id == run_id))
        return [(uri, index, dict(extra)) for uri, index, extra in rows]


def _rendered_map_indexes(dag_id: str, run_id: str) -> dict[int, str | None]:
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session

    with create_session() as session:
        tis = session.scalars(select(TaskInstance).where(
            TaskInstance.dag_id == dag_id, TaskInstance.run_id == run_id,
            TaskInstance.task_id == "sync"))
        return {ti.map_index: ti.rendered_map_index for ti in tis}


def test_warehouse_assets_follow_the_openlineage_naming():
    assets = warehouse_assets("postgresql://db.internal/warehouse")
    assert {a.uri.rsplit("/", 1)[1] for a in assets} == TABLES
    calls = warehouse_asset("postgres://db.internal:5432/warehouse", "calls")
    assert calls.name == "postgres://db.internal:5432/warehouse.public.calls"
    assert calls.uri == "postgres://db.internal:5432/warehouse/public/calls"
    with pytest.raises(ValueError, match="postgres://host:port/database"):
        warehouse_assets("db.internal/warehouse")


def test_the_example_dags_shards_declare_the_tables_and_emit_events_with_counts(
        airflow_home: Path, connections: URL, monkeypatch, tmp_path: Path):
    uri = warehouse_uri(connections)
    monkeypatch.setenv("COMMUBO_WAREHOUSE_URI", uri)
    dag = load_dag(airflow_home, "commubo_sync.py", "commubo_sync")
    sync = dag.get_task("sync")
    # Declared when the DAG is parsed, on the mapped task: what the dag processor registers.
    assert {a.uri for a in sync.outlets} == {a.uri for a in warehouse_assets(uri)}

    ids = [f"call-{n:06d}" for n in range(1, 61)] + ["nf-asset-1"]
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text("\n".join(ids) + "\n")
    run = dag.test(run_conf={"ids_file": str(ids_file)})
    assert run.state == "success"

    summaries = return_values("commubo_sync", run.run_id, "sync")
    events = _asset_events("commubo_sync", run.run_id)
    # One event per table per shard, each with the counts of that shard's run.
    assert sorted((uri_, index) for uri_, index, _ in events) == sorted(
        (a.uri, i) for a in warehouse_assets(uri) for i in range(NUM_SHARDS))
    for asset_uri, index, extra in events:
        summary = summaries[index]
        assert extra["table"] == asset_uri.rsplit("/", 1)[1]
        assert extra["shard"] == f"{index + 1}/{NUM_SHARDS}"
        for key in ("run_id", "requested", "loaded", "not_found", "failed", "skipped"):
            assert extra[key] == summary[key], key
    assert sum(e["loaded"] for u, _, e in events if u.endswith("/calls")) == sum(
        s["loaded"] for s in summaries.values()) > 0

    # The shards are named in the UI.
    assert _rendered_map_indexes("commubo_sync", run.run_id) == {
        i: f"shard {i + 1}/{NUM_SHARDS}" for i in range(NUM_SHARDS)}


def test_shards_of_a_small_list_are_named_by_map_index_and_count(
        airflow_home: Path, connections: URL):
    dag = load_dag(airflow_home, "commubo_test_ids.py", "commubo_test_ids")
    run = dag.test()
    assert run.state == "success"
    assert _rendered_map_indexes("commubo_test_ids", run.run_id) == {
        0: "shard 1/3", 1: "shard 2/3", 2: "shard 3/3"}


def test_an_unmapped_task_without_warehouse_uri_reports_through_an_alias(
        airflow_home: Path, connections: URL):
    task = CommuboSyncOperator(task_id="sync", ids=["call-000001"])
    assert task.outlets == [AssetAlias(name="commubo-etl:commubo_warehouse",
                                       group="commubo-etl")]
    # A mapped one declares none: concurrent shards creating the alias's assets race in
    # Airflow's API server.
    from airflow.sdk import DAG

    with DAG("commubo_alias_check"):
        mapped = CommuboSyncOperator.partial(task_id="sync", ids_file="f", num_shards=2
                                             ).expand(shard_index=[0, 1])
    assert mapped.outlets == []

    from airflow.sdk.execution_time.context import OutletEventAccessors

    events = OutletEventAccessors()
    task.execute({"ti": RecordingTI(), "outlet_events": events})  # type: ignore[arg-type]
    added = events[task.outlets[0]].asset_alias_events
    expected = warehouse_assets(warehouse_uri(connections))
    assert {e.dest_asset_key.uri for e in added} == {a.uri for a in expected}
    assert all(e.extra["requested"] == 1 for e in added)


def test_outlets_given_by_the_user_win(connections: URL):
    mine = Asset(name="my-calls", uri="postgres://elsewhere:5432/x/public/calls")
    task = CommuboSyncOperator(task_id="sync", ids=["call-1"], outlets=[mine])
    assert task.outlets == [mine]
    assert CommuboSyncOperator(task_id="s2", ids=["c"], outlets=[]).outlets == []
    sqlite = CommuboSyncOperator(task_id="s3", ids=["c"], db_url="sqlite:////tmp/trial.db")
    assert sqlite.outlets == []  # a trial warehouse is no asset


def test_openlineage_sees_the_api_as_input_and_the_tables_as_outputs(connections: URL,
                                                                     sim: Simulator):
    pytest.importorskip("airflow.providers.openlineage")
    task = CommuboSyncOperator(task_id="sync", ids=[f"call-{n:06d}" for n in range(1, 21)])
    assert task.get_openlineage_facets_on_complete(None) is None  # not run yet
    summary = task.execute({"ti": RecordingTI()})  # type: ignore[arg-type]

    lineage = task.get_openlineage_facets_on_complete(None)
    [source] = lineage.inputs
    assert (source.namespace, source.name) == (sim.url, "/v1/calls")
    assert source.inputFacets["inputStatistics"].rowCount == 20
    namespace = warehouse_uri(connections).rsplit("/", 1)[0]
    database = normalize_database_url(connections).database
    assert {(o.namespace, o.name) for o in lineage.outputs} == {
        (namespace, f"{database}.public.{t}") for t in TABLES}
    assert {o.outputFacets["outputStatistics"].rowCount for o in lineage.outputs} == {
        summary["loaded"]}
    facet = lineage.run_facets["commubo_sync"]
    assert (facet.run_id, facet.requested, facet.loaded) == (
        summary["run_id"], 20, summary["loaded"])
    # OpenLineage can serialize what it got (it sends JSON).
    from openlineage.client.serde import Serde

    assert '"commubo_sync"' not in Serde.to_json(lineage.outputs[0])
    assert summary["run_id"] in Serde.to_json(facet)


def test_ids_and_db_url_are_templated_and_the_password_is_masked(connections: URL):
    from airflow.sdk._shared.secrets_masker import redact

    url = normalize_database_url(connections).set(password="pa55-w0rd-in-url")
    task = CommuboSyncOperator(
        task_id="sync", ids="{{ params.ids }}",
        db_url="postgresql://{{ params.who }}:pa55-w0rd-in-url@h:5432/db")
    assert set(task.template_fields) >= {"ids", "ids_file", "db_url"}
    task.render_template_fields({"params": {"ids": ["a", "b"], "who": "etl"}})
    assert task.db_url == "postgresql://etl:pa55-w0rd-in-url@h:5432/db"
    assert "pa55-w0rd-in-url" not in str(redact(task.db_url))
    assert url.password  # (the fixture's URL is untouched)


def test_max_rps_is_shared_by_the_shards(connections: URL, tmp_path: Path):
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text("call-000001\n")
    whole = CommuboSyncOperator(task_id="s", ids_file=str(ids_file), max_rps=40)
    assert whole.build_settings(*whole.shard_position()[1:]).max_requests_per_s == 40
    shard = CommuboSyncOperator(task_id="s", ids_file=str(ids_file), max_rps=40,
                                shard_index=2, num_shards=4)
    assert shard.shard_position() == (2, 4)
    assert shard.build_settings(4).max_requests_per_s == 10
    unlimited = CommuboSyncOperator(task_id="s", ids_file=str(ids_file), num_shards=4)
    assert unlimited.build_settings(4).max_requests_per_s == 0


def test_shard_ids_comes_with_the_operator():
    from etl.ids import shard_ids as the_one

    assert shard_ids is the_one


def test_on_kill_stops_a_hanging_sync_promptly_and_records_it_interrupted(
        connections: URL, sim: Simulator):
    from airflow.sdk.exceptions import AirflowException

    # Every id trickles one byte a second: without on_kill the task would hang for minutes.
    task = CommuboSyncOperator(task_id="sync", concurrency=4,
                               ids=[f"trickle-99-kill-{n}" for n in range(8)])
    outcome: dict[str, BaseException] = {}

    def run() -> None:
        try:
            task.execute({"ti": RecordingTI()})  # type: ignore[arg-type]
        except BaseException as exc:  # noqa: BLE001 - recorded for the assertions
            outcome["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    time.sleep(1.5)  # the requests are hanging by now
    killed = time.monotonic()
    task.on_kill()
    thread.join(timeout=10)
    assert not thread.is_alive()
    assert time.monotonic() - killed < 5
    assert isinstance(outcome["error"], AirflowException)
    assert "killed by Airflow" in str(outcome["error"])
    engine = create_engine(connections)
    try:
        with engine.connect() as conn:
            assert conn.scalar(select(etl_runs.c.status)) == "interrupted"
    finally:
        engine.dispose()
