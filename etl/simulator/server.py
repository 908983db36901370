"""The simulator's HTTP server: :class:`Simulator`, a threaded server on a loopback address that
answers ``GET {base}/v1/calls/{callId}`` as :mod:`etl.simulator.payload` describes.

Authentication
--------------
Every request must carry ``x-commubo-tenantId`` and ``x-commubo-accessToken`` equal to the
simulator's ``tenant_id`` / ``access_token`` (defaults :data:`DEFAULT_TENANT_ID` /
:data:`DEFAULT_ACCESS_TOKEN`); otherwise the answer is ``403``.  Auth is checked before any
fault script.  Any path other than ``/v1/calls/{callId}`` (or a method other than GET) gets
``404 {"error": "not found"}``.  The call id is URL-decoded (``%2F`` may appear inside it).

Per-id counters (:meth:`Simulator.requests_for`) count every request addressed to
``/v1/calls/{callId}``, including ones rejected with 403.

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
"""

from __future__ import annotations

import contextlib
import json
import math
import socket
import struct
import sys
import threading
import time
from collections.abc import Iterator
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

from .bodies import (
    BAD_JSON,
    ENDLESS_PREFIX,
    ESCAPE_BODY,
    ESCAPE_REASON,
    FORBIDDEN,
    HUGE_PREFIX,
    NOT_FOUND,
    RATE_LIMITED,
    STATUS_BODIES,
    filler,
    gzip_bomb,
    json_bytes,
)
from .faults import NEVER_SERVED, classify, random_fault
from .payload import is_missing, payload_for

DEFAULT_TENANT_ID = "demo-tenant"
DEFAULT_ACCESS_TOKEN = "demo-token"

_CALLS_PREFIX = "/v1/calls/"
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


class _Handler(BaseHTTPRequestHandler):
    """Per-connection request handler: it decides each answer, from the id grammar and the
    settings and counters of its :class:`Simulator` (``self.server.sim``), and sends it."""

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
        sim = self.server.sim
        path = urlsplit(self.path).path
        if path == _STATS_PATH:
            self.send_body(200, json.dumps(sim.stats()).encode())
            return
        retry_after = sim._over_limit()
        if retry_after is not None:
            self._wait_latency()
            self.send_body(429, RATE_LIMITED, (("Retry-After", str(retry_after)),))
            return
        raw_id = path[len(_CALLS_PREFIX) :] if path.startswith(_CALLS_PREFIX) else ""
        call_id = unquote(raw_id) if raw_id and "/" not in raw_id else None
        attempt = sim._count(call_id)

        self._wait_latency()
        if (
            self.headers.get("x-commubo-tenantId") != sim.tenant_id
            or self.headers.get("x-commubo-accessToken") != sim.access_token
        ):
            self.send_body(403, FORBIDDEN)
            return
        if call_id is None:
            self.send_body(404, NOT_FOUND)
            return

        kind, n = classify(call_id)
        if kind == "ordinary":
            if is_missing(call_id, sim.seed):
                sim._tally("not_found")
                self.send_body(404, NOT_FOUND)
                return
            fault = random_fault(sim.seed, call_id, attempt, sim.fault_rate)
            if fault is not None:
                self._fault(fault, call_id)
                return
        elif kind == "slow":
            if attempt < n:
                sim._hang_up.wait(sim.slow_s)
        elif kind in ("trickle", "trickleb"):
            if attempt < n:
                self._trickle(call_id, whole=kind == "trickle")
                return
        elif kind in NEVER_SERVED:
            self._fixed(kind)
            return
        elif attempt < n:
            self._fault(kind, call_id)
            return

        sim._tally("ok")
        self.send_body(200, json_bytes(payload_for(call_id, sim.seed)))

    def _other_method(self) -> None:
        # Drain any body so a keep-alive connection stays in sync, then refuse.
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        self.server.sim._count(None)
        self.send_body(404, NOT_FOUND)

    do_POST = do_PUT = do_PATCH = do_DELETE = _other_method

    def _wait_latency(self) -> None:
        sim = self.server.sim
        if sim.latency_ms:
            sim._hang_up.wait(sim.latency_ms / 1000)

    # -- the answers of the id grammar -----------------------------------------------------

    def _fault(self, kind: str, call_id: str) -> None:
        """Inject one fault of ``kind`` instead of the answer for ``call_id``."""
        sim = self.server.sim
        if kind == "reset":
            self.reset_connection()
        elif kind == "cut":
            # Half of the real body, then the connection closes.
            self.send_body(200, json_bytes(payload_for(call_id, sim.seed)), truncate=True)
        elif kind == "e429s":
            self.send_body(429, RATE_LIMITED, (("Retry-After", str(sim.retry_after_s)),))
        elif kind == "e429d":
            when = formatdate(time.time() + sim.retry_after_s, usegmt=True)
            self.send_body(429, RATE_LIMITED, (("Retry-After", when),))
        else:  # e500 / e502 / e503
            self.send_body(int(kind[1:]), STATUS_BODIES[int(kind[1:])])

    def _fixed(self, kind: str) -> None:
        """Answer for the prefixes that behave the same on every request."""
        sim = self.server.sim
        if kind == "nf":
            sim._tally("not_found")
            self.send_body(404, NOT_FOUND)
        elif kind == "broken":
            self.send_body(500, STATUS_BODIES[500])
        elif kind == "badjson":
            self.send_body(200, BAD_JSON)
        elif kind == "array":
            self.send_body(200, b"[]")
        elif kind == "bomb":
            self.send_body(200, gzip_bomb(sim.bomb_bytes), (("Content-Encoding", "gzip"),))
        elif kind == "huge":
            self._huge()
        elif kind == "endless":
            self._endless()
        else:  # escape
            self.send_body(400, ESCAPE_BODY, reason=ESCAPE_REASON)

    def _trickle(self, call_id: str, *, whole: bool) -> None:
        """The normal response one byte every ``trickle_s``: all of it (``whole``), or the body
        only after the status line and headers went out at once."""
        sim = self.server.sim
        body = json_bytes(payload_for(call_id, sim.seed))
        head = self.head_bytes(
            200, (("Content-Type", "application/json"), ("Content-Length", str(len(body))))
        )
        if whole:
            data = head + body
        else:
            if not self.send_raw(head):
                return
            data = body
            # The head went out; the first body byte waits like every later one.
            if sim._hang_up.wait(sim.trickle_s):
                self.close_connection = True
                return
        for i in range(len(data)):
            # Wait on the event, not time.sleep: stop() or refuse_connections() ends the
            # trickle at once instead of leaving the thread asleep for up to trickle_s.
            if i and sim._hang_up.wait(sim.trickle_s):
                self.close_connection = True
                return
            if not self.send_raw(data[i : i + 1]):
                return

    def _huge(self) -> None:
        """200 announcing ``huge_bytes`` and streaming them, a block at a time."""
        size = self.server.sim.huge_bytes
        self._stream(("Content-Length", str(size)), filler(HUGE_PREFIX, size))

    def _endless(self) -> None:
        """200 with a chunked body that never ends (until hang-up or stop)."""
        chunks = (b"%x\r\n%b\r\n" % (len(b), b) for b in filler(ENDLESS_PREFIX, None))
        self._stream(("Transfer-Encoding", "chunked"), chunks)

    def _stream(self, framing: tuple[str, str], blocks: Iterator[bytes]) -> None:
        """200 with ``framing`` (its Content-Length or Transfer-Encoding header), then
        ``blocks`` until they end, the client hangs up, or the simulator hangs up."""
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header(*framing)
        self.end_headers()
        for block in blocks:
            if self.server.sim._hang_up.is_set():
                # The body is unfinished, so the connection cannot be reused.
                self.close_connection = True
                return
            if not self.send_raw(block):
                return

    # -- sending ---------------------------------------------------------------------------

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
    :attr:`port` are valid before :meth:`start`.  See :mod:`etl.simulator.payload` for the id
    grammar, and the module docstring for the hostile-server kinds, the refusing mode
    (``refuse``) and the rate limit (``rate_limit`` requests/s, a bucket of ``burst`` tokens;
    :meth:`stats`).
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
        self.burst = (
            (burst if burst is not None else max(1.0, rate_limit / 10)) if rate_limit else None
        )
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
        return f"Simulator(url={self.url!r}, seed={self.seed}, fault_rate={self.fault_rate}{limit})"

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
