"""Incremental re-materialization: editing one dataset's file requests exactly that dataset's partitions
downstream (and the per-variant partitions of that dataset), and nothing else; with no change, nothing."""

import dagster as dg
from dagster._core.definitions.observe import observe  # dagster 1.13 has no public observe()

from rlhn_assets.definitions import defs
from rlhn_assets.resources import DatasetRegistryResource, RLHNDuckDB


def test_editing_one_file_requests_only_that_datasets_partitions(tmp_data, db_path, instance):
    d = defs()
    resources = {
        **d.resources,
        "duckdb": RLHNDuckDB(database=str(db_path)),
        "registry": DatasetRegistryResource(path=str(tmp_data / "datasets.yaml")),
    }
    from rlhn_assets.defs.sources.assets import raw_dataset_files as source

    ingest = ["hard_negative_mining", "raw_bge", "pruned"]
    sel = dg.AssetSelection.assets(*ingest) | dg.AssetSelection.checks_for_assets(*ingest)

    observe([source], instance=instance, resources={"registry": resources["registry"]})
    for ds in ("fiqa", "nq"):
        assert dg.materialize(
            list(d.assets) + list(d.asset_checks),
            selection=sel,
            partition_key=ds,
            resources=resources,
            instance=instance,
        ).success
    full = dg.Definitions(assets=d.assets, asset_checks=d.asset_checks, sensors=d.sensors, resources=resources)
    first = dg.evaluate_automation_conditions(defs=full, instance=instance)  # the first tick only sets the cursor
    # No change since: the next tick requests nothing.
    idle = dg.evaluate_automation_conditions(defs=full, instance=instance, cursor=first.cursor)
    assert idle.total_requested == 0

    # Edit fiqa's file (drop its last row), observe the sources: only fiqa's data version changes.
    path = tmp_data / "raw" / "fiqa" / "rlhn_judge_sample.jsonl.gz"
    import gzip

    lines = gzip.open(path, "rt").read().splitlines(True)
    with gzip.open(path, "wt") as f:
        f.writelines(lines[:-1])
    observe([source], instance=instance, resources={"registry": resources["registry"]})
    tick = dg.evaluate_automation_conditions(defs=full, instance=instance, cursor=idle.cursor)
    requested = {
        k.to_user_string(): tick.get_requested_partitions(k)
        for k in d.resolve_all_asset_keys()
        if tick.get_requested_partitions(k)
    }
    assert requested["raw_bge"] == {"fiqa"} and requested["pruned"] == {"fiqa"}
    assert requested["hard_negative_mining"] == {"fiqa"}
    for key, parts in requested.items():
        for p in parts:
            assert (p == "fiqa") or (
                isinstance(p, dg.MultiPartitionKey) and p.keys_by_dimension["dataset"] == "fiqa"
            ), (key, p)

    # And the tick after that, with nothing changed, requests nothing again.
    again = dg.evaluate_automation_conditions(defs=full, instance=instance, cursor=tick.cursor)
    assert again.total_requested == 0
