"""What fetching one call id produced: the hand-off from the extractor to the loader."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any


class CallStatus(StrEnum):
    """The status of a call id: what fetching it gave, and what etl_call_status stores."""

    LOADED = "loaded"  # the API answered with a call (the loader stores it, or FAILED)
    NOT_FOUND = "not_found"  # 404: no such call, or no longer
    FAILED = "failed"  # no usable answer after the retries, or a payload that is no call


# The names the fetching side uses: an answer to load is OK until the loader has stored it.
OK = CallStatus.LOADED
NOT_FOUND = CallStatus.NOT_FOUND
FAILED = CallStatus.FAILED


@dataclass(slots=True)
class Outcome:
    call_id: str
    status: CallStatus  # OK (payload to load), NOT_FOUND (404) or FAILED (error says why)
    payload: Any = None
    http_status: int | None = None
    error: str | None = None
    attempts: int = 0
    fetched_at: datetime | None = None
    body: bytes | None = None  # the response body the payload was parsed from, when known
