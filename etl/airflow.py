"""The Airflow face of the pipeline: `CommuboSyncOperator` runs `run_sync` in the task's process.

Installed with the `airflow` extra (`pip install 'commubo-etl[airflow]'`); nothing else in `etl`
imports Airflow. Written against the Airflow 3 task SDK (`airflow.sdk`).

The API is a `commubo` connection (`etl.airflow_hook.CommuboHook`; an HTTP connection with the
same fields works too: host = base URL, login = tenant id, password = access token); the
warehouse is a Postgres connection, or `db_url`. Settings neither has (backoff, response size
cap, ...) come from the etl config file named by `ETL_CONFIG` on the worker, as for `etl sync`.

The operator declares an Airflow asset per warehouse table it writes when it knows the warehouse
when the DAG is parsed (`warehouse_uri=`, or `db_url=`), and attaches the run's counts to their
events; it reports the same to OpenLineage when that provider is installed.

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

import contextlib
import logging
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from airflow.sdk import Asset, AssetAlias, BaseHook, BaseOperator, conf
from airflow.sdk.exceptions import (
    AirflowException,
    AirflowFailException,
    AirflowNotFoundException,
)
from airflow.sdk.log import mask_secret
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from .airflow_hook import CommuboHook, api_from_connection
from .config import (
    Settings,
    display_url,
    normalize_database_url,
    with_overrides,
)
from .errors import (
    AuthError,
    ConfigError,
    EtlError,
    ExitCode,
    FatalError,
    InputError,
    Interrupted,
)
from .ids import read_ids, select_shard, shard_ids
from .logs import log_context, shard_label
from .progress import LogProgress
from .schema import metadata
from .sync import DEFAULT_RELATED_DEPTH, StopRequest, SyncSummary, run_sync, shard_rate

if TYPE_CHECKING:
    from airflow.sdk import Connection, Context

__all__ = [
    "CommuboHook",
    "CommuboSyncOperator",
    "api_from_connection",
    "database_url_from_connection",
    "shard_ids",
    "warehouse_asset",
    "warehouse_assets",
]

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

    :param ids: the call ids (a list, templated), e.g. one element of `shard_ids(...)`
        through `.expand(ids=...)`. Give `ids` or `ids_file`, not both.
    :param ids_file: path of an ids file on the worker (templated). The task reads it and keeps
        shard `shard_index` of `num_shards` (the stable hash of `etl.ids`), so big id lists
        never travel through XCom or the serialized DAG.
    :param shard_index: which shard of `ids_file` (or of `ids`) this task syncs; map over it
        with `.expand(shard_index=range(num_shards))`.
    :param num_shards: how many shards the ids are split into. At most Airflow's
        `core.max_map_length` (1024 unless configured): more mapped tasks than that are refused
        by Airflow where the list comes through XCom, and clog the scheduler anyway.
    :param api_conn_id: the API's connection, of type `commubo` (or HTTP): host = base URL,
        login = tenant id, password = access token (see `CommuboHook`).
    :param db_conn_id: Postgres connection of the warehouse (host, port, schema = database,
        login, password; libpq parameters such as `sslmode` in extra).
    :param db_url: a SQLAlchemy URL used instead of `db_conn_id` (templated; e.g. SQLite for
        a trial). A password in it is masked in the rendered fields and logs; the connection
        is the better place for one.
    :param warehouse_uri: where `db_conn_id` points, as `postgres://host:port/database`, for
        the assets (outlets) the task declares: one per table it writes, so downstream DAGs
        can be scheduled on them. Not needed with `db_url` (read from it). Without either, an
        unmapped task reports its tables through an asset alias instead, and a mapped one
        declares none (see docs/airflow.md).
    :param concurrency: concurrent requests of this task.
    :param batch_size: rows per load transaction.
    :param max_rps: request rate cap per second of all the shards together (0 = none): each
        of N mapped shards takes its part, as `etl sync --num-shards` does.
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

    Mapped tasks are named `shard I/N` in the UI (`map_index_template`). A task Airflow kills
    (timeout, "mark failed", SIGTERM) stops within a second: requests in flight are cut off,
    what was fetched is committed, and the run is recorded as `interrupted`.
    """

    template_fields: Sequence[str] = ("ids", "ids_file", "db_url")
    ui_color = "#d6ecf3"

    def __init__(
        self,
        *,
        ids: Iterable[str] | None = None,
        ids_file: str | None = None,
        shard_index: int = 0,
        num_shards: int = 1,
        api_conn_id: str = CommuboHook.default_conn_name,
        db_conn_id: str = "commubo_warehouse",
        db_url: str | None = None,
        warehouse_uri: str | None = None,
        concurrency: int = 8,
        batch_size: int = 500,
        max_rps: float = 0,
        fail_on_failed_ids: bool = True,
        retry_failed: bool = False,
        follow_related: bool = False,
        related_depth: int = DEFAULT_RELATED_DEPTH,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("map_index_template", _MAP_INDEX_TEMPLATE)
        # Not when a mapped task is created for its run: its outlets came through partial().
        if "outlets" not in kwargs:
            kwargs["outlets"] = default_outlets(warehouse_uri, db_url, db_conn_id)
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
        self.warehouse_uri = warehouse_uri
        self.concurrency = concurrency
        self.batch_size = batch_size
        self.max_rps = max_rps
        self.fail_on_failed_ids = fail_on_failed_ids
        self.retry_failed = retry_failed
        self.follow_related = follow_related
        self.related_depth = related_depth
        self._stop = StopRequest()
        self._summary: SyncSummary | None = None
        self._settings: Settings | None = None

    @classmethod
    def partial(cls, **kwargs: Any):  # type: ignore[override]
        """As BaseOperator.partial; mapped tasks get their outlets here, where Airflow reads
        them when the DAG is parsed (`__init__` only runs for each mapped task at run time).
        No asset alias for mapped tasks: shards finishing together would each create the
        alias's asset, and Airflow's API server fails all but one of them."""
        if "outlets" not in kwargs:
            outlets = [o for o in default_outlets(
                kwargs.get("warehouse_uri"), kwargs.get("db_url"),
                kwargs.get("db_conn_id", "commubo_warehouse")) if isinstance(o, Asset)]
            if outlets:
                kwargs["outlets"] = outlets
        kwargs.setdefault("map_index_template", _MAP_INDEX_TEMPLATE)
        return super().partial(**kwargs)

    def render_template_fields(self, context: Context, jinja_env: Any = None) -> None:
        super().render_template_fields(context, jinja_env)
        # Registered before Airflow stores the rendered fields, so the password never reaches
        # the UI's "Rendered Template" view.
        if self.db_url:
            with contextlib.suppress(ArgumentError, ValueError):
                password = make_url(str(self.db_url)).password
                if password:
                    mask_secret(str(password))

    def execute(self, context: Context) -> dict[str, Any]:
        """Run the sync of this task's shard and return its summary dict (docs/airflow.md)."""
        shard, shards = self.shard_position(context)
        label = shard_label(shard, shards)
        context["commubo_shard"] = label  # for map_index_template
        # Every line of the task carries the shard in the task log (and the run id once
        # run_sync made one), also for shards of a list, which run_sync only knows as (0, 1).
        with log_context(shard=label):
            return self._sync(context, shards, label)

    def _sync(self, context: Context, shards: int, label: str) -> dict[str, Any]:
        try:
            ids = self.resolve_ids()
            settings = self.build_settings(shards)
        except InputError as exc:
            raise AirflowFailException(str(exc)) from None
        self._settings = settings
        ti = context.get("ti")
        try_number = getattr(ti, "try_number", None) or 1
        skip_loaded = try_number > 1
        source = f"ids file {self.ids_file}" if self.ids_file is not None else "the ids given"
        log.info("commubo sync of %d ids: shard %s of %s; API %s; database %s%s%s",
                 len(ids), label, source, settings.base_url,
                 display_url(settings.database_url),
                 f"; {settings.max_requests_per_s:g} requests/s" if self.max_rps else "",
                 f"; try {try_number}, so ids already loaded are skipped" if skip_loaded else "")
        try:
            summary = run_sync(
                settings, ids, skip_loaded=skip_loaded, retry_failed=self.retry_failed,
                progress=LogProgress(), stop=self._stop,
                shard=(self.shard_index, self.num_shards) if self.num_shards > 1 else None,
                follow_related=self.follow_related, related_depth=self.related_depth)
        except AuthError as exc:
            self._push_partial(context, exc)
            raise AirflowFailException(
                f"{exc} (here: the login and password of Airflow connection "
                f"{self.api_conn_id!r}); not retried, every request would be refused"
            ) from None
        except InputError as exc:
            # Raised before any request: bad ids, or a schema the migrations cannot reach.
            raise AirflowFailException(str(exc)) from None
        except Interrupted as exc:
            self._push_partial(context, exc)
            raise AirflowException(f"{exc}; the next try goes on where this one stopped"
                                   ) from None
        except FatalError as exc:
            # The database went away (or another stop a later try may get past): retryable.
            self._push_partial(context, exc)
            raise AirflowException(f"{exc}; the next try goes on where this one stopped"
                                   ) from None
        self._summary = summary
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
        self._emit_asset_events(context, settings, summary, label)
        return result

    def on_kill(self) -> None:
        """Airflow calls this from its SIGTERM handler (and on a task timeout): only set the
        stop request, which is safe there; the run ends at its next check (a quarter second),
        records itself as interrupted, and `execute` raises."""
        self._stop.stop("killed by Airflow (timeout, mark failed or SIGTERM)",
                        ExitCode.TERMINATED)

    # -- the parts of execute, public so they can be checked on their own ---------------------

    def shard_position(self, context: Context | None = None) -> tuple[int, int]:
        """(index, count) of this task among the shards: `shard_index`/`num_shards` when they
        split the ids, else the map index among the mapped tasks (`.expand(ids=...)`), else
        (0, 1)."""
        if self.num_shards > 1:
            return self.shard_index, self.num_shards
        ti = (context or {}).get("ti")
        map_index = getattr(ti, "map_index", -1)
        if map_index is None or map_index < 0:
            return 0, 1
        return map_index, max(_mapped_count(ti, self), map_index + 1)

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

    def build_settings(self, shards: int = 1) -> Settings:
        """Settings from the worker's etl config (ETL_CONFIG), the connections and the
        operator's arguments, in increasing precedence; `max_rps` is this shard's part of
        the total when `shards` share it."""
        hook = CommuboHook(commubo_conn_id=self.api_conn_id)
        if self.db_url is not None:
            database_url = normalize_database_url(self.db_url)
            if database_url.password:
                mask_secret(str(database_url.password))
        else:
            database_url = database_url_from_connection(_connection(self.db_conn_id),
                                                        self.db_conn_id)
        settings = hook.get_settings(
            concurrency=self.concurrency,
            batch_size=self.batch_size,
            max_requests_per_s=shard_rate(self.max_rps, shards) if self.max_rps else None,
        )
        # As a URL object, not a string: a socket directory as host does not survive a
        # round trip through the string form.
        return with_overrides(settings, database_url=database_url)

    def get_openlineage_facets_on_complete(self, task_instance: Any) -> Any:
        """What OpenLineage's Airflow integration reports for this task: the API as the input,
        the tables as outputs, the run's counts as statistics. OpenLineage is imported here
        only, so nothing needs it unless it is installed."""
        from .airflow_lineage import operator_lineage

        if self._settings is None or self._summary is None:
            return None
        return operator_lineage(self._settings, self._summary)

    def _emit_asset_events(self, context: Context, settings: Settings, summary: SyncSummary,
                           shard: str) -> None:
        """Attach the run's counts to the events of the assets this task declared; through
        the alias, name the assets of where it actually wrote."""
        counts = summary.to_dict()
        extra = {"shard": shard, **{k: counts[k] for k in _EVENT_COUNTS}}
        events = context.get("outlet_events")
        if events is None:
            return
        where = _warehouse_of(settings.database_url)
        written = warehouse_assets(where) if where else []
        written_uris = {a.uri for a in written}
        tables = set(_written_tables())
        for outlet in self.outlets:
            if isinstance(outlet, AssetAlias):
                for asset in written:
                    events[outlet].add(asset, extra={**extra, "table": _table_of(asset)})
            elif isinstance(outlet, Asset) and _table_of(outlet) in tables:
                if outlet.uri not in written_uris:
                    log.warning("asset %s names another warehouse than the one written (%s): "
                                "check warehouse_uri", outlet.uri,
                                display_url(settings.database_url))
                events[outlet].extra = {**extra, "table": _table_of(outlet)}

    def _push_partial(self, context: Context, exc: EtlError) -> None:
        if exc.summary is not None:
            self._push(context, exc.summary.to_dict())

    def _push(self, context: Context, result: dict[str, Any]) -> None:
        ti = context.get("ti")
        if self.do_xcom_push and ti is not None:
            ti.xcom_push(key=_RETURN_KEY, value=result)


# The summary's fields an asset event carries (with the shard and the table).
_EVENT_COUNTS = ("run_id", "requested", "related", "loaded", "not_found", "failed", "skipped",
                 "warnings")

# The UI names mapped tasks by this (the task sets `commubo_shard` in the context).
_MAP_INDEX_TEMPLATE = "shard {{ commubo_shard }}"

# The tables a sync writes rows of: the assets of a task. call_types is filled by the
# migrations, etl_runs is the run log, not data.
_NOT_WRITTEN = frozenset({"call_types", "etl_runs"})


def _written_tables() -> list[str]:
    return [t.name for t in metadata.sorted_tables if t.name not in _NOT_WRITTEN]


def warehouse_assets(warehouse_uri: str) -> list[Asset]:
    """One Airflow asset per table a sync writes, for the PostgreSQL warehouse at
    `warehouse_uri` (`postgres://host:port/database`; `postgresql://` and a missing port,
    5432, are accepted). Named by OpenLineage's convention: namespace `postgres://host:port`,
    name `database.public.table`; the URI is Airflow's form of the same
    (`postgres://host:port/database/public/table`)."""
    namespace, database = _split_warehouse(warehouse_uri)
    return [Asset(name=f"{namespace}/{database}.public.{table}",
                  uri=f"{namespace}/{database}/public/{table}",
                  group="commubo-etl")
            for table in _written_tables()]


def warehouse_asset(warehouse_uri: str, table: str = "calls") -> Asset:
    """The asset of one table (`warehouse_assets`), e.g. to schedule a DAG on `calls`."""
    for asset in warehouse_assets(warehouse_uri):
        if _table_of(asset) == table:
            return asset
    raise ValueError(f"a sync writes no table {table!r}; it writes {', '.join(_written_tables())}")


def default_outlets(warehouse_uri: str | None, db_url: str | None,
                    db_conn_id: str) -> list[Asset | AssetAlias]:
    """The outlets a task declares unless given: the tables of `warehouse_uri` or of
    `db_url` when either is known when the DAG is parsed, else an asset alias the task
    fills with the tables of the warehouse its connection names."""
    if warehouse_uri:
        return list(warehouse_assets(warehouse_uri))
    if db_url and "{{" not in str(db_url):
        # Only PostgreSQL has assets (not a SQLite trial); an invalid URL fails at run time.
        with contextlib.suppress(ArgumentError, ValueError):
            where = _warehouse_of(make_url(str(db_url)))
            return warehouse_assets(where) if where else []
        return []
    return [AssetAlias(name=f"commubo-etl:{db_conn_id}", group="commubo-etl")]


def _split_warehouse(warehouse_uri: str) -> tuple[str, str]:
    """(OpenLineage namespace, database) of `postgres://host:port/database`."""
    parts = urlsplit(warehouse_uri.strip())
    scheme = parts.scheme.lower().split("+")[0]
    if scheme not in ("postgres", "postgresql") or not parts.hostname:
        raise ValueError(f"warehouse_uri must look like postgres://host:port/database, "
                         f"got {warehouse_uri!r}")
    database = parts.path.strip("/")
    if not database or "/" in database:
        raise ValueError(f"warehouse_uri must name one database: postgres://host:port/database,"
                         f" got {warehouse_uri!r}")
    host = parts.hostname
    if ":" in host:
        host = f"[{host}]"
    return f"postgres://{host}:{parts.port or 5432}", database


def _warehouse_of(url: URL) -> str | None:
    """`postgres://host:port/database` of a PostgreSQL URL (no user, no password); None for
    another database. A socket directory as host names no place: `localhost`."""
    if url.get_backend_name() != "postgresql":
        return None
    host = url.host if url.host and not url.host.startswith("/") else "localhost"
    return f"postgres://{host}:{url.port or 5432}/{url.database or ''}"


def _table_of(asset: Asset) -> str:
    return asset.uri.rsplit("/", 1)[-1]


def _mapped_count(ti: Any, task: BaseOperator) -> int:
    """How many mapped tasks this task has in its run (1 if Airflow cannot say)."""
    try:
        return int(ti.get_ti_count(dag_id=ti.dag_id, task_ids=[task.task_id],
                                   run_ids=[ti.run_id]))
    except Exception:  # not inside a task runner (a test calling execute): one shard
        log.debug("could not count the mapped tasks", exc_info=True)
        return 1


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
