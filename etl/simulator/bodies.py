"""The bytes of every answer that is not a call object: the JSON error bodies, the ``badjson``
and ``escape`` answers, and the hostile bodies (``bomb``, ``huge``, ``endless``), which are
made block by block so that none is ever whole in memory.
"""

from __future__ import annotations

import json
import threading
import zlib
from collections.abc import Iterator
from functools import lru_cache


def json_bytes(obj: object) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode()


NOT_FOUND = json_bytes({"error": "not found"})
FORBIDDEN = json_bytes({"error": "forbidden", "message": "invalid tenant id or access token"})
RATE_LIMITED = json_bytes({"error": "too many requests"})
STATUS_BODIES = {
    500: json_bytes({"error": "internal server error"}),
    502: json_bytes({"error": "bad gateway"}),
    503: json_bytes({"error": "service unavailable"}),
}
BAD_JSON = b"<html>oops</html>"

# What an ``escape-`` id answers.  An OSC sequence that retitles the terminal, a CSI that clears
# the screen and a bare CR that makes the rest overwrite the line: a client that prints these
# unescaped lets the server rewrite the operator's terminal.  No LF (it would end the status
# line) and no whitespace at either end (http.client strips it from the reason).
ESCAPE_REASON = "Bad Request\x1b]0;pwned\x07\x1b[2J\rall calls synced OK"
# Raw control bytes, not JSON escapes: a server may send anything, and a client that prints the
# start of an error body must not pass them through.  (So the body is not valid JSON.)
ESCAPE_BODY = b'{"error": "bad request \x1b]0;pwned\x07\x1b[2J\rall calls synced OK"}'

# Hostile bodies are made of a JSON-looking prefix and then spaces, produced in blocks of this
# size, so neither the 300 MiB the bomb inflates to nor a huge/endless body is ever in memory.
_BLOCK = 64 * 1024
_SPACES = b" " * _BLOCK
_BOMB_PREFIX = b'{"callId": "bomb", "note": "'
HUGE_PREFIX = b'{"callId": "huge", "note": "'
ENDLESS_PREFIX = b'{"callId": "endless", "note": "'


def filler(prefix: bytes, total: int | None) -> Iterator[bytes]:
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


def gzip_bomb(size: int) -> bytes:
    """The ``bomb-`` body: ``size`` bytes once inflated, built on first use (see _gzip_bomb)."""
    with _BOMB_LOCK:
        return _gzip_bomb(size)


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
    parts = [compressor.compress(block) for block in filler(_BOMB_PREFIX, size)]
    parts.append(compressor.flush())
    return b"".join(parts)
