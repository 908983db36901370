"""The peer of `etl sync` in the benchmarks: the same sync written as a data engineer would
write it with dlt 1.31.

A `@dlt.resource` yields the call ids of IDS_FILE; a `@dlt.transformer` made parallel with
`@dlt.defer` fetches each id with dlt's own requests helper (retries, backoff, Retry-After) and
the two commubo headers; the calls land with `write_disposition="merge"` on `callId` in the
PostgreSQL database of --db-url, dataset (schema) `commubo`, table `calls`. dlt's
normalisation defaults stay on (the customer's phone numbers become a child table).

    python benchmarks/dlt_pipeline.py IDS_FILE --base-url URL --db-url URL --concurrency N

The tenant id and access token come from COMMUBO_TENANT_ID / COMMUBO_ACCESS_TOKEN. dlt's
working directory (DLT_DATA_DIR, pipelines dir) is a temporary directory unless --work-dir is
given. Prints one JSON object on stdout. Needs the `bench` dependency group (dlt lives only
there): `uv run --group bench python benchmarks/dlt_pipeline.py ...`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from urllib.parse import quote, urlsplit, urlunsplit

DATASET = "commubo"
TABLE = "calls"


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("ids_file")
    p.add_argument("--base-url", required=True, help="API base URL (before /v1/calls/)")
    p.add_argument("--db-url", required=True, help="postgresql://user[:password]@host/db")
    p.add_argument("--concurrency", type=int, default=8, help="dlt extract workers")
    p.add_argument("--dataset", default=DATASET)
    p.add_argument("--work-dir", help="dlt's data and pipelines dir (default: a temp dir)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    work_dir = args.work_dir or tempfile.mkdtemp(prefix="dlt-bench-")
    # dlt reads these when it is imported and when the pipeline runs: set them first.
    # A deferred transformer runs in the extract thread pool (`extract.workers`, default 5),
    # and at most `extract.max_parallel_items` (default 20) items are in flight: both are
    # raised to the concurrency, as anyone tuning dlt for an I/O-bound API would.
    os.environ["EXTRACT__WORKERS"] = str(args.concurrency)
    os.environ["EXTRACT__MAX_PARALLEL_ITEMS"] = str(args.concurrency)
    os.environ.setdefault("RUNTIME__DLTHUB_TELEMETRY", "false")
    os.environ["DLT_DATA_DIR"] = os.path.join(work_dir, "data")
    try:
        return _run(args, os.path.join(work_dir, "pipelines"))
    finally:
        if not args.work_dir:
            shutil.rmtree(work_dir, ignore_errors=True)


def _run(args: argparse.Namespace, pipelines_dir: str) -> int:
    import dlt
    from dlt.sources.helpers import requests

    headers = {
        "x-commubo-tenantId": os.environ["COMMUBO_TENANT_ID"],
        "x-commubo-accessToken": os.environ["COMMUBO_ACCESS_TOKEN"],
    }
    base = args.base_url.rstrip("/") + "/v1/calls/"

    @dlt.resource(name="call_ids")
    def call_ids():
        with open(args.ids_file, encoding="utf-8") as f:
            for line in f:
                call_id = line.strip()
                if call_id and not call_id.startswith("#"):
                    yield call_id

    @dlt.transformer(name=TABLE, write_disposition="merge", primary_key="callId")
    @dlt.defer
    def calls(call_id: str):
        try:
            resp = requests.get(base + quote(call_id, safe=""), headers=headers)
        except requests.HTTPError as exc:
            # raise_for_status is on; a missing call is a normal answer, not an error
            if exc.response is not None and exc.response.status_code == 404:
                return None
            raise
        return resp.json()

    pipeline = dlt.pipeline(
        pipeline_name="commubo_bench",
        pipelines_dir=pipelines_dir,
        destination=dlt.destinations.postgres(credentials=_with_password(args.db_url)),
        dataset_name=args.dataset,
    )
    started = time.perf_counter()
    info = pipeline.run(call_ids | calls)
    duration = time.perf_counter() - started
    info.raise_on_failed_jobs()
    json.dump({"duration_s": round(duration, 3), "dataset": args.dataset, "table": TABLE,
               "load_packages": len(info.load_packages)}, sys.stdout)
    sys.stdout.write("\n")
    return 0


def _with_password(db_url: str) -> str:
    """dlt insists on a password; a server with trust auth never asks for it, so a URL without
    one (postgresql://postgres@127.0.0.1/db) gets a placeholder that is never sent."""
    parts = urlsplit(db_url)
    if parts.password is not None or "@" not in parts.netloc:
        return db_url
    user, host = parts.netloc.rsplit("@", 1)
    return urlunsplit(parts._replace(netloc=f"{user}:unused@{host}"))


if __name__ == "__main__":
    sys.exit(main())
