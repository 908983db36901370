"""Several `etl sync` processes at once against one PostgreSQL database (docs/design.md §5.9): no
deadlocks, no lost updates, and a schema upgrade that does not race."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

from helpers import etl_env, expected_warehouse, lost_ids, stale_entities, stored_warehouse
from sqlalchemy import create_engine, select
from sqlalchemy.engine import URL

from etl import db
from etl.schema import calls
from etl.simulator import Simulator, payload_for


def start_sync(ids_file: Path, sim: Simulator, db_url: URL, config: Path, *extra: str
               ) -> subprocess.Popen[str]:
    """`etl sync` in its own process, the same command line `run_etl` uses."""
    return subprocess.Popen(
        [sys.executable, "-m", "etl", "sync", "--config", str(config), "--ids-file",
         str(ids_file), "--json", *extra],
        env=etl_env(sim, db_url), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def finish(procs: list[subprocess.Popen[str]], timeout: float = 120) -> list[tuple[int, str, str]]:
    out = []
    for p in procs:
        try:
            stdout, stderr = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        out.append((p.returncode, stdout, stderr))
    return out


def write_ids(path: Path, ids: list[str]) -> Path:
    path.write_text("\n".join(ids) + "\n")
    return path


def test_overlapping_syncs_at_once_load_every_call_with_newest_snapshots(
        sim: Simulator, pg_url: URL, fast_config: Path, tmp_path: Path) -> None:
    engine = db.make_engine(pg_url)
    db.upgrade(engine)
    engine.dispose()
    # Three overlapping slices of 800 ids, each shuffled differently: the same customers and
    # operators (pools of 500 and 40) turn up in all three processes in different orders.
    universe = [f"call-{n:06d}" for n in range(1, 801)]
    slices = [universe[0:400], universe[200:600], universe[400:800] + universe[0:100]]
    files = []
    for n, ids in enumerate(slices):
        ids = list(ids)
        random.Random(n).shuffle(ids)
        files.append(write_ids(tmp_path / f"ids-{n}.txt", ids))

    procs = [start_sync(f, sim, pg_url, fast_config, "--batch-size", "5") for f in files]
    results = finish(procs)

    for code, _, stderr in results:
        assert code == 0, stderr
        assert "deadlock" not in stderr.lower()
        assert "retrying the batch" not in stderr
    summaries = [json.loads(stdout) for _, stdout, _ in results]
    want = expected_warehouse(universe)
    for ids, summary in zip(slices, summaries, strict=True):
        assert summary["loaded"] == sum(1 for i in ids if i in want.calls)

    got = stored_warehouse(pg_url)
    assert got.statuses == want.statuses  # loaded, or not_found for the simulator's 404s
    assert got.calls == want.calls
    # Many customers were shared between the processes, so the race was real.
    seen_by = Counter(want.calls[i]["customer_id"] for ids in slices for i in ids
                      if i in want.calls and want.calls[i]["customer_id"] is not None)
    assert sum(1 for n in seen_by.values() if n >= 3) > 100

    # Each customer and operator at its newest snapshot, whichever process wrote it last.
    assert stale_entities(want, got) == []


def test_syncs_starting_together_on_an_empty_database_both_succeed(
        sim: Simulator, pg_url: URL, fast_config: Path, tmp_path: Path) -> None:
    files = [write_ids(tmp_path / f"ids-{n}.txt",
                       [f"call-{i:06d}" for i in range(1 + 10 * n, 31 + 10 * n)])
             for n in range(3)]
    procs = [start_sync(f, sim, pg_url, fast_config) for f in files]
    results = finish(procs)

    for code, _, stderr in results:
        assert code == 0, stderr
    engine = create_engine(pg_url)
    with engine.connect() as conn:
        assert db.current_revision(conn) == db.head_revision()
        loaded = set(conn.execute(select(calls.c.call_id)).scalars())
    engine.dispose()
    every = {f"call-{i:06d}" for i in range(1, 51)}
    assert loaded == {i for i in every if payload_for(i) is not None}


def test_four_syncs_of_the_same_ids_in_small_batches_agree_with_what_was_served(
        sim: Simulator, pg_url: URL, fast_config: Path, tmp_path: Path) -> None:
    # Every process writes every call, customer and operator (40 operators, each in many
    # snapshots), in its own order and batch size: the most conflicts one id list can make.
    universe = [*(f"same-{n:04d}" for n in range(200)), "nf-same", "poison-same"]
    procs = []
    for n, batch_size in enumerate(("1", "2", "3", "5")):
        ids = list(universe)
        random.Random(100 + n).shuffle(ids)
        procs.append(start_sync(write_ids(tmp_path / f"same-{n}.txt", ids), sim, pg_url,
                                fast_config, "--batch-size", batch_size, "--concurrency", "8"))
    results = finish(procs)

    want = expected_warehouse(universe)
    for code, stdout, stderr in results:
        assert code == 1, stderr  # poison-same fails in every process
        assert "deadlock" not in stderr.lower()
        assert "retrying the batch" not in stderr
        summary = json.loads(stdout)
        assert (summary["loaded"], summary["failed"]) == (len(want.calls), 1)
    got = stored_warehouse(pg_url)
    assert lost_ids(want, got) == []
    assert stale_entities(want, got) == []
