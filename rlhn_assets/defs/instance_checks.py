"""Asset checks shared by every stage that stores an instance table (raw_bge, pruned).

Each check is per partition (it has the asset's partitions_def) and blocking: an instance without a
positive, a duplicated id or a passage that is both positive and negative would poison judging and
training downstream."""


import dagster as dg

from rlhn_assets.lib import invariants
from rlhn_assets.partitions import dataset_pd
from rlhn_assets.resources import RLHNDuckDB


def _result(violations: int, examples: list[str], what: str) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(
        passed=violations == 0,
        severity=dg.AssetCheckSeverity.ERROR,
        description=f"{violations} {what}" if violations else f"no {what}",
        metadata={"violations": violations, "examples": ", ".join(examples) or "-"},
    )


def build_instance_checks(asset: dg.AssetsDefinition, table: str) -> list[dg.AssetChecksDefinition]:
    name = asset.key.path[-1]

    @dg.asset_check(asset=asset, name=f"{name}_every_instance_has_a_positive", partitions_def=dataset_pd,
                    blocking=True, description="Every instance has at least one positive passage.")
    def has_positive(context: dg.AssetCheckExecutionContext, duckdb: RLHNDuckDB) -> dg.AssetCheckResult:
        with duckdb.get_connection() as conn:
            return _result(*invariants.without_positive(conn, table, context.partition_key),
                           "instances without a positive")

    @dg.asset_check(asset=asset, name=f"{name}_unique_ids", partitions_def=dataset_pd, blocking=True,
                    description="Instance, query and passage ids are unique per dataset, and every referenced "
                                "passage exists.")
    def unique_ids(context: dg.AssetCheckExecutionContext, duckdb: RLHNDuckDB) -> dg.AssetCheckResult:
        ds = context.partition_key
        with duckdb.get_connection() as conn:
            parts = {
                "duplicate instance ids": invariants.duplicate_instance_ids(conn, table, ds),
                "duplicate query ids": invariants.duplicate_query_ids(conn, ds),
                "duplicate passage ids": invariants.duplicate_passage_ids(conn, ds),
                "instances referencing a missing passage": invariants.dangling_passage_refs(conn, table, ds),
            }
        total = sum(n for n, _ in parts.values())
        return dg.AssetCheckResult(
            passed=total == 0,
            severity=dg.AssetCheckSeverity.ERROR,
            description="; ".join(f"{n} {what}" for what, (n, _) in parts.items() if n) or "all ids unique",
            metadata={what: n for what, (n, _) in parts.items()}
            | {"examples": ", ".join(e for _, ex in parts.values() for e in ex) or "-"},
        )

    @dg.asset_check(asset=asset, name=f"{name}_no_passage_both_positive_and_negative", partitions_def=dataset_pd,
                    blocking=True, description="No passage is both a positive and a negative of one instance.")
    def no_overlap(context: dg.AssetCheckExecutionContext, duckdb: RLHNDuckDB) -> dg.AssetCheckResult:
        with duckdb.get_connection() as conn:
            return _result(*invariants.positive_also_negative(conn, table, context.partition_key),
                           "instances with a passage both positive and negative")

    return [has_positive, unique_ids, no_overlap]
