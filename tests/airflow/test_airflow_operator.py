"""`etl.airflow.CommuboSyncOperator` on its own: connections to settings, and execute called
directly against the simulator and a real PostgreSQL, with real Airflow connections (from
AIRFLOW_CONN_* variables) and Airflow's own exceptions. The DAG runs are in
test_airflow_dag.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("airflow.sdk")

from airflow.sdk import Connection  # noqa: E402
from airflow.sdk.exceptions import AirflowException, AirflowFailException  # noqa: E402
from airflow_helpers import RecordingTI, api_connection  # noqa: E402
from sqlalchemy import create_engine, select  # noqa: E402
from sqlalchemy.engine import URL  # noqa: E402

from etl.airflow import (  # noqa: E402
    CommuboSyncOperator,
    api_from_connection,
    database_url_from_connection,
)
from etl.errors import ConfigError  # noqa: E402
from etl.ids import select_shard  # noqa: E402
from etl.schema import calls  # noqa: E402
from etl.simulator import Simulator, payload_for  # noqa: E402

GOOD = [f"call-{n:06d}" for n in range(1, 21)]


def _run(op: CommuboSyncOperator, try_number: int = 1) -> tuple[dict, RecordingTI]:
    ti = RecordingTI(try_number)
    return op.execute({"ti": ti}), ti  # type: ignore[arg-type]


def _loadable(ids: list[str]) -> set[str]:
    """The ids the simulator serves a call for (about 3% of ordinary ids are 404)."""
    return {i for i in ids if payload_for(i) is not None}


def _loaded_ids(url: URL) -> set[str]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return set(conn.scalars(select(calls.c.call_id)))
    finally:
        engine.dispose()


# -- the API connection -------------------------------------------------------------------------


def _http(**fields) -> Connection:
    return Connection(conn_id="commubo_default", login="tenant", password="pw-s3cr3t", **fields)


@pytest.mark.parametrize(
    ("conn", "base_url"),
    [
        (_http(conn_type="http", host="http://127.0.0.1:8089"), "http://127.0.0.1:8089"),
        (_http(conn_type="http", host="127.0.0.1", port=8089), "http://127.0.0.1:8089"),
        (_http(conn_type="http", host="api.example.com", schema="https"),
         "https://api.example.com"),
        (_http(conn_type="https", host="api.example.com"), "https://api.example.com"),
        (_http(conn_type="http", host="https://api.example.com/base/", port=8443),
         "https://api.example.com:8443/base"),
        (_http(conn_type="http", host="https://api.example.com:8443", port=8443),
         "https://api.example.com:8443"),
        (_http(conn_type="http", host="::1", port=8089), "http://[::1]:8089"),
        # URI form, as AIRFLOW_CONN_... or `airflow connections add --conn-uri` store it:
        # the path lands in `schema`.
        (Connection.from_uri("http://tenant:tok@127.0.0.1:8089/prefix", conn_id="c"),
         "http://127.0.0.1:8089/prefix"),
        (Connection.from_uri("https://tenant:tok@api.example.com", conn_id="c"),
         "https://api.example.com"),
    ],
)
def test_base_url_is_taken_from_the_http_connection_as_airflow_stores_it(conn, base_url):
    assert api_from_connection(conn, "c")[:2] == (base_url, "tenant")


def test_an_access_token_with_reserved_characters_survives_the_uri_form():
    conn = Connection.from_uri("https://tenant:t%2Fo%40k%3A@api.example.com", conn_id="c")
    assert api_from_connection(conn, "c")[2] == "t/o@k:"


@pytest.mark.parametrize(
    ("conn", "message"),
    [
        (_http(conn_type="http"), "has no host"),
        (Connection(conn_id="c", conn_type="http", host="h", password="pw-s3cr3t"), "no login"),
        (Connection(conn_id="c", conn_type="http", host="h", login="t"), "no password"),
        (_http(conn_type="http", host="http://h:8080", port=9090), "port 8080 and the port"),
    ],
)
def test_an_incomplete_api_connection_is_a_config_error(conn, message):
    with pytest.raises(ConfigError, match=message) as info:
        api_from_connection(conn, "c")
    assert "pw-s3cr3t" not in str(info.value)


# -- the warehouse connection -------------------------------------------------------------------


def test_postgres_connection_becomes_a_psycopg_url_with_libpq_extras():
    conn = Connection.from_uri(
        "postgresql://etl:p%40ss%2Fw0rd@db.example.com:5433/warehouse"
        "?sslmode=require&cursor=dictcursor&connect_timeout=5", conn_id="w")
    url = database_url_from_connection(conn, "w")
    assert url.drivername == "postgresql+psycopg"
    assert (url.username, url.password, url.host, url.port, url.database) == (
        "etl", "p@ss/w0rd", "db.example.com", 5433, "warehouse")
    # sslmode and connect_timeout are libpq's; the provider's cursor option is not.
    assert dict(url.query) == {"sslmode": "require", "connect_timeout": "5"}


def test_a_socket_directory_as_postgres_host_is_kept():
    conn = Connection(conn_id="w", conn_type="postgres", host="/run/postgresql",
                      login="etl", schema="warehouse")
    url = database_url_from_connection(conn, "w")
    assert url.host == "/run/postgresql"


@pytest.mark.parametrize("conn_type", ["mysql", "http", None])
def test_the_warehouse_must_be_a_postgres_connection(conn_type):
    conn = Connection(conn_id="w", conn_type=conn_type, host="db", login="u", password="pw")
    with pytest.raises(ConfigError, match="Postgres connection"):
        database_url_from_connection(conn, "w")


# -- execute ------------------------------------------------------------------------------------


def test_execute_loads_the_ids_and_returns_the_summary(connections, sim: Simulator):
    summary, ti = _run(CommuboSyncOperator(task_id="sync", ids=GOOD + ["nf-1"]))
    assert summary["status"] == "succeeded"
    assert summary["requested"] == 21
    assert summary["loaded"] + summary["not_found"] == 21
    assert summary["failed"] == 0
    assert set(summary) == {"run_id", "status", "requested", "loaded", "not_found", "failed",
                            "skipped", "warnings", "duration_s", "calls_per_s", "database",
                            "api", "unknown_fields", "related"}
    json.dumps(summary)  # XCom takes JSON
    assert ti.pushed == {}  # Airflow pushes the return value itself
    assert _loaded_ids(connections) == _loadable(GOOD)
    assert summary["loaded"] == len(_loadable(GOOD))


def test_execute_takes_its_shard_of_an_ids_file(connections, tmp_path: Path):
    ids = [f"call-{n:06d}" for n in range(1, 61)]
    path = tmp_path / "ids.txt"
    path.write_text("# ids of the day\n" + "\n".join(ids) + "\n")
    requested = []
    for index in range(3):
        summary, _ = _run(CommuboSyncOperator(task_id="sync", ids_file=str(path),
                                              shard_index=index, num_shards=3))
        assert summary["requested"] == len(select_shard(ids, index, 3))
        requested.append(summary["requested"])
    assert sum(requested) == len(ids)
    assert _loaded_ids(connections) == _loadable(ids)


def test_retry_failed_refetches_only_the_failed_ids_of_its_shard(connections, sim: Simulator):
    failing = [f"broken-op-shard{n}" for n in range(30)]
    with pytest.raises(AirflowException):
        _run(CommuboSyncOperator(task_id="sync", ids=failing))
    mine = select_shard(failing, 2, 3)
    assert 0 < len(mine) < len(failing)
    before = {i: sim.requests_for(i) for i in failing}
    ti = RecordingTI()
    with pytest.raises(AirflowException):  # they fail again
        CommuboSyncOperator(task_id="sync", ids=[], retry_failed=True, shard_index=2,
                            num_shards=3).execute({"ti": ti})  # type: ignore[arg-type]
    assert ti.pushed["return_value"]["requested"] == len(mine)
    assert {i for i in failing if sim.requests_for(i) > before[i]} == set(mine)


def test_failed_ids_fail_the_task_retryably_and_push_the_summary(connections):
    op = CommuboSyncOperator(task_id="sync", ids=GOOD + ["broken-op-1"])
    with pytest.raises(AirflowException) as info:
        _run(op)
    assert not isinstance(info.value, AirflowFailException)
    assert "1 of 21 ids failed" in str(info.value)
    # What the other ids loaded stays loaded.
    assert _loaded_ids(connections) == _loadable(GOOD)


def test_failed_ids_are_tolerated_with_fail_on_failed_ids_false(connections):
    op = CommuboSyncOperator(task_id="sync", ids=GOOD + ["broken-op-2"],
                             fail_on_failed_ids=False)
    summary, _ = _run(op)
    assert summary["failed"] == 1
    assert summary["status"] == "partial"


def test_the_partial_summary_of_a_failed_try_is_pushed(connections):
    ti = RecordingTI()
    op = CommuboSyncOperator(task_id="sync", ids=GOOD + ["broken-op-3"])
    with pytest.raises(AirflowException):
        op.execute({"ti": ti})  # type: ignore[arg-type]
    pushed = ti.pushed["return_value"]
    assert pushed["status"] == "partial"
    assert pushed["failed"] == 1


def test_a_retry_skips_what_an_earlier_try_loaded(connections, sim: Simulator):
    ids = GOOD + ["broken-op-4"]
    with pytest.raises(AirflowException):
        _run(CommuboSyncOperator(task_id="sync", ids=ids), try_number=1)
    loaded = _loaded_ids(connections)
    before = {i: sim.requests_for(i) for i in ids}
    with pytest.raises(AirflowException) as info:
        _run(CommuboSyncOperator(task_id="sync", ids=ids), try_number=2)
    assert f"{len(loaded)} skipped" in str(info.value)
    for call_id in loaded:
        assert sim.requests_for(call_id) == before[call_id]  # not fetched again
    assert sim.requests_for("broken-op-4") > before["broken-op-4"]


def test_403_fails_without_retry_and_never_shows_the_token(connections, monkeypatch, sim):
    monkeypatch.setenv("AIRFLOW_CONN_COMMUBO_DEFAULT",
                       api_connection(sim, token="wrong-token-s3cr3t"))
    ti = RecordingTI()
    with pytest.raises(AirflowFailException) as info:
        CommuboSyncOperator(task_id="sync", ids=GOOD).execute({"ti": ti})  # type: ignore[arg-type]
    message = str(info.value)
    assert "403" in message and "'commubo_default'" in message
    assert "wrong-token-s3cr3t" not in message
    assert ti.pushed["return_value"]["status"] == "failed"
    assert _loaded_ids(connections) == set()


def test_an_unreachable_database_is_a_retryable_failure_without_the_password(connections):
    op = CommuboSyncOperator(task_id="sync", ids=GOOD,
                             db_url="postgresql://etl:db-s3cr3t-pw@127.0.0.1:1/warehouse")
    with pytest.raises(AirflowException) as info:
        _run(op)
    assert not isinstance(info.value, AirflowFailException)
    assert "db-s3cr3t-pw" not in str(info.value)
    assert "database" in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "needs ids or ids_file"),
        ({"ids": "call-1"}, "not a string"),
        ({"ids": ["call-1", "bad id!"]}, "invalid call id"),
        ({"ids_file": "/nonexistent/ids.txt"}, "no such file"),
        ({"ids": GOOD, "num_shards": 2000}, "max_map_length"),
        ({"ids": GOOD, "num_shards": 0}, "positive integer"),
        ({"ids": GOOD, "num_shards": 4, "shard_index": 4}, "shard-index"),
        ({"ids": GOOD, "api_conn_id": "no_such_conn"}, "'no_such_conn' is not defined"),
        ({"ids": GOOD, "concurrency": 0}, "concurrency"),
        ({"ids": GOOD, "db_url": "mysql://u:pw@h/db"}, "not supported"),
    ],
)
def test_bad_input_or_configuration_fails_without_retry(connections, kwargs, message):
    with pytest.raises(AirflowFailException, match=message):
        _run(CommuboSyncOperator(task_id="sync", **kwargs))


def test_a_bad_base_url_in_the_connection_fails_without_retry(connections, monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_COMMUBO_DEFAULT", json.dumps(
        {"conn_type": "http", "host": "http://api.example.com:65536", "login": "t",
         "password": "tok"}))
    with pytest.raises(AirflowFailException, match="65536"):
        _run(CommuboSyncOperator(task_id="sync", ids=GOOD))


def test_ids_and_ids_file_together_are_refused_when_the_dag_is_parsed():
    with pytest.raises(ValueError, match="not both"):
        CommuboSyncOperator(task_id="sync", ids=GOOD, ids_file="/data/ids.txt")


def test_ids_file_is_templated():
    assert "ids_file" in CommuboSyncOperator.template_fields
