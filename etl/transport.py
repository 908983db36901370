"""One HTTP exchange with hard limits: a deadline for the whole exchange and a size cap on
the body, whatever the server sends.

requests' `timeout` bounds each socket operation, not the request: a server that sends one
byte a second never trips it. So every worker owns a `Slot` that records the connection its
request is using, and one `Watchdog` thread shuts down the socket of any request past its
deadline (and of every request when the run stops). The blocked read then fails at once and
the attempt counts as a timeout. The connection classes below only report themselves to the
slot of the thread using them; everything else is requests' and urllib3's own machinery.

The body is read from the raw stream in bounded pieces and decoded (gzip, deflate) with an
output limit, so neither a 100 MB body, an endless one nor a decompression bomb can take more
than `max_bytes` of memory.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import zlib
from collections.abc import Mapping

import urllib3
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

# How often the watchdog looks at the deadlines: the precision of the deadline.
WATCH_INTERVAL_S = 0.1
# Bodies of unknown length are read in pieces of this size.
_PIECE = 64 * 1024
# Content codings we ask for and decode within the cap; anything else fails the id.
ACCEPT_ENCODING = "gzip, deflate"


class DeadlineExceeded(Exception):
    """The exchange was cut off by the watchdog: past its deadline, or the run stopped."""


class BodyTooLarge(Exception):
    """The body (as received or decoded) is larger than the cap."""

    def __init__(self, limit: int, decoded: bool) -> None:
        super().__init__(f"response body larger than {limit:,} bytes"
                         + (" once decompressed" if decoded else ""))


class BodyCutShort(Exception):
    """The connection closed before the body announced by Content-Length was complete."""


class UndecodableBody(Exception):
    """A content coding we did not ask for, or a compressed body that does not decode."""


class Slot:
    """The request one worker thread has in flight: its deadline and its connection."""

    __slots__ = ("_lock", "deadline", "conn", "cut")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.deadline: float | None = None
        self.conn: HTTPConnection | None = None
        self.cut = False

    def begin(self, timeout_s: float) -> None:
        with self._lock:
            self.conn = None
            self.cut = False
            self.deadline = time.monotonic() + timeout_s

    def end(self) -> None:
        with self._lock:
            self.deadline = None
            self.conn = None

    def cut_off(self) -> None:
        """Shut the request's socket down: a read blocked on it returns at once."""
        with self._lock:
            if self.deadline is None:
                return
            self.cut = True
            sock = self.conn.sock if self.conn is not None else None
            if sock is not None:
                # The socket layer's shutdown, also for TLS sockets: SSLSocket.shutdown would
                # drop the TLS state under the reader's feet.
                with contextlib.suppress(OSError):
                    socket.socket.shutdown(sock, socket.SHUT_RDWR)


_current = threading.local()


class Watchdog:
    """One thread that cuts off every request past its deadline."""

    def __init__(self) -> None:
        self._slots: list[Slot] = []
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None

    def slot_for_this_thread(self) -> Slot:
        """A slot for the calling worker thread; its connections report to it."""
        slot = Slot()
        _current.slot = slot
        with self._lock:
            self._slots.append(slot)
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, daemon=True,
                                                name="fetch-deadlines")
                self._thread.start()
        return slot

    def cut_off_all(self) -> None:
        with self._lock:
            slots = list(self._slots)
        for slot in slots:
            slot.cut_off()

    def close(self) -> None:
        self._closed.set()

    def _watch(self) -> None:
        while not self._closed.wait(WATCH_INTERVAL_S):
            now = time.monotonic()
            with self._lock:
                late = [s for s in self._slots if s.deadline is not None and now >= s.deadline]
            # Again at every tick while late: a request still connecting has no socket yet.
            for slot in late:
                slot.cut_off()


class _Reporting:
    """Mixin for urllib3 connections: tell the current thread's slot which connection (and so
    which socket) its request uses, before connecting and before each request on a kept-alive
    connection."""

    def _report(self) -> None:
        slot = getattr(_current, "slot", None)
        if slot is not None:
            slot.conn = self

    def connect(self) -> None:
        self._report()
        super().connect()  # type: ignore[misc]

    def request(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        self._report()
        super().request(*args, **kwargs)  # type: ignore[misc]


class _HTTPConnection(_Reporting, HTTPConnection):
    pass


class _HTTPSConnection(_Reporting, HTTPSConnection):
    pass


class _HTTPPool(HTTPConnectionPool):
    ConnectionCls = _HTTPConnection


class _HTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _HTTPSConnection


_POOLS = {"http": _HTTPPool, "https": _HTTPSPool}


class WatchedAdapter(HTTPAdapter):
    """requests' transport adapter, with connections that report to the watchdog's slots."""

    def init_poolmanager(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = _POOLS

    def proxy_manager_for(self, proxy, **proxy_kwargs):  # type: ignore[no-untyped-def]
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        # HTTP(S) proxies use the standard pools; a SOCKS manager has pools of its own, and
        # there only the per-read timeout applies.
        if manager.pool_classes_by_scheme is urllib3.poolmanager.pool_classes_by_scheme:
            manager.pool_classes_by_scheme = _POOLS
        return manager


def read_body(raw: urllib3.BaseHTTPResponse, headers: Mapping[str, str], max_bytes: int
              ) -> bytes:
    """The whole body of `raw`, decoded, at most `max_bytes` as received and as decoded.

    Raises BodyTooLarge (the connection is closed, not drained), BodyCutShort or
    UndecodableBody; transport
    errors are urllib3's. Memory stays within about twice `max_bytes`."""
    coding = (headers.get("Content-Encoding") or "identity").strip().lower()
    if coding not in ("identity", "gzip", "x-gzip", "deflate"):
        raw.close()
        raise UndecodableBody(f"response uses Content-Encoding {coding[:40]!r}, "
                              "which was not asked for")
    length = headers.get("Content-Length")
    if length is not None and length.strip().isdigit():
        if int(length) > max_bytes:
            raw.close()
            raise BodyTooLarge(max_bytes, decoded=False)
        data = raw.read(int(length), decode_content=False)
        if len(data) < int(length):
            raise BodyCutShort(f"{len(data)} of {int(length)} bytes")
    else:
        data = _read_capped(raw, max_bytes)
    if coding == "identity":
        return data
    return _decode(data, coding, max_bytes)


def _read_capped(raw: urllib3.BaseHTTPResponse, max_bytes: int) -> bytes:
    pieces: list[bytes] = []
    size = 0
    while True:
        piece = raw.read(_PIECE, decode_content=False)
        if not piece:
            return b"".join(pieces)
        size += len(piece)
        if size > max_bytes:
            raw.close()
            raise BodyTooLarge(max_bytes, decoded=False)
        pieces.append(piece)


def _decode(data: bytes, coding: str, max_bytes: int) -> bytes:
    # wbits 47 reads gzip or zlib; "deflate" is zlib by the standard but raw deflate from
    # some servers: try both.
    for wbits in ((47,) if coding != "deflate" else (15, -15)):
        decoder = zlib.decompressobj(wbits)
        try:
            out = decoder.decompress(data, max_bytes + 1)
        except zlib.error:
            continue
        if len(out) > max_bytes:
            raise BodyTooLarge(max_bytes, decoded=True)
        if not decoder.eof:
            raise UndecodableBody(f"{coding} body ends before its end marker")
        return out
    raise UndecodableBody(f"{coding} body does not decode")
