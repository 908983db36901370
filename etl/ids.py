"""Reading, validating and sharding call ids (docs/design.md §3.2, `etl sync --ids-file`)."""

from __future__ import annotations

import hashlib
import re
import sys
from collections.abc import Iterable, Iterator
from typing import BinaryIO

from .errors import InputError

CALL_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
# How many offending line numbers an error message names before it says "and N more".
_MAX_LINES_NAMED = 10


def is_valid_call_id(call_id: str) -> bool:
    return CALL_ID_RE.fullmatch(call_id) is not None


def parse_ids(lines: Iterable[str], source: str = "<ids>") -> list[str]:
    """Call ids from lines: trimmed, blanks and `#` comments skipped, duplicates dropped (first
    occurrence keeps its place). Every invalid line is collected so one error names them all."""
    seen: dict[str, None] = {}
    bad: list[int] = []
    for number, line in enumerate(lines, start=1):
        text = line.strip()
        if number == 1:
            text = text.lstrip("\ufeff").strip()  # a BOM left by Windows editors
        if not text or text.startswith("#"):
            continue
        if CALL_ID_RE.fullmatch(text) is None:
            bad.append(number)
            continue
        seen.setdefault(text, None)
    if bad:
        named = ", ".join(str(n) for n in bad[:_MAX_LINES_NAMED])
        more = f" and {len(bad) - _MAX_LINES_NAMED} more" if len(bad) > _MAX_LINES_NAMED else ""
        raise InputError(
            f"{source}: invalid call id on line{'s' if len(bad) > 1 else ''} {named}{more} "
            "(a call id is 1 to 64 characters of A-Z a-z 0-9 _ -)"
        )
    return list(seen)


def read_ids(path: str) -> list[str]:
    """Read an ids file (`-` for standard input). Undecodable bytes are an input error.

    The file is read line by line, so the only copy of a large file in memory is the ids
    themselves."""
    if path == "-":
        return parse_ids(_decoded(sys.stdin.buffer, "<stdin>"), "<stdin>")
    try:
        stream = open(path, "rb")  # noqa: SIM115 - closed below, after the error mapping
    except IsADirectoryError:
        raise InputError(f"{path}: is a directory, expected a file of call ids") from None
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror})") from None
    with stream:
        try:
            return parse_ids(_decoded(stream, path), path)
        except IsADirectoryError:
            raise InputError(f"{path}: is a directory, expected a file of call ids") from None
        except OSError as exc:
            raise InputError(f"{path}: cannot read ({exc.strerror})") from None


def _decoded(stream: BinaryIO, source: str) -> Iterator[str]:
    # Binary lines end at b"\n" only: str.splitlines() would also split at U+2028, form
    # feeds and the like, turning one invalid line into ids. "\r" of CRLF goes with the trim.
    for number, raw in enumerate(stream, start=1):
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError:
            raise InputError(f"{source}: line {number} is not UTF-8 text") from None


def shard_of(call_id: str, num_shards: int) -> int:
    """Stable shard number of an id: the same on every machine and Python process
    (Python's own hash() is salted per process, so it cannot split work between processes)."""
    digest = hashlib.blake2b(call_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % num_shards


def select_shard(ids: list[str], shard_index: int, num_shards: int) -> list[str]:
    if num_shards < 1:
        raise InputError(f"--num-shards must be at least 1, got {num_shards}")
    if not 0 <= shard_index < num_shards:
        raise InputError(f"--shard-index must be in 0..{num_shards - 1}, got {shard_index}")
    if num_shards == 1:
        return ids
    return [i for i in ids if shard_of(i, num_shards) == shard_index]


def shard_ids(ids: Iterable[str], shards: int) -> list[list[str]]:
    """Split `ids` into `shards` lists by the stable hash of `shard_of`: list `i` holds exactly
    the ids that `select_shard(ids, i, shards)` (and `etl sync --shard-index i`) would take, in
    their original order, duplicates dropped. Empty shards stay in place, so the position of a
    list is its shard index.

    Meant for Airflow's dynamic task mapping over a small id list
    (`CommuboSyncOperator.partial(...).expand(ids=shard_ids(ids, shards=4))`). The lists are
    stored in the serialized DAG or in XCom, so keep big id lists in a file and map over
    `shard_index` instead. Airflow refuses to map a list pushed through XCom that is longer
    than `core.max_map_length` (1024 by default): keep `shards` at most that.
    """
    if shards < 1:
        raise InputError(f"the number of shards must be at least 1, got {shards}")
    out: list[list[str]] = [[] for _ in range(shards)]
    for call_id in dict.fromkeys(ids):
        out[shard_of(call_id, shards)].append(call_id)
    return out
