import dagster as dg

from rlhn_assets.lib.fingerprint import dataset_fingerprint
from rlhn_assets.partitions import dataset_pd
from rlhn_assets.resources import DatasetRegistryResource


@dg.observable_source_asset(
    partitions_def=dataset_pd,
    group_name="sources",
    description=(
        "The source files of each dataset (registry entry + file bytes + mining inputs). Its data version per "
        "partition is their content hash: editing one dataset's file changes only that partition's version, and "
        "the automation sensor then re-materializes exactly what depends on it. Observed every 10 minutes by the "
        "automation sensor, or with 'Observe sources' in the UI."
    ),
    automation_condition=dg.AutomationCondition.cron_tick_passed("*/10 * * * *"),
)
def raw_dataset_files(
    context: dg.AssetExecutionContext, registry: DatasetRegistryResource
) -> dg.DataVersionsByPartition:
    reg = registry.load()
    keys = context.partition_keys if context.has_partition_key_range or context.has_partition_key else reg.names
    return dg.DataVersionsByPartition({k: dataset_fingerprint(reg, k) for k in keys if k in reg.names})
