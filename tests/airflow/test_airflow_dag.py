"""The example DAG (examples/dags/commubo_sync.py) and a small-list DAG, run with
`dag.test()` by a real Airflow (SQLite metadata database) against the simulator and a real
PostgreSQL warehouse. A DAG run takes about 10 seconds."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("airflow.sdk")

from airflow_helpers import (  # noqa: E402
    api_connection,
    load_dag,
    return_values,
    task_instances,
)
from sqlalchemy import create_engine, func, select  # noqa: E402
from sqlalchemy.engine import URL  # noqa: E402

from etl.ids import shard_of  # noqa: E402
from etl.schema import calls, etl_call_status  # noqa: E402
from etl.simulator import Simulator, payload_for  # noqa: E402

# Airflow's in-process API server imports starlette's test client, which warns about itself.
pytestmark = pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")

NUM_SHARDS = 4  # the example DAG's
COUNTS = ("requested", "loaded", "not_found", "failed", "skipped")


@pytest.fixture
def example_dag(airflow_home: Path):
    dag = load_dag(airflow_home, "commubo_sync.py", "commubo_sync")
    assert dag.get_task("sync").expand_input.value["shard_index"] == list(range(NUM_SHARDS))
    return dag


def _ids_file(tmp_path: Path, ids: list[str]) -> Path:
    path = tmp_path / "ids.txt"
    path.write_text("# ids of the day\n" + "\n".join(ids) + "\n")
    return path


def _loaded(url: URL) -> set[str]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            ids = set(conn.scalars(select(calls.c.call_id)))
            # No duplicates, ever: one status row per id as well.
            assert conn.scalar(select(func.count()).select_from(calls)) == len(ids)
            return ids
    finally:
        engine.dispose()


def _loadable(ids: list[str]) -> set[str]:
    return {i for i in ids if payload_for(i) is not None}


def _status(url: URL, call_id: str) -> str | None:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return conn.scalar(select(etl_call_status.c.status)
                               .where(etl_call_status.c.call_id == call_id))
    finally:
        engine.dispose()


def _in_shard(prefix: str, shard: int) -> str:
    """An id starting with `prefix` that falls in shard `shard` of the example DAG."""
    return next(f"{prefix}-{n}" for n in range(1000)
                if shard_of(f"{prefix}-{n}", NUM_SHARDS) == shard)


def test_example_dag_syncs_every_shard_and_reports_the_totals(
        example_dag, connections: URL, tmp_path: Path):
    ids = [f"call-{n:06d}" for n in range(1, 81)] + ["nf-dag-1", "nf-dag-2"]
    run = example_dag.test(run_conf={"ids_file": str(_ids_file(tmp_path, ids))})

    assert run.state == "success"
    states = task_instances("commubo_sync", run.run_id)
    assert states == {**{("sync", i): ("success", 1) for i in range(NUM_SHARDS)},
                      ("report", -1): ("success", 1)}
    summaries = return_values("commubo_sync", run.run_id, "sync")
    assert sorted(summaries) == list(range(NUM_SHARDS))
    for index, summary in summaries.items():
        in_shard = [i for i in ids if shard_of(i, NUM_SHARDS) == index]
        assert summary["requested"] == len(in_shard) > 0
        assert summary["loaded"] == len(_loadable(in_shard))
        assert summary["status"] == "succeeded"
    totals = return_values("commubo_sync", run.run_id, "report")[-1]
    assert totals == {**{k: sum(s[k] for s in summaries.values()) for k in COUNTS},
                      "shards": NUM_SHARDS, "shards_succeeded": NUM_SHARDS}
    assert totals["requested"] == len(ids)
    assert totals["loaded"] == len(_loadable(ids))
    assert totals["not_found"] == len(ids) - len(_loadable(ids))
    assert _loaded(connections) == _loadable(ids)


def test_a_failing_shard_does_not_undo_the_others_and_its_retries_skip_what_is_loaded(
        example_dag, connections: URL, tmp_path: Path, sim: Simulator):
    bad_shard = 2
    broken = _in_shard("broken-dag", bad_shard)
    ids = [f"call-{n:06d}" for n in range(1, 81)] + [broken]
    run = example_dag.test(run_conf={"ids_file": str(_ids_file(tmp_path, ids))})

    # The broken id fails every try: the shard fails after its 2 retries, the run fails.
    assert run.state == "failed"
    states = task_instances("commubo_sync", run.run_id)
    for index in range(NUM_SHARDS):
        assert states[("sync", index)] == (
            ("failed", 3) if index == bad_shard else ("success", 1))
    assert states[("report", -1)] == ("failed", 1)  # ran (all_done), and failed the run

    # Every other id of every shard, the failing one's included, is loaded; the broken id is
    # recorded as failed.
    assert _loaded(connections) == _loadable(ids)
    assert _status(connections, broken) == "failed"

    summaries = return_values("commubo_sync", run.run_id, "sync")
    assert sorted(summaries) == list(range(NUM_SHARDS))  # the failed shard's too
    last_try = summaries[bad_shard]
    in_bad_shard = [i for i in ids if shard_of(i, NUM_SHARDS) == bad_shard]
    # The third try skipped what the first one loaded, and fetched only the broken id again.
    assert last_try == {**last_try, "status": "partial", "requested": len(in_bad_shard),
                        "loaded": 0, "failed": 1, "skipped": len(_loadable(in_bad_shard))}
    for call_id in _loadable(in_bad_shard):
        assert sim.requests_for(call_id) == 1


def test_403_fails_every_shard_without_retry_and_never_logs_the_token(
        example_dag, connections: URL, tmp_path: Path, sim: Simulator, monkeypatch,
        capfd: pytest.CaptureFixture[str]):
    monkeypatch.setenv("AIRFLOW_CONN_COMMUBO_DEFAULT",
                       api_connection(sim, token="wrong-token-s3cr3t"))
    ids = [f"call-{n:06d}" for n in range(1, 41)]
    # No ids_file param this time: the DAG falls back to the Variable commubo_ids_file.
    monkeypatch.setenv("AIRFLOW_VAR_COMMUBO_IDS_FILE", str(_ids_file(tmp_path, ids)))
    run = example_dag.test()

    assert run.state == "failed"
    states = task_instances("commubo_sync", run.run_id)
    # retries=2 in the DAG, but a 403 is not retried: every shard failed on its first try.
    assert [states[("sync", i)] for i in range(NUM_SHARDS)] == [("failed", 1)] * NUM_SHARDS
    assert _loaded(connections) == set()
    # Each shard read the file and started its run (it pushed a summary) before the 403.
    summaries = return_values("commubo_sync", run.run_id, "sync")
    assert sorted(summaries) == list(range(NUM_SHARDS))
    assert {s["status"] for s in summaries.values()} == {"failed"}
    out, err = capfd.readouterr()
    assert "403" in out + err
    assert "wrong-token-s3cr3t" not in out + err


def test_small_lists_map_over_shard_ids_and_may_tolerate_failed_ids(
        airflow_home: Path, connections: URL):
    dag = load_dag(airflow_home, "commubo_test_ids.py", "commubo_test_ids")
    from etl.ids import shard_ids

    module_ids = dag.get_task("sync").expand_input.value["ids"]
    all_ids = [i for shard in module_ids for i in shard]
    assert module_ids == shard_ids(all_ids, shards=3)

    run = dag.test()

    # fail_on_failed_ids=False: the shard with the broken id succeeds, its summary counts it.
    assert run.state == "success"
    summaries = return_values("commubo_test_ids", run.run_id, "sync")
    assert sorted(summaries) == [0, 1, 2]
    assert sum(s["requested"] for s in summaries.values()) == len(all_ids)
    assert sum(s["failed"] for s in summaries.values()) == 1
    assert _loaded(connections) == _loadable(all_ids)
