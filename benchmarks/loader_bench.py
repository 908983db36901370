"""The loader-alone scenario, run by `benchmarks/run.py` in a worker process of its own.

Builds N `Outcome`s from the simulator's `payload_for` (ids the simulator would answer 404 are
left out, so every outcome carries a call), loads every other one before timing, then times
`Loader(engine, run_id).load` over all N in batches of --batch-size into the migrated
database of --db-url: all five data tables, half of the rows conflicting. Then, as the
ceiling, times a raw psycopg `COPY` of the same call rows (the calls table's columns, `raw` as
JSON text) into a fresh table with the calls table's columns and nothing else, in the empty
database of --copy-db-url; and, for comparison, into one with its primary key and indexes too
(never its foreign keys). Prints one JSON object on stdout.

It runs in a process of its own: the driver stays small, and the figures are this work's alone.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import UTC, datetime

import psycopg
from sqlalchemy import func, select

from etl import db, runs
from etl.config import normalize_database_url
from etl.load import Loader
from etl.outcome import OK, Outcome
from etl.schema import calls
from etl.simulator import payload_for
from etl.transform import transform


def _outcomes(n: int, now: datetime) -> list[Outcome]:
    out: list[Outcome] = []
    i = 0
    while len(out) < n:
        call_id = f"ldr-{i:07d}"
        i += 1
        payload = payload_for(call_id)
        if payload is not None:
            # As the extractor hands them over: the parsed payload and the body it came from.
            body = json.dumps(payload, ensure_ascii=False).encode()
            out.append(Outcome(call_id, OK, payload=json.loads(body), http_status=200,
                               attempts=1, fetched_at=now, body=body))
    return out


def _batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


def bench_loader(db_url: str, outcomes: list[Outcome], batch_size: int) -> dict:
    engine = db.make_engine(normalize_database_url(db_url))
    try:
        db.upgrade(engine)
        warm = runs.RunRecorder(engine, runs.new_run_id())
        warm.start(requested=len(outcomes) // 2, skipped=0)
        for batch in _batches(outcomes[::2], batch_size):
            Loader(engine, warm.run_id).load(batch)
        warm.finish(runs.RunStatus.SUCCEEDED)

        run = runs.RunRecorder(engine, runs.new_run_id())
        run.start(requested=len(outcomes), skipped=0)
        loader = Loader(engine, run.run_id)
        cpu0, t0 = time.process_time(), time.perf_counter()
        loaded = 0
        for batch in _batches(outcomes, batch_size):
            loaded += loader.load(batch).get("loaded", 0)
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        run.finish(runs.RunStatus.SUCCEEDED)
        with engine.connect() as conn:
            rows = conn.execute(select(func.count()).select_from(calls)).scalar_one()
    finally:
        engine.dispose()
    return {"calls": len(outcomes), "loaded": loaded, "rows": rows,
            "seconds": round(elapsed, 4), "client_cpu_s": round(cpu, 4)}


def bench_copy(db_url: str, outcomes: list[Outcome]) -> dict:
    """COPY the call rows into a bare table (the ceiling), then into one with the calls
    table's primary key and indexes (what the indexes cost)."""
    now = datetime.now(UTC)
    columns = [c.name for c in calls.columns]
    rows = []
    for o in outcomes:
        call = dict(transform(o.payload, call_id=o.call_id, fetched_at=now, run_id="copy").call)
        call["raw"] = _json_text(call.get("raw"), o.payload)
        call.setdefault("fetched_at", now)
        call.setdefault("run_id", "copy")
        rows.append(tuple(call.get(c) for c in columns))
    result = {}
    for name, indexed in (("bare", False), ("indexed", True)):
        table = f"copy_calls_{name}"
        with psycopg.connect(db_url, autocommit=True) as conn:
            conn.execute(_calls_ddl(table, indexed))
        with psycopg.connect(db_url) as conn:
            t0 = time.perf_counter()
            with conn.cursor() as cur, cur.copy(
                f"COPY {table} ({', '.join(columns)}) FROM STDIN"
            ) as copy:
                for row in rows:
                    copy.write_row(row)
            conn.commit()
            elapsed = time.perf_counter() - t0
            landed = conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
        result[name] = {"rows": landed, "seconds": round(elapsed, 4)}
    return result


def _json_text(raw: object, payload: object) -> str:
    """`raw` as JSON text, whatever form the transform hands it over in."""
    if isinstance(raw, str):
        return raw
    if isinstance(raw, bytes):
        return raw.decode()
    if isinstance(raw, dict | list):
        return json.dumps(raw, ensure_ascii=False)
    obj = getattr(raw, "obj", payload)  # e.g. a psycopg Jsonb wrapper
    return json.dumps(obj, ensure_ascii=False).replace("\\u0000", "")


def _calls_ddl(name: str, indexed: bool) -> str:
    """A table with the columns and types of `calls` (compiled from etl.schema, so it follows
    schema changes) and no foreign keys; with `indexed`, its primary key and indexes too."""
    from sqlalchemy import Column, Index, MetaData, Table
    from sqlalchemy.dialects import postgresql
    from sqlalchemy.schema import CreateIndex, CreateTable

    table = Table(name, MetaData(),
                  *(Column(c.name, c.type, primary_key=indexed and c.primary_key,
                           nullable=c.nullable) for c in calls.columns))
    dialect = postgresql.dialect()
    statements = [str(CreateTable(table).compile(dialect=dialect))]
    if indexed:
        for i, index in enumerate(calls.indexes):
            cols = [table.c[c.name] for c in index.columns]
            statements.append(str(CreateIndex(Index(f"ix_{name}_{i}", *cols))
                                  .compile(dialect=dialect)))
    return ";\n".join(statements)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--db-url", required=True, help="an empty database for the loader")
    p.add_argument("--copy-db-url", required=True, help="an empty database for the COPY")
    p.add_argument("--calls", type=int, default=20_000)
    p.add_argument("--batch-size", type=int, default=500)
    args = p.parse_args(argv)

    outcomes = _outcomes(args.calls, datetime.now(UTC))
    result = {"loader": bench_loader(args.db_url, outcomes, args.batch_size),
              "copy": bench_copy(args.copy_db_url, outcomes)}
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
