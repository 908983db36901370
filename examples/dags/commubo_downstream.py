"""Runs after commubo data landed: scheduled on the `calls` asset that the shards of
`commubo_sync` update (one asset event per shard, each with its run's counts).

Point `COMMUBO_WAREHOUSE_URI` (or the default below) at the same warehouse as commubo_sync.
"""

from __future__ import annotations

import logging
import os

from airflow.sdk import DAG, task

from etl.airflow import warehouse_asset

log = logging.getLogger(__name__)

WAREHOUSE_URI = os.environ.get("COMMUBO_WAREHOUSE_URI", "postgres://db.internal:5432/warehouse")
CALLS = warehouse_asset(WAREHOUSE_URI, "calls")

with DAG(dag_id="commubo_downstream", schedule=[CALLS], catchup=False,
         tags=["commubo"]) as dag:

    @task(inlets=[CALLS])
    def new_calls(*, triggering_asset_events=None) -> int:
        """How many calls the syncs that triggered this run loaded (from the events' extra)."""
        loaded = sum(event.extra.get("loaded", 0)
                     for events in (triggering_asset_events or {}).values()
                     for event in events)
        log.info("the syncs before this run loaded %d calls", loaded)
        return loaded

    new_calls()
