"""Test DAG: the small-list route, `.expand(ids=shard_ids(...))`, with failed ids tolerated."""

from __future__ import annotations

from datetime import UTC, datetime

from airflow.sdk import DAG

from etl.airflow import CommuboSyncOperator
from etl.ids import shard_ids

IDS = [f"call-{n:06d}" for n in range(1, 31)] + ["nf-ids-1", "broken-ids-1"]
NUM_SHARDS = 3

with DAG(
    dag_id="commubo_test_ids",
    schedule=None,
    start_date=datetime(2026, 1, 1, tzinfo=UTC),
    catchup=False,
) as dag:
    CommuboSyncOperator.partial(
        task_id="sync", fail_on_failed_ids=False, concurrency=4, batch_size=10
    ).expand(ids=shard_ids(IDS, shards=NUM_SHARDS))
