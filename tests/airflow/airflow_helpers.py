"""Helpers of the Airflow tests (a module with a name of its own: see conftest.py on
`conftest` names)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

from sqlalchemy.engine import URL

from etl.config import normalize_database_url
from etl.simulator import DEFAULT_ACCESS_TOKEN, DEFAULT_TENANT_ID, Simulator


def installed(distribution: str) -> bool:
    """Whether a distribution is installed. Not importlib.util.find_spec("airflow"): that finds
    the tests' own airflow folder (see conftest.py)."""
    try:
        importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def load_dag(home: Path, filename: str, dag_id: str):
    """The DAG `dag_id` of a file in the dags folder, imported the way a worker would."""
    path = home / "dags" / filename
    name = f"_etl_test_dag_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    dag = module.dag
    assert dag.dag_id == dag_id
    return dag


def api_connection(sim: Simulator, *, token: str = DEFAULT_ACCESS_TOKEN) -> str:
    """AIRFLOW_CONN_... value of an HTTP connection to the simulator, in JSON form."""
    return json.dumps({"conn_type": "http", "host": sim.url, "login": DEFAULT_TENANT_ID,
                       "password": token})


def warehouse_connection(url: URL) -> str:
    """AIRFLOW_CONN_... value of a Postgres connection to `url`, in JSON form. The embedded
    pgserver listens on a socket directory given as `?host=`: that becomes the host."""
    host = url.host or url.query.get("host")
    assert isinstance(host, str), url.render_as_string(hide_password=True)
    conn: dict[str, Any] = {"conn_type": "postgres", "host": host, "login": url.username,
                            "password": url.password, "port": url.port,
                            "schema": url.database}
    return json.dumps({k: v for k, v in conn.items() if v is not None})


def warehouse_uri(url: URL) -> str:
    """What a data engineer writes for warehouse_uri (`postgres://host:port/database`):
    where the connection points (a socket directory as host: localhost)."""
    url = normalize_database_url(url)
    host = url.host if url.host and not url.host.startswith("/") else "localhost"
    return f"postgres://{host}:{url.port or 5432}/{url.database}"


class RecordingTI:
    """The two things CommuboSyncOperator.execute asks of its task instance, for calling
    execute directly: the try number, and XCom pushes (recorded)."""

    def __init__(self, try_number: int = 1) -> None:
        self.try_number = try_number
        self.pushed: dict[str, Any] = {}

    def xcom_push(self, key: str, value: Any) -> None:
        self.pushed[key] = value


def task_instances(dag_id: str, run_id: str) -> dict[tuple[str, int], tuple[str, int]]:
    """(task_id, map_index) -> (state, try_number) of a DAG run, from the metadata database."""
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        rows = session.scalars(select(TaskInstance).where(TaskInstance.dag_id == dag_id,
                                                          TaskInstance.run_id == run_id))
        return {(ti.task_id, ti.map_index): (str(ti.state), ti.try_number) for ti in rows}


def return_values(dag_id: str, run_id: str, task_id: str) -> dict[int, Any]:
    """map_index -> the XCom return value of a task of a DAG run."""
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        rows = session.scalars(select(XComModel).where(
            XComModel.dag_id == dag_id, XComModel.run_id == run_id,
            XComModel.task_id == task_id, XComModel.key == "return_value"))
        return {x.map_index: x.value for x in rows}
