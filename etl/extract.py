"""Fetching calls from the commubo API: bounded concurrency, retries, backoff, rate cap, and a
circuit breaker for an API that cannot be reached.

Workers pull ids from a shared source and put one `Outcome` per id into a bounded queue, so
memory stays flat however many ids there are; the caller consumes outcomes as they complete.
With a `follow` hook (`RelatedCalls`, for `etl sync --follow-related`) the source also takes the
ids that fetched calls lead to, and ends only when nothing is left and nothing is in flight.
Every exchange has a deadline and a size cap (`transport`); what an answer means is decided in
one place (`policy`); how long to wait between attempts and how many to make is tenacity's
job here (exponential backoff with jitter, or the server's Retry-After, capped). How many
exchanges are in flight at once is up to `adaptive.AdaptiveLimit` (at most the concurrency,
fewer while the API answers 429): each attempt takes a place before it is sent and gives it
back with what its answer said, so a worker waiting out a Retry-After holds no place.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, urlsplit

import requests
import urllib3
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential_jitter

from .adaptive import AdaptiveLimit, Signal
from .config import Settings
from .errors import ApiUnreachable, ConfigError, EtlError
from .ids import is_valid_call_id
from .outcome import FAILED, NOT_FOUND, OK, Outcome
from .policy import Decision, Verdict, judge_answer, judge_failure
from .transport import (
    ACCEPT_ENCODING,
    BodyTooLarge,
    DeadlineExceeded,
    Slot,
    Watchdog,
    WatchedAdapter,
    read_body,
)

log = logging.getLogger(__name__)

USER_AGENT = "commubo-etl/0.1 (+python-requests)"
# Connecting gets at most this long (within the request's deadline): a host that drops
# packets should count as unreachable long before a slow answer would time out.
CONNECT_TIMEOUT_S = 10.0
# Error bodies are read for the failure's reason up to this size; the rest is not wanted.
_ERROR_BODY_BYTES = 64 * 1024
# How long `close` waits for workers after cutting off their requests: a worker stuck in a
# DNS lookup cannot be interrupted, and is a daemon thread that dies with the process.
_JOIN_S = 5.0
# How often a worker waiting for ids that calls in flight may lead to looks for a stop.
_IDLE_S = 0.1

# Given what fetching an id produced, the ids to fetch because of it (called by the worker
# that fetched it, before the id counts as done).
Follow = Callable[[Outcome], Iterable[str]]


class _Retryable(Exception):
    """A failure worth another attempt, as the policy decided."""

    def __init__(self, decision: Decision) -> None:
        super().__init__(decision.reason)
        self.decision = decision


class _Stopped(Exception):
    """The run is stopping (403 elsewhere, or the caller gave up): drop this id unfetched."""


_DONE = object()


class RateLimiter:
    """At most `rate` acquisitions per second across all threads, evenly spaced."""

    def __init__(self, rate: float) -> None:
        self._interval = 1.0 / rate
        self._next = time.monotonic()
        self._lock = threading.Lock()

    def wait(self, stop: threading.Event) -> None:
        with self._lock:
            now = time.monotonic()
            slot = max(self._next, now)
            self._next = slot + self._interval
        if slot > now:
            stop.wait(slot - now)


class CircuitBreaker:
    """Stops the run when the API has given no answer at all for `window_s`: every attempt
    begun since then failed before a status line came (refused, DNS, connect or read timeout,
    reset). Any HTTP answer, even an error status, closes the circuit again, so a flaky API
    that still answers some requests never trips it."""

    def __init__(self, window_s: float, where: str) -> None:
        self._window = window_s
        self._where = where
        self._lock = threading.Lock()
        self._last_answer = time.monotonic()
        self._silent_since: float | None = None

    def answered(self) -> None:
        self._last_answer = time.monotonic()
        self._silent_since = None

    def no_answer(self, began: float, reason: str) -> None:
        """Record an attempt begun at `began` that got no answer; raises ApiUnreachable when
        nothing has answered for the whole window."""
        with self._lock:
            began = max(began, self._last_answer)
            if self._silent_since is None or began < self._silent_since:
                self._silent_since = began
            silent = time.monotonic() - self._silent_since
        if silent >= self._window:
            raise ApiUnreachable(
                f"cannot reach the API at {self._where}: {reason} (no answer for "
                f"{silent:.0f}s, api.unreachable_after_s = {self._window:g}); what was loaded "
                "stays, run the same command again later")


class _Source:
    """The ids the workers fetch: those given, and those that `follow` finds in what was fetched.

    Without `follow` a worker ends as soon as the given ids run out. With it, the source stays
    open while any id is `open` (taken, and what it leads to not known yet): a worker that finds
    nothing to take waits until an open id is done, then takes what it led to, or ends when
    nothing is open any more. Every worker then ends, so the run does. Found ids go before the
    rest of the given ones: a chain is finished before new ones start, which keeps the backlog
    of found ids to about one per worker."""

    def __init__(self, ids: Iterable[str], follow: Follow | None) -> None:
        self._given = iter(ids)
        self._follow = follow
        self._found: deque[str] = deque()
        self._open = 0
        self._changed = threading.Condition()

    def take(self, stop: threading.Event) -> str | None:
        """The next id to fetch, or None when there is none left (or the run is stopping)."""
        with self._changed:
            while not stop.is_set():
                call_id = self._found.popleft() if self._found else next(self._given, None)
                if call_id is not None:
                    self._open += 1
                    return call_id
                if self._follow is None or not self._open:
                    return None
                # Polled, not only notified: a stop sets an Event and takes no lock.
                self._changed.wait(_IDLE_S)
            return None

    def done(self, outcome: Outcome) -> None:
        """`outcome`'s id is fetched: add what it leads to, then close it. In that order: the
        other way round, a waiting worker could see nothing open and end while ids still come
        (none would be lost, the worker calling this takes them next, but fewer workers would
        be left to fetch them)."""
        found = list(self._follow(outcome)) if self._follow is not None else []
        with self._changed:
            self._found.extend(found)
            self._open -= 1
            self._changed.notify_all()


class Extractor:
    """Fetches call ids with `settings.concurrency` workers. Use `fetch` as an iterator.

    With `settings.adaptive_concurrency` (the default), `adaptive` holds how many of them may
    have a request in flight: all of them until the API answers 429, fewer while it does."""

    def __init__(self, settings: Settings, queue_size: int | None = None) -> None:
        if not settings.base_url or settings.access_token is None:
            raise ValueError("settings lack the API base URL or the access token")
        self.settings = settings
        self._base = settings.base_url + "/v1/calls/"
        self._timeout = settings.timeout_s
        self._timeouts = (min(settings.timeout_s, CONNECT_TIMEOUT_S), settings.timeout_s)
        self._stop = threading.Event()
        self._queue: queue.Queue = queue.Queue(
            maxsize=queue_size or max(2 * settings.concurrency, settings.batch_size))
        self._fatal: BaseException | None = None
        self._workers: list[threading.Thread] = []
        self._retrying = Retrying(  # its statistics (the attempt count) are per thread
            stop=stop_after_attempt(settings.max_attempts),
            wait=self._wait,
            retry=retry_if_exception_type(_Retryable),
            sleep=self._sleep,
            reraise=True,
        )
        self._backoff = wait_exponential_jitter(
            multiplier=settings.backoff_s, max=settings.max_backoff_s, jitter=settings.backoff_s)
        self._limiter = (RateLimiter(settings.max_requests_per_s)
                         if settings.max_requests_per_s > 0 else None)
        self.adaptive = (AdaptiveLimit(settings.concurrency)
                         if settings.adaptive_concurrency else None)
        self._closed = False
        parts = urlsplit(settings.base_url)
        self._breaker = CircuitBreaker(settings.unreachable_after_s,
                                       f"{parts.scheme}://{parts.netloc}")
        self._watchdog = Watchdog()
        # One pool shared by every worker, as large as the concurrency, so each worker keeps
        # its keep-alive connection instead of reconnecting.
        self._adapter = WatchedAdapter(pool_connections=1, pool_maxsize=settings.concurrency,
                                       max_retries=0)
        # requests looks up proxies, netrc and CA bundles in the environment on every call
        # through a Session: look them up once here instead.
        env = requests.Session().merge_environment_settings(
            settings.base_url, {}, None, settings.verify_tls, None)
        self._proxies = env["proxies"]
        self._verify = env["verify"]
        if isinstance(self._verify, str) and not os.path.exists(self._verify):
            raise ConfigError(
                f"the CA bundle {self._verify!r} (from REQUESTS_CA_BUNDLE or CURL_CA_BUNDLE) "
                "does not exist")
        if not settings.verify_tls:
            log.warning("TLS certificate verification is OFF (api.verify_tls = false): "
                        "use this for test endpoints only")
            urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
        self._template = requests.Request("GET", self._base, headers={
            "x-commubo-tenantId": settings.tenant_id or "",
            "x-commubo-accessToken": settings.access_token.get(),
            "Accept": "application/json",
            "Accept-Encoding": ACCEPT_ENCODING,
            "User-Agent": USER_AGENT,
        }).prepare()

    def stop(self) -> None:
        """Stop fetching: requests in flight are cut off at once, no new one starts."""
        self._stop.set()
        self._watchdog.cut_off_all()
        if self.adaptive is not None:
            self.adaptive.wake()

    # -- the consumer side --------------------------------------------------------------------

    def fetch(self, ids: Iterable[str], tick_s: float | None = None,
              follow: Follow | None = None) -> Iterator[Outcome | None]:
        """Outcomes in completion order. With `tick_s`, yields None whenever nothing arrived for
        that long (so the caller can commit a partial batch or notice a stop). Raises the
        error that stopped the run (a 403, an unreachable API) after yielding what was
        already fetched. With `follow`, also fetches the ids it names for each outcome."""
        self.start(ids, follow)
        yield from self.results(tick_s)

    def start(self, ids: Iterable[str], follow: Follow | None = None) -> None:
        """Start the workers on `ids` (and what `follow` finds); they fill the bounded queue
        until `results` drains it."""
        source = _Source(ids, follow)
        # Each worker runs in a copy of the caller's context: threads do not inherit context
        # variables, and the log fields (run id, shard) live there, also structlog's under
        # Airflow (etl.logs).
        self._workers = [
            threading.Thread(target=contextvars.copy_context().run, args=(self._work, source),
                             daemon=True, name=f"fetch-{n}")
            for n in range(self.settings.concurrency)
        ]
        for w in self._workers:
            w.start()

    def results(self, tick_s: float | None = None) -> Iterator[Outcome | None]:
        """The outcomes of the ids given to `start` (see `fetch`)."""
        running = len(self._workers)
        try:
            while running:
                try:
                    item = self._queue.get(timeout=tick_s)
                except queue.Empty:
                    yield None
                    continue
                if item is _DONE:
                    running -= 1
                else:
                    yield item
            if self._fatal is not None:
                raise self._fatal
        finally:
            self.close()

    def drain(self) -> list[Outcome]:
        """Stop fetching and return the outcomes fetched but not taken by `results` yet (the
        requests in flight are cut off and give none): a stopped run still commits them.
        Taking them also unblocks workers waiting on a full queue, so they can end."""
        self.stop()
        left: list[Outcome] = []
        give_up = time.monotonic() + _JOIN_S
        while True:
            alive = any(w.is_alive() for w in self._workers)
            if alive and time.monotonic() >= give_up:
                break
            try:
                # Once every worker has ended nothing more comes: take what is left, no wait.
                item = self._queue.get(timeout=0.05) if alive else self._queue.get_nowait()
            except queue.Empty:
                if alive:
                    continue
                break
            if item is not _DONE:
                left.append(item)
        return left

    def close(self) -> None:
        """Stop the workers (cutting off requests in flight) and release the pool; what is
        still queued is dropped (`drain` first to keep it)."""
        self.drain()
        self._watchdog.close()
        self._adapter.close()
        if not self._closed and self.adaptive is not None and self.adaptive.decreases:
            a = self.adaptive
            log.info("adaptive concurrency: %d request(s) answered 429 (rate limited), %d "
                     "cut(s) of which %d for latency, lowest %d, at the end %d of %d",
                     a.limited, a.decreases, a.latency_cuts, a.lowest, a.limit, a.max_limit)
        self._closed = True

    # -- the worker side ----------------------------------------------------------------------

    def _work(self, source: _Source) -> None:
        slot = self._watchdog.slot_for_this_thread()
        try:
            while (call_id := source.take(self._stop)) is not None:
                outcome = self._fetch_one(call_id, slot)
                # Before the hand-off: the ids it leads to are fetched while it waits in the
                # queue, and the source knows whether to end without asking the consumer.
                source.done(outcome)
                self._put(outcome)
        except _Stopped:
            pass
        except EtlError as exc:  # the policy or the breaker stopped the run
            self._fail(exc)
        except BaseException as exc:  # a bug: surface it in the consumer, not in a dead thread
            self._fail(exc)
            raise
        finally:
            self._put(_DONE, force=True)

    def _fail(self, exc: BaseException) -> None:
        if self._fatal is None:
            self._fatal = exc
        self.stop()

    def _put(self, item: object, force: bool = False) -> None:
        while True:
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                if self._stop.is_set() and not force:
                    raise _Stopped from None

    def _sleep(self, seconds: float) -> None:
        if self._stop.wait(seconds):
            raise _Stopped

    def _wait(self, state) -> float:
        retry_after = state.outcome.exception().decision.retry_after
        if retry_after is not None:
            return min(retry_after, self.settings.retry_after_cap_s)
        return self._backoff(state)

    def _fetch_one(self, call_id: str, slot: Slot) -> Outcome:
        url = self._base + quote(call_id, safe="")
        try:
            outcome = self._retrying(self._attempt, url, call_id, slot)
        except _Retryable as exc:
            d = exc.decision
            outcome = Outcome(call_id, FAILED, http_status=d.http_status, error=(
                f"{d.reason} (gave up after {self._retrying.statistics['attempt_number']} "
                "attempts)"))
        outcome.attempts = self._retrying.statistics["attempt_number"]
        if outcome.fetched_at is None:  # when the last answer (or failure) came
            outcome.fetched_at = datetime.now(UTC)
        return outcome

    def _attempt(self, url: str, call_id: str, slot: Slot) -> Outcome:
        if self._stop.is_set():
            raise _Stopped
        decision, body = (self._exchange_adaptively(url, slot) if self.adaptive is not None
                          else self._capped_exchange(url, slot))
        verdict = decision.verdict
        if verdict is Verdict.LOAD:
            return _parsed(call_id, body)
        if verdict is Verdict.NOT_FOUND:
            return Outcome(call_id, NOT_FOUND, http_status=404)
        if verdict is Verdict.RETRY:
            raise _Retryable(decision)
        if verdict is Verdict.STOP:
            raise decision.error
        return Outcome(call_id, FAILED, http_status=decision.http_status,
                       error=decision.reason)

    def _capped_exchange(self, url: str, slot: Slot) -> tuple[Decision, bytes]:
        """One exchange, after the wait the rate cap (api.max_requests_per_s) asks for."""
        if self._limiter is not None:
            self._limiter.wait(self._stop)
        return self._exchange(url, slot)

    def _exchange_adaptively(self, url: str, slot: Slot) -> tuple[Decision, bytes]:
        """One exchange within the adaptive limit: wait for a place in flight (and the time
        pacing gives it), send, and give the place back with what the answer said."""
        adaptive = self.adaptive
        assert adaptive is not None
        ticket = adaptive.acquire(self._stop)
        if ticket is None:
            raise _Stopped
        signal, latency = Signal.IGNORE, None
        try:
            if ticket.send_at is not None and self._stop.wait(ticket.send_at - time.monotonic()):
                raise _Stopped
            if self._limiter is not None:
                self._limiter.wait(self._stop)
            began = time.monotonic()
            decision, body = self._exchange(url, slot)
            if decision.verdict in (Verdict.LOAD, Verdict.NOT_FOUND):
                signal, latency = Signal.OK, time.monotonic() - began
            elif decision.http_status == 429:
                signal = Signal.LIMITED
            return decision, body
        finally:
            adaptive.release(ticket, signal, latency)

    def _exchange(self, url: str, slot: Slot) -> tuple[Decision, bytes]:
        """Send one request and read its whole answer within the deadline; judge it."""
        # Straight to the transport adapter with a copy of one prepared request: a Session
        # would merge headers, cookies, hooks and environment settings again on every call,
        # which cost more CPU than the rest of the fetch. Nothing is lost: the API sets no
        # cookies and redirects are not followed.
        request = self._template.copy()
        request.url = url
        began = time.monotonic()
        slot.begin(self._timeout)
        response = None
        try:
            response = self._adapter.send(request, stream=True, timeout=self._timeouts,
                                          verify=self._verify, proxies=self._proxies)
            self._breaker.answered()
            status = response.status_code
            try:
                body = read_body(response.raw, response.headers, self.settings.max_response_bytes
                                 if status == 200 else _ERROR_BODY_BYTES)
            except BodyTooLarge:
                if status == 200:
                    raise
                body = b""  # an error body's reason is not worth a big read
            slot.end()
            return judge_answer(status, response.reason, response.headers, body), body
        except Exception as exc:  # noqa: BLE001 - every failure is judged by the policy
            if self._stop.is_set():
                raise _Stopped from None
            cut = slot.cut
            slot.end()
            decision = judge_failure(DeadlineExceeded() if cut else exc, self._timeout)
            if response is None and decision.verdict is Verdict.RETRY:
                self._breaker.no_answer(began, decision.reason)
            return decision, b""


def _parsed(call_id: str, body: bytes) -> Outcome:
    try:
        payload = json.loads(body)
    except ValueError:
        return Outcome(call_id, FAILED, http_status=200, error="response body is not JSON")
    except RecursionError:  # json.loads gives up on arrays or objects ~1000 deep
        return Outcome(call_id, FAILED, http_status=200,
                       error="response body is JSON nested too deeply")
    return Outcome(call_id, OK, payload=payload, http_status=200,
                   fetched_at=datetime.now(UTC), body=body)




# -- following related calls (etl sync --follow-related) --------------------------------------

# Of some call ids, those stored as loaded, each with the related call id its stored row names.
StoredLinks = Callable[[list[str]], dict[str, str | None]]


def related_call_id(call_id: str, payload: Any) -> str | None:
    """The id of the call that the fetched call `call_id` derives from, when its payload names
    a valid one; None when it is absent, null or not a call id (such ids are not followed)."""
    if not isinstance(payload, dict) or payload.get("callId") != call_id:
        return None  # not the call asked for: it fails to load, and what it names is not ours
    value = payload.get("relatedCallId")
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)  # stored as its digits (transform.to_text): follow that same id
    return value if isinstance(value, str) and is_valid_call_id(value) else None


class RelatedCalls:
    """Which ids to fetch because fetched calls derive from them (`etl sync --follow-related`):
    the `Follow` hook of `Extractor.start` is `after`.

    The ids of the ids file (`requested`) are at depth 0, the calls they derive from at depth 1,
    and so on up to `max_depth`. Each id is handed out once a run however often it is reached,
    and an id of the ids file never (it is fetched as such). An id's depth is the shortest way to
    it found so far: the workers race, so a long chain may reach a call before a short one does;
    the short one then reaches again what that call derives from, so the calls fetched are those
    within `max_depth` of the ids file whatever the order the fetches complete in.

    With `stored` (--skip-loaded), a related id already stored as loaded is not fetched (it is
    counted in `skipped`), and its chain goes on from the related id its stored row names.

    Memory: a set of the requested ids, and two entries per related id reached."""

    def __init__(self, requested: Iterable[str], max_depth: int,
                 stored: StoredLinks | None = None) -> None:
        self._requested = frozenset(requested)
        self._max_depth = max_depth
        self._stored = stored
        self._depth: dict[str, int] = {}  # each related id reached: the shortest way found
        # Related ids whose own related id is known (fetched or stored): that id, or None.
        self._link: dict[str, str | None] = {}
        self._lock = threading.Lock()  # the workers call `after` at once
        self.skipped = 0

    def is_related(self, call_id: str) -> bool:
        """Whether `call_id` was reached as a related call (and so fetched as one, unless
        skipped)."""
        return call_id in self._depth

    def after(self, outcome: Outcome) -> list[str]:
        """The ids to fetch because `outcome` was fetched."""
        if outcome.status != OK:
            return []  # a 404 or a failure names no call
        return self._linked({outcome.call_id: related_call_id(outcome.call_id, outcome.payload)})

    def after_stored(self, call_ids: list[str]) -> list[str]:
        """The ids to fetch because of requested calls skipped as loaded (--skip-loaded): their
        chains go on from the related ids stored with them, so a rerun completes the chains
        that an interrupted or failed run left unfinished."""
        return self._linked(self._stored(call_ids)) if self._stored is not None else []

    def _linked(self, links: dict[str, str | None]) -> list[str]:
        """Record what each call of `links` derives from; the ids to fetch because of that."""
        to_fetch: list[str] = []
        while links:
            with self._lock:
                new = self._reach(self._record(links))
            # A database round trip: outside the lock, the id is already marked as reached.
            loaded = self._stored(new) if self._stored is not None and new else {}
            to_fetch += [i for i in new if i not in loaded]
            with self._lock:
                self.skipped += len(loaded)
            links = loaded  # not fetched: their stored rows say what they derive from
        return to_fetch

    def _record(self, links: dict[str, str | None]) -> list[tuple[str, int]]:
        """Under the lock: note the links of related calls; (id, depth) of each id linked to."""
        reached = []
        for call_id, related in links.items():
            if related is not None and not is_valid_call_id(related):
                related = None  # a stored value is text of any form
            if call_id in self._depth:
                self._link[call_id] = related
            if related is not None:
                # Read now, not when the fetch began: a shorter way may have been found since.
                reached.append((related, self._depth.get(call_id, 0) + 1))
        return reached

    def _reach(self, reached: list[tuple[str, int]]) -> list[str]:
        """Under the lock: the ids reached for the first time, within the depth limit."""
        new = []
        for first, first_depth in reached:
            call_id: str | None = first
            depth = first_depth
            while (call_id is not None and depth <= self._max_depth
                   and call_id not in self._requested):
                known = self._depth.get(call_id)
                if known is not None and known <= depth:
                    break
                self._depth[call_id] = depth
                if known is None:
                    new.append(call_id)
                    break
                # Reached by a shorter way: so is what it derives from, when that is known
                # (when not, its fetch is still on and reads the new depth as it completes).
                call_id, depth = self._link.get(call_id), depth + 1
        return new
