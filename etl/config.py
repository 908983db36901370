"""Settings: defaults < config file < environment < command-line options (docs/design.md §2).

Built once into a frozen `Settings`; secrets are held in `Secret`, whose repr and str mask them,
and the database URL is a SQLAlchemy `URL`, whose repr hides the password.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from .errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_CONFIG_FILE = "etl.toml"
DEFAULT_DATABASE_URL = "sqlite:///commubo.db"


class Secret:
    """A string that never shows itself by accident: repr, str and format all print a mask."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def get(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True)
class Settings:
    base_url: str | None = None
    tenant_id: str | None = None
    access_token: Secret | None = None
    database_url: URL = field(default_factory=lambda: make_url(DEFAULT_DATABASE_URL))
    concurrency: int = 8
    timeout_s: float = 30.0
    max_attempts: int = 5
    max_requests_per_s: float = 0.0
    batch_size: int = 500
    # API settings without a command-line option (docs/design.md §2.2): retry pacing, limits, TLS.
    backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    retry_after_cap_s: float = 120.0
    # The largest response body accepted, as received and after decoding; a bigger one fails
    # that id without a retry.
    max_response_bytes: int = 10 * 1024 * 1024
    # When every attempt to connect has failed for this long, with no HTTP answer in between,
    # the run stops: the API cannot be reached (exit 3).
    unreachable_after_s: float = 20.0
    # Fewer requests in flight while the API answers 429 (etl/adaptive.py); off: always
    # `concurrency`.
    adaptive_concurrency: bool = True
    verify_tls: bool = True
    config_file: str | None = None

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}={v!r}" for k, v in self.describe().items())
        return f"Settings({shown})"

    __str__ = __repr__

    def describe(self) -> dict[str, Any]:
        """The settings as plain values for display, secrets masked."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "database_url":
                value = display_url(value)
            elif isinstance(value, Secret):
                value = "***"
            out[f.name] = value
        return out


# TOML key -> (settings field, parser). Every key is documented in config.example.toml.
def _str(v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError("expected a string")
    return v


def _int(v: Any) -> int:
    if isinstance(v, bool):
        raise ValueError("expected an integer")
    if isinstance(v, float):
        if not v.is_integer():
            raise ValueError(f"expected an integer, got {v}")
        return int(v)
    if isinstance(v, str):
        v = v.strip()
    try:
        return int(v)
    except (TypeError, ValueError):
        raise ValueError("expected an integer") from None


def _float(v: Any) -> float:
    if isinstance(v, bool):
        raise ValueError("expected a number")
    try:
        return float(v)
    except (TypeError, ValueError):
        raise ValueError("expected a number") from None


def _bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    text = v.strip().lower() if isinstance(v, str) else None
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


TOML_KEYS: dict[str, tuple[str, Any]] = {
    "api.base_url": ("base_url", _str),
    "api.tenant_id": ("tenant_id", _str),
    "api.access_token": ("access_token", _str),
    "api.concurrency": ("concurrency", _int),
    "api.timeout_s": ("timeout_s", _float),
    "api.max_attempts": ("max_attempts", _int),
    "api.max_requests_per_s": ("max_requests_per_s", _float),
    "api.backoff_s": ("backoff_s", _float),
    "api.max_backoff_s": ("max_backoff_s", _float),
    "api.retry_after_cap_s": ("retry_after_cap_s", _float),
    "api.max_response_bytes": ("max_response_bytes", _int),
    "api.unreachable_after_s": ("unreachable_after_s", _float),
    "api.verify_tls": ("verify_tls", _bool),
    "api.adaptive_concurrency": ("adaptive_concurrency", _bool),
    "database.url": ("database_url", _str),
    "sync.batch_size": ("batch_size", _int),
}

ENV_KEYS: dict[str, str] = {
    "COMMUBO_BASE_URL": "base_url",
    "COMMUBO_TENANT_ID": "tenant_id",
    "COMMUBO_ACCESS_TOKEN": "access_token",
    "ETL_DATABASE_URL": "database_url",
}

_PARSERS = {name: parser for name, parser in TOML_KEYS.values()}


def load_settings(
    config_file: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
) -> Settings:
    """Build Settings from defaults, the config file, the environment and `overrides` (option
    values; None means "not given"). Raises ConfigError with one clear line."""
    env = os.environ if env is None else env
    raw: dict[str, Any] = {}

    path = config_file or env.get("ETL_CONFIG") or None
    explicit = path is not None
    if path is None and Path(DEFAULT_CONFIG_FILE).is_file():
        path = DEFAULT_CONFIG_FILE
    if path is not None:
        raw.update(_read_toml(path, explicit))

    for var, name in ENV_KEYS.items():
        value = env.get(var)
        if value:  # an empty variable counts as unset, as in most shells' `VAR= cmd`
            raw[name] = value
    for name, value in (overrides or {}).items():
        if value is not None:
            raw[name] = value

    values: dict[str, Any] = {}
    for name, value in raw.items():
        try:
            values[name] = _PARSERS[name](value)
        except ValueError as exc:
            raise ConfigError(f"setting {name}: {exc}") from None
    return validate(Settings(config_file=path, **_finish(values)))


def _read_toml(path: str, explicit: bool) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            doc = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a directory") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc}") from None
    out: dict[str, Any] = {}
    for section, table in doc.items():
        if not isinstance(table, dict):
            raise ConfigError(f"config file {path}: {section} must be a table ([{section}])")
        for key, value in table.items():
            dotted = f"{section}.{key}"
            if dotted not in TOML_KEYS:
                known = ", ".join(sorted(TOML_KEYS))
                raise ConfigError(f"config file {path}: unknown key {dotted} (known: {known})")
            name, parser = TOML_KEYS[dotted]
            try:
                out[name] = parser(value)
            except ValueError as exc:
                raise ConfigError(f"config file {path}: {dotted}: {exc}") from None
    return out


def _finish(values: dict[str, Any]) -> dict[str, Any]:
    # A token or tenant id pasted with a line break or spaces around it: HTTP would drop them.
    if "tenant_id" in values:
        values["tenant_id"] = values["tenant_id"].strip()
    if "access_token" in values:
        values["access_token"] = Secret(values["access_token"].strip())
    if "base_url" in values:
        values["base_url"] = normalize_base_url(values["base_url"])
    if "database_url" in values:
        values["database_url"] = normalize_database_url(values["database_url"])
    return values


def normalize_base_url(url: str) -> str:
    """Check an API base URL and drop a trailing slash. Refuses what requests would fail on
    later, such as the vendor documentation's port 65536."""
    url = url.strip()
    try:
        parts = urlsplit(url)
        port = parts.port  # raises ValueError for ports outside 0..65535
    except ValueError as exc:
        raise ConfigError(f"API base URL {_mask_userinfo(url)!r} is invalid: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise ConfigError(
            f"API base URL {_mask_userinfo(url)!r} must start with http:// or https://"
        )
    if not parts.hostname:
        raise ConfigError(f"API base URL {_mask_userinfo(url)!r} has no host name")
    if port == 0:
        raise ConfigError(f"API base URL {_mask_userinfo(url)!r} has port 0")
    if parts.query or parts.fragment:
        raise ConfigError(
            f"API base URL {_mask_userinfo(url)!r} must not have a query or fragment: "
            "give the part before /v1/calls/..."
        )
    if parts.username or parts.password:
        raise ConfigError("API base URL must not carry credentials: use COMMUBO_ACCESS_TOKEN")
    # The sync appends /v1/calls/{callId}: a base URL that already ends in it would ask for
    # /v1/v1/calls/..., which the API answers with 404 for every id, each recorded not_found.
    # A call's URL pasted whole (.../v1/calls/123) is the same mistake.
    path = parts.path.rstrip("/").lower()
    if path.endswith("/v1") or "/v1/calls" in path:
        raise ConfigError(
            f"API base URL {url!r} must not include /v1: give the part before /v1 "
            "(the sync adds /v1/calls/{callId})"
        )
    return url.rstrip("/")


def _mask_userinfo(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"
    return url


def normalize_database_url(url: str | URL) -> URL:
    """A SQLAlchemy URL; bare postgres:// and postgresql:// go to psycopg 3."""
    try:
        parsed = make_url(url) if isinstance(url, str) else url
    except (ArgumentError, ValueError):
        # make_url's message repeats the URL, password included: say it without the URL.
        raise ConfigError(
            "database URL is not a valid SQLAlchemy URL "
            "(examples: sqlite:///commubo.db, postgresql://user:pass@host:5432/db)"
        ) from None
    if parsed.drivername in ("postgres", "postgresql"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    elif parsed.drivername.startswith("postgres+"):
        parsed = parsed.set(drivername="postgresql+" + parsed.drivername.split("+", 1)[1])
    if parsed.get_backend_name() == "postgresql" and parsed.get_driver_name() != "psycopg":
        # The loader speaks psycopg 3 (binary COPY): another driver, even when installed (dlt
        # brings psycopg2), would fail in the middle of the first batch.
        raise ConfigError(f"database driver {parsed.drivername!r} is not supported: write "
                          "postgresql://... (psycopg 3)")
    return parsed


_SECRET_QUERY_KEYS = frozenset({"password", "passwd", "sslpassword"})


def display_url(url: URL) -> str:
    """The URL for messages: the password masked, also where libpq takes it from the query."""
    if any(k.lower() in _SECRET_QUERY_KEYS for k in url.query):
        url = url.set(query={k: ("***" if k.lower() in _SECRET_QUERY_KEYS else v)
                             for k, v in url.query.items()})
    return url.render_as_string(hide_password=True)


# Labels for messages: the TOML key, with the option where there is one.
_CONCURRENCY = "concurrency (--concurrency or api.concurrency)"
_MAX_RPS = "max requests per second (--max-rps or api.max_requests_per_s)"
_BATCH_SIZE = "batch size (--batch-size or sync.batch_size)"

# Settings field -> (label, lowest, highest, whether the lowest is excluded, unit).
_RANGES: dict[str, tuple[str, float, float, bool, str]] = {
    "concurrency": (_CONCURRENCY, 1, 1024, False, ""),
    "timeout_s": ("api.timeout_s", 0, 3600, True, " seconds"),
    "max_attempts": ("api.max_attempts", 1, 100, False, ""),  # etl_call_status: smallint
    "batch_size": (_BATCH_SIZE, 1, 100_000, False, ""),
    "backoff_s": ("api.backoff_s", 0, 3600, False, " seconds"),
    "max_backoff_s": ("api.max_backoff_s", 0, 3600, False, " seconds"),
    "retry_after_cap_s": ("api.retry_after_cap_s", 0, 3600, False, " seconds"),
    "max_response_bytes": ("api.max_response_bytes", 1024, 2**30, False, " bytes"),
    "unreachable_after_s": ("api.unreachable_after_s", 1, 3600, False, " seconds"),
}
# 0 means no cap; a tiny positive cap (0.0001/s) would make a run all but never end.
_MAX_RPS_RANGE = (0.1, 100_000)


def _num(x: float) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"


def validate(s: Settings) -> Settings:
    """Refuse values outside their sane range (and inf or nan anywhere), with one line naming
    the setting, the range and the value given."""
    for name, (label, low, high, low_excluded, unit) in _RANGES.items():
        value = getattr(s, name)
        finite = not isinstance(value, float) or math.isfinite(value)
        low_ok = value > low if low_excluded else value >= low
        if not (finite and low_ok and value <= high):
            if low_excluded:
                allowed = f"more than {_num(low)} and at most {_num(high)}{unit}"
            else:
                allowed = f"between {_num(low)} and {_num(high)}{unit}"
            kind = ("an integer" if isinstance(value, int)
                    else "a number" if finite else "a finite number")
            raise ConfigError(f"{label} must be {kind} {allowed}, got {value}")
    rps = s.max_requests_per_s
    low, high = _MAX_RPS_RANGE
    if not (rps == 0 or low <= rps <= high):
        raise ConfigError(f"{_MAX_RPS} must be 0 (no cap) or between {_num(low)} and "
                          f"{_num(high)}, got {rps}")
    backend = s.database_url.get_backend_name()
    if backend not in ("postgresql", "sqlite"):
        raise ConfigError(f"database {backend!r} is not supported: use postgresql or sqlite")
    return s


def require_api(s: Settings) -> None:
    """What `sync` needs beyond the defaults; checked before any request."""
    missing = [
        label
        for label, value in (
            ("base URL (--base-url, COMMUBO_BASE_URL or api.base_url)", s.base_url),
            ("tenant id (COMMUBO_TENANT_ID or api.tenant_id)", s.tenant_id),
            ("access token (COMMUBO_ACCESS_TOKEN or api.access_token)",
             s.access_token and s.access_token.get()),
        )
        if not value
    ]
    if missing:
        raise ConfigError("missing " + "; ".join(missing))
    # HTTP header values are Latin-1 at best and printable ASCII in practice: requests refuses
    # a line break or a control character with an error that repeats the value, token
    # included, and http.client a character outside Latin-1 with an encoding error that shows
    # it too. One rule, checked here, naming the setting and never showing the value.
    for label, value in (("tenant id (COMMUBO_TENANT_ID or api.tenant_id)", s.tenant_id),
                         ("access token (COMMUBO_ACCESS_TOKEN or api.access_token)",
                          s.access_token.get())):
        if not _header_safe(value):
            raise ConfigError(f"{label} has a line break, a control character, surrounding "
                              "spaces or other characters an HTTP header cannot carry (only "
                              "printable ASCII)")
    _warn_if_clear_text(s.base_url)


def _header_safe(value: str) -> bool:
    """Only printable ASCII (0x20-0x7E), without spaces around it (HTTP would drop them)."""
    return all(" " <= c <= "~" for c in value) and value == value.strip()


def _warn_if_clear_text(base_url: str) -> None:
    parts = urlsplit(base_url)
    if parts.scheme != "http" or _is_loopback(parts.hostname or ""):
        return
    log.warning("API base URL %s is http://, not https://: the access token travels in clear "
                "text to %s", base_url, parts.hostname)


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def with_overrides(s: Settings, **changes: Any) -> Settings:
    """A copy with some values changed, validated like the original (for the library API)."""
    return validate(replace(s, **_finish(dict(changes))))
