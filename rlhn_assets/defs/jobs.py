import dagster as dg

from rlhn_assets.partitions import dataset_pd, dataset_variant_pd


class ChecksOfAssetsPartitionedBy(dg.AssetSelection):
    """The asset checks of every asset whose partitions definition is ``partitions_def``.

    Resolved against the loaded graph, so a check added to a stage (or a new stage with that partitioning)
    joins the checks job without anyone editing a list of names."""

    def __init__(self, partitions_def: dg.PartitionsDefinition):
        self.partitions_def = partitions_def

    def resolve_inner(self, asset_graph, allow_missing):
        return set()  # checks only: selecting the assets would re-materialize them

    def resolve_checks_inner(self, asset_graph, allow_missing):
        return {
            key
            for key in asset_graph.asset_check_keys
            if asset_graph.get(key.asset_key).partitions_def == self.partitions_def
        }

    def to_serializable_asset_selection(self, asset_graph):
        # The base class would serialize the (empty) asset keys and lose the checks.
        return dg.AssetSelection.checks(*self.resolve_checks(asset_graph))

    def __repr__(self) -> str:
        return f"ChecksOfAssetsPartitionedBy({self.partitions_def!r})"


def _checks_job(name: str, partitions_def: dg.PartitionsDefinition, description: str):
    # Dagster infers a job's partitions from the assets it materializes (define_asset_job's partitions_def is
    # deprecated), so a checks-only job would be unpartitioned: no partition picker in the UI, and a
    # "dataset|variant" key reaching the check as a plain string. A partitioned config (empty run config)
    # gives it the partitions.
    return dg.define_asset_job(
        name,
        selection=ChecksOfAssetsPartitionedBy(partitions_def),
        description=description,
        config=dg.PartitionedConfig(partitions_def=partitions_def, run_config_for_partition_key_fn=lambda _: {}),
    )


# Re-run asset checks on demand, without re-materializing anything. One run has one partition key, and the
# per-dataset checks and those of `relabeled` (dataset x variant) take keys of different shapes: two jobs.
dataset_checks_job = _checks_job(
    "dataset_checks_job",
    dataset_pd,
    "Re-run every asset check of the per-dataset stages (ingest, pruning, judging) for one dataset "
    "partition; materializes nothing. The checks of `relabeled` (dataset x variant) are in "
    "`dataset_variant_checks_job`.",
)

dataset_variant_checks_job = _checks_job(
    "dataset_variant_checks_job",
    dataset_variant_pd,
    "Re-run every asset check of the per-(dataset, variant) stages (`relabeled`) for one dataset|variant "
    "partition; materializes nothing.",
)
