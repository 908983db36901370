"""What the Airflow integration relies on that needs no Airflow: `etl.ids.shard_ids`, and
`import etl` staying free of Airflow. Runs in the default environment too."""

from __future__ import annotations

import subprocess
import sys

import pytest

from etl.errors import InputError
from etl.ids import select_shard, shard_ids, shard_of

IDS = [f"call-{n:06d}" for n in range(1, 301)] + ["nf-1", "broken-1", "x_Y-9"]


@pytest.mark.parametrize("shards", [1, 2, 3, 8, 1024])
def test_shard_ids_list_i_is_what_shard_index_i_selects(shards):
    lists = shard_ids(IDS, shards=shards)
    assert len(lists) == shards
    for index, ids in enumerate(lists):
        assert ids == select_shard(IDS, index, shards)


@pytest.mark.parametrize("shards", [1, 4, 7])
def test_shard_ids_covers_every_id_once_in_original_order(shards):
    lists = shard_ids(IDS, shards=shards)
    assert sorted(i for ids in lists for i in ids) == sorted(IDS)
    for ids in lists:
        assert ids == sorted(ids, key=IDS.index)


def test_shard_ids_uses_the_stable_hash_not_python_hash():
    # The same split in every process (Python's hash() is salted per process): a worker
    # that reads the file and a DAG file that split the list must agree.
    lists = shard_ids(IDS, shards=4)
    assert all(shard_of(i, 4) == index for index, ids in enumerate(lists) for i in ids)
    script = ("from etl.ids import shard_ids; import json; "
              f"print(json.dumps(shard_ids({IDS!r}, shards=4)))")
    runs = {subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                           check=True, env={"PYTHONHASHSEED": seed}).stdout
            for seed in ("1", "2")}
    assert len(runs) == 1


def test_shard_ids_drops_duplicates_and_keeps_empty_shards_in_place():
    lists = shard_ids(["a", "a", "b"], shards=16)
    assert len(lists) == 16
    assert sum(len(ids) for ids in lists) == 2
    assert lists[shard_of("a", 16)].count("a") == 1


@pytest.mark.parametrize("shards", [0, -1])
def test_shard_ids_refuses_fewer_than_one_shard(shards):
    with pytest.raises(InputError, match="at least 1"):
        shard_ids(IDS, shards=shards)


def test_importing_etl_never_imports_airflow():
    script = ("import sys, etl, etl.cli, etl.sync, etl.ids, etl.config, etl.progress; "
              "assert not [m for m in sys.modules if m == 'airflow' or m.startswith('airflow.')]")
    subprocess.run([sys.executable, "-c", script], check=True)
