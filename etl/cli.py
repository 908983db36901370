"""The `etl` command: a thin click shell over the library (docs/design.md §3).

Options are parsed here, the work is done by `etl.sync`, `etl.db` and `etl.runs`, and every
`EtlError` is mapped to one line on stderr and its exit code in `main`, nowhere else.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import click
from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError

from . import db, runs
from .config import DEFAULT_DATABASE_URL, Settings, display_url, load_settings, with_overrides
from .errors import DatabaseError, EtlError, ExitCode, InputError, Interrupted
from .ids import read_ids, select_shard
from .logs import FORMATS, json_logging, log_context, setup_logging, shard_label
from .schema import SCHEMA_REVISION
from .text import printable

log = logging.getLogger("etl")


class _HardStop(KeyboardInterrupt):
    """A second Ctrl-C or SIGTERM: stop at once, wherever the run is."""

    def __init__(self, exit_code: int) -> None:
        super().__init__()
        self.exit_code = exit_code


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[Any]:
    """Ctrl-C (exit 130) and SIGTERM (exit 143: what cron wrappers, systemd and Airflow send)
    ask the run to stop at its next safe point, within a second; a second signal stops it at
    once."""
    from .sync import StopRequest

    stop = StopRequest()

    def handler(signum: int, frame: object) -> None:
        code = 128 + signum
        if stop.requested:
            raise _HardStop(code)
        stop.stop("interrupted by Ctrl-C" if signum == signal.SIGINT else
                  "stopped by SIGTERM", code)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _settings(config: str | None, **overrides: Any) -> Settings:
    return load_settings(config, overrides)


def config_option(f: Callable) -> Callable:
    return click.option("--config", "config", type=click.Path(dir_okay=False),
                        help="TOML config file (default: $ETL_CONFIG, else ./etl.toml if present)."
                        )(f)


def db_url_option(f: Callable) -> Callable:
    return click.option("--db-url", help="SQLAlchemy database URL (env ETL_DATABASE_URL).")(f)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors on stderr.")
@click.option("--log-format", type=click.Choice(FORMATS, case_sensitive=False),
              envvar="ETL_LOG_FORMAT", show_envvar=True, default="text", show_default=True,
              help="Log lines on stderr as text, or as one JSON object per line (for log "
              "shippers).")
@click.version_option(package_name="commubo-etl")
def cli(verbose: int, quiet: bool, log_format: str) -> None:
    """Sync commubo connect call history into a PostgreSQL (or SQLite) warehouse."""
    setup_logging(verbose, quiet, log_format.lower())


@cli.command()
@click.option("--ids-file", type=str, metavar="PATH",
              help="Call ids, one per line; - for standard input.")
@config_option
@db_url_option
@click.option("--base-url", help="API base URL, the part before /v1/calls/ (env COMMUBO_BASE_URL).")
@click.option("--concurrency", type=click.IntRange(min=1), help="Concurrent requests (default 8).")
@click.option("--batch-size", type=click.IntRange(min=1), help="Rows per load transaction "
              "(default 500).")
@click.option("--max-rps", type=click.FloatRange(min=0), help="Request rate cap per second "
              "(0 = none), for all shards together: each of N shards gets 1/N of it.")
@click.option("--json", "as_json", is_flag=True, help="Print the run summary as one JSON object.")
@click.option("--skip-loaded", is_flag=True, help="Do not fetch ids whose last status is loaded.")
@click.option("--retry-failed", is_flag=True, help="Also fetch every id whose last status is "
              "failed.")
@click.option("--no-migrate", is_flag=True, help="Do not upgrade the schema first; fail if it "
              "is not current.")
@click.option("--shard-index", type=int, default=0, show_default=True,
              help="Which shard of the ids to sync.")
@click.option("--num-shards", type=int, default=1, show_default=True,
              help="How many shards the ids are split into (by a stable hash of the id).")
@click.option("--follow-related", is_flag=True, help="Also fetch the calls that fetched calls "
              "derive from (relatedCallId), transitively, each once.")
@click.option("--related-depth", type=click.IntRange(min=1), metavar="N",
              help="With --follow-related: follow at most N links from a call of the ids file "
              "(default 5; 1 = only the calls they name).")
@click.pass_context
def sync(ctx: click.Context, ids_file: str | None, config: str | None, db_url: str | None,
         base_url: str | None, concurrency: int | None, batch_size: int | None,
         max_rps: float | None, as_json: bool, skip_loaded: bool, retry_failed: bool,
         no_migrate: bool, shard_index: int, num_shards: int, follow_related: bool,
         related_depth: int | None) -> None:
    """Fetch the calls of an ids file and upsert them into the warehouse."""
    from .progress import LogProgress, for_stream
    from .sync import DEFAULT_RELATED_DEPTH, run_sync, shard_rate

    settings = _settings(config, database_url=db_url, base_url=base_url, concurrency=concurrency,
                         batch_size=batch_size, max_requests_per_s=max_rps)
    if ids_file is None and not retry_failed:
        raise InputError("give --ids-file PATH (or - for standard input), or --retry-failed")
    if related_depth is not None and not follow_related:
        raise InputError("--related-depth is for --follow-related: give both, or neither")
    ids = read_ids(ids_file) if ids_file is not None else []
    # A shard follows the chains of its own ids, into ids of other shards' hashes too.
    ids = select_shard(ids, shard_index, num_shards)
    try:
        # Every line of this shard says which it is; run_sync adds the run id once it has one.
        with (log_context(shard=shard_label(shard_index, num_shards)),
              _stop_on_signals() as stop):
            if display_url(settings.database_url) == DEFAULT_DATABASE_URL:
                log.info("no database configured (--db-url, ETL_DATABASE_URL or database.url): "
                         "writing to ./commubo.db")
            # The cap is for all shards together, wherever it was set: a config file shared
            # by the shard processes is the common case.
            settings = with_overrides(settings, max_requests_per_s=shard_rate(
                settings.max_requests_per_s, num_shards))
            # A redrawn bar would break the one-JSON-object-per-line promise.
            progress = LogProgress() if json_logging() else for_stream()
            summary = run_sync(settings, ids, skip_loaded=skip_loaded, retry_failed=retry_failed,
                               migrate=not no_migrate, progress=progress, stop=stop,
                               shard=(shard_index, num_shards), follow_related=follow_related,
                               related_depth=related_depth or DEFAULT_RELATED_DEPTH)
    except EtlError as exc:
        if exc.summary is not None:
            _print_summary(exc.summary, as_json)
        raise
    _print_summary(summary, as_json)
    ctx.exit(summary.exit_code)


def _print_summary(summary, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(summary.to_dict()))
        return
    related = f" (and {summary.related} related)" if summary.related else ""
    click.echo(
        f"run {summary.run_id} {summary.status}: {summary.requested} requested{related}, "
        f"{summary.loaded} loaded, {summary.not_found} not found, {summary.failed} failed, "
        f"{summary.skipped} skipped, {summary.warnings} with warnings in "
        f"{summary.duration_s:.1f}s ({summary.calls_per_s:.0f} calls/s), from {summary.api} "
        f"into {summary.database}"
    )
    if summary.failed:
        click.echo(f"see the failed ids: etl failures --run {summary.run_id}")


@cli.group(name="db")
def db_group() -> None:
    """Manage the warehouse schema (Alembic migrations)."""


@db_group.command("upgrade")
@config_option
@db_url_option
def db_upgrade(config: str | None, db_url: str | None) -> None:
    """Upgrade the schema to the newest migration."""
    settings = _settings(config, database_url=db_url)
    engine = db.make_engine(settings.database_url)
    try:
        before, after = db.upgrade(engine)
    finally:
        engine.dispose()
    where = display_url(settings.database_url)
    if before == after:
        click.echo(f"{where}: already at {after}")
    else:
        click.echo(f"{where}: upgraded {before or '(empty)'} -> {after}")


@db_group.command("current")
@config_option
@db_url_option
def db_current(config: str | None, db_url: str | None) -> None:
    """Show the schema revision of the database and whether it is the newest."""
    settings = _settings(config, database_url=db_url)
    engine = db.make_engine(settings.database_url)
    try:
        with db.connect(engine) as conn:
            current = db.current_revision(conn)
    finally:
        engine.dispose()
    head = db.head_revision()
    state = "(head)" if current == head else f"(newest is {head}: run etl db upgrade)"
    click.echo(f"{current or '(none)'} {state}")


@db_group.command("docs")
@click.option("--output", default="docs/data-dictionary.md", show_default=True,
              type=click.Path(dir_okay=False, allow_dash=True),
              help="Where to write the data dictionary (- for standard output).")
def db_docs(output: str) -> None:
    """Write the data dictionary (every table, view, column and code value) from the schema."""
    from .dictionary import render

    text = render()
    if output == "-":
        click.echo(text, nl=False)
        return
    path = Path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    click.echo(f"wrote {path}", err=True)


def _query_engine(config: str | None, db_url: str | None) -> Engine:
    """An engine for read-only commands, checked to hold etl's schema."""
    settings = _settings(config, database_url=db_url)
    engine = db.make_engine(settings.database_url)
    with db.connect(engine) as conn:
        current = db.current_revision(conn)
    if current is None:
        engine.dispose()
        raise DatabaseError(f"{display_url(settings.database_url)} has no etl schema yet: "
                            "run etl db upgrade or etl sync first")
    if current != SCHEMA_REVISION:
        engine.dispose()
        raise db.SchemaNotCurrent(
            f"{display_url(settings.database_url)} has schema revision {current}, this version "
            f"reads {SCHEMA_REVISION}: run etl db upgrade (or the next etl sync does)")
    return engine


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    return printable(value, 300)  # an error may hold what a server said


def _table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    cells = [[_fmt(r[c]) for c in columns] for r in rows]
    widths = [max([len(c), *(len(row[i]) for row in cells)]) for i, c in enumerate(columns)]
    click.echo("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
    for row in cells:
        click.echo("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


def _json_rows(rows: list[dict[str, Any]]) -> None:
    click.echo(json.dumps(rows, default=lambda v: v.isoformat() if isinstance(v, datetime)
                          else str(v)))


@cli.command(name="runs")
@config_option
@db_url_option
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the runs as a JSON array.")
def runs_cmd(config: str | None, db_url: str | None, limit: int,
             as_json: bool) -> None:
    """Recent runs with their counts, newest first."""
    engine = _query_engine(config, db_url)
    try:
        runs.mark_abandoned(engine)  # so a killed run does not show as live
        rows = runs.recent_runs(engine, limit)
    finally:
        engine.dispose()
    if as_json:
        _json_rows(rows)
    elif rows:
        _table(rows, ["run_id", "status", "started_at", "finished_at", "requested", "loaded",
                      "not_found", "failed", "skipped", "warnings", "host", "pid", "error"])
    else:
        click.echo("no runs yet")


@cli.command()
@config_option
@db_url_option
@click.option("--run", "run_id", help="Only the ids whose last attempt was in this run.")
@click.option("--limit", type=click.IntRange(min=1), help="At most this many rows.")
@click.option("--warnings", "warnings", is_flag=True,
              help="Instead: ids loaded with values outside what the API doc allows, and which.")
@click.option("--json", "as_json", is_flag=True, help="Print the failures as a JSON array.")
def failures(config: str | None, db_url: str | None, run_id: str | None,
             limit: int | None, warnings: bool, as_json: bool) -> None:
    """Ids whose last status is failed, and why (or, with --warnings, loaded with warnings)."""
    engine = _query_engine(config, db_url)
    try:
        if run_id and not runs.run_exists(engine, run_id):
            raise InputError(f"no run {run_id!r}: see etl runs")
        rows = runs.failures(engine, run_id, limit, warnings=warnings)
    finally:
        engine.dispose()
    if as_json:
        _json_rows(rows)
    elif rows:
        _table(rows, ["call_id", "status", "run_id", "warnings"] if warnings else
               ["call_id", "http_status", "attempts", "run_id", "error"])
    else:
        what = "no ids with warnings" if warnings else "no failed ids"
        click.echo(what + (f" in run {run_id}" if run_id else ""))


@cli.command()
@click.option("--port", type=click.IntRange(0, 65535), default=8089, show_default=True)
@click.option("--latency-ms", type=click.FloatRange(min=0), default=0, show_default=True)
@click.option("--fault-rate", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="Share of requests answered with a fault (5xx, 429, reset, cut body).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the data.")
@click.option("--tenant-id", default=None, help="Tenant id the simulator accepts.")
@click.option("--access-token", default=None, help="Access token the simulator accepts.")
@click.option("--refuse", is_flag=True, help="refuse every connection (a dead API)")
@click.option("--rate-limit", type=click.FloatRange(min=0, max=1e9), default=0.0,
              show_default=True, help="Requests per second allowed, 0 = no limit; past it, 429 "
              "with Retry-After (a token bucket of max(1, R/10) tokens shared by all "
              "connections). Counters: GET /_stats.")
def simulate(port: int, latency_ms: float, fault_rate: float, seed: int,
             tenant_id: str | None, access_token: str | None, refuse: bool,
             rate_limit: float) -> None:
    """Serve a simulated commubo API on 127.0.0.1 (for demos, tests and benchmarks)."""
    from .simulator import DEFAULT_ACCESS_TOKEN, DEFAULT_TENANT_ID, Simulator

    tenant_id = tenant_id or DEFAULT_TENANT_ID
    access_token = access_token or DEFAULT_ACCESS_TOKEN
    try:
        sim = Simulator(port=port, latency_ms=latency_ms, fault_rate=fault_rate, seed=seed,
                        tenant_id=tenant_id, access_token=access_token, refuse=refuse,
                        rate_limit=rate_limit)
    except OSError as exc:
        raise InputError(f"cannot listen on 127.0.0.1:{port}: {exc.strerror}") from None
    mode = " refusing every connection" if refuse else ""
    if rate_limit:
        mode += f" allowing {rate_limit:g} requests/s (burst {sim.burst:g})"
    click.echo(f"simulated commubo API on {sim.url}{mode} (tenant id {tenant_id!r}, access "
               f"token {access_token!r}); Ctrl-C stops", err=True)
    click.echo(f"  COMMUBO_BASE_URL={sim.url} COMMUBO_TENANT_ID={tenant_id} "
               f"COMMUBO_ACCESS_TOKEN={access_token} etl sync --ids-file ids.txt", err=True)
    sim.serve_forever()


@cli.command()
@config_option
@click.option("--db-url", help="SQLAlchemy database URL (default: sqlite:///commubo-demo.db; "
              "ETL_DATABASE_URL and database.url are not used: simulated calls do not belong in "
              "a warehouse by accident).")
@click.option("--calls", type=click.IntRange(min=1, max=1_000_000), default=500,
              show_default=True, help="How many simulated calls to sync.")
def demo(config: str | None, db_url: str | None, calls: int) -> None:
    """Sync simulated calls into a database of their own and show a first query."""
    from .demo import DEMO_DATABASE_URL, run_demo

    settings = _settings(config, database_url=db_url or DEMO_DATABASE_URL)
    run_demo(settings, calls, click.echo)


def _say(line: str, level: int = logging.ERROR) -> None:
    """How `main` reports the end of a run on stderr: one line, or with --log-format json a
    JSON record like every other line there (a log shipper would not parse a plain line),
    its message the line without "etl: "."""
    if json_logging():
        log.log(level, line.removeprefix("etl: "))
    else:
        click.echo(line, err=True)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: every EtlError becomes one line on stderr and its exit code."""
    try:
        code = cli.main(args=argv, prog_name="etl", standalone_mode=False)
    except click.exceptions.Exit as exc:
        code = exc.exit_code
    except click.ClickException as exc:
        if json_logging():
            _say(f"etl: error: {exc.format_message()}")
        else:
            exc.show()
        code = exc.exit_code
    except (click.Abort, KeyboardInterrupt) as exc:  # click turns Ctrl-C into Abort
        _say("etl: interrupted; what was committed stays committed", logging.WARNING)
        code = getattr(exc, "exit_code", ExitCode.INTERRUPTED)
    except Interrupted as exc:
        _say(f"etl: {printable(exc, 1000)}", logging.WARNING)
        code = exc.exit_code
    except EtlError as exc:
        _say(f"etl: error: {printable(exc, 1000)}")
        code = exc.exit_code
    except DBAPIError as exc:
        # Paths that expect database trouble raise DatabaseError; this is the safety net.
        _say(f"etl: database error: {type(exc.orig).__name__}")
        code = ExitCode.STOPPED
    except Exception as exc:
        if os.environ.get("ETL_DEBUG"):
            raise
        # A bug, not a user error: one line (no traceback, which could carry secrets).
        _say(f"etl: internal error: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
             " (set ETL_DEBUG=1 for a traceback)")
        code = ExitCode.INTERNAL
    sys.exit(int(code) if isinstance(code, int) else ExitCode.OK)


if __name__ == "__main__":
    main()
