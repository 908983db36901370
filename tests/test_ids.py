"""Reading, validating and sharding call ids (etl/ids.py, docs/design.md §3.2 `--ids-file`)."""

from __future__ import annotations

import io
import sys
from collections import Counter
from pathlib import Path

import pytest

from etl.errors import InputError
from etl.ids import is_valid_call_id, parse_ids, read_ids, select_shard, shard_of

# -- parse_ids ----------------------------------------------------------------------------------


def test_ids_are_trimmed_and_blank_and_comment_lines_skipped():
    lines = ["  call-1  ", "", "   ", "\t", "# a comment", "   # indented comment", "call_2\t",
             "#call-3"]
    assert parse_ids(lines) == ["call-1", "call_2"]


def test_duplicates_are_kept_once_in_first_seen_order():
    lines = ["b", "a", "c", "a", " b ", "d", "c"]
    assert parse_ids(lines) == ["b", "a", "c", "d"]


def test_ids_are_case_sensitive():
    assert parse_ids(["Abc", "abc", "ABC"]) == ["Abc", "abc", "ABC"]


@pytest.mark.parametrize(
    "call_id",
    ["a", "A", "0", "_", "-", "call-2018_09-01", "x" * 64, "ABCxyz019_-"],
)
def test_valid_call_ids_are_accepted(call_id):
    assert is_valid_call_id(call_id)
    assert parse_ids([call_id]) == [call_id]


@pytest.mark.parametrize(
    "line",
    ["../x", "a%2Fb", "a?b", "a b", "x" * 65, "a/b", "a.b", "a#b", "ü", "呼出-1", "a\x00b",
     "a\u2028b"],
)
def test_invalid_line_raises_input_error_naming_source_and_line(line):
    with pytest.raises(InputError) as info:
        parse_ids(["good-1", "# comment", line, "good-2"], source="ids.txt")
    message = str(info.value)
    assert message.startswith("ids.txt:")
    assert "line 3 " in message
    assert "A-Z a-z 0-9 _ -" in message  # says what a valid id looks like


def test_every_invalid_line_is_named_in_one_error():
    lines = ["ok", "bad id", "ok2", "", "../x", "a?b"]
    with pytest.raises(InputError, match=r"ids\.txt: invalid call id on lines 2, 5, 6 "):
        parse_ids(lines, source="ids.txt")


def test_many_invalid_lines_are_summarised():
    lines = [f"bad id {n}" for n in range(25)]
    with pytest.raises(InputError) as info:
        parse_ids(lines, source="f")
    message = str(info.value)
    assert "lines 1, 2, 3, 4, 5, 6, 7, 8, 9, 10 and 15 more (" in message
    assert ", 11" not in message


def test_no_ids_is_an_empty_list():
    assert parse_ids([]) == []
    assert parse_ids(["", "# only comments", "  "]) == []


# -- read_ids -----------------------------------------------------------------------------------


def write(tmp_path: Path, data: bytes, name: str = "ids.txt") -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def test_read_ids_from_a_file(tmp_path):
    path = write(tmp_path, b"# header\ncall-1\n\ncall-2\ncall-1\n")
    assert read_ids(path) == ["call-1", "call-2"]


def test_byte_order_mark_is_ignored(tmp_path):
    path = write(tmp_path, "\ufeffcall-1\ncall-2\n".encode())
    assert read_ids(path) == ["call-1", "call-2"]


def test_byte_order_mark_before_a_comment_is_ignored(tmp_path):
    path = write(tmp_path, "\ufeff# ids\ncall-1\n".encode())
    assert read_ids(path) == ["call-1"]


def test_crlf_line_endings_are_accepted(tmp_path):
    path = write(tmp_path, b"call-1\r\ncall-2\r\n\r\n# c\r\ncall-3")
    assert read_ids(path) == ["call-1", "call-2", "call-3"]


def test_invalid_lines_in_a_file_are_named_with_the_file_and_line_numbers(tmp_path):
    path = write(tmp_path, b"call-1\n../x\r\ncall-2\na b\n")
    with pytest.raises(InputError) as info:
        read_ids(path)
    message = str(info.value)
    assert message.startswith(f"{path}:")
    assert "lines 2, 4 " in message


def test_non_utf8_bytes_are_an_input_error_naming_the_line(tmp_path):
    path = write(tmp_path, b"call-1\ncall-2\ncall-\xff\xfe3\n")
    with pytest.raises(InputError) as info:
        read_ids(path)
    message = str(info.value)
    assert path in message
    assert "line 3" in message
    assert "UTF-8" in message


def test_directory_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="directory") as info:
        read_ids(str(tmp_path))
    assert str(tmp_path) in str(info.value)


def test_missing_file_is_an_input_error(tmp_path):
    path = str(tmp_path / "nope.txt")
    with pytest.raises(InputError, match="no such file") as info:
        read_ids(path)
    assert path in str(info.value)


def test_empty_file_is_an_empty_list(tmp_path):
    assert read_ids(write(tmp_path, b"")) == []


def test_dash_reads_standard_input(monkeypatch):
    stdin = io.TextIOWrapper(io.BytesIO(b"call-1\ncall-2\ncall-1\n"), encoding="utf-8")
    monkeypatch.setattr(sys, "stdin", stdin)
    assert read_ids("-") == ["call-1", "call-2"]


def test_invalid_line_on_standard_input_names_stdin(monkeypatch):
    stdin = io.TextIOWrapper(io.BytesIO(b"call-1\nbad id\n"), encoding="utf-8")
    monkeypatch.setattr(sys, "stdin", stdin)
    with pytest.raises(InputError, match=r"^<stdin>: invalid call id on line 2 "):
        read_ids("-")


@pytest.mark.parametrize("separator", ["\u2028", "\x0c", "\x1e", "\x85"])
def test_only_newlines_separate_lines_in_an_ids_file(tmp_path, separator):
    path = write(tmp_path, f"a{separator}b\nc d\n".encode())
    with pytest.raises(InputError, match="lines 1, 2 "):
        read_ids(path)


# -- sharding -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call_id", "num_shards", "expected"),
    [
        ("call-000001", 2, 1),
        ("call-000001", 7, 5),
        ("call-000001", 1000, 713),
        ("abc", 4, 1),
        ("abc", 1000, 721),
        ("20180901-0001", 2, 0),
        ("20180901-0001", 1000, 176),
        ("Z", 4, 3),
        ("nf-x", 1000, 237),
    ],
)
def test_shard_of_is_stable_across_processes_and_versions(call_id, num_shards, expected):
    # Values computed once: a change of hash would silently re-split running Airflow shards.
    assert shard_of(call_id, num_shards) == expected


def test_shard_of_is_in_range():
    for n in (1, 2, 3, 16):
        assert {shard_of(f"id-{i}", n) for i in range(500)} <= set(range(n))


@pytest.mark.parametrize("num_shards", [1, 2, 3, 8])
def test_shards_partition_the_ids_exactly(num_shards):
    ids = [f"call-{i:06d}" for i in range(2000)]
    shards = [select_shard(ids, i, num_shards) for i in range(num_shards)]

    assert sorted(i for shard in shards for i in shard) == sorted(ids)  # union, no duplicates
    for a in range(num_shards):
        for b in range(a + 1, num_shards):
            assert not set(shards[a]) & set(shards[b])
    expected = len(ids) / num_shards
    for shard in shards:
        assert 0.8 * expected <= len(shard) <= 1.2 * expected
        members = set(shard)
        assert shard == [i for i in ids if i in members]  # input order kept inside a shard


def test_shard_selection_is_the_same_whatever_the_other_ids():
    ids = [f"call-{i}" for i in range(300)]
    first = set(ids[:10])
    alone = select_shard(ids[:10], 1, 3)
    assert alone == [i for i in select_shard(ids, 1, 3) if i in first]


def test_hashing_spreads_ids_over_shards():
    counts = Counter(shard_of(f"{i}", 4) for i in range(4000))
    assert set(counts) == {0, 1, 2, 3}
    assert all(800 <= c <= 1200 for c in counts.values())


@pytest.mark.parametrize(
    ("shard_index", "num_shards", "message"),
    [
        (0, 0, "--num-shards"),
        (0, -1, "--num-shards"),
        (-1, 2, "--shard-index"),
        (2, 2, "--shard-index"),
        (5, 3, "--shard-index"),
        (1, 1, "--shard-index"),
    ],
)
def test_bad_shard_arguments_are_input_errors(shard_index, num_shards, message):
    with pytest.raises(InputError, match=message):
        select_shard(["a", "b"], shard_index, num_shards)
