"""`--max-rps` (and `api.max_requests_per_s`) is the cap of all shards together: each of N
shards gets a share (`etl.sync.shard_rate`)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from helpers import etl_env, ids_file, run_etl
from sqlalchemy.engine import URL

from etl.config import Settings, validate
from etl.errors import InputError
from etl.ids import shard_of
from etl.simulator import Simulator, payload_for
from etl.sync import shard_rate


@pytest.mark.parametrize(("max_rps", "num_shards", "each"), [
    (40, 4, 10), (40, 1, 40), (7.5, 3, 2.5), (0, 8, 0), (0, 1, 0), (100_000, 1024, 97.65625),
    (0.4, 4, 0.1),  # exactly the lowest cap
])
def test_shard_rate_splits_the_cap(max_rps: float, num_shards: int, each: float) -> None:
    assert shard_rate(max_rps, num_shards) == pytest.approx(each)


def test_a_share_below_the_lowest_cap_is_the_lowest_cap_with_a_warning(caplog) -> None:
    caplog.set_level(logging.INFO, logger="etl.sync")
    assert shard_rate(0.5, 8) == 0.1
    [warning] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "together up to 0.8" in warning.getMessage()
    # What it gives is always a valid setting.
    for max_rps, num_shards in ((0.1, 1024), (0.5, 8), (100_000, 3), (0, 5)):
        validate(replace(Settings(), max_requests_per_s=shard_rate(max_rps, num_shards)))


def test_one_shard_or_no_cap_logs_nothing(caplog) -> None:
    caplog.set_level(logging.DEBUG, logger="etl.sync")
    shard_rate(40, 1)
    shard_rate(0, 4)
    assert caplog.records == []


def test_no_shards_is_refused() -> None:
    with pytest.raises(InputError, match="at least 1"):
        shard_rate(10, 0)


# -- the command -------------------------------------------------------------------------------

# 16 servable ids of shard 0 of 4: at 10 requests/s their requests take at least 1.5 s.
SHARD_IDS = [i for i in (f"call-{n:06d}" for n in range(1, 400))
             if shard_of(i, 4) == 0 and payload_for(i) is not None][:16]


@pytest.mark.parametrize("where", ["option", "config file"])
def test_each_of_4_shards_gets_a_quarter_of_max_rps(
        sim: Simulator, pg_url: URL, fast_config: Path, tmp_path: Path, where: str) -> None:
    args = ["--max-rps", "40"]
    if where == "config file":  # shared by the shard processes: the common case
        fast_config.write_text(fast_config.read_text().replace(
            "[api]\n", "[api]\nmax_requests_per_s = 40\n"))
        args = []
    proc = run_etl("sync", "--config", str(fast_config), "--ids-file",
                   str(ids_file(tmp_path, SHARD_IDS)), "--num-shards", "4", "--shard-index",
                   "0", "--json", *args, env=etl_env(sim, pg_url))

    assert proc.returncode == 0, proc.stderr
    assert "max rps 40 shared by 4 shards: 10 each" in proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["loaded"] == len(SHARD_IDS) == 16
    # The limiter spaces requests evenly, 0.1 s apart at 10/s (0.025 s at 40/s): 16 requests
    # span at least 1.5 s. A slow machine only makes the run longer.
    assert summary["duration_s"] >= 1.45


def test_four_shard_processes_together_keep_to_max_rps(
        sim: Simulator, pg_url: URL, fast_config: Path, tmp_path: Path) -> None:
    """The cap holds across processes, counted where it matters: by the server, per second."""
    ids = [f"call-{n:06d}" for n in range(1, 161)]
    path = str(ids_file(tmp_path, ids))
    env = etl_env(sim, pg_url)
    procs = [subprocess.Popen(
        [sys.executable, "-m", "etl", "sync", "--config", str(fast_config), "--ids-file", path,
         "--num-shards", "4", "--shard-index", str(i), "--max-rps", "40", "--json"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(4)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [err for _, err in outs]
    summaries = [json.loads(out) for out, _ in outs]
    assert sum(s["requested"] for s in summaries) == len(ids)

    stats = sim.stats()
    assert stats["requests"] == len(ids)  # one request per id: nothing was retried
    per_second = [row["requests"] for row in stats["per_second"]]
    # Each shard sends 10 evenly spaced requests a second; a whole-second window can catch an
    # 11th of each. Uncapped, 4 shards of concurrency 4 send hundreds a second.
    assert max(per_second) <= 44, per_second
    # 160 requests at 40/s take about 4 s; shards that start late only stretch it.
    assert len(per_second) >= 4, per_second
