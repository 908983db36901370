"""The Airflow face of the pipeline: `CommuboSyncOperator` runs `run_sync` in the task's process.

Installed with the `airflow` extra (`pip install 'commubo-etl[airflow]'`); nothing else in `etl`
imports Airflow. Written against the Airflow 3 task SDK (`airflow.sdk`).

The API is an HTTP connection (host = base URL, login = tenant id, password = access token);
the warehouse is a Postgres connection, or `db_url`. Settings the operator has no argument for
(timeouts, attempts per id, backoff, TLS verification) come from the etl config file named by
`ETL_CONFIG` on the worker, as for `etl sync`.

How run outcomes become task states:

- every id loaded or not found (404): success; the summary dict is the XCom return value;
- some ids failed after their retries: a retryable failure (`AirflowException`), unless
  `fail_on_failed_ids=False`;
- the database is unreachable: a retryable failure (`AirflowException`);
- the API refused the credentials (403): failure without retry (`AirflowFailException`);
- bad ids, ids file, connection or settings: failure without retry (`AirflowFailException`).

When a run had started, its summary is pushed as the return value even when the task fails, so
a downstream `trigger_rule="all_done"` task can count what every shard did.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from airflow.sdk import BaseHook, BaseOperator, conf
from airflow.sdk.exceptions import (
    AirflowException,
    AirflowFailException,
    AirflowNotFoundException,
)
from airflow.sdk.log import mask_secret
from sqlalchemy.engine import URL

from .config import (
    Settings,
    display_url,
    load_settings,
    normalize_database_url,
    with_overrides,
)
from .errors import AuthError, ConfigError, FatalError, InputError
from .ids import read_ids, select_shard
from .progress import LogProgress
from .sync import DEFAULT_RELATED_DEPTH, SyncSummary, run_sync

if TYPE_CHECKING:
    from airflow.sdk import Connection, Context

log = logging.getLogger(__name__)

# Airflow's key for a task's return value; a failed task pushes its partial summary under it.
_RETURN_KEY = "return_value"

# libpq parameters a Postgres connection's "extra" may carry (sslmode, ...). Other keys of the
# Postgres provider's extra (cursor, iam, aws_conn_id, ...) mean nothing to psycopg: dropped.
_LIBPQ_EXTRAS = frozenset({
    "application_name", "channel_binding", "client_encoding", "connect_timeout",
    "fallback_application_name", "gssencmode", "keepalives", "keepalives_count",
    "keepalives_idle", "keepalives_interval", "krbsrvname", "load_balance_hosts", "options",
    "passfile", "require_auth", "service", "sslcert", "sslcompression", "sslcrl", "sslkey",
    "sslmode", "sslnegotiation", "sslpassword", "sslrootcert", "sslsni", "target_session_attrs",
    "tcp_user_timeout",
})


class CommuboSyncOperator(BaseOperator):
    """Sync call ids from the commubo connect API into the warehouse, in-process via `run_sync`.

    :param ids: the call ids (a list), e.g. one element of `etl.ids.shard_ids(...)` through
        `.expand(ids=...)`. Give `ids` or `ids_file`, not both.
    :param ids_file: path of an ids file on the worker (templated). The task reads it and keeps
        shard `shard_index` of `num_shards` (the stable hash of `etl.ids`), so big id lists
        never travel through XCom or the serialized DAG.
    :param shard_index: which shard of `ids_file` (or of `ids`) this task syncs; map over it
        with `.expand(shard_index=range(num_shards))`.
    :param num_shards: how many shards the ids are split into. At most Airflow's
        `core.max_map_length` (1024 unless configured): more mapped tasks than that are refused
        by Airflow where the list comes through XCom, and clog the scheduler anyway.
    :param api_conn_id: HTTP connection of the API: host = base URL (with or without scheme
        and port; `schema` may be `http`/`https`, or else a path prefix), login = tenant id,
        password = access token.
    :param db_conn_id: Postgres connection of the warehouse (host, port, schema = database,
        login, password; libpq parameters such as `sslmode` in extra).
    :param db_url: a SQLAlchemy URL used instead of `db_conn_id` (e.g. SQLite for a trial).
        Not templated, so that a password in it is never rendered in the UI.
    :param concurrency: concurrent requests of this task.
    :param batch_size: rows per load transaction.
    :param max_rps: request rate cap per second of this task (0 = none); N mapped tasks
        together send up to N times as many.
    :param fail_on_failed_ids: fail the task (retryable) when ids failed after their retries.
        With False the task succeeds and the summary counts them (`etl failures` lists them).
    :param retry_failed: also fetch the ids whose last status is `failed`, of this task's shard
        only (as `etl sync --retry-failed --shard-index I --num-shards N`), so that mapped
        shards never refetch each other's ids.
    :param follow_related: also fetch the calls that fetched calls derive from
        (`relatedCallId`), transitively, each once a try (as `etl sync --follow-related`). A
        shard follows the chains of its own ids, also where they lead into ids of another
        shard's hash (two shards may then both fetch a call: the newest fetch wins). The
        summary then has `related`, the number of calls fetched that way (also counted in
        `loaded`, `not_found` and `failed`).
    :param related_depth: with `follow_related`, how many links to follow from an id of the
        task (1 = only the calls they name).

    Retries: the first try fetches every id of its shard, so a scheduled run refreshes calls
    that changed since the last fetch (the newest fetch wins). A retry (`try_number > 1`) passes
    `skip_loaded=True`: it only completes what the failed try left, and does not hit the API
    again for what is already loaded, and with `follow_related` goes on along the chains from
    the related ids stored with what it skips, so chains a failed try left unfinished are
    completed.
    """

    template_fields: Sequence[str] = ("ids_file",)
    ui_color = "#d6ecf3"

    def __init__(
        self,
        *,
        ids: Iterable[str] | None = None,
        ids_file: str | None = None,
        shard_index: int = 0,
        num_shards: int = 1,
        api_conn_id: str = "commubo_default",
        db_conn_id: str = "commubo_warehouse",
        db_url: str | None = None,
        concurrency: int = 8,
        batch_size: int = 500,
        max_rps: float = 0,
        fail_on_failed_ids: bool = True,
        retry_failed: bool = False,
        follow_related: bool = False,
        related_depth: int = DEFAULT_RELATED_DEPTH,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if ids is not None and ids_file is not None:
            # Caught when the DAG file is parsed (unmapped tasks); mapped tasks fail at run time.
            raise ValueError("give ids or ids_file, not both")
        self.ids = ids
        self.ids_file = ids_file
        self.shard_index = shard_index
        self.num_shards = num_shards
        self.api_conn_id = api_conn_id
        self.db_conn_id = db_conn_id
        self.db_url = db_url
        self.concurrency = concurrency
        self.batch_size = batch_size
        self.max_rps = max_rps
        self.fail_on_failed_ids = fail_on_failed_ids
        self.retry_failed = retry_failed
        self.follow_related = follow_related
        self.related_depth = related_depth

    def execute(self, context: Context) -> dict[str, Any]:
        """Run the sync of this task's shard and return its summary dict (SPEC section 3)."""
        try:
            ids = self.resolve_ids()
            settings = self.build_settings()
        except InputError as exc:
            raise AirflowFailException(str(exc)) from None
        ti = context.get("ti")
        try_number = getattr(ti, "try_number", None) or 1
        skip_loaded = try_number > 1
        source = f"ids file {self.ids_file}" if self.ids_file is not None else "the ids given"
        log.info("commubo sync of %d ids: shard index %d of %d shards of %s; API %s; "
                 "database %s%s", len(ids), self.shard_index, self.num_shards, source,
                 settings.base_url, display_url(settings.database_url),
                 f"; try {try_number}, so ids already loaded are skipped" if skip_loaded else "")
        try:
            summary = run_sync(settings, ids, skip_loaded=skip_loaded,
                               retry_failed=self.retry_failed, progress=LogProgress(),
                               shard=(self.shard_index, self.num_shards),
                               follow_related=self.follow_related,
                               related_depth=self.related_depth)
        except AuthError as exc:
            self._push_partial(context, exc)
            raise AirflowFailException(
                f"{exc} (here: the login and password of Airflow connection "
                f"{self.api_conn_id!r}); not retried, every request would be refused"
            ) from None
        except InputError as exc:
            # Raised before any request: bad ids, or a schema the migrations cannot reach.
            raise AirflowFailException(str(exc)) from None
        except FatalError as exc:
            # The database went away (or another stop a later try may get past): retryable.
            self._push_partial(context, exc)
            raise AirflowException(f"{exc}; the next try goes on where this one stopped"
                                   ) from None
        result = summary.to_dict()
        if summary.failed and self.fail_on_failed_ids:
            self._push(context, result)
            raise AirflowException(
                f"run {summary.run_id}: {summary.failed} of "
                f"{summary.requested + summary.related} ids failed "
                f"after their retries ({summary.loaded} loaded, {summary.not_found} not found, "
                f"{summary.skipped} skipped); a task retry fetches only what is not loaded; "
                f"see them with `etl failures --run {summary.run_id}`"
            )
        return result

    # -- the parts of execute, public so they can be checked on their own ---------------------

    def resolve_ids(self) -> list[str]:
        """This task's ids: `ids` or the ids file, then shard `shard_index` of `num_shards`."""
        if (self.ids is None) == (self.ids_file is None):
            raise InputError("CommuboSyncOperator needs ids or ids_file (exactly one of them)")
        check_num_shards(self.num_shards)
        if self.ids_file is not None:
            ids = read_ids(str(self.ids_file))
        elif isinstance(self.ids, str | bytes):
            # A bare string would be synced letter by letter.
            raise InputError("ids must be a list of call ids, not a string")
        else:
            ids = list(self.ids)  # type: ignore[arg-type]  # not None: checked above
        return select_shard(ids, self.shard_index, self.num_shards)

    def build_settings(self) -> Settings:
        """Settings from the worker's etl config (ETL_CONFIG), the connections and the
        operator's arguments, in increasing precedence."""
        base_url, tenant_id, token = api_from_connection(_connection(self.api_conn_id),
                                                         self.api_conn_id)
        if self.db_url is not None:
            database_url = normalize_database_url(self.db_url)
            if database_url.password:
                mask_secret(str(database_url.password))
        else:
            database_url = database_url_from_connection(_connection(self.db_conn_id),
                                                        self.db_conn_id)
        settings = load_settings(overrides={
            "base_url": base_url,
            "tenant_id": tenant_id,
            "access_token": token,
            "concurrency": self.concurrency,
            "batch_size": self.batch_size,
            "max_requests_per_s": self.max_rps,
        })
        # As a URL object, not a string: a socket directory as host does not survive a
        # round trip through the string form.
        return with_overrides(settings, database_url=database_url)

    def _push_partial(self, context: Context, exc: BaseException) -> None:
        summary: SyncSummary | None = getattr(exc, "summary", None)
        if summary is not None:
            self._push(context, summary.to_dict())

    def _push(self, context: Context, result: dict[str, Any]) -> None:
        ti = context.get("ti")
        if self.do_xcom_push and ti is not None:
            ti.xcom_push(key=_RETURN_KEY, value=result)


def check_num_shards(num_shards: int) -> None:
    """Refuse more shards than Airflow will map: `core.max_map_length`, 1024 by default."""
    limit = conf.getint("core", "max_map_length", fallback=1024)
    if not isinstance(num_shards, int) or isinstance(num_shards, bool) or num_shards < 1:
        raise InputError(f"num_shards must be a positive integer, got {num_shards!r}")
    if num_shards > limit:
        raise InputError(
            f"num_shards={num_shards} is above Airflow's core.max_map_length ({limit}): use "
            "fewer, bigger shards (raise concurrency), or raise core.max_map_length"
        )


def _connection(conn_id: str) -> Connection:
    try:
        return BaseHook.get_connection(conn_id)
    except AirflowNotFoundException:
        raise ConfigError(f"Airflow connection {conn_id!r} is not defined") from None


def api_from_connection(conn: Connection, conn_id: str = "") -> tuple[str, str, str]:
    """(base URL, tenant id, access token) from an HTTP connection.

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


def database_url_from_connection(conn: Connection, conn_id: str = "") -> URL:
    """A `postgresql+psycopg` URL from a Postgres connection (schema = database name)."""
    name = f"Airflow connection {conn_id!r}" if conn_id else "the database connection"
    conn_type = (conn.conn_type or "").lower()
    if conn_type not in ("postgres", "postgresql"):
        raise ConfigError(f"{name} is of type {conn.conn_type!r}: the warehouse needs a "
                          "Postgres connection (or db_url=)")
    if not conn.host:
        raise ConfigError(f"{name} has no host")
    extra = conn.extra_dejson
    query = {k: str(v) for k, v in extra.items() if k in _LIBPQ_EXTRAS and v is not None}
    if conn.password:
        mask_secret(conn.password)
    return normalize_database_url(URL.create(
        "postgresql",
        username=conn.login or None,
        password=conn.password or None,
        host=conn.host,
        port=conn.port or None,
        database=conn.schema or None,
        query=query,
    ))
