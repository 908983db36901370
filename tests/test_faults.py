"""Faults injected by the simulator, end to end into PostgreSQL (docs/design.md §1, §3 and §5).

For each kind of fault a real service shows under load: every id the simulator can serve ends
up `loaded` with exact values, every other id `failed` with the reason, retries wait as long as
Retry-After says and stop at the attempt limit, and the exit code is as docs/design.md §3.4 says.
(The extractor's retry rules alone are pinned in test_extract.py.)
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import (
    TimedSimulator,
    etl_env,
    expected_warehouse,
    lost_ids,
    make_settings,
    run_etl,
    stale_entities,
    stored_warehouse,
)
from sqlalchemy import create_engine, select
from sqlalchemy.engine import URL

from etl.schema import etl_call_status
from etl.simulator import Simulator, payload_for
from etl.sync import run_sync

# kind: (what etl_call_status.error says once the attempts are spent, http_status recorded)
FAULTS = {
    "e500": ("HTTP 500", 500),
    "e502": ("HTTP 502", 502),
    "e503": ("HTTP 503", 503),
    "e429s": ("HTTP 429", 429),
    "e429d": ("HTTP 429", 429),
    "reset": ("connection reset", None),
    "cut": ("response body cut short", None),
    "slow": ("timed out", None),
}
ATTEMPTS = 3




@pytest.fixture
def timed_sim() -> Iterator[TimedSimulator]:
    with TimedSimulator(slow_s=1.5, retry_after_s=1) as simulator:
        yield simulator


def ordinary_ids(n: int, prefix: str) -> list[str]:
    return [f"{prefix}-{i:04d}" for i in range(n)]


def statuses(db_url: URL, call_ids: list[str]) -> dict[str, dict]:
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(select(etl_call_status)
                                .where(etl_call_status.c.call_id.in_(call_ids))).mappings()
            return {r["call_id"]: dict(r) for r in rows}
    finally:
        engine.dispose()


@pytest.mark.parametrize("kind", list(FAULTS))
def test_fault_bursts_shorter_than_the_attempts_load_and_longer_ones_fail_with_the_reason(
        timed_sim: TimedSimulator, pg_url: URL, kind: str) -> None:
    # Bursts of 1 and 2 faults recover on attempt 2 and 3; a burst of 3 outlasts the attempts.
    recovering = {f"{kind}-1-a": 1, f"{kind}-2-b": 2}
    endless = f"{kind}-{ATTEMPTS}-z"
    call_ids = [*ordinary_ids(30, f"plain{kind}"), *recovering, endless, "nf-faults"]
    random.Random(kind).shuffle(call_ids)
    settings = make_settings(timed_sim, pg_url, max_attempts=ATTEMPTS, timeout_s=0.5,
                             batch_size=7)

    summary = run_sync(settings, call_ids)

    want = expected_warehouse(call_ids, failing=[endless])
    got = stored_warehouse(pg_url)
    assert lost_ids(want, got) == []
    assert stale_entities(want, got) == []
    loaded = sum(1 for s in want.statuses.values() if s == "loaded")
    assert (summary.loaded, summary.failed, summary.not_found) == (
        loaded, 1, len(call_ids) - loaded - 1)
    assert (summary.status, summary.exit_code) == ("partial", 1)

    rows = statuses(pg_url, [*recovering, endless])
    for call_id, burst in recovering.items():
        assert timed_sim.requests_for(call_id) == burst + 1
        assert (rows[call_id]["status"], rows[call_id]["attempts"]) == ("loaded", burst + 1)
    reason, http_status = FAULTS[kind]
    failed = rows[endless]
    assert timed_sim.requests_for(endless) == ATTEMPTS  # the limit, not one request more
    assert (failed["status"], failed["attempts"], failed["http_status"]) == (
        "failed", ATTEMPTS, http_status)
    assert failed["error"].startswith(reason)
    assert failed["error"].endswith(f"(gave up after {ATTEMPTS} attempts)")
    if kind == "e429s":
        # Every retry of a 429 waited for its Retry-After (1 s), not the 0.01 s backoff
        # (the HTTP date form, whole seconds only, has its own test below).
        assert min(timed_sim.gaps(endless) + timed_sim.gaps(f"{kind}-2-b")) >= 0.95


@pytest.mark.parametrize(
    ("kind", "retry_after_s", "cap_s", "at_least", "at_most"),
    [
        pytest.param("e429s", 1, 30.0, 0.95, 3.0, id="seconds"),
        # An HTTP date has whole seconds: "now + 2 s" means between 1 and 2 s from now.
        pytest.param("e429d", 2, 30.0, 0.95, 3.0, id="http-date"),
        pytest.param("e429s", 30, 0.3, 0.25, 5.0, id="seconds-capped"),
        pytest.param("e429d", 30, 0.3, 0.25, 5.0, id="http-date-capped"),
    ],
)
def test_each_retry_of_a_429_waits_for_retry_after_up_to_the_cap(
        pg_url: URL, kind: str, retry_after_s: int, cap_s: float, at_least: float,
        at_most: float) -> None:
    call_id = f"{kind}-1-wait"
    with TimedSimulator(retry_after_s=retry_after_s) as sim:
        summary = run_sync(make_settings(sim, pg_url, retry_after_cap_s=cap_s), [call_id])
        gaps = sim.gaps(call_id)

    assert summary.loaded == 1
    [gap] = gaps
    assert at_least <= gap <= at_most
    assert stored_warehouse(pg_url).calls[call_id]["raw"] == payload_for(call_id)


def test_5xx_retries_back_off_without_waiting_for_a_retry_after(
        timed_sim: TimedSimulator, pg_url: URL) -> None:
    settings = make_settings(timed_sim, pg_url, backoff_s=0.1, max_backoff_s=0.4,
                             max_attempts=5)
    summary = run_sync(settings, ["e503-4-backoff"])

    assert summary.loaded == 1
    gaps = timed_sim.gaps("e503-4-backoff")
    assert len(gaps) == 4
    # Exponential from 0.1 s with up to 0.1 s of jitter, capped at 0.4 s (the upper bound
    # leaves room for a busy machine).
    assert all(0.09 <= gap <= 1.5 for gap in gaps), gaps
    assert gaps[-1] >= 0.35


def test_heavy_random_faults_of_every_kind_lose_nothing(pg_url: URL) -> None:
    call_ids = ordinary_ids(300, "rnd")
    # Each request fails with probability 0.4 (500, 502, 503, 429 in seconds or as a date,
    # reset, cut): decided per (seed, id, attempt), so this run is the same every time, and
    # 12 attempts leave no id failing.
    with Simulator(fault_rate=0.4, seed=11, retry_after_s=0) as sim:
        settings = make_settings(sim, pg_url, concurrency=8, max_attempts=12, batch_size=25)
        summary = run_sync(settings, call_ids)
        requests = sim.total_requests

    want = expected_warehouse(call_ids, seed=11)
    got = stored_warehouse(pg_url)
    assert lost_ids(want, got) == []
    assert stale_entities(want, got) == []
    assert summary.failed == 0
    assert requests > 1.5 * len(call_ids)  # the faults were real, and retried


def test_persistently_broken_id_fails_alone_and_the_command_exits_1(
        sim: Simulator, pg_url: URL, tmp_path: Path) -> None:
    config = tmp_path / "etl.toml"
    config.write_text("[api]\nbackoff_s = 0.01\nmax_backoff_s = 0.05\ntimeout_s = 0.5\n"
                      "max_attempts = 4\nconcurrency = 4\n\n[sync]\nbatch_size = 10\n")
    bursts = [f"{kind}-2-cli" for kind in FAULTS]
    good = [*ordinary_ids(20, "cli"), *bursts, "nf-cli"]
    files = {name: tmp_path / f"{name}.txt" for name in ("recovering", "broken")}
    files["recovering"].write_text("\n".join(good) + "\n")
    files["broken"].write_text("\n".join([*good, "broken-cli"]) + "\n")
    env = etl_env(sim, pg_url)

    recovering = run_etl("sync", "--config", str(config), "--json", "--ids-file",
                         str(files["recovering"]), env=env)
    sim.reset_counts()
    broken = run_etl("sync", "--config", str(config), "--json", "--ids-file",
                     str(files["broken"]), env=env)

    assert recovering.returncode == 0, recovering.stderr
    assert broken.returncode == 1, broken.stderr
    for proc in (recovering, broken):
        assert "Traceback" not in proc.stderr
    first, second = json.loads(recovering.stdout), json.loads(broken.stdout)
    assert (first["failed"], first["status"]) == (0, "succeeded")
    assert (second["failed"], second["status"]) == (1, "partial")
    assert second["loaded"] == first["loaded"]
    assert sim.requests_for("broken-cli") == 4
    want = expected_warehouse([*good, "broken-cli"])
    assert lost_ids(want, stored_warehouse(pg_url)) == []
    failures = run_etl("failures", "--run", second["run_id"], env=env)
    assert "broken-cli" in failures.stdout
    assert "HTTP 500 (gave up after 4 attempts)" in failures.stdout
