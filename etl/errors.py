"""One exception hierarchy; each class carries the exit code the CLI maps it to (see the
README's exit-code table)."""

from __future__ import annotations

from typing import Any


class EtlError(Exception):
    """Root of every error a user can cause or must act on; the CLI prints it as one line."""

    exit_code = 1
    # The summary of the run this error stopped, when a run had started (a `SyncSummary`).
    summary: Any = None


class InputError(EtlError):
    """Bad input or configuration: the operator must fix it, retrying will not help. Found
    before any request was sent, except for what only the API's answers show."""

    exit_code = 2


class ConfigError(InputError):
    """Invalid or missing configuration."""


class RemoteConfigError(ConfigError):
    """The API's answers show the configuration is wrong: a redirect, or 404 for every id
    (a base URL that is not the API's)."""


class FatalError(EtlError):
    """The run stopped; what was committed stays committed. May heal by itself (retry later),
    unless the message says otherwise."""

    exit_code = 3


class AuthError(FatalError):
    """The API refused the credentials (403): every further request would fail too."""


class ApiUnreachable(FatalError):
    """No connection to the API could be made for a while (refused, DNS, connect timeouts)."""


class DatabaseError(FatalError):
    """The database is unreachable, or its schema is not what this version needs."""


class Interrupted(EtlError):
    """The run was stopped by a signal (Ctrl-C: exit 130, SIGTERM: exit 143) or by its caller;
    what was committed stays committed."""

    def __init__(self, message: str, exit_code: int = 130) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class PayloadError(ValueError):
    """A payload that cannot become rows; recorded as `failed` for that id, the run goes on."""
