"""Local stand-in for the commubo connect API (``GET {base}/v1/calls/{callId}``).

The real API is unreachable from development and CI, so every HTTP test, the demo and the
benchmarks talk to this simulator instead.  It serves deterministic call objects that reproduce
the vendor's documented quirks, and it can inject faults either at random (``fault_rate``) or
on a fixed script chosen by the shape of the call id.

The modules, each importing only those after it:

- :mod:`~etl.simulator.server`: :class:`Simulator`, the HTTP server (authentication, hostile
  servers, the refusing mode, the rate limit, ``/_stats``).
- :mod:`~etl.simulator.payload`: the id grammar (the reference for what each call id answers)
  and the call objects, customers, operators and chains of related calls.
- :mod:`~etl.simulator.faults`: which fault an id gets, scripted or random.
- :mod:`~etl.simulator.bodies`: the bytes of the answers that are not call objects.
- :mod:`~etl.simulator.data`: the names and words the call objects are made of.
"""

from __future__ import annotations

from .bodies import ESCAPE_BODY, ESCAPE_REASON
from .faults import RANDOM_FAULTS, random_fault
from .payload import customer_versions, operator_versions, payload_for, related_chain
from .server import DEFAULT_ACCESS_TOKEN, DEFAULT_TENANT_ID, Simulator

__all__ = [
    "DEFAULT_ACCESS_TOKEN",
    "DEFAULT_TENANT_ID",
    "ESCAPE_BODY",
    "ESCAPE_REASON",
    "RANDOM_FAULTS",
    "Simulator",
    "customer_versions",
    "operator_versions",
    "payload_for",
    "random_fault",
    "related_chain",
]
