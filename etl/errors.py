"""One exception hierarchy; each class carries the exit code the CLI maps it to (see the
README's exit-code table)."""

from __future__ import annotations

from enum import IntEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .sync import SyncSummary


class ExitCode(IntEnum):
    """The exit codes of `etl` (docs/design.md §3.4), each meaning defined here only."""

    OK = 0
    IDS_FAILED = 1  # the run ended, some ids failed after their retries
    INPUT = 2  # bad input or configuration: fix it, a retry will not help
    STOPPED = 3  # the run stopped (403, API or database unreachable): what committed stays
    INTERNAL = 70  # a bug (EX_SOFTWARE)
    INTERRUPTED = 130  # Ctrl-C (128 + SIGINT)
    TERMINATED = 143  # SIGTERM (128 + SIGTERM)


class EtlError(Exception):
    """Root of every error a user can cause or must act on; the CLI prints it as one line."""

    exit_code: int = ExitCode.IDS_FAILED
    # The summary of the run this error stopped, when a run had started.
    summary: SyncSummary | None = None


class InputError(EtlError):
    """Bad input or configuration: the operator must fix it, retrying will not help. Found
    before any request was sent, except for what only the API's answers show."""

    exit_code = ExitCode.INPUT


class ConfigError(InputError):
    """Invalid or missing configuration."""


class RemoteConfigError(ConfigError):
    """The API's answers show the configuration is wrong: a redirect, or 404 for every id
    (a base URL that is not the API's)."""


class FatalError(EtlError):
    """The run stopped; what was committed stays committed. May heal by itself (retry later),
    unless the message says otherwise."""

    exit_code = ExitCode.STOPPED


class AuthError(FatalError):
    """The API refused the credentials (403): every further request would fail too."""


class ApiUnreachable(FatalError):
    """No connection to the API could be made for a while (refused, DNS, connect timeouts)."""


class DatabaseError(FatalError):
    """The database is unreachable, or its schema is not what this version needs."""


class Interrupted(EtlError):
    """The run was stopped by a signal (Ctrl-C: exit 130, SIGTERM: exit 143) or by its caller;
    what was committed stays committed."""

    def __init__(self, message: str, exit_code: int = ExitCode.INTERRUPTED) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class PayloadError(ValueError):
    """A payload that cannot become rows; recorded as `failed` for that id, the run goes on."""
