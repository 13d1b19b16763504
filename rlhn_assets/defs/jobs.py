import dagster as dg

from rlhn_assets.partitions import dataset_pd

# Re-run the asset checks of the per-dataset stages on demand, without re-materializing anything.
dataset_checks_job = dg.define_asset_job(
    "dataset_checks_job",
    selection=dg.AssetSelection.all_asset_checks() & dg.AssetSelection.groups("ingest"),
    partitions_def=dataset_pd,
    description="Re-run every asset check of the per-dataset stages (ingest, pruning) for one partition.",
)
