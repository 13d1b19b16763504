import dagster as dg

from rlhn_assets.defs.instance_checks import build_instance_checks
from rlhn_assets.defs.prune.assets import pruned
from rlhn_assets.partitions import dataset_pd
from rlhn_assets.resources import RLHNDuckDB

pruned_has_positive, pruned_unique_ids, pruned_no_overlap = build_instance_checks(pruned, "pruned_instances")


@dg.asset_check(asset=pruned, partitions_def=dataset_pd, blocking=True,
                description="The pruning decision of the partition is recorded, and a pruned-away dataset "
                            "has no instances left.")
def pruned_decision_applied(context: dg.AssetCheckExecutionContext, duckdb: RLHNDuckDB) -> dg.AssetCheckResult:
    with duckdb.get_connection() as conn:
        rows = conn.execute("SELECT kept, decided_by FROM pruned_decisions WHERE dataset = ?",
                            [context.partition_key]).fetchall()
        n = conn.execute("SELECT count(*) FROM pruned_instances WHERE dataset = ?",
                         [context.partition_key]).fetchall()[0][0]
    ok = len(rows) == 1 and (rows[0][0] or n == 0)
    return dg.AssetCheckResult(passed=ok, severity=dg.AssetCheckSeverity.ERROR,
                               description=f"decision rows {len(rows)}, kept={rows[0][0] if rows else None}, instances {n}",
                               metadata={"instances": n})
