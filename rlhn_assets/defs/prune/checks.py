import dagster as dg

from rlhn_assets.defs.instance_checks import build_instance_checks, partitions_of
from rlhn_assets.defs.prune.assets import pruned
from rlhn_assets.partitions import dataset_pd
from rlhn_assets.resources import RLHNDuckDB

pruned_has_positive, pruned_unique_ids, pruned_no_overlap = build_instance_checks(pruned, "pruned_instances")


@dg.asset_check(
    asset=pruned,
    partitions_def=dataset_pd,
    blocking=True,
    description="The pruning decision of the partition is recorded, and a pruned-away dataset has no instances left.",
)
def pruned_decision_applied(context: dg.AssetCheckExecutionContext, duckdb: RLHNDuckDB) -> dg.AssetCheckResult:
    problems, lines, total = [], [], 0
    with duckdb.get_connection() as conn:
        for ds in partitions_of(context):  # several datasets when a single-run backfill covered a range
            rows = conn.execute("SELECT kept, decided_by FROM pruned_decisions WHERE dataset = ?", [ds]).fetchall()
            n = conn.execute("SELECT count(*) FROM pruned_instances WHERE dataset = ?", [ds]).fetchall()[0][0]
            total += n
            line = f"{ds}: decision rows {len(rows)}, kept={rows[0][0] if rows else None}, instances {n}"
            lines.append(line)
            if not (len(rows) == 1 and (rows[0][0] or n == 0)):
                problems.append(line)
    return dg.AssetCheckResult(
        passed=not problems,
        severity=dg.AssetCheckSeverity.ERROR,
        description="; ".join(problems or lines),
        metadata={"instances": total},
    )
