"""Logging policy of the `etl` command: where log lines go, what they look like, and the fields
that tie each line to its run.

- `setup_logging` installs the one stderr handler: text lines for people (the default) or one
  JSON object per line (`etl --log-format json`) for log shippers and Airflow's task log view.
- `log_context(run_id=..., shard=...)` adds fields to every record logged inside it;
  `ContextFilter`, installed on a handler, copies them onto each record as attributes, so
  both formatters here and a foreign handler (Airflow's) can show them.

stdout is data (the run summary); every log line goes to stderr.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
import threading
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

from .text import printable

# The attribute ContextFilter sets on a record: the context fields, as one mapping, so that a
# formatter can tell them from the record's own attributes.
FIELDS_ATTR = "etl_fields"
# Longest message of a JSON record, as the text lines are cut (at the line): a library that
# logs a whole response must not make a line a log shipper refuses.
_MAX_MESSAGE = 4000
_EMPTY: Mapping[str, Any] = MappingProxyType({})
# Names a context field may not take: the record's own attributes (setting them would change
# what the record says) and the keys of a JSON record.
_RESERVED = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message", "asctime", FIELDS_ATTR, "ts", "level", "logger", "exc", "stack"}

# The fields of this thread's (or asyncio task's) context.
_fields: ContextVar[Mapping[str, Any]] = ContextVar("etl_log_fields", default=_EMPTY)
# The fields of every log_context now open in the process, newest last. The extractor's
# workers and the run's heartbeat are plain threading.Threads, which start with an empty
# context (they do not inherit contextvars), so a record logged there would lose the run id.
# Such records take the fields of the newest open log_context instead: right for the one run
# an `etl` process does; when two runs share a process (or a thread is not the run's, such as
# a server in a test), such a record may show the other run's fields.
_open: list[Mapping[str, Any]] = []
_open_lock = threading.Lock()


def _current_fields() -> Mapping[str, Any]:
    fields = _fields.get()
    if fields:
        return fields
    with _open_lock:
        return _open[-1] if _open else _EMPTY


@contextlib.contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    """Add `fields` (`run_id="..."`, `shard="2/8"`) to every record logged inside the block,
    also from threads started inside it. Nests: an inner block adds to (or overrides) the
    fields of the outer one until it ends. Values should be JSON types (others are shown with
    str())."""
    clash = _RESERVED.intersection(fields)
    if clash:
        raise ValueError(f"log field name(s) taken by the log record: {', '.join(sorted(clash))}")
    merged = MappingProxyType({**_current_fields(), **fields})
    token = _fields.set(merged)
    with _open_lock:
        _open.append(merged)
    # Under Airflow the task log is written by structlog, whose handlers never see our filter;
    # its contextvars are merged into every record (stdlib ones too), so bind the fields there
    # as well. Only when something already imported structlog: etl does not need it. There
    # `run_id` is Airflow's (the DAG run's): ours goes in as `etl_run_id`.
    structlog = sys.modules.get("structlog")
    bound = structlog.contextvars.bind_contextvars(
        **{_STRUCTLOG_NAMES.get(k, k): v for k, v in fields.items()}) if structlog else None
    try:
        yield
    finally:
        if bound is not None:
            structlog.contextvars.reset_contextvars(**bound)
        with _open_lock:
            # By identity: blocks of other threads may have opened and closed meanwhile.
            _open[:] = [e for e in _open if e is not merged]
        _fields.reset(token)


# Field names that mean something else in a structlog log (Airflow's task log).
_STRUCTLOG_NAMES = {"run_id": "etl_run_id"}


def shard_label(shard_index: int, num_shards: int) -> str:
    """The `shard` log field: 1-based, "3/8" for `--shard-index 2 --num-shards 8`, as Airflow
    numbers mapped tasks for people ("shard 3/8") while the option counts from 0."""
    return f"{shard_index + 1}/{num_shards}"


class ContextFilter(logging.Filter):
    """Copies the current `log_context` fields onto each record (as attributes, and all of
    them as `record.etl_fields`). Install it on a handler, not a logger: a logger's filters
    see only the records logged to that very logger, not those of its children."""

    def filter(self, record: logging.LogRecord) -> bool:
        fields = _current_fields()
        setattr(record, FIELDS_ATTR, fields)
        for name, value in fields.items():
            record.__dict__.setdefault(name, value)  # `extra=` given at the call wins
        return True


def _exception_line(exc: BaseException | None) -> str:
    """An exception as one short line: its type and the first line of its message."""
    text = str(exc).strip()
    first = text.splitlines()[0][:200] if text else ""
    return f"{type(exc).__name__}{': ' + first if first else ''}"


class OneLineFormatter(logging.Formatter):
    """Text records whose exception is shown as one line, not a traceback: libraries log some
    (SQLAlchemy's pool after an interrupted query, say), and stderr gets no tracebacks, which
    could also carry values. ETL_DEBUG=1 shows them whole (setup_logging then uses a plain
    Formatter). Control characters (from text a server chose) are escaped."""

    def format(self, record: logging.LogRecord) -> str:
        return printable(super().format(record), _MAX_MESSAGE)

    def formatException(self, ei) -> str:  # noqa: N802 - logging's name
        return f"  ({_exception_line(ei[1])})"

    def formatStack(self, stack_info: str) -> str:  # noqa: N802 - logging's name
        return ""


# What json.dumps(ensure_ascii=False) leaves raw and a reader may still take for a line break
# or use to hide text: C1 controls (NEL, U+0085, ends a line for str.splitlines), DEL, the
# Unicode line and paragraph separators, bidi and zero-width characters, and lone surrogates
# (not UTF-8 at all). Written as \uXXXX escapes, which decode back to the same text.
_FIRST_FIELDS = {"run_id": 0, "shard": 1}
_JSON_UNSAFE = re.compile("[\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff\ud800-\udfff]")


class JsonFormatter(logging.Formatter):
    """One JSON object per record and line: `ts` (UTC, milliseconds, "...T21:03:04.123Z"),
    `level` ("info"), `logger`, `message`, then the `log_context` fields (`run_id`, `shard`),
    and `exc` when the record has an exception.

    Every character that could end or hide a line is escaped, so one record is always one
    line, whatever a server put in a message. Messages are not passed through `printable`:
    text a server chose is made printable where it enters a message, and JSON escapes the
    rest, so escaping again would only double the backslashes. `exc` follows the text
    policy: one line ("TypeName: first line of the message"), the whole traceback only with
    ETL_DEBUG=1."""

    def __init__(self, debug: bool | None = None) -> None:
        super().__init__()
        self._debug = bool(os.environ.get("ETL_DEBUG")) if debug is None else debug

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if len(message) > _MAX_MESSAGE:
            message = message[:_MAX_MESSAGE] + "…"
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": message,
        }
        # The filter's fields when it ran; else (a handler without it) the current ones.
        fields = getattr(record, FIELDS_ATTR, None)
        if fields is None:
            fields = _current_fields()
        # run_id and shard first, whichever log_context added them, for people reading along.
        for name in sorted(fields, key=lambda n: _FIRST_FIELDS.get(n, len(_FIRST_FIELDS))):
            out[name] = fields[name]
        if record.exc_info and record.exc_info[1] is not None:
            out["exc"] = (self.formatException(record.exc_info).rstrip() if self._debug
                          else _exception_line(record.exc_info[1]))
        if record.stack_info and self._debug:
            out["stack"] = record.stack_info
        line = json.dumps(out, ensure_ascii=False, default=str)
        return _JSON_UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", line)


FORMATS = ("text", "json")


def setup_logging(verbose: int = 0, quiet: bool = False, fmt: str = "text") -> None:
    """One handler on stderr for the whole process: INFO, DEBUG with `verbose` > 1, WARNING
    with `quiet`; `fmt` "text" (timestamped lines) or "json" (JsonFormatter). Below -vv the
    chatty libraries (urllib3, alembic) show warnings only."""
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
        # Python's warnings print two lines of their own to stderr (the warning, then the
        # source line): as records they are one JSON line like the rest.
        logging.captureWarnings(True)
    else:
        text = "%(asctime)s %(levelname)s %(name)s: %(message)s"
        handler.setFormatter(logging.Formatter(text) if os.environ.get("ETL_DEBUG")
                             else OneLineFormatter(text))
    handler.addFilter(ContextFilter())
    logging.basicConfig(level=level, handlers=[handler])
    if verbose < 2:
        for noisy in ("urllib3", "alembic"):
            logging.getLogger(noisy).setLevel(logging.WARNING)


def json_logging() -> bool:
    """Whether the root logger writes JSON lines (for output that must follow suit)."""
    return any(isinstance(h.formatter, JsonFormatter) for h in logging.getLogger().handlers)
