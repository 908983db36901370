"""Reference client for the latency-bound scenario: a bare `requests` thread pool that fetches
and parses every id and stores nothing. What any sync can hope for at this concurrency.

    python benchmarks/bare_requests.py IDS_FILE --base-url URL --concurrency N

The tenant id and access token come from COMMUBO_TENANT_ID / COMMUBO_ACCESS_TOKEN. Prints one
JSON object on stdout: how many ids answered 200 (and parsed), 404, or something else.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import quote

import requests
from requests.adapters import HTTPAdapter


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("ids_file")
    p.add_argument("--base-url", required=True)
    p.add_argument("--concurrency", type=int, default=8)
    args = p.parse_args(argv)

    with open(args.ids_file, encoding="utf-8") as f:
        ids = [s for s in (line.strip() for line in f) if s and not s.startswith("#")]
    base = args.base_url.rstrip("/") + "/v1/calls/"
    headers = {
        "x-commubo-tenantId": os.environ["COMMUBO_TENANT_ID"],
        "x-commubo-accessToken": os.environ["COMMUBO_ACCESS_TOKEN"],
    }
    adapter = HTTPAdapter(pool_maxsize=args.concurrency, max_retries=3)
    local = threading.local()

    def fetch(call_id: str) -> str:
        session = getattr(local, "session", None)
        if session is None:
            session = local.session = requests.Session()
            session.mount("http://", adapter)
            session.headers.update(headers)
        resp = session.get(base + quote(call_id, safe=""), timeout=30)
        if resp.status_code == 200:
            json.loads(resp.content)
            return "ok"
        return "not_found" if resp.status_code == 404 else "other"

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=args.concurrency) as pool:
        counts = Counter(pool.map(fetch, ids))
    duration = time.perf_counter() - started
    json.dump({"duration_s": round(duration, 3), "ok": counts["ok"],
               "not_found": counts["not_found"], "other": counts["other"]}, sys.stdout)
    sys.stdout.write("\n")
    return 0 if not counts["other"] else 1


if __name__ == "__main__":
    sys.exit(main())
