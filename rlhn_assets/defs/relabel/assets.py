from typing import Literal

import dagster as dg

from rlhn_assets import settings
from rlhn_assets.conditions import PIPELINE
from rlhn_assets.defs.judge.assets import tier1_judgments, tier2_judgments
from rlhn_assets.defs.relabel.teacher import teacher_scores
from rlhn_assets.lib.markdown import md_table
from rlhn_assets.lib.relabel import build_variant, export_variant
from rlhn_assets.lib.teacher import DEFAULT_THRESHOLD
from rlhn_assets.partitions import dataset_variant_pd
from rlhn_assets.resources import DatasetRegistryResource, RLHNDuckDB

_BY_DATASET = dg.MultiToSingleDimensionPartitionMapping(partition_dimension_name="dataset")


class RelabelConfig(dg.Config):
    # Which verdicts are false negatives: "better" (the paper, both stages) or "better+worse" (the authors' release
    # script for stage 2). Stage 2's default `auto` picks by the kind of judge that made the tier-2 verdicts: for a
    # listwise judge `worse` means "relevant but not preferred over the ground truth" and stays a negative, as in
    # the paper; for a one-token judge (pointwise / graded, calibrated or not) `worse` means score >=
    # threshold_relevant, the false-negative cut judge_agreement tunes (better = a second, higher cut), so both
    # lists are false negatives.
    fn_lists: Literal["better", "better+worse"] = "better"
    fn_lists_stage2: Literal["auto", "better", "better+worse"] = "auto"
    # hn_remove / rlhn drop an instance with more than k false negatives (ambiguous query; paper k = 7);
    # s2_rlhn_filter with more than k negatives judged better or worse.
    ambiguity_k: int = 7
    # topk_percpos: drop a negative whose teacher score is >= this share of the weakest positive's score
    # (NV-Retriever's TopK-PercPos, 95%); in (0, 1].
    percpos_threshold: float = DEFAULT_THRESHOLD
    export: bool = True
    export_dir: str = ""  # default: <data dir>/exports


ONE_TOKEN_KINDS = ("pointwise", "graded")


def stage2_fn_lists(conn, dataset: str, setting: str) -> str:
    """``setting`` unless it is ``auto``: then ``better+worse`` when every tier-2 verdict of ``dataset`` came from a
    one-token judge kind (``pointwise``, ``graded``, with or without ``+calibrated``), else ``better``."""
    if setting != "auto":
        return setting
    kinds = {
        k
        for (k,) in conn.execute(
            "SELECT DISTINCT judge_kind FROM judgments WHERE dataset = $1 AND tier = 2", [dataset]
        ).fetchall()
    }
    one_token = bool(kinds) and all(k and k.split("+")[0] in ONE_TOKEN_KINDS for k in kinds)
    return "better+worse" if one_token else "better"


def export_paths(variant: str, dataset: str, export_dir: str = ""):
    from pathlib import Path

    root = (Path(export_dir) if export_dir else settings.data_dir() / "exports") / variant
    return root / f"{dataset}.parquet", root / f"{dataset}.jsonl.gz"


@dg.asset(
    partitions_def=dataset_variant_pd,
    group_name="relabel",
    code_version="2",
    automation_condition=PIPELINE,
    deps=[
        dg.AssetDep(tier1_judgments, partition_mapping=_BY_DATASET),
        dg.AssetDep(tier2_judgments, partition_mapping=_BY_DATASET),
        dg.AssetDep(teacher_scores, partition_mapping=_BY_DATASET),
    ],
    kinds={"duckdb", "parquet"},
    description=(
        "The dataset variants of the paper (§3), per dataset x variant: `default` (pruned, unchanged), and from "
        "stage 1 alone (`s1_`) or the full cascade (`s2_`): `remove` (drop instances with a false negative), "
        "`hn_remove` (drop the false negatives), `rlhn` (relabel them as positives); instances with more than k "
        "false negatives are dropped from hn_remove/rlhn. Comparison treatments: `s2_rlhn_filter` (ARHN's "
        "relabel + filter, arXiv 2604.11092: stage-2 `better` negatives become positives, `worse` ones are "
        "removed) and `topk_percpos` (NV-Retriever's TopK-PercPos, arXiv 2407.15831: negatives whose "
        "`teacher_scores` score is >= `percpos_threshold` (default 95%) of the weakest positive's are removed; no "
        "LLM). Table `relabeled_instances`; also exported in the rlhn schema to "
        "data/exports/<variant>/<dataset>.{parquet,jsonl.gz}."
    ),
)
def relabeled(
    context: dg.AssetExecutionContext, config: RelabelConfig, duckdb: RLHNDuckDB, registry: DatasetRegistryResource
) -> dg.MaterializeResult:
    keys = context.partition_key.keys_by_dimension
    dataset, variant = keys["dataset"], keys["variant"]
    judged = registry.load().get(dataset).judge
    with duckdb.get_connection() as conn:
        fn_lists = (
            stage2_fn_lists(conn, dataset, config.fn_lists_stage2) if variant.startswith("s2_") else config.fn_lists
        )
        try:
            stats = build_variant(
                conn,
                dataset,
                variant,
                fn_lists=fn_lists,
                ambiguity_k=config.ambiguity_k,
                judged=judged,
                percpos_threshold=config.percpos_threshold,
            )
        except ValueError as e:  # a setting out of range, or teacher scores missing: a retry cannot help
            raise dg.Failure(str(e), allow_retries=False) from e
        md = {
            "dagster/row_count": stats.instances_out,
            "instances": stats.instances_out,
            "instances_in": stats.instances_in,
            "instances_with_false_negatives": stats.instances_with_fn,
            "false_negatives": stats.false_negatives,
            "dropped_ambiguous": stats.dropped_ambiguous,
            "dropped_remove": stats.dropped_remove,
            "error_verdicts_ignored": stats.error_verdicts,
            "relabeled_positives": stats.relabeled_positives,
            "negatives_removed": stats.negatives_removed,
            "fn_lists": fn_lists,
            "ambiguity_k": config.ambiguity_k,
            "judged": judged,
        }
        if variant == "topk_percpos":
            md["percpos_threshold"] = config.percpos_threshold
            md["fn_lists"] = "not used (teacher scores, no verdicts)"
        elif variant == "s2_rlhn_filter":
            md["fn_lists"] = "not used (better -> positives, worse -> removed)"
        pos_neg = conn.execute(
            "SELECT avg(len(positive_ids)), avg(len(negative_ids)) FROM relabeled_instances "
            "WHERE dataset = $1 AND variant = $2",
            [dataset, variant],
        ).fetchall()[0]
        md["positives_per_instance_mean"] = round(float(pos_neg[0] or 0), 3)
        md["negatives_per_instance_mean"] = round(float(pos_neg[1] or 0), 3)
        if config.export:
            pq, jl = export_paths(variant, dataset, config.export_dir)
            n = export_variant(conn, dataset, variant, pq, jl)
            md["export_parquet"] = dg.MetadataValue.path(str(pq))
            md["export_jsonl"] = dg.MetadataValue.path(str(jl))
            md["exported_rows"] = n
    context.log.info(
        f"{dataset}/{variant}: {stats.instances_out:,}/{stats.instances_in:,} instances, "
        f"{stats.false_negatives:,} false negatives"
    )
    md["summary"] = dg.MetadataValue.md(
        md_table(
            ["instances in", "out", "with FN", "FNs", "dropped (>k)", "dropped (remove)", "relabeled", "neg. removed"],
            [
                [
                    stats.instances_in,
                    stats.instances_out,
                    stats.instances_with_fn,
                    stats.false_negatives,
                    stats.dropped_ambiguous,
                    stats.dropped_remove,
                    stats.relabeled_positives,
                    stats.negatives_removed,
                ]
            ],
        )
    )
    return dg.MaterializeResult(metadata=md)
