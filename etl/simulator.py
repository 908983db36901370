"""Local stand-in for the commubo connect API (``GET {base}/v1/calls/{callId}``).

The real API is unreachable from development and CI, so every HTTP test, the demo and the
benchmarks talk to this simulator instead.  It serves deterministic call objects that reproduce
the vendor's documented quirks, and it can inject faults either at random (``fault_rate``) or
on a fixed script chosen by the shape of the call id.

Authentication
--------------
Every request must carry ``x-commubo-tenantId`` and ``x-commubo-accessToken`` equal to the
simulator's ``tenant_id`` / ``access_token`` (defaults :data:`DEFAULT_TENANT_ID` /
:data:`DEFAULT_ACCESS_TOKEN`); otherwise the answer is ``403``.  Auth is checked before any
fault script.  Any path other than ``/v1/calls/{callId}`` (or a method other than GET) gets
``404 {"error": "not found"}``.  The call id is URL-decoded (``%2F`` may appear inside it).

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

Hostile servers
---------------
The streaming kinds (``trickle``, ``trickleb``, ``huge``, ``endless``) never hold a whole body
in memory, end quietly as soon as a write fails (the client hung up), and wait between bytes on
an event that :meth:`Simulator.stop` and :meth:`Simulator.refuse_connections` set, so no handler
thread outlives the simulator.  The ``bomb`` body is compressed once per ``bomb_bytes``, on
first use.  :meth:`Simulator.handler_threads` lists the threads still serving connections.

``Simulator(refuse=True)``, or :meth:`Simulator.refuse_connections` on a running simulator,
plays a dead API: the port stays bound by a socket that never listens, so the kernel answers
every connection attempt with RST (``ECONNREFUSED``), while :attr:`Simulator.url` stays the
same.  Switching hangs up the open connections.  :meth:`Simulator.stop` releases the port in
either mode.

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

Per-id counters (:meth:`Simulator.requests_for`) count every request addressed to
``/v1/calls/{callId}``, including ones rejected with 403.

Rate limit
----------
``Simulator(rate_limit=R)`` (``etl simulate --rate-limit R``; 0, the default, means none) plays
an API that allows ``R`` requests per second: a token bucket shared by every connection, that
refills at ``R`` tokens a second up to its capacity ``burst`` (default ``max(1, R / 10)``: a
tenth of a second's worth, so a client may run ahead of the rate for a moment but not for
long), and starts full.  Every request takes a token on arrival, before anything else is
looked at (auth, the path, fault scripts).  One that finds no token is answered ``429`` with
``{"error": "too many requests"}`` and ``Retry-After: <s>``: the seconds until a token is
free, rounded up to a whole second and at least 1 (HTTP's delta-seconds are integers, so at
300 requests/s this is coarse, 1 s where 4 ms would do: a client should honour it for the
request that got it and slow its other requests down by itself).  Such a request takes no
token, is answered after ``latency_ms`` like every answer, counts in
:attr:`Simulator.total_requests` but not in :meth:`Simulator.requests_for` (it never reached
the API behind the limit: fault scripts and random faults do not see it).

:meth:`Simulator.stats` (and ``GET /_stats``: JSON, no headers needed, neither counted nor
rate-limited nor delayed) tells the requests received, how many the rate limit answered with
429, and a series per second since the first request (``requests``, ``ok``: 200 with a call,
``not_found``: 404 for a call id, ``rate_limited``), for benchmarks to draw throughput and 429s
over time.  :meth:`Simulator.reset_counts` zeroes it and fills the bucket again.

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

import contextlib
import hashlib
import json
import math
import random
import re
import socket
import struct
import sys
import threading
import time
import zlib
from bisect import bisect_right
from collections.abc import Iterator
from email.utils import formatdate
from functools import lru_cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, NamedTuple
from urllib.parse import unquote, urlsplit

__all__ = [
    "DEFAULT_ACCESS_TOKEN",
    "DEFAULT_TENANT_ID",
    "ESCAPE_BODY",
    "ESCAPE_REASON",
    "Simulator",
    "customer_versions",
    "operator_versions",
    "payload_for",
    "related_chain",
]

DEFAULT_TENANT_ID = "demo-tenant"
DEFAULT_ACCESS_TOKEN = "demo-token"

_CALLS_PREFIX = "/v1/calls/"

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
_NEVER_SERVED = ("nf", "broken", "badjson", "array", "bomb", "huge", "endless", "escape")
RANDOM_FAULTS = ("e500", "e502", "e503", "e429s", "e429d", "reset", "cut")


def random_fault(seed: int, call_id: str, attempt: int, fault_rate: float) -> str | None:
    """The fault (a kind of RANDOM_FAULTS) the simulator serves for request `attempt` (0-based)
    of an ordinary id at `fault_rate`, or None for the normal answer. Deterministic, so that
    reports and tests can tell in advance which ids fail every attempt."""
    rng = random.Random(f"{seed}:{call_id}:{attempt}")
    return rng.choice(RANDOM_FAULTS) if rng.random() < fault_rate else None

# Hostile bodies are made of a JSON-looking prefix and then spaces, produced in blocks of this
# size, so neither the 300 MiB the bomb inflates to nor a huge/endless body is ever in memory.
_BLOCK = 64 * 1024
_SPACES = b" " * _BLOCK
_BOMB_PREFIX = b'{"callId": "bomb", "note": "'
_HUGE_PREFIX = b'{"callId": "huge", "note": "'
_ENDLESS_PREFIX = b'{"callId": "endless", "note": "'

# What an ``escape-`` id answers.  An OSC sequence that retitles the terminal, a CSI that clears
# the screen and a bare CR that makes the rest overwrite the line: a client that prints these
# unescaped lets the server rewrite the operator's terminal.  No LF (it would end the status
# line) and no whitespace at either end (http.client strips it from the reason).
ESCAPE_REASON = "Bad Request\x1b]0;pwned\x07\x1b[2J\rall calls synced OK"
# Raw control bytes, not JSON escapes: a server may send anything, and a client that prints the
# start of an error body must not pass them through.  (So the body is not valid JSON.)
ESCAPE_BODY = b'{"error": "bad request \x1b]0;pwned\x07\x1b[2J\rall calls synced OK"}'

_FAMILY = (
    ("佐藤", "サトウ"),
    ("鈴木", "スズキ"),
    ("高橋", "タカハシ"),
    ("田中", "タナカ"),
    ("伊藤", "イトウ"),
    ("渡辺", "ワタナベ"),
    ("山本", "ヤマモト"),
    ("中村", "ナカムラ"),
    ("小林", "コバヤシ"),
    ("加藤", "カトウ"),
    ("吉田", "ヨシダ"),
    ("山田", "ヤマダ"),
)
_PERSONAL = (
    ("太郎", "タロウ"),
    ("花子", "ハナコ"),
    ("健太", "ケンタ"),
    ("美咲", "ミサキ"),
    ("翔", "ショウ"),
    ("陽菜", "ヒナ"),
    ("大輔", "ダイスケ"),
    ("さくら", "サクラ"),
    ("拓也", "タクヤ"),
    ("結衣", "ユイ"),
)
_MIDDLE = (("マリア", "マリア"), ("ジョン", "ジョン"), ("アン", "アン"))
# (name, kana, short name, short kana)
_ORGS = (
    ("株式会社サンプル商事", "カブシキガイシャサンプル", "サンプル商事", "サンプル"),
    ("東京テスト工業株式会社", "トウキョウテストコウギョウ", "東京テスト", "トウキョウテスト"),
    ("合同会社みらい", "ゴウドウガイシャミライ", "みらい", "ミライ"),
    ("Acme Japan K.K.", "アクメジャパン", "Acme", "アクメ"),
    ("さくら不動産株式会社", "サクラフドウサン", "さくら不動産", "サクラ"),
)
_DEPTS = (
    ("営業部", "エイギョウブ", "営業", "エイギョウ"),
    ("総務部", "ソウムブ", "総務", "ソウム"),
    ("経理部", "ケイリブ", "経理", "ケイリ"),
    ("情報システム部", "ジョウホウシステムブ", "情シス", "ジョウシス"),
    ("カスタマーサポート部", "カスタマーサポートブ", "CS", "シーエス"),
)
_CALL_CENTER_ORG = ("コミューボ株式会社", "コミューボカブシキガイシャ", "コミューボ", "コミューボ")
_CALL_CENTER_DEPTS = (
    ("第一コールセンター", "ダイイチコールセンター", "第一CC", "ダイイチシーシー"),
    ("第二コールセンター", "ダイニコールセンター", "第二CC", "ダイニシーシー"),
    ("品質管理課", "ヒンシツカンリカ", "品管", "ヒンカン"),
    ("アウトバウンド課", "アウトバウンドカ", "OB", "オービー"),
)
_NOTES = (
    "折り返し希望",
    "契約内容の確認",
    "不在のため再架電",
    "請求書の再発行依頼",
    "Customer asked about the invoice",
    "Follow-up next week",
    "住所変更の連絡 / address change",
    "クレーム対応（エスカレーション済）",
)
_CHECKPOINTS = ("A", "B", "C", "1", "2", "済", "要折返し")
# A customer's own note (the customer record's, not a call's).
_CUSTOMER_NOTES = (
    "法人契約",
    "VIP対応",
    "午後の連絡を希望",
    "メール連絡不可",
    "English preferred",
    "請求先変更済",
    "担当者変更あり",
)
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


def _classify(call_id: str) -> tuple[str, int]:
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


def _move_dept(rng: random.Random, attrs: dict[str, Any], depts: tuple[Any, ...],
               short_share: float) -> None:
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
    org, org_kana, org_short, org_short_kana = _other(rng, _ORGS, attrs.get("orgName"))
    for key in _ORG_KEYS:
        attrs.pop(key, None)
    attrs.update(orgName=org, orgNameKana=org_kana)
    if rng.random() < 0.7:
        attrs.update(orgShortName=org_short, orgShortNameKana=org_short_kana)
    if rng.random() < 0.5:
        _move_dept(rng, attrs, _DEPTS, 0.5)


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
        _move_dept(rng, new, _DEPTS, 0.5)
    elif kind == "org":
        _join_org(rng, new)
    elif kind == "phone_added":
        new["phoneNumbers"] = (*phones, _new_phone(rng, phones))
    elif kind == "phone_changed":
        changed = list(phones)
        changed[rng.randrange(len(phones))] = _new_phone(rng, phones)
        new["phoneNumbers"] = tuple(changed)
    elif kind == "family_name":
        new["familyName"], new["familyNameKana"] = _other(rng, _FAMILY, new["familyName"])
    else:  # note
        new["note"] = _other(rng, _CUSTOMER_NOTES, new.get("note"))
    return new


@lru_cache(maxsize=2048)
def _customer_history(seed: int, customer_id: str) -> _History:
    """Every version of a customer, a pure function of (seed, customer id)."""
    rng = random.Random(f"{seed}:customer:{customer_id}")
    family, family_kana = rng.choice(_FAMILY)
    personal, personal_kana = rng.choice(_PERSONAL)
    attrs: dict[str, Any] = {
        "familyName": family,
        "familyNameKana": family_kana,
        "personalName": personal,
        "personalNameKana": personal_kana,
    }
    # Optional fields are absent (not null) for customers that lack them.
    if rng.random() < 0.08:
        attrs["middleName"], attrs["middleNameKana"] = rng.choice(_MIDDLE)
    if rng.random() < 0.6:
        _join_org(rng, attrs)
    phones: tuple[str, ...] = ()
    for _ in range(rng.choices((0, 1, 2, 3), (15, 45, 25, 15))[0]):
        phones = (*phones, _new_phone(rng, phones))
    attrs["phoneNumbers"] = phones
    if rng.random() < 0.3:
        attrs["note"] = rng.choice(_CUSTOMER_NOTES)
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
        _move_dept(rng, new, _CALL_CENTER_DEPTS, new["_deptShortShare"])
    elif kind == "renamed":
        family, family_kana = _other(rng, _FAMILY, new["shortName"])
        personal, personal_kana = new["_personal"]
        new.update(name=f"{family} {personal}", nameKana=f"{family_kana} {personal_kana}",
                   shortName=family, shortNameKana=family_kana)
    else:  # voice
        new["_voice"] = rng.choice([v for v in range(1, 21) if v != new["_voice"]])
    return new


@lru_cache(maxsize=256)
def _operator_history(seed: int, operator_id: str) -> _History:
    """Every version of an operator, a pure function of (seed, operator id).  Keys starting
    with ``_`` are bookkeeping, not payload."""
    rng = random.Random(f"{seed}:operator:{operator_id}")
    family, family_kana = rng.choice(_FAMILY)
    personal, personal_kana = rng.choice(_PERSONAL)
    org, org_kana, org_short, org_short_kana = _CALL_CENTER_ORG
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
    _move_dept(rng, attrs, _CALL_CENTER_DEPTS, attrs["_deptShortShare"])
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
            if (number >= 1 and _call_time(target, seed) < at
                    and len(_chain(target, seed)) < _MAX_CHAIN):
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
    if _is_missing(following, seed):
        return (following,)
    return (following, *_chain(following, seed))


def related_chain(call_id: str, seed: int = 0) -> list[str]:
    """The ids reached from ``call_id`` by following ``relatedCallId``, nearest first: the
    call's relatedCallId, that call's relatedCallId, and so on, each call earlier than the one
    before.  The last id may answer 404 (a deleted call, or a missing ``call-<digits>``):
    following stops there.  ``[]`` when the call carries no relatedCallId or is not served
    (404, or a scripted id).  At most ``_MAX_CHAIN`` (6) ids."""
    if _classify(call_id)[0] != "ordinary" or _is_missing(call_id, seed):
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
        payload["checkPoint"] = rng.choice(_CHECKPOINTS)
    has_nul = rng.random() < 0.02
    if has_nul or rng.random() < 0.7:
        note = rng.choice(_NOTES)
        if has_nul:
            # Some vendor notes carry a NUL, which PostgreSQL text columns reject.
            note = f"{note}\x00{rng.choice(_NOTES)}"
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


def _is_missing(call_id: str, seed: int) -> bool:
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
    kind, _ = _classify(call_id)
    if kind in _NEVER_SERVED:
        return None
    if kind == "ordinary":
        return None if _is_missing(call_id, seed) else _base_payload(call_id, seed)
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


def _json_bytes(obj: object) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode()


_NOT_FOUND = _json_bytes({"error": "not found"})
_FORBIDDEN = _json_bytes({"error": "forbidden", "message": "invalid tenant id or access token"})
_RATE_LIMITED = _json_bytes({"error": "too many requests"})
# Counters for benchmarks (Simulator.stats); not an API path, so no call id can collide.
_STATS_PATH = "/_stats"


class _TokenBucket:
    """``rate`` tokens a second up to ``capacity``, starting full (the caller locks)."""

    __slots__ = ("_rate", "_capacity", "_tokens", "_at")

    def __init__(self, rate: float, capacity: float) -> None:
        self._rate = rate
        self._capacity = capacity
        self._tokens = capacity
        self._at: float | None = None

    def take(self, now: float) -> float | None:
        """Take a token: None when there was one, else the seconds until there is one (and
        nothing is taken)."""
        if self._at is not None:
            self._tokens = min(self._capacity, self._tokens + (now - self._at) * self._rate)
        self._at = now
        if self._tokens >= 1:
            self._tokens -= 1
            return None
        return (1 - self._tokens) / self._rate


class _Series:
    """Counts per whole second since the first event (the caller locks)."""

    KINDS = ("requests", "ok", "not_found", "rate_limited")

    def __init__(self) -> None:
        self._start: float | None = None
        self._rows: list[dict[str, int]] = []

    def add(self, kind: str) -> None:
        now = time.monotonic()
        if self._start is None:
            self._start = now
        second = int(now - self._start)
        while len(self._rows) <= second:
            self._rows.append({"s": len(self._rows), **dict.fromkeys(self.KINDS, 0)})
        self._rows[second][kind] += 1

    def rows(self) -> list[dict[str, int]]:
        return [dict(r) for r in self._rows]
_STATUS_BODIES = {
    500: _json_bytes({"error": "internal server error"}),
    502: _json_bytes({"error": "bad gateway"}),
    503: _json_bytes({"error": "service unavailable"}),
}
_BAD_JSON = b"<html>oops</html>"


def _filler(prefix: bytes, total: int | None) -> Iterator[bytes]:
    """``total`` bytes (forever if None) in blocks of at most ``_BLOCK``: ``prefix``, then
    spaces.  The blocks are shared constants, so streaming them allocates nothing per block."""
    chunk = (prefix + _SPACES)[:_BLOCK]
    left = total
    while left is None or left > 0:
        if left is not None:
            chunk = chunk[:left]  # a no-op slice (same object) unless this is the last block
            left -= len(chunk)
        yield chunk
        chunk = _SPACES


# Serialises the first build of a bomb, so concurrent first requests don't each burn a core on it.
_BOMB_LOCK = threading.Lock()


@lru_cache(maxsize=4)
def _gzip_bomb(size: int) -> bytes:
    """gzip of ``size`` bytes of ``_BOMB_PREFIX`` and spaces, compressed block by block.

    Deflate tops out near 1032:1, so the default 300 MiB comes to 305,809 bytes.  Measured on
    the 2-core AMD EPYC dev box (Python 3.11): 0.85 s for 300 MiB at level 9 (levels 6 and 9
    give the same size and time; level 1 is 0.36 s but 4.5 times larger), about 2.8 ms per MiB.
    Hence lazily, once per size, and under ``_BOMB_LOCK``.
    """
    # wbits 31 = gzip container; its header carries mtime 0, so the bytes are deterministic.
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    parts = [compressor.compress(block) for block in _filler(_BOMB_PREFIX, size)]
    parts.append(compressor.flush())
    return b"".join(parts)


class _Handler(BaseHTTPRequestHandler):
    """Per-connection request handler; all decisions live in :meth:`Simulator._respond`."""

    protocol_version = "HTTP/1.1"  # keep-alive, so pooled clients reuse connections
    server_version = "commubo-sim/1.0"
    # Headers and body go out in separate sends; without NODELAY, Nagle + delayed ACK can
    # add ~40 ms to every keep-alive response.
    disable_nagle_algorithm = True
    server: _Server

    def version_string(self) -> str:
        """The Server header: just the simulator name (no Python version)."""
        return self.server_version

    def log_message(self, format: str, *args: Any) -> None:
        """Silence the default one-line-per-request stderr log."""

    def do_GET(self) -> None:
        self.server.sim._respond(self)

    def _other_method(self) -> None:
        # Drain any body so a keep-alive connection stays in sync, then refuse.
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        self.server.sim._count(None)
        self.send_body(404, _NOT_FOUND)

    do_POST = do_PUT = do_PATCH = do_DELETE = _other_method

    def send_body(
        self,
        status: int,
        body: bytes,
        headers: tuple[tuple[str, str], ...] = (),
        *,
        truncate: bool = False,
        reason: str | None = None,
    ) -> None:
        """Send a complete response; with ``truncate`` send half the body and hang up.

        ``reason`` replaces the standard reason phrase; send_response writes it as given
        (latin-1), control characters included.
        """
        self.send_response(status, reason)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers:
            self.send_header(name, value)
        if truncate:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body[: len(body) // 2] if truncate else body)

    def head_bytes(self, status: int, headers: tuple[tuple[str, str], ...]) -> bytes:
        """Status line and headers as send_response/send_header would write them, for callers
        that must send them piecemeal (trickle) instead of in one go."""
        lines = [
            f"{self.protocol_version} {status} {self.responses[status][0]}",
            f"Server: {self.version_string()}",
            f"Date: {self.date_time_string()}",
            *(f"{name}: {value}" for name, value in headers),
        ]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def send_raw(self, data: bytes) -> bool:
        """Write ``data``; False (and the connection marked for closing) if the client is gone.

        A hostile stream runs until the client hangs up, so a failed write is the normal end,
        not an error worth a traceback.
        """
        try:
            self.wfile.write(data)
        except OSError:
            self.close_connection = True
            return False
        return True

    def reset_connection(self) -> None:
        """Abort the connection with a TCP RST instead of answering."""
        self.close_connection = True
        sock = self.connection
        try:
            # Linger on with timeout 0 makes close() send RST rather than FIN.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            # rfile holds a reference to the socket; the fd is only really closed (and the
            # RST sent) once both are closed.  socketserver's later shutdown/close on the
            # already-closed socket is harmless (it swallows OSError).
            sock.close()
            self.rfile.close()
        except OSError:
            pass


class _Server(ThreadingHTTPServer):
    """Threaded HTTP server that tracks open connections so stop() can hang them up."""

    daemon_threads = True
    allow_reuse_address = True
    # The listen backlog. socketserver's 5 drops the handshakes of a client that opens tens
    # of connections at once (a sync's pool), and each dropped one costs that request a 1 s
    # retransmission: an artefact of the simulator, not of the API or the client.
    request_queue_size = 1024
    # ThreadingMixIn would otherwise join every handler thread on server_close(), which
    # blocks for as long as any client keeps an idle keep-alive connection open.
    block_on_close = False

    def __init__(self, address: tuple[str, int], sim: Simulator, *, listen: bool = True) -> None:
        self.sim = sim
        self._conns: set[socket.socket] = set()
        # Not "_threads": ThreadingMixIn uses that name for its own (here unused) bookkeeping.
        self._handlers: set[threading.Thread] = set()
        self._conns_lock = threading.Lock()
        super().__init__(address, _Handler, bind_and_activate=False)
        try:
            self.server_bind()
            if listen:
                self.server_activate()
            else:
                _reserve(self.socket)
        except BaseException:
            self.server_close()
            raise

    def process_request(self, request: Any, client_address: Any) -> None:
        # ThreadingMixIn.process_request, but keeping the thread so handler_threads() can list
        # it; registered before start() so it is visible as soon as the connection is accepted.
        thread = threading.Thread(
            target=self.process_request_thread,
            args=(request, client_address),
            name=f"commubo-sim-{self.server_address[1]}-conn",
            daemon=True,
        )
        with self._conns_lock:
            self._conns.add(request)
            self._handlers.add(thread)
        thread.start()

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._conns_lock:
                self._handlers.discard(threading.current_thread())

    def handler_threads(self) -> list[threading.Thread]:
        with self._conns_lock:
            return [t for t in self._handlers if t.is_alive()]

    def shutdown_request(self, request: Any) -> None:
        with self._conns_lock:
            self._conns.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """Wake handler threads blocked on idle keep-alive connections so they exit."""
        with self._conns_lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                # Also wakes a handler blocked in sendall() to a client that stopped reading.
                conn.shutdown(socket.SHUT_RDWR)

    def join_handlers(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds in all for the handler threads to end."""
        deadline = time.monotonic() + timeout
        for thread in self.handler_threads():
            thread.join(max(0.0, deadline - time.monotonic()))

    def stop_listening(self) -> None:
        """Swap the listening socket for one bound to the same address that never listens."""
        address = self.server_address[:2]
        self.socket.close()
        # A listening socket cannot be turned back portably (Linux's shutdown(SHUT_RD) can), so
        # close and rebind at once: another process would have to bind this very port within
        # microseconds to take it.  SO_REUSEADDR lets the bind past the TIME_WAIT left by the
        # connections we just hung up.
        sock = socket.socket(self.address_family, self.socket_type)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            _reserve(sock)
        except BaseException:
            sock.close()
            raise
        self.socket = sock

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients hanging up (timeouts, our own resets) are expected; don't print tracebacks.
        exc = sys.exc_info()[1]
        if isinstance(exc, (OSError, ValueError)):
            return
        super().handle_error(request, client_address)


def _reserve(sock: socket.socket) -> None:
    """Keep a bound, never-listening socket's port to ourselves.

    Clearing SO_REUSEADDR after bind() matters: with it set on both sides, Linux lets another
    SO_REUSEADDR socket (another Simulator, say) bind the port and listen on it.
    """
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 0)


def _check_loopback(host: str) -> None:
    if host != "localhost" and not host.startswith("127."):
        raise ValueError(f"the simulator only binds loopback addresses, not {host!r}")


class Simulator:
    """A local commubo connect API serving deterministic call objects and scripted faults.

    Binding happens in the constructor (port 0 picks a free port), so :attr:`url` and
    :attr:`port` are valid before :meth:`start`.  See the module docstring for the id grammar,
    the hostile-server kinds, the refusing mode (``refuse``) and the rate limit (``rate_limit``
    requests/s, a bucket of ``burst`` tokens; :meth:`stats`).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        latency_ms: float = 0,
        fault_rate: float = 0.0,
        seed: int = 0,
        tenant_id: str = DEFAULT_TENANT_ID,
        access_token: str = DEFAULT_ACCESS_TOKEN,
        slow_s: float = 2.0,
        retry_after_s: int = 1,
        trickle_s: float = 1.0,
        bomb_bytes: int = 300 * 2**20,
        huge_bytes: int = 100 * 2**20,
        refuse: bool = False,
        rate_limit: float = 0.0,
        burst: float | None = None,
    ) -> None:
        _check_loopback(host)
        if not 0.0 <= fault_rate <= 1.0:
            raise ValueError("fault_rate must be between 0 and 1")
        if not (0.0 <= rate_limit < float("inf")):
            raise ValueError("rate_limit must be 0 (none) or a positive number of requests/s")
        if burst is not None and not (1.0 <= burst < float("inf")):
            raise ValueError("burst must be at least 1 token")
        if min(latency_ms, slow_s, retry_after_s, trickle_s, bomb_bytes, huge_bytes) < 0:
            raise ValueError(
                "latency_ms, slow_s, retry_after_s, trickle_s, bomb_bytes and huge_bytes "
                "must not be negative"
            )
        self.latency_ms = latency_ms
        self.fault_rate = fault_rate
        self.seed = seed
        self.tenant_id = tenant_id
        self.access_token = access_token
        self.slow_s = slow_s
        self.retry_after_s = retry_after_s
        self.trickle_s = trickle_s
        self.bomb_bytes = bomb_bytes
        self.huge_bytes = huge_bytes
        self._counts: dict[str, int] = {}
        self._total = 0
        self._lock = threading.Lock()
        self.rate_limit = rate_limit
        self.burst = (burst if burst is not None else max(1.0, rate_limit / 10)
                      ) if rate_limit else None
        self._bucket = _TokenBucket(rate_limit, self.burst) if rate_limit else None
        self._rate_limited = 0
        self._series = _Series()
        self._thread: threading.Thread | None = None
        # The thread running serve_forever() in the foreground (etl simulate), if any.
        self._foreground: threading.Thread | None = None
        self._closed = False
        self._refusing = refuse
        # stop() and refuse_connections() are not meant to race, but a Ctrl-C in the foreground
        # while another thread switches modes should not tear the server down twice at once.
        self._lifecycle = threading.Lock()
        # Set when open connections must end (stop or refuse): handlers wait on it instead of
        # sleeping, so a trickle, a slow answer or an endless body ends at once.
        self._hang_up = threading.Event()
        # Set by stop(); the foreground serve_forever() waits on it while refusing.
        self._stopped = threading.Event()
        # Bind now and read the port back, so port 0 has no window for another process.
        self._server = _Server((host, port), self, listen=not refuse)
        self.port: int = self._server.server_address[1]
        self.url: str = f"http://{self._server.server_address[0]}:{self.port}"

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> Simulator:
        """Serve in a daemon background thread and return self (no-op if already running, and
        while refusing connections: there is nothing to serve)."""
        if self._closed:
            raise RuntimeError("simulator was stopped; create a new one")
        if self._thread is None and not self._refusing:
            self._thread = threading.Thread(
                target=self._server.serve_forever,
                kwargs={"poll_interval": 0.05},
                name=f"commubo-sim-{self.port}",
                daemon=True,
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, hang up open connections, close the socket and join the threads.

        Works in either mode (serving or refusing) and releases the port.  Handler threads get
        up to a second in all to end; streaming ones are woken at once, so they need far less.
        """
        with self._lifecycle:
            if self._closed:
                return
            self._closed = True
            self._stopped.set()
            self._hang_up.set()
            self._halt_loop()
            self._server.close_connections()
            self._server.server_close()
            self._server.join_handlers(1.0)

    def refuse_connections(self) -> None:
        """Play a dead API from now on: stop serving, hang up open connections and keep the
        port bound by a socket that never listens, so connection attempts get ECONNREFUSED.

        :attr:`url` and :attr:`port` stay the same; :meth:`stop` releases the port.  A no-op
        if already refusing.
        """
        with self._lifecycle:
            if self._closed:
                raise RuntimeError("simulator was stopped; create a new one")
            if self._refusing:
                return
            self._refusing = True
            # Set for good: no connection arrives any more, so nothing needs it cleared.
            self._hang_up.set()
            self._halt_loop()
            self._server.close_connections()
            self._server.stop_listening()
            self._server.join_handlers(1.0)

    @property
    def refusing(self) -> bool:
        """Whether the simulator refuses connections (``refuse=True`` or refuse_connections())."""
        return self._refusing

    def handler_threads(self) -> list[threading.Thread]:
        """The threads still serving a connection (one per open connection)."""
        return self._server.handler_threads()

    def _halt_loop(self) -> None:
        """End the accept loop, background or foreground, and wait until it has."""
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
            self._thread = None
        elif self._foreground not in (None, threading.current_thread()):
            # shutdown() waits for serve_forever() to return, which it can only do if it runs
            # in another thread; BaseServer.shutdown() would block forever if no loop ran.
            self._server.shutdown()

    def serve_forever(self) -> None:
        """Serve in the foreground until Ctrl-C (used by the ``etl simulate`` command).

        While refusing connections (from the start or since refuse_connections()) it just
        keeps the port until Ctrl-C or stop().
        """
        if self._closed:
            raise RuntimeError("simulator was stopped; create a new one")
        try:
            if not self._refusing:
                self._foreground = threading.current_thread()
                self._server.serve_forever(poll_interval=0.2)
            # The loop returns on stop() or refuse_connections(); for the latter, hold the port.
            self._stopped.wait()
        except KeyboardInterrupt:
            pass
        finally:
            self._foreground = None
            self.stop()

    def __enter__(self) -> Simulator:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        limit = f", rate_limit={self.rate_limit:g}" if self.rate_limit else ""
        return (f"Simulator(url={self.url!r}, seed={self.seed}, fault_rate={self.fault_rate}"
                f"{limit})")

    # -- counters --------------------------------------------------------------------------

    def requests_for(self, call_id: str) -> int:
        """How many requests ``call_id`` has received (every outcome, 403s included)."""
        with self._lock:
            return self._counts.get(call_id, 0)

    @property
    def total_requests(self) -> int:
        """All requests received, whatever the path or outcome (403s and faults included)."""
        with self._lock:
            return self._total

    @property
    def rate_limited(self) -> int:
        """Requests the rate limit answered with 429 (not those of fault scripts)."""
        with self._lock:
            return self._rate_limited

    def stats(self) -> dict[str, Any]:
        """Counters for benchmarks (also ``GET /_stats``): the requests received, those the
        rate limit answered with 429, the limit and its burst, and one entry per second since
        the first request: ``{"s": 0, "requests": .., "ok": .., "not_found": ..,
        "rate_limited": ..}`` (``s``: whole seconds since the first request)."""
        with self._lock:
            return {
                "requests": self._total,
                "rate_limited": self._rate_limited,
                "rate_limit": self.rate_limit,
                "burst": self.burst,
                "per_second": self._series.rows(),
            }

    def reset_counts(self) -> None:
        """Zero all counters and the per-second series, and fill the rate limit's bucket
        again; scripted ids then start their fault scripts again."""
        with self._lock:
            self._counts.clear()
            self._total = 0
            self._rate_limited = 0
            self._series = _Series()
            if self._bucket is not None:
                self._bucket = _TokenBucket(self.rate_limit, self.burst)

    def _count(self, call_id: str | None) -> int:
        """Record one request; return how many this id had before it (its 0-based attempt)."""
        with self._lock:
            self._total += 1
            self._series.add("requests")
            if call_id is None:
                return 0
            attempt = self._counts.get(call_id, 0)
            self._counts[call_id] = attempt + 1
            return attempt

    def _over_limit(self) -> int | None:
        """Take a token for a request that just arrived; when there is none, count the
        request as received and rate-limited and return the Retry-After seconds."""
        if self._bucket is None:
            return None
        with self._lock:
            wait = self._bucket.take(time.monotonic())
            if wait is None:
                return None
            self._total += 1
            self._rate_limited += 1
            self._series.add("requests")
            self._series.add("rate_limited")
        return max(1, math.ceil(wait))

    def _tally(self, what: str) -> None:
        with self._lock:
            self._series.add(what)

    # -- request handling ------------------------------------------------------------------

    def _respond(self, h: _Handler) -> None:
        path = urlsplit(h.path).path
        if path == _STATS_PATH:
            h.send_body(200, json.dumps(self.stats()).encode())
            return
        retry_after = self._over_limit()
        if retry_after is not None:
            if self.latency_ms:
                self._hang_up.wait(self.latency_ms / 1000)
            h.send_body(429, _RATE_LIMITED, (("Retry-After", str(retry_after)),))
            return
        raw_id = path[len(_CALLS_PREFIX) :] if path.startswith(_CALLS_PREFIX) else ""
        call_id = unquote(raw_id) if raw_id and "/" not in raw_id else None
        attempt = self._count(call_id)

        if self.latency_ms:
            self._hang_up.wait(self.latency_ms / 1000)
        if (
            h.headers.get("x-commubo-tenantId") != self.tenant_id
            or h.headers.get("x-commubo-accessToken") != self.access_token
        ):
            h.send_body(403, _FORBIDDEN)
            return
        if call_id is None:
            h.send_body(404, _NOT_FOUND)
            return

        kind, n = _classify(call_id)
        if kind == "ordinary":
            if _is_missing(call_id, self.seed):
                self._tally("not_found")
                h.send_body(404, _NOT_FOUND)
                return
            fault = random_fault(self.seed, call_id, attempt, self.fault_rate)
            if fault is not None:
                body = _json_bytes(payload_for(call_id, self.seed)) if fault == "cut" else b""
                self._fault(h, fault, body)
                return
        elif kind == "slow":
            if attempt < n:
                self._hang_up.wait(self.slow_s)
        elif kind in ("trickle", "trickleb"):
            if attempt < n:
                self._trickle(h, call_id, whole=kind == "trickle")
                return
        elif kind in _NEVER_SERVED:
            self._fixed(h, kind)
            return
        elif attempt < n:
            # reset/cut need the real body (cut sends half of it); others ignore it.
            body = _json_bytes(payload_for(call_id, self.seed)) if kind == "cut" else b""
            self._fault(h, kind, body)
            return

        self._tally("ok")
        h.send_body(200, _json_bytes(payload_for(call_id, self.seed)))

    def _fixed(self, h: _Handler, kind: str) -> None:
        """Answer for the prefixes that behave the same on every request."""
        if kind == "nf":
            self._tally("not_found")
            h.send_body(404, _NOT_FOUND)
        elif kind == "broken":
            h.send_body(500, _STATUS_BODIES[500])
        elif kind == "badjson":
            h.send_body(200, _BAD_JSON)
        elif kind == "array":
            h.send_body(200, b"[]")
        elif kind == "bomb":
            with _BOMB_LOCK:
                body = _gzip_bomb(self.bomb_bytes)
            h.send_body(200, body, (("Content-Encoding", "gzip"),))
        elif kind == "huge":
            self._huge(h)
        elif kind == "endless":
            self._endless(h)
        else:  # escape
            h.send_body(400, ESCAPE_BODY, reason=ESCAPE_REASON)

    def _trickle(self, h: _Handler, call_id: str, *, whole: bool) -> None:
        """The normal response one byte every ``trickle_s``: all of it (``whole``), or the body
        only after the status line and headers went out at once."""
        body = _json_bytes(payload_for(call_id, self.seed))
        head = h.head_bytes(
            200, (("Content-Type", "application/json"), ("Content-Length", str(len(body))))
        )
        if whole:
            data = head + body
        else:
            if not h.send_raw(head):
                return
            data = body
            # The head went out; the first body byte waits like every later one.
            if self._hang_up.wait(self.trickle_s):
                h.close_connection = True
                return
        for i in range(len(data)):
            # Wait on the event, not time.sleep: stop() or refuse_connections() ends the
            # trickle at once instead of leaving the thread asleep for up to trickle_s.
            if i and self._hang_up.wait(self.trickle_s):
                h.close_connection = True
                return
            if not h.send_raw(data[i : i + 1]):
                return

    def _huge(self, h: _Handler) -> None:
        """200 announcing ``huge_bytes`` and streaming them, a block at a time."""
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(self.huge_bytes))
        h.end_headers()
        for block in _filler(_HUGE_PREFIX, self.huge_bytes):
            if self._hang_up.is_set():
                # The body is unfinished, so the connection cannot be reused.
                h.close_connection = True
                return
            if not h.send_raw(block):
                return

    def _endless(self, h: _Handler) -> None:
        """200 with a chunked body that never ends (until hang-up or stop)."""
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        for block in _filler(_ENDLESS_PREFIX, None):
            if self._hang_up.is_set():
                h.close_connection = True
                return
            if not h.send_raw(b"%x\r\n%b\r\n" % (len(block), block)):
                return

    def _fault(self, h: _Handler, kind: str, body: bytes) -> None:
        """Inject one fault of ``kind``; ``body`` is the payload a cut response truncates."""
        if kind == "reset":
            h.reset_connection()
        elif kind == "cut":
            h.send_body(200, body, truncate=True)
        elif kind == "e429s":
            h.send_body(429, _RATE_LIMITED, (("Retry-After", str(self.retry_after_s)),))
        elif kind == "e429d":
            when = formatdate(time.time() + self.retry_after_s, usegmt=True)
            h.send_body(429, _RATE_LIMITED, (("Retry-After", when),))
        else:  # e500 / e502 / e503
            h.send_body(int(kind[1:]), _STATUS_BODIES[int(kind[1:])])
