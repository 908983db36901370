"""Adaptive concurrency under a rate limit (issue #12): the limiter's rules alone
(etl/adaptive.py, with a fake clock), then syncs against the simulator's real rate limit."""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import deque
from pathlib import Path

import pytest
from helpers import etl_env, expected_warehouse, lost_ids, make_settings, stored_warehouse
from sqlalchemy.engine import URL

from etl.adaptive import AdaptiveLimit, Signal, Ticket
from etl.config import load_settings
from etl.extract import Extractor
from etl.simulator import Simulator
from etl.sync import run_sync

OK, LIMITED, IGNORE = Signal.OK, Signal.LIMITED, Signal.IGNORE


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def take(limit: AdaptiveLimit, n: int) -> list[Ticket]:
    tickets = [limit.try_acquire() for _ in range(n)]
    assert all(t is not None for t in tickets), "fewer places than expected"
    return tickets  # type: ignore[return-value]


class Saturated:
    """A client with more workers than places: a place given back is taken again at once."""

    def __init__(self, limit: AdaptiveLimit) -> None:
        self.limit = limit
        self.flying: deque[Ticket] = deque()

    def fill(self) -> None:
        while (t := self.limit.try_acquire()) is not None:
            self.flying.append(t)

    def answer(self, n: int, signal: Signal = OK, latency_s: float = 0.05) -> None:
        """The oldest `n` requests in flight get their answer, one by one."""
        for _ in range(n):
            self.fill()
            self.limit.release(self.flying.popleft(), signal, latency_s)
        self.fill()

    def round_trip(self, latency_s: float = 0.05) -> None:
        self.answer(self.limit.limit, OK, latency_s)

    def drain(self) -> None:
        while self.flying:
            self.limit.release(self.flying.popleft(), IGNORE)


def saturated_then_cut(maximum: int) -> tuple[AdaptiveLimit, Saturated]:
    """A limit of `maximum`, every place taken, then a 429 to the oldest request: one cut."""
    limit = AdaptiveLimit(maximum, clock=Clock())
    client = Saturated(limit)
    client.fill()
    client.answer(1, LIMITED)
    return limit, client


# -- the limiter alone ----------------------------------------------------------------------------


def test_starts_at_the_maximum_and_holds_no_more_in_flight():
    limit = AdaptiveLimit(8, clock=Clock())
    tickets = take(limit, 8)
    assert limit.try_acquire() is None
    assert all(t.send_at is None for t in tickets)  # no pacing before any 429
    limit.release(tickets[0], OK, 0.05)
    assert limit.try_acquire() is not None


def test_without_429s_the_limit_stays_at_the_maximum():
    limit = AdaptiveLimit(16, clock=Clock())
    client = Saturated(limit)
    for _ in range(50):
        client.round_trip()
    assert (limit.limit, limit.decreases) == (16, 0)
    assert all(t.send_at is None for t in client.flying)


def test_a_burst_of_429s_from_one_round_trip_cuts_once():
    limit = AdaptiveLimit(32, clock=Clock())
    for t in take(limit, 32):  # all sent under the same limit: one signal, one cut
        limit.release(t, LIMITED)
    assert limit.limited == 32
    assert limit.decreases == 1
    assert limit.limit == 24  # 32 x 0.75


def test_a_429_to_a_request_sent_after_the_cut_cuts_again_and_harder_without_growth():
    limit, client = saturated_then_cut(32)
    assert limit.limit == 24
    client.answer(31, LIMITED)  # the rest of that burst: sent before the cut
    assert (limit.limit, limit.decreases) == (24, 1)
    client.answer(1, LIMITED)  # sent after the cut: it was not enough, x 0.75^2
    assert limit.limit == 13
    assert limit.decreases == 2


def test_the_cut_is_taken_from_what_is_in_flight_not_from_an_unused_limit():
    limit = AdaptiveLimit(64, clock=Clock())
    tickets = take(limit, 8)  # the other workers wait out a Retry-After, say
    limit.release(tickets[0], LIMITED)
    assert limit.limit == 6  # 8 x 0.75, not 64 x 0.75


def test_additive_increase_one_per_round_trip_of_answers_while_the_limit_is_in_use():
    limit, client = saturated_then_cut(64)
    assert limit.limit == 48
    client.answer(47)
    assert limit.limit == 48
    client.answer(1)  # 48 answers with every place taken: +1
    assert limit.limit == 49
    client.answer(49)
    assert limit.limit == 50


def test_no_increase_while_the_limit_is_not_in_use():
    limit, client = saturated_then_cut(64)
    client.drain()
    assert limit.limit == 48
    for _ in range(500):  # one request at a time: a limit of 48 is never tested
        [t] = take(limit, 1)
        limit.release(t, OK, 0.05)
    assert limit.limit == 48


def _cut_at_400_per_s() -> tuple[AdaptiveLimit, Saturated]:
    """A limit cut by a 429 with 20 requests in flight at 50 ms: 400/s is where it came."""
    limit = AdaptiveLimit(64, clock=Clock())
    client = Saturated(limit)
    client.round_trip(0.050)
    client.drain()
    tickets = take(limit, 20)
    limit.release(tickets[0], LIMITED)
    for t in tickets[1:]:
        limit.release(t, IGNORE)
    assert limit.limit == 15
    return limit, client


def test_increase_slows_down_near_the_rate_where_429s_came():
    limit, client = _cut_at_400_per_s()
    client.round_trip(0.050)
    assert limit.limit == 16  # 15 / 50 ms = 300/s, below 0.8 x 400/s: +1 per round trip
    for _ in range(7):
        client.round_trip(0.050)
    assert limit.limit == 16  # from 320/s to 480/s: +1 per 8 round trips
    client.round_trip(0.050)
    assert limit.limit == 17


def test_a_longer_round_trip_gets_more_in_flight_for_the_same_rate_at_full_speed():
    limit, client = _cut_at_400_per_s()
    for _ in range(12):  # the round trip doubles (a slower API, a busy client): 16 in
        client.round_trip(0.100)  # flight are 160/s, far below where the 429s came
    assert limit.limit == 27


def test_bounds_never_below_one_never_above_the_maximum():
    limit = AdaptiveLimit(4, clock=Clock())
    client = Saturated(limit)
    for _ in range(30):
        client.answer(1, LIMITED)
        assert 1 <= limit.limit <= 4
    assert limit.limit == 1
    assert len(client.flying) == 1
    for _ in range(3000):
        client.answer(1)
        assert 1 <= limit.limit <= 4
    assert limit.limit == 4


def test_ignored_outcomes_only_give_the_place_back():
    limit = AdaptiveLimit(4, clock=Clock())
    for t in take(limit, 4):
        limit.release(t, IGNORE)
    assert (limit.limit, limit.in_flight, limit.decreases) == (4, 0, 0)


def test_rising_latency_cuts_mildly_once_and_noise_does_not():
    limit = AdaptiveLimit(10, clock=Clock())
    client = Saturated(limit)
    for _ in range(5):
        client.round_trip(0.050)
    # One very slow answer in a window (a retransmission, say): the median is unmoved.
    client.answer(1, OK, 1.0)
    client.answer(9, OK, 0.050)
    # Jitter of +-40%: nothing either.
    for i in range(50):
        client.answer(1, OK, 0.050 * (0.6 + 0.8 * (i % 5) / 4))
    # A whole window slow, once: a blip.
    client.round_trip(0.150)
    client.round_trip(0.050)
    assert limit.decreases == 0
    # Two in a row (queueing at the API): one cut of 10%.
    client.round_trip(0.150)
    client.round_trip(0.150)
    assert (limit.limit, limit.decreases, limit.latency_cuts) == (9, 1, 1)
    assert limit.limited == 0


def test_a_latency_that_stays_high_after_a_cut_becomes_the_new_normal():
    limit = AdaptiveLimit(10, clock=Clock())
    client = Saturated(limit)
    for _ in range(3):
        client.round_trip(0.050)
    for _ in range(60):  # the API became slower for good: cutting does not help
        client.round_trip(0.200)
    assert limit.latency_cuts == 1
    assert limit.limit == 10  # and grown back


def test_after_a_429_sends_are_paced():
    clock = Clock()
    limit = AdaptiveLimit(10, clock=clock)
    client = Saturated(limit)
    for _ in range(3):
        client.round_trip(0.050)
    client.answer(1, LIMITED)
    client.drain()
    assert limit.limit == 7
    clock.now += 1
    tickets = take(limit, 7)
    # Spread over 80% of a round trip (rate: 1.25 x the limit per round trip), not at once.
    interval = 0.050 / (7 * 1.25)
    assert tickets[0].send_at is None
    assert [t.send_at for t in tickets[1:]] == pytest.approx(
        [clock.now + k * interval for k in range(1, 7)])


def test_acquire_waits_for_a_place_and_gives_up_when_stopped():
    limit = AdaptiveLimit(1)
    held = limit.acquire()
    assert held is not None
    got: list[Ticket | None] = []
    waiter = threading.Thread(target=lambda: got.append(limit.acquire(threading.Event())))
    waiter.start()
    time.sleep(0.05)
    assert got == []
    limit.release(held, OK, 0.01)
    waiter.join(2)
    assert got and got[0] is not None

    stop = threading.Event()
    got.clear()
    waiter = threading.Thread(target=lambda: got.append(limit.acquire(stop)))
    waiter.start()
    time.sleep(0.05)
    started = time.monotonic()
    stop.set()
    limit.wake()
    waiter.join(2)
    assert got == [None]
    assert time.monotonic() - started < 0.5


def test_a_cut_is_logged_at_info_at_most_every_ten_seconds(caplog):
    clock = Clock()
    limit = AdaptiveLimit(64, clock=clock)
    with caplog.at_level(logging.DEBUG, logger="etl.adaptive"):
        for step in (1, 1, 10, 0):  # cuts at 0, 1, 2 and 12 s
            tickets = take(limit, limit.limit)
            limit.release(tickets[0], LIMITED)
            for t in tickets[1:]:
                limit.release(t, IGNORE)
            clock.now += step
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    debugs = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert infos == ["rate limited (429): concurrency 64 -> 48",
                     "rate limited (429): concurrency 15 -> 8 (2 more cut(s) since the last "
                     "message)"]
    assert debugs == ["rate limited (429): concurrency 48 -> 27",
                      "rate limited (429): concurrency 27 -> 15"]


# -- the simulator's rate limit through the command line ------------------------------------------


def test_etl_simulate_rate_limit_option(tmp_path: Path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "etl", "simulate", "--port", str(port),
                             "--rate-limit", "2.5"], env=etl_env(), cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stats", timeout=2) as r:
                    stats = json.loads(r.read())
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.1)
        assert (stats["rate_limit"], stats["burst"], stats["rate_limited"]) == (2.5, 1, 0)
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    assert b"allowing 2.5 requests/s (burst 1)" in err


# -- the extractor and the sync against a rate-limited API ----------------------------------------


def test_adaptive_concurrency_can_be_turned_off(tmp_path: Path):
    path = tmp_path / "etl.toml"
    path.write_text("[api]\nadaptive_concurrency = false\n")
    assert load_settings(config_file=str(path), env={}).adaptive_concurrency is False
    assert load_settings(env={}).adaptive_concurrency is True
    with Simulator() as sim:
        settings = make_settings(sim, URL.create("sqlite"), adaptive_concurrency=False)
        assert Extractor(settings).adaptive is None
        assert Extractor(make_settings(sim, URL.create("sqlite"))).adaptive is not None


RATE, WORKERS, IDS = 100, 32, 600


def _sync_rate_limited(pg_url: URL, adaptive: bool) -> tuple[int, object]:
    """Sync IDS ordinary ids from an API allowing RATE requests/s (bucket of 10) at latency
    50 ms with WORKERS workers; the number of 429s its rate limit answered, and the summary."""
    call_ids = [f"rl-{adaptive:d}-{i:04d}" for i in range(IDS)]
    with Simulator(rate_limit=RATE, latency_ms=50) as sim:
        settings = make_settings(sim, pg_url, concurrency=WORKERS, max_attempts=10,
                                 adaptive_concurrency=adaptive, batch_size=100)
        summary = run_sync(settings, call_ids)
        return sim.rate_limited, summary


def test_a_rate_limited_sync_loads_every_id_with_far_fewer_429s_than_fixed_concurrency(
        pg_url: URL, caplog):
    # Counts, not timings: with a fixed concurrency of 32 against 100 requests/s, every
    # worker keeps coming back after its 1 s Retry-After and about a quarter of all requests
    # are answered 429 (~170 over the run), however fast or loaded the machine. Adaptive, the
    # first round trips earn a burst (the limit starts at 32), then a few per second.
    with caplog.at_level(logging.INFO, logger="etl"):
        limited_adaptive, summary = _sync_rate_limited(pg_url, adaptive=True)
    call_ids = [f"rl-1-{i:04d}" for i in range(IDS)]
    want = expected_warehouse(call_ids)
    assert lost_ids(want, stored_warehouse(pg_url)) == []
    assert (summary.failed, summary.loaded + summary.not_found) == (0, IDS)
    assert summary.status == "succeeded"

    limited_fixed, fixed = _sync_rate_limited(pg_url, adaptive=False)
    assert fixed.loaded + fixed.not_found + fixed.failed == IDS

    assert limited_adaptive > 0  # the limit was reached, the test tests something
    assert limited_adaptive * 2 < limited_fixed, (limited_adaptive, limited_fixed)
    cuts = [r.getMessage() for r in caplog.records
            if r.name == "etl.adaptive" and r.levelno == logging.INFO]
    assert cuts and cuts[0].startswith(f"rate limited (429): concurrency {WORKERS} -> ")
    assert len(cuts) <= 2  # at most one line per 10 s, not one per 429
