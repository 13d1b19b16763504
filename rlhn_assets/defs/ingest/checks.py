import dagster as dg

from rlhn_assets.defs.ingest.assets import raw_bge
from rlhn_assets.defs.instance_checks import build_instance_checks
from rlhn_assets.partitions import dataset_pd
from rlhn_assets.resources import DatasetRegistryResource, RLHNDuckDB

raw_bge_has_positive, raw_bge_unique_ids, raw_bge_no_overlap = build_instance_checks(raw_bge, "raw_instances")


@dg.asset_check(
    asset=raw_bge,
    partitions_def=dataset_pd,
    blocking=True,
    description="The share of quarantined rows is at most the dataset's `max_quarantine_rate` "
    "(registry; default 0.05). A high rate usually means a wrong format or a broken file.",
)
def raw_bge_quarantine_rate(
    context: dg.AssetCheckExecutionContext, duckdb: RLHNDuckDB, registry: DatasetRegistryResource
) -> dg.AssetCheckResult:
    ds = registry.load().get(context.partition_key)
    with duckdb.get_connection() as conn:
        rejected, accepted = conn.execute(
            """SELECT (SELECT count(*) FROM raw_quarantine WHERE dataset = $1
                        AND reason NOT IN ('negative_equals_positive', 'duplicate_negative')),
                      (SELECT count(*) FROM raw_instances WHERE dataset = $1)""",
            [ds.name],
        ).fetchall()[0]
    rate = rejected / (rejected + accepted) if rejected + accepted else 0.0
    return dg.AssetCheckResult(
        passed=rate <= ds.max_quarantine_rate,
        severity=dg.AssetCheckSeverity.ERROR,
        description=(
            f"{rejected} of {rejected + accepted} rows quarantined ({rate:.2%}); limit {ds.max_quarantine_rate:.2%}"
        ),
        metadata={
            "quarantined_rows": rejected,
            "rows": rejected + accepted,
            "rate": round(rate, 5),
            "threshold": ds.max_quarantine_rate,
        },
    )
