"""The OpenLineage view of a sync: imported by `CommuboSyncOperator` only when OpenLineage's
Airflow provider asks, so neither Airflow's core nor etl needs OpenLineage installed."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import attrs
from airflow.providers.openlineage.extractors import OperatorLineage
from openlineage.client.event_v2 import InputDataset, OutputDataset
from openlineage.client.facet_v2 import (
    RunFacet,
    input_statistics_input_dataset,
    output_statistics_output_dataset,
)

from .config import Settings
from .sync import SyncSummary

# The API's endpoint as a dataset name: the calls resource, one GET per id.
API_DATASET = "/v1/calls"


@attrs.define
class CommuboSyncRunFacet(RunFacet):
    """The run's counts (`etl sync --json`), as a custom run facet."""

    run_id: str
    requested: int
    related: int
    loaded: int
    not_found: int
    failed: int
    skipped: int
    warnings: int


def operator_lineage(settings: Settings, summary: SyncSummary) -> OperatorLineage:
    """The API as input (its calls fetched), each table written as output (the calls loaded
    as its row count: each loaded call is at most one row of each table it touches), and the
    counts as the `commubo_sync` run facet."""
    from .airflow import _warehouse_of, warehouse_assets  # the names the assets use

    api = urlsplit(settings.base_url or "")
    fetched = summary.loaded + summary.not_found + summary.failed
    inputs = [InputDataset(
        namespace=f"{api.scheme}://{api.netloc}",
        name=(api.path.rstrip("/") + API_DATASET),
        inputFacets={"inputStatistics":
                     input_statistics_input_dataset.InputStatisticsInputDatasetFacet(
                         rowCount=fetched)},
    )]
    outputs = []
    where = _warehouse_of(settings.database_url)
    for asset in warehouse_assets(where) if where else []:
        namespace, _, name = asset.name.rpartition("/")
        outputs.append(OutputDataset(
            namespace=namespace, name=name,
            outputFacets={"outputStatistics":
                          output_statistics_output_dataset.OutputStatisticsOutputDatasetFacet(
                              rowCount=summary.loaded)},
        ))
    facet: Any = CommuboSyncRunFacet(
        run_id=summary.run_id, requested=summary.requested, related=summary.related,
        loaded=summary.loaded, not_found=summary.not_found, failed=summary.failed,
        skipped=summary.skipped, warnings=summary.warnings)
    return OperatorLineage(inputs=inputs, outputs=outputs, run_facets={"commubo_sync": facet})
