"""The example DAG (examples/dags/commubo_sync.py, as it is) on a real distributed engine:
Airflow's CeleryExecutor with a Redis broker, a PostgreSQL metadata database, and the
api-server, scheduler, dag-processor and two Celery workers as separate processes. A run over a
few thousand ids must succeed, spread its shards over both workers, and account for every id in
the warehouse; the shards are named "shard i/4" and emit an asset event per table with their
counts (concrete assets: no alias, whose assets concurrent shards would race to create).

Needs the `celery` extra, in an environment of its own as .ci/run does:
`UV_PROJECT_ENVIRONMENT=.venv-celery uv run --locked --extra airflow --extra celery
pytest tests/airflow/test_airflow_celery.py`.

Redis: the one on 127.0.0.1:6379 when it answers, else a `redis-server` that the test starts on
a free port, else the test is skipped. The two PostgreSQL databases (Airflow's and the
warehouse) are fresh ones on the test server (tests/conftest.py), dropped afterwards. With
ETL_CELERY_TEST_REQUIRED=1 (set by .ci/run) every reason to skip fails the test instead.

The stack takes about 1.5 GB. Every process it starts is stopped when the test ends, passed or
failed (celery_stack.py); the test's own keys in a shared Redis are deleted.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import sys
import time
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from airflow_helpers import api_connection, installed, warehouse_connection, warehouse_uri
from celery_stack import Stack, free_port, redis_answers
from helpers import fresh_database, stored_statuses
from sqlalchemy.engine import URL

from etl.simulator import Simulator, payload_for

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE_DAG = ROOT / "examples" / "dags" / "commubo_sync.py"
DAG_ID = "commubo_sync"
NUM_SHARDS = 4  # the example DAG's
WORKERS = ("worker-1", "worker-2")
IDS = [f"call-{n:06d}" for n in range(1, 3001)] + [f"nf-celery-{n}" for n in range(1, 4)]

# Bounded waits (seconds). Seen on this machine (2 cores): migrate 3 to 5 s, start 10 to 13 s,
# the run 9 to 12 s.
MIGRATE_TIMEOUT = 240
START_TIMEOUT = 150
RUN_TIMEOUT = 240

REQUIRED = os.environ.get("ETL_CELERY_TEST_REQUIRED") == "1"

pytestmark = pytest.mark.timeout(MIGRATE_TIMEOUT + START_TIMEOUT + RUN_TIMEOUT + 120)

# The hostname that Airflow records for task instances (core.hostname_callable): each worker
# gets its own name, whereas two workers on one host would both record the host's name.
HOSTNAME_MODULE = '''\
import os
import socket


def hostname():
    return os.environ.get("ETL_CELERY_TEST_HOSTNAME") or socket.getfqdn()
'''


def _skip(reason: str) -> None:
    if REQUIRED:
        pytest.fail(f"{reason}; ETL_CELERY_TEST_REQUIRED=1 does not allow a skip", pytrace=False)
    pytest.skip(reason)


@pytest.fixture
def celery_extra() -> None:
    missing = [d for d in ("apache-airflow-core", "apache-airflow-providers-celery", "redis")
               if not installed(d)]
    if missing:
        _skip(f"needs the airflow and celery extras ({', '.join(missing)} not installed): "
              "UV_PROJECT_ENVIRONMENT=.venv-celery uv run --locked --extra airflow "
              "--extra celery pytest tests/airflow/test_airflow_celery.py")


@pytest.fixture
def metadata_db(pg_server: URL) -> Iterator[URL]:
    """A fresh database for Airflow's metadata, dropped afterwards (FORCE: after the stack)."""
    with fresh_database(pg_server, "etl_airflow_meta") as url:
        yield url


@pytest.fixture
def token() -> str:
    """Names the test's queue, workers and run: apart from any other user of the Redis."""
    return uuid.uuid4().hex[:12]


def _stop(stack: Stack) -> None:
    problems, killed = stack.stop()
    for what in killed:
        warnings.warn(what, stacklevel=1)
    if problems:
        pytest.fail("the stack did not stop:\n" + "\n".join(problems), pytrace=False)


@pytest.fixture
def broker(celery_extra: None, token: str, tmp_path: Path) -> Iterator[str]:
    """URL of the Celery broker: the machine's Redis, else a redis-server of the test's own
    on a free port, else a skip."""
    if redis_answers(6379):
        url = "redis://127.0.0.1:6379/0"
        try:
            yield url
        finally:
            _forget_keys(url, token)
        return
    exe = shutil.which("redis-server")
    if exe is None:
        _skip("no Redis for the Celery broker: nothing answers PING on 127.0.0.1:6379 and "
              "redis-server is not installed")
    data = tmp_path / "redis"
    data.mkdir()
    own = Stack(f"{token}-redis", env=os.environ, cwd=data, log_dir=tmp_path / "logs")
    port = free_port()
    own.ports.append(port)
    try:
        own.start("redis-server", [exe, "--bind", "127.0.0.1", "--port", str(port), "--save",
                                   "", "--appendonly", "no", "--dir", str(data)])
        own.wait_for(f"redis-server on port {port}", lambda: redis_answers(port), 20)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        _stop(own)


@pytest.fixture
def stack(broker: str, metadata_db: URL, pg_url: URL, sim: Simulator, token: str,
          tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Iterator[Stack]:
    """Runs the test's processes, with a temporary AIRFLOW_HOME as their working directory
    (the environment is the test's to fill in). Every one of them is stopped at the end,
    whatever happened, and none may be left; then go what they used (broker, databases,
    simulator), fixtures set up before this one."""
    home = tmp_path / "airflow-home"
    home.mkdir()
    # Nothing of the test process's own Airflow (conftest.py points it at SQLite) or etl setup.
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AIRFLOW", "COMMUBO_", "ETL_", "PYTHON"))}
    the_stack = Stack(token, env=env, cwd=home, log_dir=tmp_path / "logs")
    try:
        yield the_stack
    finally:
        started = time.monotonic()
        try:
            _stop(the_stack)
        finally:
            with capsys.disabled():
                print(f"\ncelery e2e: stack stopped in {time.monotonic() - started:.1f} s ("
                      + ", ".join(f"{k} {v:.1f} s" for k, v in the_stack.stop_s.items()) + ")")


def _forget_keys(url: str, token: str) -> None:
    """Delete what the test left in a shared Redis: its queue, its bindings, and messages of
    its queue still unacknowledged (a worker killed during a task leaves its message in kombu's
    `unacked` hash, to be delivered again a day later)."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        for key in client.scan_iter(match=f"*{token}*"):
            client.delete(key)
        for key in client.scan_iter(match="_kombu.binding.*"):
            members = [m for m in client.smembers(key) if token.encode() in m]
            if members:
                client.srem(key, *members)
        for tag, message in client.hscan_iter("unacked"):
            if token.encode() in message:
                client.hdel("unacked", tag)
                client.zrem("unacked_index", tag)
    finally:
        client.close()


def _airflow(*args: str) -> list[str]:
    return [sys.executable, "-m", "airflow", *args]


def test_example_dag_on_celery_workers_spreads_the_shards_and_loads_every_id(
        stack: Stack, broker: str, metadata_db: URL, pg_url: URL, sim: Simulator, fast_config: Path,
        tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    began = time.monotonic()
    home = stack.cwd

    (home / "dags").mkdir()
    shutil.copy(EXAMPLE_DAG, home / "dags" / EXAMPLE_DAG.name)
    pylib = home / "pylib"
    pylib.mkdir()
    (pylib / "etl_celery_test_hostname.py").write_text(HOSTNAME_MODULE)
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text("# ids of the day\n" + "\n".join(IDS) + "\n")

    api_port = free_port()
    stack.ports.append(api_port)
    api = f"http://127.0.0.1:{api_port}"
    queue = f"etl-test-{stack.token}"
    meta = metadata_db.set(drivername="postgresql+psycopg")
    stack.env.update({
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(home / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
        "AIRFLOW__CORE__FERNET_KEY": base64.urlsafe_b64encode(os.urandom(32)).decode(),
        "AIRFLOW__CORE__HOSTNAME_CALLABLE": "etl_celery_test_hostname.hostname",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{api}/execution/",
        # The DAG runs unpaused, and only when triggered (not its @daily schedule); a failed
        # shard is retried at once, so that a failure shows without waiting 5 minutes.
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
        "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
        "AIRFLOW__CORE__DEFAULT_TASK_RETRY_DELAY": "0",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
        "AIRFLOW__API__SECRET_KEY": secrets.token_hex(16),
        "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(32),
        "AIRFLOW__API__WORKERS": "1",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": meta.render_as_string(hide_password=False),
        # Else Airflow derives an asyncpg URL for its async engine, and asyncpg is not here.
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC": meta.set(
            drivername="postgresql+psycopg_async").render_as_string(hide_password=False),
        "AIRFLOW__DAG_PROCESSOR__PARSING_PROCESSES": "1",
        # A task's supervisor notices that its task process has exited within this interval:
        # 5 s by default, which a worker's stop would wait for.
        "AIRFLOW__WORKERS__MIN_HEARTBEAT_INTERVAL": "1",
        "AIRFLOW__CELERY__BROKER_URL": broker,
        # A queue of the test's own: in a shared Redis no other worker takes its tasks.
        "AIRFLOW__OPERATORS__DEFAULT_QUEUE": queue,
        "AIRFLOW_CONN_COMMUBO_DEFAULT": api_connection(sim),
        "AIRFLOW_CONN_COMMUBO_WAREHOUSE": warehouse_connection(pg_url),
        # The example DAG names its assets by it (read when the DAG is parsed).
        "COMMUBO_WAREHOUSE_URI": warehouse_uri(pg_url),
        "ETL_CONFIG": str(fast_config),
        "PYTHONPATH": str(pylib),
    })

    stack.run("migrate", _airflow("db", "migrate"), MIGRATE_TIMEOUT)
    migrated = time.monotonic()

    stack.start("api-server", _airflow("api-server", "--host", "127.0.0.1",
                                       "--port", str(api_port), "--workers", "1"))
    stack.start("scheduler", _airflow("scheduler", "--skip-serve-logs"))
    stack.start("dag-processor", _airflow("dag-processor"))
    for name in WORKERS:
        # Two task slots each, one message prefetched per slot: a worker holds at most two of
        # the four shards, so the other worker must take the rest.
        stack.start(name, _airflow("celery", "worker", "--queues", queue, "--concurrency", "2",
                                   "--celery-hostname", f"{name}-{stack.token}@%h",
                                   "--without-mingle", "--without-gossip",
                                   "--skip-serve-logs"),
                    stop_wave=0, ETL_CELERY_TEST_HOSTNAME=name)

    http = requests.Session()

    def get(path: str) -> Any:
        try:
            answer = http.get(f"{api}{path}", timeout=5)
        except requests.RequestException:
            return None
        return answer.json() if answer.status_code == 200 else None

    def healthy() -> bool:
        health = get("/api/v2/monitor/health") or {}
        return all((health.get(part) or {}).get("status") == "healthy"
                   for part in ("metadatabase", "scheduler", "dag_processor"))

    stack.wait_for("the api-server, scheduler and dag-processor to report healthy", healthy,
                   START_TIMEOUT)
    for name in WORKERS:
        service = next(s for s in stack.services if s.name == name)
        stack.wait_for(f"{name} to be ready", lambda s=service: " ready." in s.log(),
                       START_TIMEOUT)
    stack.wait_for(f"the dag-processor to parse {DAG_ID}",
                   lambda: get(f"/api/v2/dags/{DAG_ID}"), START_TIMEOUT)
    started = time.monotonic()

    run_id = f"celery-test-{stack.token}"
    answer = http.post(f"{api}/api/v2/dags/{DAG_ID}/dagRuns", timeout=30, json={
        "dag_run_id": run_id, "logical_date": None, "conf": {"ids_file": str(ids_file)}})
    if answer.status_code != 200:
        stack.fail(f"triggering {DAG_ID} failed: {answer.status_code} {answer.text}")

    def task_instances() -> list[dict[str, Any]]:
        got = get(f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances?limit=100")
        return (got or {}).get("task_instances", [])

    def summary() -> str:
        rows = sorted(task_instances(), key=lambda t: (t["task_id"], t["map_index"]))
        lines = [f"  {t['task_id']}[{t['map_index']}]: {t['state']}, try {t['try_number']}, "
                 f"on {t['hostname']}" for t in rows]
        logs = sorted((home / "logs").glob(f"dag_id={DAG_ID}/run_id={run_id}/**/*.log"))
        for log in logs:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-10:])
            lines.append(f"----- task log {log.relative_to(home)} (last 10 lines):\n{tail}")
        return "task instances of the run:\n" + "\n".join(lines) + "\n"

    def finished() -> str | None:
        state = (get(f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}") or {}).get("state")
        return state if state in ("success", "failed") else None

    state = stack.wait_for(f"run {run_id} to finish", finished, RUN_TIMEOUT, details=summary)
    ran = time.monotonic()
    if state != "success":
        stack.fail(f"run {run_id} ended {state}", summary())

    # Every task instance succeeded on its first try: the run's state alone would not show a
    # shard that failed after its summary was pushed (`report` reads the summaries).
    tis = task_instances()
    shards = {t["map_index"]: t for t in tis if t["task_id"] == "sync"}
    if sorted(shards) != list(range(NUM_SHARDS)) or len(tis) != NUM_SHARDS + 1 \
            or {(t["state"], t["try_number"]) for t in tis} != {("success", 1)}:
        stack.fail(f"run {run_id} succeeded, but not every task did so on its first try",
                   summary())
    hosts = {t["hostname"] for t in tis}
    if {t["hostname"] for t in shards.values()} != set(WORKERS) or not hosts <= set(WORKERS):
        stack.fail(f"the shards did not run on both workers {WORKERS}", summary())

    # Every id is accounted for, with the status the simulator's answer calls for.
    expected = {i: "not_found" if payload_for(i) is None else "loaded" for i in IDS}
    got = stored_statuses(pg_url)
    wrong = {i: (got.get(i), want) for i, want in expected.items() if got.get(i) != want}
    extra = sorted(set(got) - set(expected))
    assert not wrong and not extra, (
        f"{len(wrong)} of {len(IDS)} ids without the expected status in etl_call_status "
        f"(id: (got, expected)), e.g. {dict(list(wrong.items())[:10])}; "
        f"{len(extra)} ids that were not asked for, e.g. {extra[:10]}")

    totals = get(f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/report/xcomEntries/"
                 "return_value?deserialize=true")
    if totals is None:
        stack.fail("no return value of the report task", summary())
    value = totals["value"]
    counts = {status: sum(s == status for s in expected.values())
              for status in ("loaded", "not_found")}
    assert {k: value.get(k) for k in ("requested", "loaded", "not_found", "failed", "shards",
                                      "shards_succeeded")} == {
        "requested": len(IDS), **counts, "failed": 0, "shards": NUM_SHARDS,
        "shards_succeeded": NUM_SHARDS}, value

    # The UI names the shards; each shard's asset events carry its run's counts.
    names = {i: t.get("rendered_map_index") for i, t in shards.items()}
    if names != {i: f"shard {i + 1}/{NUM_SHARDS}" for i in range(NUM_SHARDS)}:
        stack.fail(f"the shards are not named as expected: {names}", summary())
    events = (get(f"/api/v2/assets/events?source_dag_id={DAG_ID}&source_run_id={run_id}"
                  "&limit=1000") or {}).get("asset_events", [])
    per_table: dict[str, list[dict[str, Any]]] = {}
    for event in events:
        per_table.setdefault(event["uri"].rsplit("/", 1)[-1], []).append(event)
    calls_events = per_table.get("calls", [])
    if len(per_table) != 8 or {len(e) for e in per_table.values()} != {NUM_SHARDS} \
            or sum(e["extra"]["loaded"] for e in calls_events) != counts["loaded"]:
        stack.fail(f"expected {NUM_SHARDS} asset events for each of 8 tables, the calls ones "
                   f"adding up to {counts['loaded']} loaded; got "
                   f"{ {t: [e['extra'].get('loaded') for e in v] for t, v in per_table.items()} }",
                   summary())

    # The task logs (JSON lines, as Airflow writes them) carry the shard on every line of the
    # sync, and the run id on every line of the run, so a log shipper can pick a shard out.
    shards_summaries = {i: (get(f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/sync/"
                                f"xcomEntries/return_value?map_index={i}&deserialize=true")
                            or {}).get("value") or {} for i in range(NUM_SHARDS)}
    for index in range(NUM_SHARDS):
        logs = list((home / "logs").glob(
            f"dag_id={DAG_ID}/run_id={run_id}/task_id=sync/map_index={index}/*.log"))
        lines = [json.loads(line) for log in logs for line in log.read_text().splitlines()
                 if line.startswith("{")]
        ours = [line for line in lines if str(line.get("logger", "")).startswith("etl.")]
        # run_id is Airflow's there (the DAG run's): ours is etl_run_id, once the run began.
        run_ids = {line.get("etl_run_id") for line in ours} - {None}
        if not ours or run_ids != {shards_summaries[index]["run_id"]} or \
                {line.get("shard") for line in ours} != {f"{index + 1}/{NUM_SHARDS}"}:
            stack.fail(f"the task log of shard {index} lacks run_id or shard on the etl lines: "
                       f"{ours[:3]}", summary())

    by_host = {h: sorted(i for i, t in shards.items() if t["hostname"] == h) for h in WORKERS}
    with capsys.disabled():
        print(f"\ncelery e2e: migrate {migrated - began:.1f} s, stack start "
              f"{started - migrated:.1f} s, DAG run {ran - started:.1f} s for {len(IDS)} ids "
              f"(shards {by_host}), peak memory {stack.peak_pss_kib / 2**20:.2f} GiB PSS "
              f"({stack.peak_rss_kib / 2**20:.2f} GiB RSS summed) over up to "
              f"{stack.peak_processes} processes, test so far {time.monotonic() - began:.1f} s")
