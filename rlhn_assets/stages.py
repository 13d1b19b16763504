"""The pipeline's stages, derived from the asset graph (not spelled out by hand).

A stage is a run of assets that share a group (ingest, judge, relabel, train, evaluate) and a partitions
definition, in dependency order: one Dagster run per partition materializes the stage's assets together, with
their checks. `make demo`, `make experiment` and the nightly schedule all take their order from here, so a
renamed or added asset cannot be left behind by a hand-written list.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import dagster as dg

Stage = tuple[list[str], list]  # (asset keys materialized together, partition keys; [None] when unpartitioned)


def graph_stages(
    asset_graph, *, exclude: Iterable[str] = (), keep_partition: Callable[[object, object], bool] | None = None
) -> list[Stage]:
    """Stages of every materializable asset of ``asset_graph`` (``Definitions.resolve_asset_graph()``) except
    ``exclude``, in an order where each stage comes after the stages it depends on.

    Kahn's algorithm over the assets: while an asset of the current stage's (group, partitions definition) is
    ready it joins the stage; otherwise the ready asset with the longest path ahead (the first in Dagster's
    topological order among equals) starts the next one.
    ``keep_partition(partitions_def, key)`` filters each stage's partition keys (e.g. only some variants)."""
    excluded = {dg.AssetKey.from_user_string(k) if isinstance(k, str) else k for k in exclude}
    order = [k for k in asset_graph.toposorted_asset_keys if asset_graph.get(k).is_materializable and k not in excluded]
    chosen = set(order)
    parents = {k: {p for p in asset_graph.get(k).parent_keys if p in chosen} for k in order}
    # longest path to a sink: the ready asset with the most work behind it starts the next stage (the critical
    # path first), so e.g. the untrained base model is set up just before the evaluation, not before ingestion
    height: dict = {}
    for k in reversed(order):
        height[k] = 1 + max((height[c] for c in asset_graph.get(k).child_keys if c in height), default=0)
    done: set = set()
    stages: list[tuple[tuple, list]] = []
    while len(done) < len(order):
        ready = [k for k in order if k not in done and parents[k] <= done]
        if not ready:  # cannot happen in a DAG; guards against an endless loop
            raise RuntimeError(f"asset graph has a cycle among {sorted(set(order) - done)}")
        kind = _kind(asset_graph, max(ready, key=lambda k: height[k]))  # max keeps the first of equals
        stage = []
        while ready := [k for k in order if k not in done and parents[k] <= done and _kind(asset_graph, k) == kind]:
            stage.extend(ready)
            done.update(ready)
        stages.append((kind, stage))
    out: list[Stage] = []
    for (_group, pd), keys in stages:
        partitions = (
            [None]
            if pd is None
            else [p for p in _partition_keys(pd) if keep_partition is None or keep_partition(pd, p)]
        )
        out.append(([k.to_user_string() for k in keys], partitions))
    return out


def _kind(asset_graph, key) -> tuple:
    node = asset_graph.get(key)
    return node.group_name, node.partitions_def


def _partition_keys(pd) -> list:
    if isinstance(pd, dg.MultiPartitionsDefinition):
        return [dg.MultiPartitionKey(k.keys_by_dimension) for k in pd.get_partition_keys()]
    return list(pd.get_partition_keys())


def only_models(models: Sequence[str]):
    """A ``keep_partition`` that keeps, of the variant- and model-partitioned stages, only ``models`` (variant names
    and `base`); dataset-partitioned stages keep every dataset, `relabeled` every (dataset, variant)."""
    from rlhn_assets.partitions import model_pd, variant_pd

    wanted = set(models)

    def keep(pd, key) -> bool:
        if pd is variant_pd or pd is model_pd:
            return key in wanted
        if isinstance(key, dg.MultiPartitionKey) and "model" in key.keys_by_dimension:
            return key.keys_by_dimension["model"] in wanted
        return True

    return keep


def per_dataset_assets(asset_graph) -> tuple[str, ...]:
    """The materializable assets partitioned by dataset alone (mining, ingest, pruning, judging), in graph order."""
    from rlhn_assets.partitions import dataset_pd

    return tuple(
        k.to_user_string()
        for k in asset_graph.toposorted_asset_keys
        if asset_graph.get(k).is_materializable and asset_graph.get(k).partitions_def is dataset_pd
    )
