"""Fixtures for the Airflow tests: a throw-away AIRFLOW_HOME with a migrated SQLite metadata
database, the DAG files in its dags folder, and the two connections as environment variables.

Run them in their own environment, so that the core install stays light:
`UV_PROJECT_ENVIRONMENT=.venv-airflow uv run --locked --extra airflow pytest tests/airflow -q`.
Without Airflow the test modules that need it are skipped: each starts with
`pytest.importorskip("airflow.sdk")` (not "airflow": with tests/ on sys.path, as pytest's
prepend import mode puts it, this folder is an importable namespace package called `airflow`).

The root `tests/conftest.py` (pg_url, sim, ...) applies here as everywhere under tests/.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from airflow_helpers import api_connection, installed, warehouse_connection
from sqlalchemy.engine import URL

from etl.simulator import Simulator

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
EXAMPLE_DAG = ROOT / "examples" / "dags" / "commubo_sync.py"
TEST_DAGS = HERE / "dags"


HAVE_AIRFLOW = installed("apache-airflow-core")

if HAVE_AIRFLOW:
    # Airflow reads its configuration once, when it is first imported, and the test modules
    # import it while they are collected, before any fixture runs: so the environment is set
    # here, when pytest loads this file, ahead of them. Also for `airflow db migrate` below.
    AIRFLOW_HOME = Path(tempfile.mkdtemp(prefix="etl-airflow-home-"))
    atexit.register(shutil.rmtree, AIRFLOW_HOME, ignore_errors=True)
    os.environ.update({
        "AIRFLOW_HOME": str(AIRFLOW_HOME),
        "AIRFLOW__CORE__DAGS_FOLDER": str(AIRFLOW_HOME / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        # The example DAG retries failed shards; without a delay dag.test() need not wait.
        "AIRFLOW__CORE__DEFAULT_TASK_RETRY_DELAY": "0",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{AIRFLOW_HOME / 'airflow.db'}",
    })


@pytest.fixture(scope="session")
def airflow_home() -> Path:
    """AIRFLOW_HOME with a migrated metadata database and the DAG files in its dags folder
    (`dag.test()` only runs DAGs it has parsed from there)."""
    pytest.importorskip("airflow.sdk")
    home = Path(os.environ["AIRFLOW_HOME"])
    dags = home / "dags"
    dags.mkdir(exist_ok=True)
    shutil.copy(EXAMPLE_DAG, dags / EXAMPLE_DAG.name)
    for path in TEST_DAGS.glob("*.py"):
        shutil.copy(path, dags / path.name)
    done = subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"],
                          capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        pytest.fail(f"airflow db migrate failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return home


@pytest.fixture
def connections(monkeypatch: pytest.MonkeyPatch, sim: Simulator, pg_url: URL,
                fast_config: Path) -> URL:
    """The connections the operator uses by default, to the simulator and a fresh database;
    fast retries for the etl (ETL_CONFIG). Returns the database URL."""
    monkeypatch.setenv("AIRFLOW_CONN_COMMUBO_DEFAULT", api_connection(sim))
    monkeypatch.setenv("AIRFLOW_CONN_COMMUBO_WAREHOUSE", warehouse_connection(pg_url))
    monkeypatch.setenv("ETL_CONFIG", str(fast_config))
    for var in ("COMMUBO_BASE_URL", "COMMUBO_TENANT_ID", "COMMUBO_ACCESS_TOKEN",
                "ETL_DATABASE_URL"):
        monkeypatch.delenv(var, raising=False)
    return pg_url


# Set by .ci/run for the Airflow step: a skip there (Airflow or OpenLineage not importable)
# means the environment is broken, and must not pass as "nothing failed".
REQUIRED = os.environ.get("ETL_AIRFLOW_TESTS_REQUIRED") == "1"


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = len(reporter.stats.get("skipped", [])) if reporter else 0
    if REQUIRED and skipped:
        reporter.write_line(f"ETL_AIRFLOW_TESTS_REQUIRED=1 and {skipped} tests or modules were "
                            "skipped: the Airflow environment is incomplete", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_unconfigure(config: pytest.Config) -> None:
    # Airflow points its log handler at the stream pytest captured, which pytest has closed
    # by the time the embedded PostgreSQL (pgserver) logs its shutdown from an atexit hook:
    # that last line cannot be written, so do not print a "Logging error" for it.
    if HAVE_AIRFLOW and "airflow.sdk" in sys.modules:
        logging.raiseExceptions = False
