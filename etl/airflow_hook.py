"""`CommuboHook`: the commubo connect API as an Airflow connection of type `commubo`.

The connection holds the base URL (host), the tenant id (login), the access token (password)
and, in the form's extra fields, the request timeout, attempts per id and TLS verification
(etl.airflow_provider declares the form). HTTP connections (type `http`/`https`) written for
earlier versions keep working: the same fields are read the same way.

Installed with the `airflow` extra; nothing outside `etl.airflow*` imports Airflow.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from airflow.sdk import BaseHook
from airflow.sdk.exceptions import AirflowNotFoundException
from airflow.sdk.log import mask_secret

from .airflow_provider import CONN_FIELDS, CONNECTION_TYPE
from .config import Settings, load_settings, with_overrides
from .errors import AuthError, ConfigError, EtlError
from .extract import Extractor
from .outcome import NOT_FOUND, OK
from .text import printable

if TYPE_CHECKING:
    from airflow.sdk import Connection

# The id `test_connection` asks for. No call has it, so an API that accepts the credentials
# answers 404; one that refuses them answers 403 before looking the id up.
TEST_CALL_ID = "nf-commubo-etl-connection-test"

# The test is one request: a few seconds are enough to tell a dead API from a live one, and the
# UI's Test button must not hang for the run's full timeout and retries.
_TEST_TIMEOUT_S = 10.0


class CommuboHook(BaseHook):
    """The commubo connect API: settings from a `commubo` (or HTTP) Airflow connection.

    :param commubo_conn_id: the connection id (`commubo_default` unless given).
    """

    conn_name_attr = "commubo_conn_id"
    default_conn_name = "commubo_default"
    conn_type = CONNECTION_TYPE
    hook_name = "commubo connect API"

    def __init__(self, commubo_conn_id: str = default_conn_name, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.commubo_conn_id = commubo_conn_id

    def api_settings(self) -> dict[str, Any]:
        """The connection as etl setting overrides: base_url, tenant_id, access_token and
        whichever of the form's extra fields are filled in."""
        try:
            conn = self.get_connection(self.commubo_conn_id)
        except AirflowNotFoundException:
            raise ConfigError(
                f"Airflow connection {self.commubo_conn_id!r} is not defined") from None
        base_url, tenant_id, token = api_from_connection(conn, self.commubo_conn_id)
        return {"base_url": base_url, "tenant_id": tenant_id, "access_token": token,
                **_extra_settings(conn)}

    def get_settings(self, **overrides: Any) -> Settings:
        """Settings from the worker's etl config (ETL_CONFIG), then the connection, then
        `overrides` (None values are ignored), in increasing precedence."""
        return load_settings(overrides={**self.api_settings(), **overrides})

    def test_connection(self) -> tuple[bool, str]:
        """One request for a call id that does not exist: a 404 means the API is there and
        accepted the credentials; a 403 means it refused them. Never raises."""
        try:
            settings = self.get_settings(
                concurrency=1, max_attempts=1, unreachable_after_s=_TEST_TIMEOUT_S)
            settings = with_overrides(settings,
                                      timeout_s=min(settings.timeout_s, _TEST_TIMEOUT_S))
            outcome = next(o for o in Extractor(settings).fetch([TEST_CALL_ID]) if o)
        except AuthError:
            return False, ("the API refused the credentials (403): check the tenant id "
                           "(login) and the access token (password)")
        except EtlError as exc:
            return False, printable(str(exc))
        except Exception as exc:  # the Test button shows the message; a traceback helps no one
            return False, printable(f"{type(exc).__name__}: {exc}")
        if outcome.status == NOT_FOUND:
            return True, (f"the API at {settings.base_url} accepted the credentials "
                          f"(404 for the test id {TEST_CALL_ID}, as expected)")
        if outcome.status == OK:
            return True, f"the API at {settings.base_url} accepted the credentials"
        return False, printable(f"the API at {settings.base_url} did not answer as expected: "
                                f"{outcome.error}")


def _extra_settings(conn: Connection) -> dict[str, Any]:
    """The form's extra fields that are filled in. Airflow's form stores them under their
    own name; connections written by hand or by older UIs may carry the
    `extra__commubo__` prefix."""
    extra = conn.extra_dejson
    found: dict[str, Any] = {}
    for name in CONN_FIELDS:
        value = extra.get(name, extra.get(f"extra__{CONNECTION_TYPE}__{name}"))
        if value not in (None, ""):
            found[name] = value
    return found


def api_from_connection(conn: Connection, conn_id: str = "") -> tuple[str, str, str]:
    """(base URL, tenant id, access token) from a commubo or HTTP connection.

    The host is taken as Airflow stores it: `https://api.example.com[:port][/prefix]`, or a
    bare `api.example.com` whose scheme is the connection's `schema` when that is `http` or
    `https`, else `https` for a connection of type https and `http` otherwise (as Airflow's
    HttpHook does). A `schema` that is not a scheme is a path prefix, which is what a URI
    such as `http://tenant:token@host:8080/prefix` leaves there. The port field is used when
    the host names none.
    """
    name = f"Airflow connection {conn_id!r}" if conn_id else "the API connection"
    host = (conn.host or "").strip()
    if not host:
        raise ConfigError(f"{name} has no host: set it to the API base URL "
                          "(the part before /v1/calls/...)")
    schema = (conn.schema or "").strip()
    scheme_field = schema.lower() in ("http", "https")
    prefix = "" if scheme_field or not schema else "/" + schema.strip("/")
    if "://" not in host:
        scheme = (schema.lower() if scheme_field
                  else "https" if (conn.conn_type or "").lower() == "https" else "http")
        if host.count(":") > 1 and not host.startswith("["):
            host = f"[{host}]"  # a bare IPv6 address
        host = f"{scheme}://{host}"
    url = host.rstrip("/") + prefix
    if conn.port:
        parts = urlsplit(url)
        try:
            port = parts.port
        except ValueError:
            pass  # an invalid port in the host: normalize_base_url names it later
        else:
            if port is None:
                url = urlunsplit(parts._replace(netloc=f"{parts.netloc}:{conn.port}"))
            elif port != conn.port:
                raise ConfigError(f"{name}: the host names port {port} and the port field "
                                  f"{conn.port}: leave one of them out")
    if not conn.login:
        raise ConfigError(f"{name} has no login: set it to the commubo tenant id")
    if not conn.password:
        raise ConfigError(f"{name} has no password: set it to the commubo access token")
    mask_secret(conn.password)
    return url, conn.login, conn.password
