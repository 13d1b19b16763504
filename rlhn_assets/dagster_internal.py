"""The only place that calls Dagster's non-public API (pinned dagster==1.13.27; a Dagster upgrade touches this file
alone). test_schedules.py and test_demo_recovery.py pin the behaviour relied on here.

- The stale-status resolver behind the UI's Missing/Stale badges: Dagster's own `RunRequest(stale_assets_only=True)`
  uses it too, but only for unpartitioned assets and only in sensors, so there is no public call per partition.
- Freeing the pool (concurrency) slots of a run that died in process: the daemon does this for runs it launched;
  an in-process run (`make demo`) has no daemon, and the public API has no call for it.
"""

from __future__ import annotations

from collections.abc import Iterable

import dagster as dg
from dagster._core.asset_graph_view.asset_graph_view import (
    AssetGraphView,
    TemporalContext,
)
from dagster._core.definitions.data_version import (
    CachingStaleStatusResolver,
    StaleStatus,
)
from dagster._time import get_current_datetime


def missing_or_stale(
    instance: dg.DagsterInstance, asset_graph, asset_keys: Iterable[dg.AssetKey], partition_key: str | None
) -> set[dg.AssetKey]:
    """The keys of ``asset_keys`` whose ``partition_key`` partition is MISSING (never materialized) or STALE (an
    upstream data version or the asset's code version changed since), as the UI shows them."""
    view = AssetGraphView(
        temporal_context=TemporalContext(effective_dt=get_current_datetime(), last_event_id=None),
        instance=instance,
        asset_graph=asset_graph,
    )
    resolver = CachingStaleStatusResolver(instance, asset_graph, loading_context=view)
    return {k for k in asset_keys if resolver.get_status(k, partition_key) in (StaleStatus.MISSING, StaleStatus.STALE)}


def free_pool_slots_of_run(instance: dg.DagsterInstance, run_id: str) -> None:
    """Release every pool slot the run holds (or waits for) in the instance's concurrency table."""
    instance.event_log_storage.free_concurrency_slots_for_run(run_id)
