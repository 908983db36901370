"""Helpers shared by the test modules (fixtures live in conftest.py). Imported as
`from helpers import ...`: pytest puts tests/ on sys.path."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from sqlalchemy.engine import URL

from etl.config import Secret, Settings
from etl.simulator import DEFAULT_ACCESS_TOKEN, DEFAULT_TENANT_ID, Simulator

ROOT = Path(__file__).resolve().parent.parent


def make_settings(sim: Simulator, db_url: URL, **changes) -> Settings:
    """Settings for a test run: fast backoff so retries do not slow the suite down."""
    base = Settings(
        base_url=sim.url,
        tenant_id=DEFAULT_TENANT_ID,
        access_token=Secret(DEFAULT_ACCESS_TOKEN),
        database_url=db_url,
        concurrency=4,
        timeout_s=5.0,
        backoff_s=0.01,
        max_backoff_s=0.05,
        retry_after_cap_s=5.0,
        batch_size=50,
    )
    return replace(base, **changes)


def etl_env(sim: Simulator | None = None, db_url: URL | None = None, **extra: str
            ) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("COMMUBO_", "ETL_DATABASE_URL", "ETL_CONFIG"))}
    if sim is not None:
        env.update(COMMUBO_BASE_URL=sim.url, COMMUBO_TENANT_ID=DEFAULT_TENANT_ID,
                   COMMUBO_ACCESS_TOKEN=DEFAULT_ACCESS_TOKEN)
    if db_url is not None:
        env["ETL_DATABASE_URL"] = db_url.render_as_string(hide_password=False)
    env.update(extra)
    return env


def run_etl(*args: str, env: dict[str, str], cwd: Path | None = None, input: str | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """The `etl` command in its own process: real exit codes, real stdout and stderr."""
    return subprocess.run(
        [sys.executable, "-m", "etl", *args],
        env=env, cwd=cwd, input=input, capture_output=True, text=True, timeout=timeout,
    )
