"""What Airflow learns about commubo-etl as a provider, through the `apache_airflow_provider`
entry point (pyproject.toml): the `commubo` connection type, its form and its hook.

Plain data, no Airflow import: Airflow reads it in every process that lists providers (the
api-server's connection form, `airflow providers list`) without importing the hook. The
connection form is declared here (`conn-fields`, `ui-field-behaviour`), the way Airflow 3.2
and later want it, so no web-form library is needed.
"""

from __future__ import annotations

from typing import Any

CONNECTION_TYPE = "commubo"

# The extra fields of the connection form: the per-connection API settings a data engineer
# sets beside the credentials. Each maps onto the etl setting of the same name (README,
# Configuration); an empty field leaves the etl config file's value.
CONN_FIELDS: dict[str, dict[str, Any]] = {
    "timeout_s": {
        "label": "Request timeout (s)",
        "description": "Deadline of each request: connect, headers and body (api.timeout_s).",
        "schema": {"type": ["number", "null"], "minimum": 0.001, "maximum": 3600},
    },
    "max_attempts": {
        "label": "Attempts per id",
        "description": "Tries per call id before it is recorded as failed (api.max_attempts).",
        "schema": {"type": ["integer", "null"], "minimum": 1, "maximum": 100},
    },
    "verify_tls": {
        "label": "Verify TLS certificates",
        "description": "Turn off for test endpoints only (api.verify_tls).",
        "schema": {"type": ["boolean", "null"], "default": True},
    },
}


def get_provider_info() -> dict[str, Any]:
    """The provider description Airflow's ProvidersManager validates and registers."""
    return {
        "package-name": "commubo-etl",
        "name": "commubo connect",
        "description": "Sync call history from the commubo connect API into PostgreSQL.",
        "versions": [_version()],
        "connection-types": [{
            "connection-type": CONNECTION_TYPE,
            "hook-class-name": "etl.airflow_hook.CommuboHook",
            "hook-name": "commubo connect API",
            "conn-fields": CONN_FIELDS,
            "ui-field-behaviour": {
                "hidden-fields": ["schema", "port", "extra"],
                "relabeling": {
                    "host": "Base URL",
                    "login": "Tenant ID",
                    "password": "Access token",
                },
                "placeholders": {
                    "host": "https://api.commubo.example (the part before /v1/calls/...)",
                    "login": "your commubo tenant id",
                    "password": "your commubo access token",
                },
            },
        }],
    }


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("commubo-etl")
    except PackageNotFoundError:  # run from a source tree that is not installed
        return "0+unknown"
