import dagster as dg

from rlhn_assets.defs.relabel.assets import relabeled
from rlhn_assets.lib.relabel import variant_treatment
from rlhn_assets.partitions import dataset_variant_pd
from rlhn_assets.resources import RLHNDuckDB


@dg.asset_check(
    asset=relabeled,
    partitions_def=dataset_variant_pd,
    blocking=True,
    description="Relabel invariants: no docid both positive and negative; RLHN positives = original "
    "positives + false negatives (in order); hn_remove/rlhn negatives = original minus false "
    "negatives; s2_rlhn_filter positives = original + some former negatives, negatives = original minus "
    "the touched ones; topk_percpos positives unchanged, negatives = original minus the dropped ones, every "
    "instance kept; remove/default keep lists unchanged; the variant's instance count agrees with "
    "the verdicts (false-negative counts per instance).",
)
def relabeled_invariants(context: dg.AssetCheckExecutionContext, duckdb: RLHNDuckDB) -> dg.AssetCheckResult:
    keys = context.partition_key.keys_by_dimension
    dataset, variant = keys["dataset"], keys["variant"]
    treatment = variant_treatment(variant)[1]
    with duckdb.get_connection() as conn:
        overlap = conn.execute(
            "SELECT count(*) FROM relabeled_instances WHERE dataset = $1 AND variant = $2 "
            "AND len(list_intersect(positive_ids, negative_ids)) > 0",
            [dataset, variant],
        ).fetchall()[0][0]
        # Compare each output row with its pruned original.
        bad_lists = conn.execute(
            """SELECT count(*) FROM relabeled_instances r JOIN pruned_instances p USING (dataset, instance_id)
               WHERE r.dataset = $1 AND r.variant = $2 AND NOT (
                 CASE $3
                   WHEN 'rlhn' THEN r.positive_ids[1:len(p.positive_ids)] = p.positive_ids
                        AND len(r.positive_ids) = len(p.positive_ids) + r.false_negatives
                        AND list_sort(r.positive_ids[len(p.positive_ids) + 1:] || r.negative_ids)
                            = list_sort(p.negative_ids)
                   WHEN 'hn_remove' THEN r.positive_ids = p.positive_ids
                        AND len(r.negative_ids) = len(p.negative_ids) - r.false_negatives
                        AND len(list_filter(r.negative_ids, lambda x: NOT list_contains(p.negative_ids, x))) = 0
                   WHEN 'topk_percpos' THEN r.positive_ids = p.positive_ids
                        AND len(r.negative_ids) = len(p.negative_ids) - r.false_negatives
                        AND len(list_filter(r.negative_ids, lambda x: NOT list_contains(p.negative_ids, x))) = 0
                   WHEN 'rlhn_filter' THEN r.positive_ids[1:len(p.positive_ids)] = p.positive_ids
                        AND len(r.positive_ids) - len(p.positive_ids) <= r.false_negatives
                        AND len(r.negative_ids) = len(p.negative_ids) - r.false_negatives
                        AND len(list_filter(r.positive_ids[len(p.positive_ids) + 1:] || r.negative_ids,
                                            lambda x: NOT list_contains(p.negative_ids, x))) = 0
                   ELSE r.positive_ids = p.positive_ids AND r.negative_ids = p.negative_ids
                 END)""",
            [dataset, variant, treatment],
        ).fetchall()[0][0]
        n_out, n_pruned = conn.execute(
            "SELECT (SELECT count(*) FROM relabeled_instances WHERE dataset = $1 AND variant = $2), "
            "(SELECT count(*) FROM pruned_instances WHERE dataset = $1)",
            [dataset, variant],
        ).fetchall()[0]
        fn_counts = conn.execute(
            "SELECT count(*) FILTER (WHERE false_negatives > 0), max(false_negatives) FROM relabeled_instances "
            "WHERE dataset = $1 AND variant = $2",
            [dataset, variant],
        ).fetchall()[0]
    count_ok = {
        "default": n_out == n_pruned,
        "topk_percpos": n_out == n_pruned,
        "remove": fn_counts[0] == 0 and n_out <= n_pruned,
    }.get(treatment, n_out <= n_pruned)
    passed = overlap == 0 and bad_lists == 0 and count_ok
    return dg.AssetCheckResult(
        passed=passed,
        description=f"{overlap} instances with a docid both positive and negative; {bad_lists} rows inconsistent with "
        f"their original and verdicts; {n_out} of {n_pruned} pruned instances kept",
        metadata={"overlap": overlap, "inconsistent_rows": bad_lists, "instances": n_out, "pruned_instances": n_pruned},
    )
