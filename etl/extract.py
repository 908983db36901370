"""Fetching calls from the commubo API: bounded concurrency, retries, backoff, rate cap, and a
circuit breaker for an API that cannot be reached.

Workers pull ids from a shared iterator and put one `Outcome` per id into a bounded queue, so
memory stays flat however many ids there are; the caller consumes outcomes as they complete.
Every exchange has a deadline and a size cap (`transport`); what an answer means is decided in
one place (`policy`); how long to wait between attempts and how many to make is tenacity's
job here (exponential backoff with jitter, or the server's Retry-After, capped).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from urllib.parse import quote, urlsplit

import requests
import urllib3
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential_jitter

from .config import Settings
from .errors import ApiUnreachable, ConfigError, EtlError
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


class Extractor:
    """Fetches call ids with `settings.concurrency` workers. Use `fetch` as an iterator."""

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

    # -- the consumer side --------------------------------------------------------------------

    def fetch(self, ids: Iterable[str], tick_s: float | None = None
              ) -> Iterator[Outcome | None]:
        """Outcomes in completion order. With `tick_s`, yields None whenever nothing arrived for
        that long (so the caller can commit a partial batch or notice a stop). Raises the
        error that stopped the run (a 403, an unreachable API) after yielding what was
        already fetched."""
        self.start(ids)
        yield from self.results(tick_s)

    def start(self, ids: Iterable[str]) -> None:
        """Start the workers on `ids`; they fill the bounded queue until `results` drains it."""
        source = iter(ids)
        lock = threading.Lock()
        self._workers = [
            threading.Thread(target=self._work, args=(source, lock), daemon=True,
                             name=f"fetch-{n}")
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

    def close(self) -> None:
        """Stop the workers (cutting off requests in flight) and release the pool."""
        self.stop()
        give_up = time.monotonic() + _JOIN_S
        while any(w.is_alive() for w in self._workers) and time.monotonic() < give_up:
            with contextlib.suppress(queue.Empty):  # unblock workers on a full queue
                self._queue.get(timeout=0.05)
        self._watchdog.close()
        self._adapter.close()

    # -- the worker side ----------------------------------------------------------------------

    def _work(self, source: Iterator[str], lock: threading.Lock) -> None:
        slot = self._watchdog.slot_for_this_thread()
        try:
            while not self._stop.is_set():
                with lock:
                    call_id = next(source, None)
                if call_id is None:
                    break
                self._put(self._fetch_one(call_id, slot))
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
        if self._limiter is not None:
            self._limiter.wait(self._stop)
        decision, body = self._exchange(url, slot)
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


