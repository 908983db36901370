"""Adaptive concurrency: how many requests may be in flight, found from what the API answers.

A vendor API that limits its rate answers 429 past it. With a fixed number of workers, a sync
past the limit earns 429s, every worker waits out its Retry-After on its own and the throughput
saw-tooths. `AdaptiveLimit` instead keeps a limit on the requests in flight, between 1 and the
configured concurrency, and moves it as TCP moves its congestion window (AIMD; Netflix's
concurrency-limits does the same for services). The rate is about limit / round trip, so
finding the limit finds the rate the API sustains.

* **Start at the concurrency.** Without a 429 nothing ever changes: a run that is not rate
  limited runs as with a fixed concurrency. (A slow start from a few requests would cost every
  run a few round trips to spare a limited run one round trip of 429s.)
* **Multiplicative decrease on a 429**: to `backoff` (0.75) times what is in flight (not the
  limit: workers waiting out a Retry-After leave a limit untested; TCP's ssthresh is also
  FlightSize / 2), at most once per round trip: a 429 to a request sent before the last cut
  says nothing new, so the 429s of one burst cut once. A 429 again before the limit grew
  since the last cut means that cut was not enough: `backoff` squared (at the start, from the
  concurrency down to the API's rate in two or three round trips).
* **Additive increase**: +1 per round trip's worth of answers (as many as the limit), while
  every place is taken. Near the rate where the last 429 came (limit / smoothed round trip
  within 0.8 to 1.2 times the rate in flight then), +1 per `probe` (8) round trips only: each
  probe past the API's rate costs a 429 or two, and probing slower there makes those cycles
  longer (in benchmarks/rate_limited.py: 429s from about 2% to 0.5% of requests at the same
  throughput). A rate, not a number of requests: when the round trip grows (a slower API, a
  busy client), more requests in flight are needed for the same rate, and the limit grows at
  full speed to them. Outside the band (a higher rate granted later), +1 per round trip.
* **Pacing, once a 429 came**: sends at least srtt / (`pacing_gain` (1.25) x limit) apart, so
  a round trip's requests are spread over most of it instead of going out in one clump that
  overflows the API's burst allowance while the rate is below its limit (with a long round
  trip, the limit exceeds the burst). Without a 429 there is no pacing.
* **A mild latency rule**: when the median latency of two windows in a row (a window: as many
  answers as the limit) exceeds `tolerance` (2) times the lowest window median of the last 16
  windows plus 5 ms, the limit goes to `latency_backoff` (0.9) times itself, and grows back at
  full speed; if the latency is still that high a round trip after the cut, it is not our load
  (a slower API, a busy machine): it becomes the new normal and no more cuts follow. Medians
  and two windows, so one retransmission or pause does not count; the 5 ms, so jitter on a
  fast API does not either.

A 429 still costs that request its Retry-After (the extractor's retry policy, capped at
`api.retry_after_cap_s`); its place is given back while it waits, and the limit slows the
others. Cuts are logged at INFO at most once per 10 s (the others at DEBUG), increases at DEBUG.

Pure and clock-injectable: `try_acquire` / `release` hold the rules; `acquire` adds the waiting
for worker threads (a condition variable whose capacity is the limit).
"""

from __future__ import annotations

import enum
import logging
import math
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

BACKOFF = 0.75
LATENCY_BACKOFF = 0.9
TOLERANCE = 2.0
PROBE = 8
PACING_GAIN = 1.25
# The band around the level of the last 429 where the increase is `probe` times slower.
_NEAR_BELOW = 0.8
_NEAR_ABOVE = 1.2
# Weight of a new latency in the smoothed round-trip time (as TCP's SRTT).
_SRTT_WEIGHT = 0.125
# The latency baseline: the lowest median of this many recent windows.
_BASELINE_WINDOWS = 16
# A window's median latency less than this many seconds above the baseline never counts as
# rising (at a latency of a millisecond, 2x is noise).
_LATENCY_SLACK_S = 0.005
# Windows in a row that must be over the threshold before a latency cut (one is a blip).
_RISING_WINDOWS = 2
# At most one INFO line about backing off per this many seconds; the others go to DEBUG.
_LOG_EVERY_S = 10.0
# How long a waiting worker sleeps between looks at its stop event.
_POLL_S = 0.1


class Signal(enum.Enum):
    """What an exchange said about the API's capacity."""

    OK = "ok"            # an answer (200, 404): counts toward an increase, and its latency
    LIMITED = "limited"  # 429: the API's rate limit, decrease
    IGNORE = "ignore"    # no answer, a 5xx, another error, the run stopping: says nothing


@dataclass(slots=True)
class Ticket:
    """One request's place in flight: the epoch (number of decreases) when it was taken,
    and when it may be sent (None: at once; see pacing in the module doc)."""

    epoch: int
    send_at: float | None = None


class AdaptiveLimit:
    """Limit on requests in flight, between 1 and `max_limit`, moved by AIMD (module doc)."""

    def __init__(self, max_limit: int, *, min_limit: int = 1,
                 backoff: float = BACKOFF, latency_backoff: float = LATENCY_BACKOFF,
                 tolerance: float = TOLERANCE, probe: int = PROBE,
                 pacing_gain: float | None = PACING_GAIN,
                 clock: Callable[[], float] = time.monotonic, name: str = "concurrency") -> None:
        if not 1 <= min_limit <= max_limit:
            raise ValueError("need 1 <= min_limit <= max_limit")
        if not (0 < backoff < 1 and 0 < latency_backoff <= 1 and tolerance > 1 and probe >= 1):
            raise ValueError("need 0 < backoff < 1, 0 < latency_backoff <= 1, tolerance > 1, "
                             "probe >= 1")
        self.max_limit = max_limit
        self.min_limit = min_limit
        self._limit = max_limit
        self._backoff = backoff
        self._latency_backoff = latency_backoff
        self._tolerance = tolerance
        self._probe = probe
        # Pacing, from the first 429 on: sends at least srtt / (limit * gain) apart.
        self._paced = False
        self._pacing_gain = pacing_gain
        self._srtt: float | None = None
        self._next_send = 0.0
        # The rate (requests in flight / srtt) when a 429 last cut the limit: the increase
        # slows down near it.
        self._ceiling: float | None = None
        self._clock = clock
        self._name = name
        self._cond = threading.Condition(threading.Lock())
        self._in_flight = 0
        self._epoch = 0
        self._acked = 0  # OK answers since the last change of the limit
        self._grown = True  # whether the last change raised the limit
        # The latencies of the current window (OK answers) and the medians of recent windows.
        self._window: list[float] = []
        self._medians: deque[float] = deque(maxlen=_BASELINE_WINDOWS)
        self._latency_cut_at: int | None = None  # the epoch the last latency cut began
        self._rising = 0  # windows in a row whose median is over the threshold
        # Counters for the run's summary and the log.
        self.decreases = 0
        self.latency_cuts = 0
        self.limited = 0
        self.lowest = self._limit
        self._logged_at: float | None = None
        self._quiet_cuts = 0

    # -- reading ----------------------------------------------------------------------------

    @property
    def limit(self) -> int:
        return self._limit

    @property
    def in_flight(self) -> int:
        return self._in_flight

    # -- taking and giving back a place --------------------------------------------------------

    def try_acquire(self) -> Ticket | None:
        """A place in flight if one is free under the limit, else None."""
        with self._cond:
            return self._take()

    def acquire(self, stop: threading.Event | None = None) -> Ticket | None:
        """Wait for a place in flight; None when `stop` is set first."""
        with self._cond:
            while True:
                if stop is not None and stop.is_set():
                    return None
                ticket = self._take()
                if ticket is not None:
                    return ticket
                # Polled as well as notified: a stop sets an Event and takes no lock.
                self._cond.wait(_POLL_S if stop is not None else None)

    def wake(self) -> None:
        """Wake every waiting worker (to look at its stop event)."""
        with self._cond:
            self._cond.notify_all()

    def release(self, ticket: Ticket, signal: Signal, latency_s: float | None = None) -> None:
        """Give back the place of `ticket`, with what its exchange said and, for OK, how long
        the exchange took."""
        with self._cond:
            self._in_flight -= 1
            before = self._limit
            if signal is Signal.OK:
                self._ok(ticket, latency_s)
            elif signal is Signal.LIMITED:
                self.limited += 1
                self._paced = self._pacing_gain is not None
                if ticket.epoch == self._epoch:
                    # Limited again before the limit rose since the last cut: that cut was not
                    # enough (the start, a lower rate limit): cut harder.
                    factor = self._backoff if self._grown else self._backoff * self._backoff
                    # What is in flight (this request included), not the limit, as TCP's
                    # ssthresh = FlightSize / 2: workers waiting out a Retry-After leave the
                    # limit untested, and it says nothing about what the API sustains.
                    base = min(self._limit, self._in_flight + 1)
                    self._cut(base, factor, "rate limited (429)", from_429=True)
            # More places when the limit rose, one when only this place came free.
            if self._limit > before:
                self._cond.notify(self._limit - before + 1)
            elif self._in_flight < self._limit:
                self._cond.notify()

    # -- the rules (under the lock) ------------------------------------------------------------

    def _take(self) -> Ticket | None:
        if self._in_flight >= self._limit:
            return None
        self._in_flight += 1
        if not self._paced or self._srtt is None:
            return Ticket(self._epoch)
        now = self._clock()
        send_at = max(now, self._next_send)
        self._next_send = send_at + self._srtt / (self._limit * self._pacing_gain)
        return Ticket(self._epoch, send_at if send_at > now else None)

    def _ok(self, ticket: Ticket, latency_s: float | None) -> None:
        if latency_s is not None and latency_s >= 0:
            self._srtt = (latency_s if self._srtt is None
                          else self._srtt + _SRTT_WEIGHT * (latency_s - self._srtt))
            self._window.append(latency_s)
            if len(self._window) >= self._limit:
                median = statistics.median(self._window)
                self._window.clear()
                baseline = min(self._medians, default=median)
                self._medians.append(median)
                rising = median > self._tolerance * baseline + _LATENCY_SLACK_S
                self._rising = self._rising + 1 if rising else 0
                if rising and ticket.epoch == self._epoch:
                    if self._latency_cut_at == self._epoch:
                        # Still slow a round trip after cutting for it: not our load (a
                        # slower API, a busy machine): the new normal, cut no more.
                        self._medians.clear()
                        self._medians.append(median)
                        self._rising = 0
                    elif self._rising >= _RISING_WINDOWS:
                        self.latency_cuts += 1
                        self._cut(self._limit, self._latency_backoff,
                                  f"latency up ({1000 * median:.0f} ms, was "
                                  f"{1000 * baseline:.0f} ms)", from_429=False)
                        self._latency_cut_at = self._epoch
                        return
        # Additive increase, only while every place is taken (this one included): a limit
        # never reached is never tested, and would only grow.
        if self._limit < self.max_limit and self._in_flight + 1 >= self._limit:
            self._acked += 1
            rate = self._limit / self._srtt if self._srtt else None
            near = (self._ceiling is not None and rate is not None
                    and _NEAR_BELOW * self._ceiling <= rate <= _NEAR_ABOVE * self._ceiling)
            if self._acked >= self._limit * (self._probe if near else 1):
                self._set(self._limit + 1)
                log.debug("%s %d -> %d", self._name, self._limit - 1, self._limit)

    def _cut(self, base: int, factor: float, why: str, *, from_429: bool) -> None:
        """Cut the limit to `base` (what was in flight) times `factor`, at least by one. A
        429 marks the rate of `base` as where the API's limit is (the increase slows down
        near it); a latency cut does not (a softer sign: grow back at full speed)."""
        new = max(self.min_limit, min(self._limit - 1, math.floor(base * factor)))
        if new >= self._limit:  # already at the floor
            self._epoch += 1
            return
        old = self._limit
        grown = self._grown
        self._set(new)
        if from_429:
            # Where the API's limit is, as a rate: the concurrency that reaches it changes
            # with the round trip (a slower API, a busy client), the rate does not.
            self._ceiling = base / self._srtt if self._srtt else None
        else:
            self._grown = grown  # a 429 after this one is not "again without growth"
        self._epoch += 1
        self.decreases += 1
        self.lowest = min(self.lowest, new)
        self._log_cut(why, old, new)

    def _set(self, limit: int) -> None:
        self._grown = limit > self._limit
        self._limit = limit
        self._acked = 0

    def _log_cut(self, why: str, old: int, new: int) -> None:
        now = self._clock()
        if self._logged_at is None or now - self._logged_at >= _LOG_EVERY_S:
            more = (f" ({self._quiet_cuts} more cut(s) since the last message)"
                    if self._quiet_cuts else "")
            log.info("%s: %s %d -> %d%s", why, self._name, old, new, more)
            self._logged_at = now
            self._quiet_cuts = 0
        else:
            self._quiet_cuts += 1
            log.debug("%s: %s %d -> %d", why, self._name, old, new)
