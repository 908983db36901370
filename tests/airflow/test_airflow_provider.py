"""The `commubo` connection type, registered through the `apache_airflow_provider` entry point,
and CommuboHook's `test_connection` against the simulator and dead ports."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import warnings

import pytest

pytest.importorskip("airflow.sdk")

from airflow_helpers import RecordingTI  # noqa: E402
from sqlalchemy import create_engine, func, select  # noqa: E402
from sqlalchemy.engine import URL  # noqa: E402

from etl.airflow import CommuboSyncOperator  # noqa: E402
from etl.airflow_hook import TEST_CALL_ID, CommuboHook  # noqa: E402
from etl.schema import calls  # noqa: E402
from etl.simulator import DEFAULT_ACCESS_TOKEN, DEFAULT_TENANT_ID, Simulator  # noqa: E402


def _commubo_connection(host: str, *, token: str = DEFAULT_ACCESS_TOKEN,
                        **extra: object) -> str:
    conn = {"conn_type": "commubo", "host": host, "login": DEFAULT_TENANT_ID,
            "password": token}
    if extra:
        conn["extra"] = json.dumps(extra)
    return json.dumps(conn)


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again: nothing listens there


def test_airflow_lists_the_provider_and_its_connection_type(airflow_home):
    listed = subprocess.run([sys.executable, "-m", "airflow", "providers", "list",
                             "--output", "json"], capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr[-2000:]
    providers = {p["package_name"]: p for p in json.loads(listed.stdout)}
    assert "commubo-etl" in providers

    hooks = subprocess.run([sys.executable, "-m", "airflow", "providers", "hooks",
                            "--output", "json"], capture_output=True, text=True, timeout=120)
    assert hooks.returncode == 0, hooks.stderr[-2000:]
    by_type = {h["connection_type"]: h for h in json.loads(hooks.stdout)}
    assert by_type["commubo"]["class"] == "etl.airflow_hook.CommuboHook"
    assert by_type["commubo"]["package_name"] == "commubo-etl"
    assert by_type["commubo"]["conn_id_attribute_name"] == "commubo_conn_id"


def test_the_connection_form_names_the_fields_and_hides_the_rest(airflow_home):
    from airflow.providers_manager import ProvidersManager

    manager = ProvidersManager()
    behaviour = manager.field_behaviours["commubo"]
    assert behaviour["relabeling"] == {"host": "Base URL", "login": "Tenant ID",
                                       "password": "Access token"}
    assert set(behaviour["hidden_fields"]) == {"schema", "port", "extra"}
    widgets = manager.connection_form_widgets
    assert {"extra__commubo__timeout_s", "extra__commubo__max_attempts",
            "extra__commubo__verify_tls"} <= set(widgets)
    assert widgets["extra__commubo__timeout_s"].field["schema"]["title"] == "Request timeout (s)"


def test_test_connection_accepts_good_credentials_with_one_request(monkeypatch, sim: Simulator):
    monkeypatch.setenv("AIRFLOW_CONN_COMMUBO_DEFAULT", _commubo_connection(sim.url))
    ok, message = CommuboHook().test_connection()
    assert ok, message
    assert "accepted the credentials" in message
    assert sim.requests_for(TEST_CALL_ID) == 1


def test_test_connection_tells_refused_credentials_and_never_shows_the_token(
        monkeypatch, sim: Simulator):
    monkeypatch.setenv("AIRFLOW_CONN_COMMUBO_TEST",
                       _commubo_connection(sim.url, token="wrong-s3cr3t-token"))
    ok, message = CommuboHook("commubo_test").test_connection()
    assert not ok
    assert "403" in message and "access token" in message
    assert "wrong-s3cr3t-token" not in message


@pytest.mark.parametrize("host, expected", [
    (None, "refused"),  # a dead port on this machine
    ("http://127.0.0.1:{port}/v1", "/v1"),  # the wrong base URL: refused before any request
])
def test_test_connection_tells_a_dead_or_wrong_api(monkeypatch, host, expected):
    port = _dead_port()
    url = f"http://127.0.0.1:{port}" if host is None else host.format(port=port)
    monkeypatch.setenv("AIRFLOW_CONN_COMMUBO_DEFAULT", _commubo_connection(url))
    ok, message = CommuboHook().test_connection()
    assert not ok
    assert expected in message


def test_a_missing_connection_fails_the_test_with_its_name():
    ok, message = CommuboHook("no_such_commubo_conn").test_connection()
    assert not ok
    assert "'no_such_commubo_conn' is not defined" in message


def test_airflows_own_test_button_path_reaches_the_hook(airflow_home, monkeypatch,
                                                        sim: Simulator):
    """What the UI's Test button does: Connection.test_connection() finds the hook class of
    the connection type through the providers manager and calls its test_connection."""
    from airflow.models.connection import Connection

    conn = Connection(conn_id="commubo_ui_test", conn_type="commubo", host=sim.url,
                      login=DEFAULT_TENANT_ID, password=DEFAULT_ACCESS_TOKEN)
    monkeypatch.setenv("AIRFLOW_CONN_COMMUBO_UI_TEST", conn.as_json())
    with warnings.catch_warnings():  # Airflow 3.3's own use of ProvidersManager.hooks
        warnings.simplefilter("ignore")
        ok, message = conn.test_connection()
    assert ok, message


def test_the_form_fields_reach_the_settings(monkeypatch, sim: Simulator):
    monkeypatch.setenv("AIRFLOW_CONN_COMMUBO_DEFAULT", _commubo_connection(
        sim.url, timeout_s=7, max_attempts="2", extra__commubo__verify_tls=False))
    settings = CommuboHook().get_settings()
    assert (settings.timeout_s, settings.max_attempts, settings.verify_tls) == (7.0, 2, False)
    assert settings.base_url == sim.url
    assert settings.tenant_id == DEFAULT_TENANT_ID


def test_the_operator_syncs_through_a_commubo_connection(connections: URL, monkeypatch,
                                                         sim: Simulator):
    monkeypatch.setenv("AIRFLOW_CONN_COMMUBO_DEFAULT", _commubo_connection(sim.url))
    ids = [f"call-{n:06d}" for n in range(1, 11)]
    summary = CommuboSyncOperator(task_id="sync", ids=ids).execute(
        {"ti": RecordingTI()})  # type: ignore[arg-type]
    assert summary["loaded"] + summary["not_found"] == 10
    engine = create_engine(connections)
    try:
        with engine.connect() as conn:
            assert conn.scalar(select(func.count()).select_from(calls)) == summary["loaded"] > 0
    finally:
        engine.dispose()
