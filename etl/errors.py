"""One exception hierarchy; each class carries the exit code the CLI maps it to (SPEC section 3)."""

from __future__ import annotations


class EtlError(Exception):
    """Root of every error a user can cause or must act on; the CLI prints it as one line."""

    exit_code = 1


class InputError(EtlError):
    """Bad input found before any request was sent: ids file, configuration, options."""

    exit_code = 2


class ConfigError(InputError):
    """Invalid or missing configuration."""


class FatalError(EtlError):
    """The run stopped; what was committed stays committed."""

    exit_code = 3


class AuthError(FatalError):
    """The API refused the credentials (403): every further request would fail too."""


class DatabaseError(FatalError):
    """The database is unreachable, or its schema is not what this version needs."""


class PayloadError(ValueError):
    """A payload that cannot become rows; recorded as `failed` for that id, the run goes on."""
