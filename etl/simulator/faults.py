"""Which fault a call id gets: the scripted kinds its prefix names (:func:`classify`) and the
random faults of ordinary ids (:func:`random_fault`).  The grammar itself is described in
:mod:`etl.simulator.payload`; how each kind is served, in :mod:`etl.simulator.server`.
"""

from __future__ import annotations

import random
import re

_SCRIPTED_RE = re.compile(
    r"^(e500|e502|e503|e429s|e429d|reset|cut|slow|trickleb|trickle)-(\d+)(?:-|$)"
)
_ALWAYS_PREFIXES = (
    "nf",
    "broken",
    "badjson",
    "wrongid",
    "nocallid",
    "array",
    "poison",
    "bigint",
    "bomb",
    "huge",
    "endless",
    "escape",
)
# Fixed kinds that never serve a call object (payload_for gives None).
NEVER_SERVED = ("nf", "broken", "badjson", "array", "bomb", "huge", "endless", "escape")
RANDOM_FAULTS = ("e500", "e502", "e503", "e429s", "e429d", "reset", "cut")


def classify(call_id: str) -> tuple[str, int]:
    """Return ``(kind, n)`` for an id.

    ``kind`` is a scripted fault kind (with ``n`` failing requests), one of the fixed prefixes
    (``n`` = 0), or ``"ordinary"``.
    """
    m = _SCRIPTED_RE.match(call_id)
    if m:
        return m.group(1), int(m.group(2))
    prefix = call_id.split("-", 1)[0]
    if prefix in _ALWAYS_PREFIXES and call_id.startswith(prefix + "-"):
        return prefix, 0
    return "ordinary", 0


def random_fault(seed: int, call_id: str, attempt: int, fault_rate: float) -> str | None:
    """The fault (a kind of RANDOM_FAULTS) the simulator serves for request `attempt` (0-based)
    of an ordinary id at `fault_rate`, or None for the normal answer. Deterministic, so that
    reports and tests can tell in advance which ids fail every attempt."""
    rng = random.Random(f"{seed}:{call_id}:{attempt}")
    return rng.choice(RANDOM_FAULTS) if rng.random() < fault_rate else None
