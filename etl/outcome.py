"""What fetching one call id produced: the hand-off from the extractor to the loader."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

OK = "ok"
NOT_FOUND = "not_found"
FAILED = "failed"


@dataclass(slots=True)
class Outcome:
    call_id: str
    status: str  # OK (payload to load), NOT_FOUND (404) or FAILED (error says why)
    payload: Any = None
    http_status: int | None = None
    error: str | None = None
    attempts: int = 0
    fetched_at: datetime | None = None
    body: bytes | None = None  # the response body the payload was parsed from, when known
