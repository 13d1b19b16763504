"""Nightly backfill of the per-dataset pipeline: only the partitions that are missing or stale.

The automation sensor reacts to changes within minutes; this schedule is the safety net for what it did not
cover (the sensor was off, a run failed, a dataset was added to the registry, an asset's code_version was
bumped). Every night it asks Dagster, per dataset and per asset, whether the partition is MISSING (never
materialized) or STALE (an upstream data version or the asset's code version changed since it was
materialized) - the same status the UI shows as "Missing" / "Stale" - adds what they feed, and launches one
run per dataset with exactly those assets (in dependency order, with their checks). FRESH
partitions and datasets that already have a run queued or in progress are left alone.

Off by default (STOPPED): a tick can start paid LLM judging (`paper` preset) or long local jobs, and on a
laptop the RUNNING automation sensor already keeps the graph up to date. Start it in the UI (Automation ->
nightly_backfill) or with `dagster schedule start nightly_backfill` on a deployment whose daemon runs at night.

Scope: the dataset-partitioned assets (mining -> ingest -> pruning -> judging, and the teacher scores of
TopK-PercPos). A Dagster job has one partitions definition, so `relabeled` (dataset x variant) and the
training/eval stages are not in the job: they follow through the automation sensor once their upstream dataset
partitions update. Source staleness is measured against the latest observation of `raw_dataset_files` (the
automation sensor observes it every 10 minutes; "Observe sources" in the UI does it by hand).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import dagster as dg

# the UI's Missing/Stale status per partition: non-public Dagster API, kept in one adapter
from rlhn_assets.dagster_internal import missing_or_stale
from rlhn_assets.partitions import dataset_pd

# Dependency order; a run executes its selection in graph order whatever the order here. Written out because the job
# is defined while the graph is being loaded; test_stages.py fails if it drifts from the graph (every asset
# partitioned by dataset alone, rlhn_assets/stages.per_dataset_assets).
PER_DATASET_ASSETS: tuple[str, ...] = (
    "hard_negative_mining",
    "raw_bge",
    "pruned",
    "tier1_judgments",
    "judging_cost_estimate",
    "tier2_judgments",
    "teacher_scores",
)
NIGHTLY_TAG = "rlhn/nightly_backfill"
_IN_PROGRESS = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
]

nightly_backfill_job = dg.define_asset_job(
    "nightly_backfill_job",
    selection=dg.AssetSelection.assets(*PER_DATASET_ASSETS),
    partitions_def=dataset_pd,
    description="The dataset-partitioned stages (mining, ingest, pruning, judging, teacher scores) with their checks; "
    "launched by the nightly_backfill schedule with only the missing or stale assets of one dataset per run.",
)


def partitions_needing_work(
    instance: dg.DagsterInstance, asset_graph, asset_keys: Iterable[dg.AssetKey], partition_keys: Sequence[str]
) -> dict[str, list[dg.AssetKey]]:
    """{partition: [asset keys whose partition is MISSING or STALE]} (partitions with nothing to do left out)."""
    keys = list(asset_keys)
    out: dict[str, list[dg.AssetKey]] = {}
    for pk in partition_keys:
        todo = missing_or_stale(instance, asset_graph, keys, pk)
        # Dagster marks only the direct children of a changed partition STALE; what they feed gets stale
        # once they rerun, so the run takes everything downstream of them in the selection too.
        frontier = list(todo)
        while frontier:
            for child in asset_graph.get(frontier.pop()).child_keys:
                if child in keys and child not in todo:
                    todo.add(child)
                    frontier.append(child)
        if todo:
            out[pk] = [k for k in keys if k in todo]
    return out


def partitions_in_progress(instance: dg.DagsterInstance) -> set[str]:
    """Partition keys of runs that are queued or running (any job): never launch a second run on top."""
    records = instance.get_run_records(dg.RunsFilter(statuses=_IN_PROGRESS))
    return {r.dagster_run.tags["dagster/partition"] for r in records if "dagster/partition" in r.dagster_run.tags}


@dg.schedule(
    job=nightly_backfill_job,
    cron_schedule="0 2 * * *",
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.STOPPED,
    description="02:00 UTC: one run per dataset whose per-dataset assets are missing or stale (only those assets); "
    "nothing for fresh datasets or datasets with a run in progress. Off by default.",
)
def nightly_backfill(context: dg.ScheduleEvaluationContext):
    keys = [dg.AssetKey(k) for k in PER_DATASET_ASSETS]
    todo = partitions_needing_work(
        context.instance, context.repository_def.asset_graph, keys, dataset_pd.get_partition_keys()
    )
    busy = partitions_in_progress(context.instance)
    requests = []
    for pk, asset_keys in todo.items():
        if pk in busy:
            context.log.info(f"{pk}: a run is in progress; skipped tonight")
            continue
        context.log.info(f"{pk}: {', '.join(k.to_user_string() for k in asset_keys)}")
        requests.append(
            dg.RunRequest(run_key=pk, partition_key=pk, asset_selection=asset_keys, tags={NIGHTLY_TAG: "true"})
        )
    if not requests:
        return dg.SkipReason(
            "every per-dataset partition is materialized and fresh"
            + (f" or in progress ({', '.join(sorted(busy & set(todo)))})" if busy & set(todo) else "")
        )
    return requests
