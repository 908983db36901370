"""Text that came from outside (a server's reason phrase or error body, a stored error) made
safe to show: control characters escaped, length bounded.

A server chooses its reason phrase and its error bodies; printed raw, an escape sequence can
retitle or clear the operator's terminal and a carriage return can hide the start of a line.
Everything such text reaches (stderr, logs, `etl failures`, the `error` column) goes through
`printable` first.
"""

from __future__ import annotations

import re
import unicodedata

# C0 and C1 controls, DEL, and the Unicode format characters that reorder or hide text
# (bidi overrides and isolates, zero-width characters, the BOM).
_UNSAFE = re.compile(
    "[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]"
)
_NAMED = {"\t": "\\t", "\n": "\\n", "\r": "\\r", "\x1b": "\\x1b"}


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    named = _NAMED.get(char)
    if named:
        return named
    return f"\\x{ord(char):02x}" if ord(char) < 0x100 else _code(char)


def printable(text: object, limit: int = 200) -> str:
    """`text` with control and invisible formatting characters escaped (`\\x1b`, `\\r`,
    `\\u202e`) and cut to about `limit` characters, marked with an ellipsis."""
    text = str(text)
    if len(text) > limit:
        text = text[:limit] + "…"
    if _UNSAFE.search(text):
        text = _UNSAFE.sub(_escape, text)
    # Unassigned code points and other separators cannot be drawn either (spaces such as
    # the ideographic space U+3000 can, and stay).
    if not text.isprintable():
        text = "".join(c if c.isprintable() or unicodedata.category(c) == "Zs" else _code(c)
                       for c in text)
    return text


def _code(char: str) -> str:
    code = ord(char)
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"
