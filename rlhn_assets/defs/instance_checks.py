"""Asset checks shared by every stage that stores an instance table (raw_bge, pruned).

Each check is per partition (it has the asset's partitions_def) and blocking: an instance without a
positive, a duplicated id or a passage that is both positive and negative would poison judging and
training downstream."""

import dagster as dg

from rlhn_assets.lib import invariants
from rlhn_assets.partitions import dataset_pd
from rlhn_assets.resources import RLHNDuckDB


def partitions_of(context: dg.AssetCheckExecutionContext) -> list[str]:
    """The datasets this check evaluation covers: one, or several when a single-run backfill (``pruned``)
    materialized a range; a check over several passes only if it passes for each."""
    return list(context.partition_keys)


def _each(context, fn) -> tuple[int, list[str]]:
    """Sum (violations, examples) of ``fn(dataset)`` over the evaluation's datasets; examples name the dataset
    when there are several."""
    keys = partitions_of(context)
    total, examples = 0, []
    for ds in keys:
        n, ex = fn(ds)
        total += n
        examples += [f"{ds}:{e}" if len(keys) > 1 else e for e in ex]
    return total, examples[:5]


def _result(violations: int, examples: list[str], what: str) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(
        passed=violations == 0,
        severity=dg.AssetCheckSeverity.ERROR,
        description=f"{violations} {what}" if violations else f"no {what}",
        metadata={"violations": violations, "examples": ", ".join(examples) or "-"},
    )


def build_instance_checks(asset: dg.AssetsDefinition, table: str) -> list[dg.AssetChecksDefinition]:
    name = asset.key.path[-1]

    @dg.asset_check(
        asset=asset,
        name=f"{name}_every_instance_has_a_positive",
        partitions_def=dataset_pd,
        blocking=True,
        description="Every instance has at least one positive passage.",
    )
    def has_positive(context: dg.AssetCheckExecutionContext, duckdb: RLHNDuckDB) -> dg.AssetCheckResult:
        with duckdb.get_connection() as conn:
            return _result(
                *_each(context, lambda ds: invariants.without_positive(conn, table, ds)), "instances without a positive"
            )

    @dg.asset_check(
        asset=asset,
        name=f"{name}_unique_ids",
        partitions_def=dataset_pd,
        blocking=True,
        description="Instance, query and passage ids are unique per dataset, and every referenced passage exists.",
    )
    def unique_ids(context: dg.AssetCheckExecutionContext, duckdb: RLHNDuckDB) -> dg.AssetCheckResult:
        with duckdb.get_connection() as conn:
            parts = {
                "duplicate instance ids": _each(context, lambda ds: invariants.duplicate_instance_ids(conn, table, ds)),
                "duplicate query ids": _each(context, lambda ds: invariants.duplicate_query_ids(conn, ds)),
                "duplicate passage ids": _each(context, lambda ds: invariants.duplicate_passage_ids(conn, ds)),
                "instances referencing a missing passage": _each(
                    context, lambda ds: invariants.dangling_passage_refs(conn, table, ds)
                ),
            }
        total = sum(n for n, _ in parts.values())
        return dg.AssetCheckResult(
            passed=total == 0,
            severity=dg.AssetCheckSeverity.ERROR,
            description="; ".join(f"{n} {what}" for what, (n, _) in parts.items() if n) or "all ids unique",
            metadata={what: n for what, (n, _) in parts.items()}
            | {"examples": ", ".join(e for _, ex in parts.values() for e in ex) or "-"},
        )

    @dg.asset_check(
        asset=asset,
        name=f"{name}_no_passage_both_positive_and_negative",
        partitions_def=dataset_pd,
        blocking=True,
        description="No passage is both a positive and a negative of one instance.",
    )
    def no_overlap(context: dg.AssetCheckExecutionContext, duckdb: RLHNDuckDB) -> dg.AssetCheckResult:
        with duckdb.get_connection() as conn:
            return _result(
                *_each(context, lambda ds: invariants.positive_also_negative(conn, table, ds)),
                "instances with a passage both positive and negative",
            )

    return [has_positive, unique_ids, no_overlap]
