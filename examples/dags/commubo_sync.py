"""Daily commubo sync, split into shards that Airflow's workers run in parallel.

Each run reads one ids file on the workers' shared storage. `sync` is mapped over
`shard_index`: every mapped task reads the file and keeps the ids whose stable hash falls in its
shard, so the id list itself never goes through XCom. All shards write to one PostgreSQL; the
loader takes its locks in a fixed order, so they never deadlock. `report` sums the shards' run
summaries once every shard has finished, and fails the run when a shard did not finish cleanly.

Needs (see docs/airflow.md): commubo-etl installed with the `airflow` extra on the workers, a
`commubo` connection `commubo_default` (Base URL, Tenant ID, Access token) and a Postgres
connection `commubo_warehouse`.

Each shard declares the warehouse's tables as assets (`WAREHOUSE_URI`) and attaches its counts
to their events, so a DAG scheduled on `calls` (examples/dags/commubo_downstream.py) runs after
new data landed. The shards are named "shard 1/4" ... "shard 4/4" in the UI.

The ids file is, in this order: the `ids_file` param of a manual run ("Trigger DAG w/ config"),
the Variable `commubo_ids_file`, else `/data/commubo/ids/<date of the run>.txt`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from datetime import UTC, datetime

from airflow.sdk import DAG, Param, TriggerRule, task
from airflow.sdk.exceptions import AirflowFailException

from etl.airflow import CommuboSyncOperator

log = logging.getLogger(__name__)

# One mapped task per shard. More shards spread the work over more workers; each shard also
# runs `concurrency` requests at once, so the API sees up to NUM_SHARDS * concurrency.
# Airflow maps at most core.max_map_length (1024) tasks; the operator refuses more shards.
NUM_SHARDS = 4

# Where the commubo_warehouse connection points, as postgres://host:port/database: it names the
# assets (one per table). Known when the DAG is parsed, unlike the connection.
WAREHOUSE_URI = os.environ.get("COMMUBO_WAREHOUSE_URI", "postgres://db.internal:5432/warehouse")

# dag_run.run_after, not `ds`: it is set for every run, also for a manual one without a
# logical date.
IDS_FILE = (
    "{{ params.ids_file or var.value.get('commubo_ids_file', "
    "'/data/commubo/ids/' ~ (dag_run.run_after | ds) ~ '.txt') }}"
)

COUNTS = ("requested", "loaded", "not_found", "failed", "skipped")

with DAG(
    dag_id="commubo_sync",
    description="Sync commubo connect call records into the warehouse, in shards",
    schedule="@daily",
    start_date=datetime(2026, 1, 1, tzinfo=UTC),
    catchup=False,
    max_active_runs=1,
    params={
        "ids_file": Param(
            None,
            type=["null", "string"],
            description="Path of the ids file on the workers (default: Variable "
            "commubo_ids_file, else /data/commubo/ids/<date>.txt)",
        ),
    },
    # A retry only fetches what the failed try did not load (skip_loaded). The delay between
    # tries is Airflow's core.default_task_retry_delay (300 s unless configured).
    default_args={"retries": 2},
    tags=["commubo"],
) as dag:
    sync = CommuboSyncOperator.partial(
        task_id="sync",
        ids_file=IDS_FILE,
        num_shards=NUM_SHARDS,
        api_conn_id="commubo_default",
        db_conn_id="commubo_warehouse",
        warehouse_uri=WAREHOUSE_URI,
        concurrency=8,
        # The API's request rate quota for all shards together (0 = none): each takes 1/4.
        max_rps=0,
    ).expand(shard_index=list(range(NUM_SHARDS)))

    @task(trigger_rule=TriggerRule.ALL_DONE, retries=0, multiple_outputs=False)
    def report(summaries: Iterable[dict]) -> dict:
        """Totals over the shards' summaries. A shard that failed after its run started still
        pushed its summary; one that never started pushed none."""
        got = [s for s in summaries if s]
        totals = {key: sum(s[key] for s in got) for key in COUNTS}
        totals["shards"] = NUM_SHARDS
        totals["shards_succeeded"] = sum(s["status"] == "succeeded" for s in got)
        log.info("commubo sync totals: %s", totals)
        if totals["shards_succeeded"] < NUM_SHARDS:
            # A leaf task that succeeds marks the whole run successful: fail here, so that a
            # failed shard shows as a failed run. What the other shards loaded stays loaded.
            raise AirflowFailException(
                f"{NUM_SHARDS - totals['shards_succeeded']} of {NUM_SHARDS} shards did not "
                f"finish cleanly ({totals['loaded']} loaded, {totals['not_found']} not found, "
                f"{totals['failed']} failed in all); see the failed sync tasks' logs"
            )
        return totals

    report(sync.output)
