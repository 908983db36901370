"""What each answer or failure of a request means: the one place that says which are retried,
which fail the id, and which stop the run.

Modelled on dlt's `sources/helpers/requests/retry.py` and the Singer SDK's `validate_response`:
the extractor sends, hands whatever came back (a status with its headers and body, or an
exception) to `judge_answer` or `judge_failure`, and acts on the `Decision`. How long to wait
between attempts and how many to make stay with tenacity in the extractor.
"""

from __future__ import annotations

import email.utils
import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum

import requests
import urllib3

from .errors import AuthError, EtlError, FatalError, RemoteConfigError
from .text import printable
from .transport import BodyCutShort, BodyTooLarge, DeadlineExceeded, UndecodableBody

# Answers that may heal by themselves: request timeout, rate limit, server-side trouble
# (520-529 are Cloudflare's origin errors).
RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504}) | frozenset(range(520, 530))
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})


class Verdict(Enum):
    LOAD = "load"            # 200: parse the body and load it
    NOT_FOUND = "not_found"  # 404: the call does not exist
    RETRY = "retry"          # worth another attempt, after a wait
    FAIL = "fail"            # this id failed; another attempt would get the same
    STOP = "stop"            # the run cannot go on (`error` says why)


@dataclass(frozen=True, slots=True)
class Decision:
    verdict: Verdict
    reason: str = ""
    http_status: int | None = None
    retry_after: float | None = None  # seconds the server asked us to wait
    unreachable: bool = False  # no connection at all: counts toward the circuit breaker
    error: EtlError | None = None  # for STOP


LOAD = Decision(Verdict.LOAD, http_status=200)
NOT_FOUND = Decision(Verdict.NOT_FOUND, http_status=404)


def judge_answer(status: int, reason: str | None, headers: Mapping[str, str],
                 body: bytes) -> Decision:
    """What an HTTP answer means. `body` may be cut to a few KB for anything but 200."""
    if status == 200:
        return LOAD
    if status == 404:
        return NOT_FOUND
    said = _said(status, reason)
    if status in (401, 403):
        return Decision(Verdict.STOP, said, status, error=AuthError(
            f"{said} from the API: check COMMUBO_TENANT_ID and COMMUBO_ACCESS_TOKEN"))
    if status in RETRY_STATUSES:
        return Decision(Verdict.RETRY, f"HTTP {status}", status,
                        retry_after=parse_retry_after(headers.get("Retry-After")))
    if status in REDIRECT_STATUSES:
        # Not followed: the token would travel to wherever the server points. A redirect
        # for a call means the base URL is not the API's (http for https, a moved host).
        where = printable(headers.get("Location") or "?", 120)
        return Decision(Verdict.STOP, said, status, error=RemoteConfigError(
            f"the API answered {said}, redirecting to {where}: redirects are not followed; "
            "check the base URL (COMMUBO_BASE_URL or api.base_url)"))
    detail = _body_text(body)
    return Decision(Verdict.FAIL, f"{said}: {detail}" if detail else said, status)


def judge_failure(exc: BaseException, timeout_s: float) -> Decision:
    """What a request that got no usable answer means (requests', urllib3's or our own
    transport exceptions)."""
    if isinstance(exc, DeadlineExceeded):
        return Decision(Verdict.RETRY, f"timed out: no complete answer within {timeout_s:g}s")
    if isinstance(exc, BodyTooLarge):
        # It will not shrink: fail the id, no retry.
        return Decision(Verdict.FAIL, f"{exc} (api.max_response_bytes)", 200)
    if isinstance(exc, UndecodableBody):
        return Decision(Verdict.FAIL, str(exc), 200)
    if isinstance(exc, requests.exceptions.SSLError):  # the handshake: a certificate problem
        return Decision(Verdict.STOP, "TLS failure", error=FatalError(
            "TLS certificate verification failed for the API base URL: fix the certificate "
            "or CA bundle (REQUESTS_CA_BUNDLE), or set api.verify_tls = false for a test "
            "endpoint"))
    if isinstance(exc, requests.exceptions.ConnectTimeout
                  | urllib3.exceptions.ConnectTimeoutError):
        return Decision(Verdict.RETRY, "connecting timed out", unreachable=True)
    if isinstance(exc, requests.exceptions.Timeout | urllib3.exceptions.TimeoutError):
        return Decision(Verdict.RETRY, f"timed out after {timeout_s:g}s")
    if isinstance(exc, requests.exceptions.ProxyError):
        return Decision(Verdict.RETRY, "the proxy refused or failed the connection",
                        unreachable=True)
    cause = _cause(exc)
    if isinstance(cause, urllib3.exceptions.NameResolutionError):
        return Decision(Verdict.RETRY, "API host name not found", unreachable=True)
    if isinstance(cause, urllib3.exceptions.NewConnectionError):
        return Decision(Verdict.RETRY, _connect_failure(cause), unreachable=True)
    if isinstance(exc, BodyCutShort | requests.exceptions.ChunkedEncodingError) or (
            "IncompleteRead" in repr(cause)):
        return Decision(Verdict.RETRY, "response body cut short")
    if isinstance(exc, requests.exceptions.ConnectionError | urllib3.exceptions.HTTPError
                  | ConnectionError):
        return Decision(Verdict.RETRY, _dropped(exc))
    return Decision(Verdict.FAIL, f"request failed: {type(exc).__name__}")


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


def _said(status: int, reason: str | None) -> str:
    """`403 Forbidden`, with the server's reason phrase made safe to print."""
    return f"{status} {printable(reason, 60)}".strip() if reason else str(status)


def _body_text(body: bytes) -> str:
    """The start of an error body, for the failure's reason: servers often say why there."""
    text = body[:400].decode("utf-8", "replace").strip()
    return printable(" ".join(text.split()), 160) if text else ""


def _cause(exc: BaseException) -> BaseException | None:
    """The urllib3 error behind a requests exception (requests wraps MaxRetryError)."""
    seen = exc.args[0] if exc.args and isinstance(exc.args[0], BaseException) else exc
    return getattr(seen, "reason", None) or seen


def _connect_failure(exc: BaseException) -> str:
    text = str(exc).lower()
    if "refused" in text:
        return "connection refused"
    if "unreachable" in text:
        return "network unreachable"
    return "cannot connect: " + printable(str(exc).split(": ", 1)[-1], 120)


def _dropped(exc: BaseException) -> str:
    text = repr(exc).lower()
    if "reset" in text or "aborted" in text or "remotedisconnected" in text:
        return "connection reset"
    return "connection error: " + printable(str(exc), 160)
