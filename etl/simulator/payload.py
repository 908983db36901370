"""What each call id answers: the id grammar, and the call objects the simulator serves.

This is the reference for the id grammar: the shape of a call id decides whether it serves a
call object, fails on a script, or takes random faults (``fault_rate``).  Which fault an id gets
is decided in :mod:`etl.simulator.faults`; how each answer goes out on the wire (statuses,
headers, streams) is :mod:`etl.simulator.server`'s.

Scripted ids
------------
The prefix of the id decides; the rest of the id is free text, so tests can make unique ids
such as ``e503-2-test42``.

``{kind}-{n}-{rest}``: the first ``n`` requests for that id fail with ``kind``, later requests
get the normal payload (use a large ``n`` such as ``99`` for "always").  Kinds:

============  ===========================================================================
``e500``      HTTP 500 with a small JSON error body
``e502``      HTTP 502
``e503``      HTTP 503
``e429s``     HTTP 429 with ``Retry-After: <retry_after_s>`` (seconds)
``e429d``     HTTP 429 with ``Retry-After`` as an HTTP date (now + ``retry_after_s``)
``reset``     the request is read, then the TCP connection is reset (RST, no response at all)
``cut``       status 200 and the full ``Content-Length``, but only the first half of the body
              is sent before the connection closes (client sees an incomplete read)
``slow``      the answer is delayed by ``slow_s`` seconds, then the normal payload is sent
``trickle``   the whole normal response (status line, headers, body) is sent one byte at a
              time, ``trickle_s`` seconds apart (a client with only a per-read timeout never
              times out)
``trickleb``  status line and headers (with the correct ``Content-Length``) at once, then the
              body one byte every ``trickle_s`` seconds
============  ===========================================================================

Fixed behaviour on every request:

================  =========================================================================
``nf-...``        404 (the call does not exist)
``broken-...``    500 (a persistently broken id)
``badjson-...``   200, ``Content-Type: application/json``, body ``<html>oops</html>``
``wrongid-...``   200, valid payload whose ``callId`` is ``"other-" + call_id``
``nocallid-...``  200, valid payload without ``callId``
``array-...``     200, body ``[]``
``poison-...``    200, normal payload but ``talkTime`` is ``"not-a-number"``
``bigint-...``    200, normal payload but ``talkTime`` is ``2**40`` (outside int32)
``bomb-...``      200, ``Content-Encoding: gzip``, correct ``Content-Length``: about 300 KB on
                  the wire that inflate to ``bomb_bytes`` (default 300 MiB) bytes, a
                  JSON-looking prefix ``{"callId": "bomb", "note": "`` and then spaces
``huge-...``      200, ``Content-Length: <huge_bytes>`` (default 100 MiB), the body (prefix
                  ``{"callId": "huge", "note": "`` and spaces) streamed block by block
``endless-...``   200, ``Transfer-Encoding: chunked`` and no ``Content-Length``; chunks of
                  ``{"callId": "endless", "note": "`` and spaces until the client hangs up
                  or the simulator stops
``escape-...``    400 whose reason phrase is :data:`ESCAPE_REASON` and whose body (not JSON) is
                  :data:`ESCAPE_BODY`; both carry terminal control sequences (an OSC title
                  ``ESC]0;pwned BEL``, a CSI ``ESC[2J`` that clears the screen, a bare ``CR``)
================  =========================================================================

Scripted ids never take random faults and never hit the random 404s described below.
:func:`payload_for` returns what a scripted id eventually serves (``None`` for ``nf-``,
``broken-``, ``badjson-``, ``array-``, ``bomb-``, ``huge-``, ``endless-`` and ``escape-``;
the modified object for ``wrongid-``, ``nocallid-``, ``poison-`` and ``bigint-``).

Ordinary ids
------------
Any other id is "ordinary".  About 3% of ordinary ids (a stable hash of ``(seed, id)``) do not
exist and answer 404 on every request; ids of the form ``call-r<digits>-<digits>`` follow the
rules of "Call chains" below instead.  With ``fault_rate > 0`` each request for an ordinary
id fails with probability ``fault_rate``, decided by
``random.Random(f"{seed}:{call_id}:{attempt}")`` where ``attempt`` is the number of earlier
requests for that id; the fault kind is one of 500, 502, 503, 429 (seconds), 429 (date),
reset and cut, chosen by the same generator.  Runs are therefore reproducible for a given order
of attempts, and a retrying client eventually gets the payload.

Call objects
------------
Every call object is a pure function of ``(seed, call id)``; no request order or clock enters
it.  The vendor's quirks: numbers sometimes sent as strings (``callType``, ``talkTime``, the
voice id), the voice id sometimes under the misspelt key ``operatorVocieId``, timestamps in
either ``+09:00`` or ``Z``, optional fields absent rather than null (a not-connected call has
no ``connectedDateTime`` / ``talkTime``), now and then a NUL inside a note.  ``callDateTime``
falls in Q1 2026 (2026-01-01 to 2026-03-31 UTC): a stable hash of the id, uniform over the
quarter, except for chain members (below).  85% of calls embed a customer (pool of 500,
``cus-00000`` .. ``cus-00499``), 95% an operator (pool of 40, ``op-000`` .. ``op-039``), 70% a
scenario (``scn-01`` .. ``scn-12``).

Customers and operators change over time
----------------------------------------
Each customer and operator has a history of versions (:func:`customer_versions`,
:func:`operator_versions`), dated by ``updatedDateTime``.  Each is created between 2024-01-01
and 2025-08-23 (``createdDateTime``); version 0 is dated at creation or at some later edit, but
always before the quarter.  About 30% of customers and of operators (drawn from a generator
seeded with ``(seed, id)``; with seed 0, 163 of 500 customers and 13 of 40 operators) then
change one, two or three times (45/35/20%) at distinct seconds inside the quarter; the others
never change.  Each change alters at least one attribute:

* a customer moves to another department of its organisation (a private customer joins an
  organisation instead), changes organisation (the old department goes, the new one may have
  none), gains a phone number (at most 5), has a number replaced, changes family name (and its
  kana), or gets another note;
* an operator moves to another call-centre department, changes family name (``name``,
  ``nameKana``, ``shortName``, ``shortNameKana``), or gets another voice id.

Given names, ``createdDateTime`` and ``customerId`` / ``operatorId`` never change.  A call
embeds the newest version whose ``updatedDateTime`` is at or before its ``callDateTime``, so
the version delivered depends on when the call was made, and calls made at different times
can carry different versions of one customer.  One version is always the same object, whatever
the call, except for its offsets (``+09:00`` or ``Z``, fixed per version) and, for operators,
the call's voice-id quirks.

Call chains
-----------
``relatedCallId`` links a call to the call it derives from, always an earlier one (smaller
``callDateTime``), so following the links always ends; :func:`related_chain` lists the ids a
call reaches.  Only ids of the numbered family ``call-<digits>`` (``call-000123``,
``call-7``) start chains; others (scripted ids, ``same-0001``...) carry no ``relatedCallId``.
For a ``call-<digits>`` id, a hash of ``(seed, id)`` decides:

* 67%: no ``relatedCallId``.
* 5% (15% of the rest): an earlier call of the same family, ``call-<m>`` with ``m`` 1 to 400
  below ``<digits>`` (same width, zero-padded), made earlier and with a chain of its own at
  most 5 long (the first of 16 tries that qualifies; if none does, a chain as below).  Such a
  link often lies inside an ids file of consecutive ids; ~3% of those ids do not exist.
* 28%: a chain ``call-r<digits>-1`` -> ``call-r<digits>-2`` -> ... -> ``call-r<digits>-L``
  (``L`` 1 to 6, weights 35/25/17/11/7/5), ids outside any ids file of ``call-<digits>``.  Each
  member is earlier than the one before by 10 minutes to 30 days (half within a day); members
  that would fall before the quarter are cut off, and a chain left empty means no
  ``relatedCallId``.  A chain's calls share the root's customer (a different version, maybe)
  and ``phoneNumber``: one customer's story; operators, notes and the rest are their own.

Each chain member answers 404 with probability 5% (a deleted call): the member before it still
points at it, so "referenced but does not exist" occurs, and following stops there (the
members after it still exist, unreached).  Any other ``call-r<digits>-<digits>`` id (beyond
its chain's length, of a root without a chain, or an alias such as ``-01``) does not exist
either (404).  The chain is decided by the root id alone, so it exists even when the root is
one of the ~3% of missing ids.  Following links from any call reaches at most 6 ids, whatever
the mix of forms.  With seed 0, over ``call-000001`` .. ``call-002000``: 32% of the served
calls carry a ``relatedCallId``, 15% of those links point inside the range, and 5% of the
distinct linked ids answer 404.
"""

from __future__ import annotations

import hashlib
import random
import re
import time
from bisect import bisect_right
from functools import lru_cache
from typing import Any, NamedTuple

from .data import (
    CALL_CENTER_DEPTS,
    CALL_CENTER_ORG,
    CHECKPOINTS,
    CUSTOMER_NOTES,
    DEPTS,
    FAMILY,
    MIDDLE,
    NOTES,
    ORGS,
    PERSONAL,
)
from .faults import NEVER_SERVED, classify

# Share of ordinary ids that do not exist (404 on every request).
_MISSING_PER_MILLE = 30

_CUSTOMER_POOL = 500
_OPERATOR_POOL = 40
_SCENARIO_POOL = 12

# Calls fall in Q1 2026.  Customers and operators are created well before (2024-01-01 to
# 2025-08-23), and their first version predates the quarter, so every call finds a version.
_CALLS_START = 1767225600  # 2026-01-01T00:00:00Z
_CALLS_SPAN_S = 90 * 86400
_ENTITIES_START = 1704067200  # 2024-01-01T00:00:00Z
_ENTITIES_SPAN_S = 600 * 86400
_JST_OFFSET_S = 9 * 3600

# Share of customers, and of operators, that change during the quarter, and how often.
_CHANGING_PERCENT = 30
_CHANGE_COUNTS = (1, 2, 3)
_CHANGE_COUNT_WEIGHTS = (45, 35, 20)
_CUSTOMER_CHANGES = ("dept", "org", "phone_added", "phone_changed", "family_name", "note")
_CUSTOMER_CHANGE_WEIGHTS = (30, 10, 25, 10, 10, 15)
_OPERATOR_CHANGES = ("dept", "renamed", "voice")
_OPERATOR_CHANGE_WEIGHTS = (45, 25, 30)
_MAX_PHONES = 5  # the API doc: phoneNumbers[] (0..5)

# Related calls (module docstring, "Call chains").
# ASCII digits only ([0-9], not \d): "call-١" is not another spelling of "call-1".
_MAIN_RE = re.compile(r"call-([0-9]+)")  # fullmatch
_RELATED_RE = re.compile(r"call-r([0-9]+)-([1-9][0-9]*)")  # fullmatch; no "-01" alias of "-1"
# The whole family (aliases such as "-01" included): what is not a member answers 404.
_RELATED_FAMILY_RE = re.compile(r"call-r[0-9]+-[0-9]+")  # fullmatch
_RELATED_PERCENT = 33  # a few of these lose their chain to the start of the quarter
_IN_FAMILY_PERCENT = 15
_IN_FAMILY_REACH = 400
_CHAIN_LENGTHS = (1, 2, 3, 4, 5, 6)
_CHAIN_LENGTH_WEIGHTS = (35, 25, 17, 11, 7, 5)
_MAX_CHAIN = 6
_DELETED_PERCENT = 5

# Key order of the objects a call embeds, as in the vendor's example.
_ORG_KEYS = (
    "orgName",
    "orgNameKana",
    "orgShortName",
    "orgShortNameKana",
    "deptName",
    "deptNameKana",
    "deptShortName",
    "deptShortNameKana",
)
_CUSTOMER_KEYS = (
    "familyName",
    "familyNameKana",
    "personalName",
    "personalNameKana",
    "middleName",
    "middleNameKana",
    *_ORG_KEYS,
)
_OPERATOR_KEYS = ("name", "nameKana", "shortName", "shortNameKana", *_ORG_KEYS)


def _stable_int(*parts: object) -> int:
    """64-bit hash of ``parts`` that, unlike ``hash()``, is the same in every process."""
    key = "\x1f".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big")


def _fmt_ts(epoch_s: int, jst: bool) -> str:
    """ISO 8601 at seconds precision, either in JST (+09:00) or UTC (Z), as the vendor mixes."""
    if jst:
        return time.strftime("%Y-%m-%dT%H:%M:%S+09:00", time.gmtime(epoch_s + _JST_OFFSET_S))
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch_s))


# -- customers and operators: dated versions -------------------------------------------------


class _Version(NamedTuple):
    updated: int  # updatedDateTime, epoch seconds
    attrs: dict[str, Any]  # shared through lru_cache: never mutated, copied into payloads


class _History(NamedTuple):
    created: int  # createdDateTime, epoch seconds
    versions: tuple[_Version, ...]  # oldest first, updated strictly increasing

    def at(self, when: int) -> int:
        """Index of the newest version updated at or before ``when``.  Version 0 predates the
        quarter and calls fall inside it, so one always qualifies."""
        return bisect_right(self.versions, when, key=lambda v: v.updated) - 1


def _first_update(rng: random.Random, created: int) -> int:
    """updatedDateTime of version 0: some entities were never edited after creation, the others
    last some time before the quarter (edits the calls cannot show, so they are not versions)."""
    if rng.random() < 0.3:
        return created
    return created + rng.randrange(_CALLS_START - created)


def _change_times(rng: random.Random) -> list[int]:
    """When an entity changes during the quarter: never for most, at one to three distinct
    seconds for ``_CHANGING_PERCENT`` % of them."""
    if rng.randrange(100) >= _CHANGING_PERCENT:
        return []
    count = rng.choices(_CHANGE_COUNTS, _CHANGE_COUNT_WEIGHTS)[0]
    return sorted(_CALLS_START + s for s in rng.sample(range(_CALLS_SPAN_S), count))


def _other(rng: random.Random, options: tuple[Any, ...], current: object) -> Any:
    """A random option whose name (first element, or the option itself for strings) is not
    ``current``, so a change always changes the value."""
    return rng.choice([o for o in options if (o if isinstance(o, str) else o[0]) != current])


def _new_phone(rng: random.Random, held: tuple[str, ...]) -> str:
    while (number := _phone(rng)) in held:
        pass
    return number


def _move_dept(
    rng: random.Random, attrs: dict[str, Any], depts: tuple[Any, ...], short_share: float
) -> None:
    """Put ``attrs`` in another department of ``depts``; its short name may or may not be
    registered (absent, not null, when not)."""
    dept, dept_kana, dept_short, dept_short_kana = _other(rng, depts, attrs.get("deptName"))
    attrs.update(deptName=dept, deptNameKana=dept_kana)
    attrs.pop("deptShortName", None)
    attrs.pop("deptShortNameKana", None)
    if rng.random() < short_share:
        attrs.update(deptShortName=dept_short, deptShortNameKana=dept_short_kana)


def _join_org(rng: random.Random, attrs: dict[str, Any]) -> None:
    """Move a customer to another organisation (or give one to a private customer): the
    department of the old one goes, the new one may come with one."""
    org, org_kana, org_short, org_short_kana = _other(rng, ORGS, attrs.get("orgName"))
    for key in _ORG_KEYS:
        attrs.pop(key, None)
    attrs.update(orgName=org, orgNameKana=org_kana)
    if rng.random() < 0.7:
        attrs.update(orgShortName=org_short, orgShortNameKana=org_short_kana)
    if rng.random() < 0.5:
        _move_dept(rng, attrs, DEPTS, 0.5)


def _change_customer(rng: random.Random, attrs: dict[str, Any]) -> dict[str, Any]:
    """The next version's attributes: ``attrs`` with one kind of change applied."""
    new = dict(attrs)
    phones: tuple[str, ...] = new["phoneNumbers"]
    kind = rng.choices(_CUSTOMER_CHANGES, _CUSTOMER_CHANGE_WEIGHTS)[0]
    # Fall back to a change that is possible for this customer.
    if kind == "dept" and "orgName" not in new:
        kind = "org"  # a private customer cannot move department, only join an organisation
    if kind == "phone_changed" and not phones:
        kind = "phone_added"
    if kind == "phone_added" and len(phones) >= _MAX_PHONES:
        kind = "phone_changed"
    if kind == "dept":
        _move_dept(rng, new, DEPTS, 0.5)
    elif kind == "org":
        _join_org(rng, new)
    elif kind == "phone_added":
        new["phoneNumbers"] = (*phones, _new_phone(rng, phones))
    elif kind == "phone_changed":
        changed = list(phones)
        changed[rng.randrange(len(phones))] = _new_phone(rng, phones)
        new["phoneNumbers"] = tuple(changed)
    elif kind == "family_name":
        new["familyName"], new["familyNameKana"] = _other(rng, FAMILY, new["familyName"])
    else:  # note
        new["note"] = _other(rng, CUSTOMER_NOTES, new.get("note"))
    return new


@lru_cache(maxsize=2048)
def _customer_history(seed: int, customer_id: str) -> _History:
    """Every version of a customer, a pure function of (seed, customer id)."""
    rng = random.Random(f"{seed}:customer:{customer_id}")
    family, family_kana = rng.choice(FAMILY)
    personal, personal_kana = rng.choice(PERSONAL)
    attrs: dict[str, Any] = {
        "familyName": family,
        "familyNameKana": family_kana,
        "personalName": personal,
        "personalNameKana": personal_kana,
    }
    # Optional fields are absent (not null) for customers that lack them.
    if rng.random() < 0.08:
        attrs["middleName"], attrs["middleNameKana"] = rng.choice(MIDDLE)
    if rng.random() < 0.6:
        _join_org(rng, attrs)
    phones: tuple[str, ...] = ()
    for _ in range(rng.choices((0, 1, 2, 3), (15, 45, 25, 15))[0]):
        phones = (*phones, _new_phone(rng, phones))
    attrs["phoneNumbers"] = phones
    if rng.random() < 0.3:
        attrs["note"] = rng.choice(CUSTOMER_NOTES)
    created = _ENTITIES_START + rng.randrange(_ENTITIES_SPAN_S)
    versions = [_Version(_first_update(rng, created), attrs)]
    for when in _change_times(rng):
        versions.append(_Version(when, _change_customer(rng, versions[-1].attrs)))
    return _History(created, tuple(versions))


def _customer_snapshot(seed: int, customer_id: str, index: int) -> dict[str, Any]:
    """Version ``index`` of the customer as a call embeds it (a fresh object)."""
    history = _customer_history(seed, customer_id)
    version = history.versions[index]
    # The vendor mixes offsets; one version always comes in the same one.
    jst = _stable_int(seed, customer_id, index, "tz") % 2 == 0
    snap: dict[str, Any] = {
        "customerId": customer_id,
        "createdDateTime": _fmt_ts(history.created, jst),
        "updatedDateTime": _fmt_ts(version.updated, jst),
    }
    snap.update((key, version.attrs[key]) for key in _CUSTOMER_KEYS if key in version.attrs)
    snap["phoneNumbers"] = list(version.attrs["phoneNumbers"])
    if "note" in version.attrs:
        snap["note"] = version.attrs["note"]
    return snap


def _change_operator(rng: random.Random, attrs: dict[str, Any]) -> dict[str, Any]:
    """The next version's attributes: ``attrs`` with one kind of change applied."""
    new = dict(attrs)
    kind = rng.choices(_OPERATOR_CHANGES, _OPERATOR_CHANGE_WEIGHTS)[0]
    if kind == "dept":
        _move_dept(rng, new, CALL_CENTER_DEPTS, new["_deptShortShare"])
    elif kind == "renamed":
        family, family_kana = _other(rng, FAMILY, new["shortName"])
        personal, personal_kana = new["_personal"]
        new.update(
            name=f"{family} {personal}",
            nameKana=f"{family_kana} {personal_kana}",
            shortName=family,
            shortNameKana=family_kana,
        )
    else:  # voice
        new["_voice"] = rng.choice([v for v in range(1, 21) if v != new["_voice"]])
    return new


@lru_cache(maxsize=256)
def _operator_history(seed: int, operator_id: str) -> _History:
    """Every version of an operator, a pure function of (seed, operator id).  Keys starting
    with ``_`` are bookkeeping, not payload."""
    rng = random.Random(f"{seed}:operator:{operator_id}")
    family, family_kana = rng.choice(FAMILY)
    personal, personal_kana = rng.choice(PERSONAL)
    org, org_kana, org_short, org_short_kana = CALL_CENTER_ORG
    attrs: dict[str, Any] = {
        "name": f"{family} {personal}",
        "nameKana": f"{family_kana} {personal_kana}",
        "shortName": family,
        "shortNameKana": family_kana,
        "orgName": org,
        "orgNameKana": org_kana,
        "_personal": (personal, personal_kana),
        # Whether the departments' short names are filled in for this operator.
        "_deptShortShare": 1.0 if rng.random() < 0.7 else 0.0,
        "_voice": rng.randint(1, 20),
    }
    if rng.random() < 0.8:
        attrs.update(orgShortName=org_short, orgShortNameKana=org_short_kana)
    _move_dept(rng, attrs, CALL_CENTER_DEPTS, attrs["_deptShortShare"])
    created = _ENTITIES_START + rng.randrange(_ENTITIES_SPAN_S)
    versions = [_Version(_first_update(rng, created), attrs)]
    for when in _change_times(rng):
        versions.append(_Version(when, _change_operator(rng, versions[-1].attrs)))
    return _History(created, tuple(versions))


def _operator_snapshot(
    seed: int, operator_id: str, index: int, voice_as_str: bool, typo_key: bool
) -> dict[str, Any]:
    """Version ``index`` of the operator as a call embeds it (a fresh object); the voice id's
    type and key spelling are the call's quirks, not the version's."""
    history = _operator_history(seed, operator_id)
    version = history.versions[index]
    jst = _stable_int(seed, operator_id, index, "tz") % 2 == 0
    voice = version.attrs["_voice"]
    # The vendor misspells the key in some payloads; the value is the same either way.
    voice_key = "operatorVocieId" if typo_key else "operatorVoiceId"
    snap: dict[str, Any] = {
        "operatorId": operator_id,
        "createdDateTime": _fmt_ts(history.created, jst),
        "updatedDateTime": _fmt_ts(version.updated, jst),
        voice_key: str(voice) if voice_as_str else voice,
    }
    snap.update((key, version.attrs[key]) for key in _OPERATOR_KEYS if key in version.attrs)
    return snap


def customer_versions(customer_id: str, seed: int = 0) -> list[dict[str, Any]]:
    """Every version of a customer, oldest first, each as a call embeds it: the version a call
    carries is the newest whose ``updatedDateTime`` is at or before the call's
    ``callDateTime``.  Consecutive versions differ in at least one attribute besides
    ``updatedDateTime``.  Calls use ``cus-00000`` .. ``cus-00499``; any id has a history."""
    history = _customer_history(seed, customer_id)
    return [_customer_snapshot(seed, customer_id, i) for i in range(len(history.versions))]


def operator_versions(operator_id: str, seed: int = 0) -> list[dict[str, Any]]:
    """Every version of an operator, oldest first, like :func:`customer_versions`.  The voice
    id is given as an integer under ``operatorVoiceId``; a call may send it as a string or
    under ``operatorVocieId``.  Calls use ``op-000`` .. ``op-039``."""
    history = _operator_history(seed, operator_id)
    return [
        _operator_snapshot(seed, operator_id, i, voice_as_str=False, typo_key=False)
        for i in range(len(history.versions))
    ]


# -- call times and chains of related calls --------------------------------------------------


class _Plan(NamedTuple):
    """What a ``call-<digits>`` id relates to: an earlier call of its own family (``target``),
    or its chain ``call-r<digits>-1`` .. ``-L`` (their call times, newest first, and whether
    each was deleted), or nothing (all empty)."""

    target: str | None
    times: tuple[int, ...]
    deleted: tuple[bool, ...]


_NO_PLAN = _Plan(None, (), ())


def _gap(rng: random.Random) -> int:
    """Seconds back from a call to the call it relates to: mostly a callback the same day,
    sometimes days, now and then weeks."""
    band = rng.random()
    if band < 0.5:
        return rng.randint(10 * 60, 86400)
    if band < 0.85:
        return rng.randint(86400, 7 * 86400)
    return rng.randint(7 * 86400, 30 * 86400)


@lru_cache(maxsize=65536)
def _plan(root: str, seed: int) -> _Plan:
    """The related calls of ``root`` (see the module docstring); _NO_PLAN for ids outside the
    ``call-<digits>`` family.  Depends only on (seed, root), not on whether root exists."""
    m = _MAIN_RE.fullmatch(root)
    if m is None:
        return _NO_PLAN
    rng = random.Random(f"{seed}:related:{root}")
    if rng.randrange(100) >= _RELATED_PERCENT:
        return _NO_PLAN
    at = _call_time(root, seed)
    if rng.randrange(100) < _IN_FAMILY_PERCENT:
        digits = m.group(1)
        for _ in range(16):
            number = int(digits) - rng.randint(1, _IN_FAMILY_REACH)
            target = f"call-{number:0{len(digits)}d}"
            # Only earlier calls (so following links ends), and only if the whole chain stays
            # within _MAX_CHAIN.  The target's plan is another, earlier root's: no cycle.
            if (
                number >= 1
                and _call_time(target, seed) < at
                and len(_chain(target, seed)) < _MAX_CHAIN
            ):
                return _Plan(target, (), ())
    times: list[int] = []
    for _ in range(rng.choices(_CHAIN_LENGTHS, _CHAIN_LENGTH_WEIGHTS)[0]):
        at -= _gap(rng)
        if at < _CALLS_START:
            break  # the simulator serves no calls before the quarter: the chain ends earlier
        times.append(at)
    deleted = tuple(rng.randrange(100) < _DELETED_PERCENT for _ in times)
    return _Plan(None, tuple(times), deleted)


def _member(call_id: str, seed: int) -> tuple[str, int] | None:
    """``(root, k)`` when call_id is ``call-r<digits>-<k>`` and ``call-<digits>`` has a chain of
    at least k calls; None otherwise (for such ids that no chain has too)."""
    m = _RELATED_RE.fullmatch(call_id)
    if m is None:
        return None
    root, k = f"call-{m.group(1)}", int(m.group(2))
    return (root, k) if k <= len(_plan(root, seed).times) else None


def _related_id(root: str, k: int) -> str:
    return f"call-r{root.removeprefix('call-')}-{k}"


def _call_time(call_id: str, seed: int) -> int:
    """callDateTime (epoch seconds): a chain member's from its chain, any other id's from a
    stable hash, uniform over the quarter."""
    member = _member(call_id, seed)
    if member is not None:
        root, k = member
        return _plan(root, seed).times[k - 1]
    return _CALLS_START + _stable_int(seed, call_id, "call-time") % _CALLS_SPAN_S


def _related_of(call_id: str, seed: int) -> str | None:
    """The relatedCallId the call carries, if any."""
    member = _member(call_id, seed)
    if member is not None:
        root, k = member
        return _related_id(root, k + 1) if k < len(_plan(root, seed).times) else None
    plan = _plan(call_id, seed)
    if plan.target is not None:
        return plan.target
    return _related_id(call_id, 1) if plan.times else None


@lru_cache(maxsize=65536)
def _chain(call_id: str, seed: int) -> tuple[str, ...]:
    """What following relatedCallId from call_id reaches (see related_chain)."""
    following = _related_of(call_id, seed)
    if following is None:
        return ()
    if is_missing(following, seed):
        return (following,)
    return (following, *_chain(following, seed))


def related_chain(call_id: str, seed: int = 0) -> list[str]:
    """The ids reached from ``call_id`` by following ``relatedCallId``, nearest first: the
    call's relatedCallId, that call's relatedCallId, and so on, each call earlier than the one
    before.  The last id may answer 404 (a deleted call, or a missing ``call-<digits>``):
    following stops there.  ``[]`` when the call carries no relatedCallId or is not served
    (404, or a scripted id).  At most ``_MAX_CHAIN`` (6) ids."""
    if classify(call_id)[0] != "ordinary" or is_missing(call_id, seed):
        return []
    return list(_chain(call_id, seed))


def _phone(rng: random.Random) -> str:
    """A Japanese landline or mobile number in one of the formats the vendor returns."""
    style = rng.randrange(3)
    if style == 0:
        return f"03{rng.randrange(10**8):08d}"
    if style == 1:
        return f"+81-90-{rng.randrange(10**4):04d}-{rng.randrange(10**4):04d}"
    return f"080{rng.randrange(10**8):08d}"


def _base_payload(call_id: str, seed: int, force_connected: bool = False) -> dict[str, Any]:
    """The normal call object for ``call_id`` (no 404 or prefix handling)."""
    rng = random.Random(f"{seed}:{call_id}")
    jst = rng.random() < 0.5
    call_type = rng.randrange(3)  # 0 incoming, 1 outgoing, 2 user call
    payload: dict[str, Any] = {
        "callId": call_id,
        "callType": str(call_type) if rng.random() < 0.5 else call_type,
    }
    related = _related_of(call_id, seed)
    if related is not None:
        payload["relatedCallId"] = related
    # A chain is one customer's story: its calls share the root's customer and line.
    member = _member(call_id, seed)
    thread = member[0] if member is not None else call_id
    payload["phoneNumber"] = _phone(random.Random(f"{seed}:phone:{thread}"))
    call_at = _call_time(call_id, seed)
    payload["callDateTime"] = _fmt_ts(call_at, jst)
    # These draws once decided relatedCallId, phoneNumber and callDateTime (now the chain's,
    # the thread's and the hash's).  They are still made so that every field drawn after
    # them (connection, talk time, notes and their NULs, quirks) keeps its value for every
    # id: tests and benchmarks pick ids by those.
    if rng.random() < 0.2:
        rng.randrange(10**6)
    _phone(rng)
    rng.randrange(_CALLS_SPAN_S)
    connected = force_connected or rng.random() >= 0.2
    if connected:
        # Not-connected calls lack these keys entirely (the vendor omits rather than nulls).
        payload["connectedDateTime"] = _fmt_ts(call_at + rng.randint(3, 40), jst)
        talk = rng.randint(0, 1800)
        payload["talkTime"] = str(talk) if rng.random() < 0.5 else talk
        payload["connectResult"] = "0"
    else:
        payload["connectResult"] = rng.choice(("1", "2", "3"))
    if rng.random() < 0.5:
        payload["checkPoint"] = rng.choice(CHECKPOINTS)
    has_nul = rng.random() < 0.02
    if has_nul or rng.random() < 0.7:
        note = rng.choice(NOTES)
        if has_nul:
            # Some vendor notes carry a NUL, which PostgreSQL text columns reject.
            note = f"{note}\x00{rng.choice(NOTES)}"
        payload["note"] = note
    has_customer = _stable_int(seed, thread, "has-customer") % 100 >= 15
    rng.random()  # decided has_customer once (see above); the thread's hash decides now
    if has_customer:
        cid = f"cus-{_stable_int(seed, thread, 'customer') % _CUSTOMER_POOL:05d}"
        index = _customer_history(seed, cid).at(call_at)
        payload["customer"] = _customer_snapshot(seed, cid, index)
    if rng.random() >= 0.05:
        oid = f"op-{_stable_int(seed, call_id, 'operator') % _OPERATOR_POOL:03d}"
        index = _operator_history(seed, oid).at(call_at)
        voice_as_str = rng.random() < 0.5
        typo_key = rng.random() < 0.5
        payload["operator"] = _operator_snapshot(seed, oid, index, voice_as_str, typo_key)
    if rng.random() >= 0.3:
        scenario = _stable_int(seed, call_id, "scenario") % _SCENARIO_POOL + 1
        payload["scenario"] = {"scenarioId": f"scn-{scenario:02d}"}
    return payload


def is_missing(call_id: str, seed: int) -> bool:
    """Whether an ordinary id answers 404: a ``call-r<digits>-<digits>`` id that is no chain's
    member or was deleted, or one of the ~3% of other ids that do not exist."""
    if _RELATED_FAMILY_RE.fullmatch(call_id):
        member = _member(call_id, seed)
        if member is None:
            return True
        root, k = member
        return _plan(root, seed).deleted[k - 1]
    return _stable_int(seed, call_id, "missing") % 1000 < _MISSING_PER_MILLE


def payload_for(call_id: str, seed: int = 0) -> dict | None:
    """The call object the simulator serves for call_id (pure, deterministic in (seed, call_id));
    None when the id is one the simulator answers with 404.

    For scripted ids this is what the id eventually serves: ``None`` for ``nf-``, ``broken-``,
    ``badjson-``, ``array-``, ``bomb-``, ``huge-``, ``endless-`` and ``escape-`` ids (they
    never serve a call object), the modified object for ``wrongid-``, ``nocallid-``,
    ``poison-`` and ``bigint-`` ids.  A fresh dict is returned on every call, so callers may
    mutate it.
    """
    kind, _ = classify(call_id)
    if kind in NEVER_SERVED:
        return None
    if kind == "ordinary":
        return None if is_missing(call_id, seed) else _base_payload(call_id, seed)
    if kind in ("poison", "bigint"):
        # Force a connected call so the bad talkTime is actually present.
        payload = _base_payload(call_id, seed, force_connected=True)
        payload["talkTime"] = "not-a-number" if kind == "poison" else 2**40
        return payload
    payload = _base_payload(call_id, seed)
    if kind == "wrongid":
        payload["callId"] = "other-" + call_id
    elif kind == "nocallid":
        del payload["callId"]
    return payload
