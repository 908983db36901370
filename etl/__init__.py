"""commubo-etl: sync commubo connect call history into a PostgreSQL warehouse.

The public API is what `__all__` names (README, "Using it from Python"); the modules behind it
(`etl.extract`, `etl.load`, ...) may change between versions. `etl.airflow` is the Airflow face,
importable only with the `airflow` extra.

The names are imported when first used (PEP 562): `import etl.airflow_provider`, which
Airflow's providers manager does in every process, must not pull in SQLAlchemy and requests.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_WHERE = {
    "Settings": "config",
    "load_settings": "config",
    "read_ids": "ids",
    "shard_ids": "ids",
    "StopRequest": "sync",
    "SyncSummary": "sync",
    "run_sync": "sync",
    **{name: "errors" for name in (
        "ApiUnreachable", "AuthError", "ConfigError", "DatabaseError", "EtlError", "ExitCode",
        "FatalError", "InputError", "Interrupted", "RemoteConfigError")},
}

__all__ = [
    "ApiUnreachable",
    "AuthError",
    "ConfigError",
    "DatabaseError",
    "EtlError",
    "ExitCode",
    "FatalError",
    "InputError",
    "Interrupted",
    "RemoteConfigError",
    "Settings",
    "StopRequest",
    "SyncSummary",
    "load_settings",
    "read_ids",
    "run_sync",
    "shard_ids",
]
assert sorted(__all__) == sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:
    from .config import Settings, load_settings
    from .errors import (
        ApiUnreachable,
        AuthError,
        ConfigError,
        DatabaseError,
        EtlError,
        ExitCode,
        FatalError,
        InputError,
        Interrupted,
        RemoteConfigError,
    )
    from .ids import read_ids, shard_ids
    from .sync import StopRequest, SyncSummary, run_sync
