"""Fetching calls from the commubo API: bounded concurrency, retries, backoff, rate cap.

Workers pull ids from a shared iterator and put one `Outcome` per id into a bounded queue, so
memory stays flat however many ids there are; the caller consumes outcomes as they complete.
Retry policy is data handed to tenacity: which failures retry, how long to wait (exponential
backoff with jitter, or the server's Retry-After, capped), how many attempts.
"""

from __future__ import annotations

import contextlib
import email.utils
import json
import logging
import math
import queue
import threading
import time
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from urllib.parse import quote

import requests
import urllib3
from requests.adapters import HTTPAdapter
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential_jitter

from .config import Settings
from .errors import AuthError, FatalError
from .outcome import FAILED, NOT_FOUND, OK, Outcome

log = logging.getLogger(__name__)

USER_AGENT = "commubo-etl/0.1 (+python-requests)"
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504}) | frozenset(range(520, 530))


class _Retryable(Exception):
    """A failure worth another attempt: 429, 5xx, connection errors, timeouts, cut bodies."""

    def __init__(self, reason: str, http_status: int | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.http_status = http_status
        self.retry_after = retry_after


class _Stopped(Exception):
    """The run is stopping (403 elsewhere, or the caller gave up): drop this id unfetched."""


_DONE = object()


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from a Retry-After header: delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return max(0.0, seconds) if math.isfinite(seconds) else None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


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


def _why(exc: requests.RequestException) -> str:
    if isinstance(exc, requests.exceptions.ChunkedEncodingError):
        return "response body cut short"
    if isinstance(exc, requests.exceptions.ContentDecodingError):
        return "response body could not be decoded"
    text = str(exc)
    lowered = text.lower()
    if "refused" in lowered:
        return "connection refused"
    if "reset" in lowered or "aborted" in lowered or "remotedisconnected" in lowered:
        return "connection reset"
    if "name or service not known" in lowered or "nodename nor servname" in lowered:
        return "API host name not found"
    return f"connection error: {text[:200]}"


class Extractor:
    """Fetches call ids with `settings.concurrency` workers. Use `fetch` as an iterator."""

    def __init__(self, settings: Settings, queue_size: int | None = None) -> None:
        if not settings.base_url or settings.access_token is None:
            raise ValueError("settings lack the API base URL or the access token")
        self.settings = settings
        self._base = settings.base_url + "/v1/calls/"
        self._timeout = settings.timeout_s
        self._stop = threading.Event()
        self._queue: queue.Queue = queue.Queue(
            maxsize=queue_size or max(2 * settings.concurrency, settings.batch_size))
        self._fatal: BaseException | None = None
        self._workers: list[threading.Thread] = []
        self._backoff = wait_exponential_jitter(
            multiplier=settings.backoff_s, max=settings.max_backoff_s, jitter=settings.backoff_s)
        self._limiter = (RateLimiter(settings.max_requests_per_s)
                         if settings.max_requests_per_s > 0 else None)
        # One pool shared by every worker, as large as the concurrency, so each worker keeps
        # its keep-alive connection instead of reconnecting.
        self._adapter = HTTPAdapter(pool_connections=1, pool_maxsize=settings.concurrency,
                                    max_retries=0)
        # requests looks up proxies, netrc and CA bundles in the environment on every call
        # through a Session: look them up once here instead.
        env = requests.Session().merge_environment_settings(
            settings.base_url, {}, None, settings.verify_tls, None)
        self._proxies = env["proxies"]
        self._verify = env["verify"]
        if not settings.verify_tls:
            log.warning("TLS certificate verification is OFF (api.verify_tls = false): "
                        "use this for test endpoints only")
            urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
        self._template = requests.Request("GET", self._base, headers={
            "x-commubo-tenantId": settings.tenant_id or "",
            "x-commubo-accessToken": settings.access_token.get(),
            "Accept": "application/json",
            "User-Agent": USER_AGENT,
        }).prepare()

    def stop(self) -> None:
        self._stop.set()

    # -- the consumer side --------------------------------------------------------------------

    def fetch(self, ids: Iterable[str], tick_s: float | None = None
              ) -> Iterator[Outcome | None]:
        """Outcomes in completion order. With `tick_s`, yields None whenever nothing arrived for
        that long (so the caller can commit a partial batch). Raises AuthError (after yielding
        what was already fetched) when the API refuses the credentials."""
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
        """Stop the workers (a request in flight finishes first) and release the pool."""
        self._stop.set()
        while any(w.is_alive() for w in self._workers):
            with contextlib.suppress(queue.Empty):  # unblock workers on a full queue
                self._queue.get(timeout=0.05)
        self._adapter.close()

    # -- the worker side ----------------------------------------------------------------------

    def _work(self, source: Iterator[str], lock: threading.Lock) -> None:
        retrying = Retrying(
            stop=stop_after_attempt(self.settings.max_attempts),
            wait=self._wait,
            retry=retry_if_exception_type(_Retryable),
            sleep=self._sleep,
            reraise=True,
        )
        try:
            while not self._stop.is_set():
                with lock:
                    call_id = next(source, None)
                if call_id is None:
                    break
                outcome = self._fetch_one(retrying, call_id)
                self._put(outcome)
        except _Stopped:
            pass
        except FatalError as exc:
            self._fail(exc)
        except BaseException as exc:  # a bug: surface it in the consumer, not in a dead thread
            self._fail(exc)
            raise
        finally:
            self._put(_DONE, force=True)

    def _fail(self, exc: BaseException) -> None:
        if self._fatal is None:
            self._fatal = exc
        self._stop.set()

    def _put(self, item: object, force: bool = False) -> None:
        while True:
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                if self._stop.is_set() and not force:
                    raise _Stopped from None

    def _send(self, url: str) -> requests.Response:
        # Straight to the transport adapter with a copy of one prepared request: a Session
        # would merge headers, cookies, hooks and environment settings again on every call,
        # which cost more CPU than the rest of the fetch. Nothing is lost: the API sets no
        # cookies and redirects are not followed.
        request = self._template.copy()
        request.url = url
        response = self._adapter.send(request, timeout=self._timeout, verify=self._verify,
                                       proxies=self._proxies)
        response.content  # noqa: B018 - read the body here, where a cut-short body is retried
        return response

    def _sleep(self, seconds: float) -> None:
        if self._stop.wait(seconds):
            raise _Stopped

    def _wait(self, state) -> float:
        exc = state.outcome.exception()
        retry_after = getattr(exc, "retry_after", None)
        if retry_after is not None:
            return min(retry_after, self.settings.retry_after_cap_s)
        return self._backoff(state)

    def _fetch_one(self, retrying: Retrying, call_id: str) -> Outcome:
        url = self._base + quote(call_id, safe="")
        tries = [0]
        try:
            outcome = retrying(self._attempt, url, call_id, tries)
        except _Retryable as exc:
            outcome = Outcome(call_id, FAILED, http_status=exc.http_status,
                              error=f"{exc.reason} (gave up after {tries[0]} attempts)")
        outcome.attempts = tries[0]
        return outcome

    def _attempt(self, url: str, call_id: str, tries: list[int]) -> Outcome:
        if self._stop.is_set():
            raise _Stopped
        if self._limiter is not None:
            self._limiter.wait(self._stop)
        tries[0] += 1
        try:
            resp = self._send(url)
        except requests.exceptions.SSLError:
            raise FatalError(
                "TLS certificate verification failed for the API base URL: fix the "
                "certificate or CA bundle (REQUESTS_CA_BUNDLE), or set api.verify_tls = false "
                "for a test endpoint"
            ) from None
        except requests.exceptions.Timeout:
            raise _Retryable(f"timed out after {self._timeout:g}s") from None
        except (requests.exceptions.ConnectionError, requests.exceptions.ChunkedEncodingError,
                requests.exceptions.ContentDecodingError) as exc:
            raise _Retryable(_why(exc)) from None
        except requests.RequestException as exc:
            return Outcome(call_id, FAILED, error=f"request failed: {type(exc).__name__}")

        code = resp.status_code
        if code == 200:
            try:
                payload = json.loads(resp.content)
            except ValueError:
                return Outcome(call_id, FAILED, http_status=code,
                               error="response body is not JSON")
            except RecursionError:  # json.loads gives up on arrays or objects ~1000 deep
                return Outcome(call_id, FAILED, http_status=code,
                               error="response body is JSON nested too deeply")
            return Outcome(call_id, OK, payload=payload, http_status=code,
                           fetched_at=datetime.now(UTC), body=resp.content)
        if code == 404:
            return Outcome(call_id, NOT_FOUND, http_status=code)
        if code in (401, 403):
            raise AuthError(
                f"{code} {resp.reason or 'Forbidden'} from the API: check COMMUBO_TENANT_ID "
                "and COMMUBO_ACCESS_TOKEN"
            )
        if code in RETRY_STATUSES:
            retry_after = parse_retry_after(resp.headers.get("Retry-After"))
            raise _Retryable(f"HTTP {code}", code, retry_after)
        reason = f"HTTP {code} {resp.reason or ''}".strip()
        return Outcome(call_id, FAILED, http_status=code, error=reason)
