import dagster as dg

from rlhn_assets.conditions import PIPELINE
from rlhn_assets.defs.ingest.assets import instance_summary_metadata, raw_bge
from rlhn_assets.lib.pruning import RECOMMENDATION_FILE, decide, load_recommendation, prune_dataset
from rlhn_assets.partitions import dataset_pd
from rlhn_assets.resources import DatasetRegistryResource, RLHNDuckDB


class PruneConfig(dg.Config):
    # The paper prompts at most 25 negatives per call; None keeps all (the judge then makes several calls).
    max_negatives_per_instance: int | None = None
    # Keep only the first N instances (by instance id) of each dataset: a sample size for demos and trials.
    max_instances: int | None = None


@dg.asset(
    partitions_def=dataset_pd,
    group_name="ingest",
    code_version="1",
    automation_condition=PIPELINE,
    deps=[raw_bge],
    kinds={"duckdb"},
    backfill_policy=dg.BackfillPolicy.single_run(),
    description=(
        "Applies the dataset pruning decision (manual `keep:` in the registry wins over the leave-one-out "
        "recommendation in `data/pruning/recommendation.json`; default keep) and cleans instances: exact "
        "duplicates removed, negatives that are also positives removed, optional cap on negatives. A "
        "pruned-away dataset materializes an empty partition whose metadata says why. Table `pruned_instances`."
    ),
)
def pruned(
    context: dg.AssetExecutionContext, config: PruneConfig, duckdb: RLHNDuckDB, registry: DatasetRegistryResource
) -> dg.MaterializeResult:
    reg = registry.load()
    try:
        recommendation = load_recommendation(reg.data_dir / RECOMMENDATION_FILE)
    except ValueError as e:
        raise dg.Failure(str(e)) from e
    results = {}
    for key in context.partition_keys:  # single-run backfills cover several datasets
        ds = reg.get(key)
        decision = decide(ds, recommendation)
        with duckdb.get_connection() as conn:
            stats = prune_dataset(conn, ds.name, decision, config.max_negatives_per_instance, config.max_instances)
            metadata = instance_summary_metadata(conn, "pruned_instances", ds.name)
        context.log.info(
            f"{ds.name}: {'kept' if decision.kept else 'PRUNED'} ({decision.decided_by}: "
            f"{decision.reason}); {stats.kept_instances:,}/{stats.raw_instances:,} instances"
        )
        metadata.update(
            {
                "kept": dg.MetadataValue.bool(decision.kept),
                "decided_by": dg.MetadataValue.text(decision.decided_by),
                "decision_reason": dg.MetadataValue.text(decision.reason),
                "raw_instances": dg.MetadataValue.int(stats.raw_instances),
                "duplicates_removed": dg.MetadataValue.int(stats.duplicates_removed),
                "overlap_negatives_removed": dg.MetadataValue.int(stats.overlap_negatives_removed),
                "capped_negatives_removed": dg.MetadataValue.int(stats.capped_negatives_removed),
                "max_negatives_per_instance": dg.MetadataValue.text(str(config.max_negatives_per_instance)),
                "max_instances": dg.MetadataValue.text(str(config.max_instances)),
                "sampled_away": dg.MetadataValue.int(stats.sampled_away),
            }
        )
        results[key] = metadata
    if len(results) == 1:
        return dg.MaterializeResult(metadata=next(iter(results.values())))
    # Several partitions in one run: one materialization event, with a per-dataset summary.
    return dg.MaterializeResult(
        metadata={
            f"{k}_{m}": v
            for k, md in results.items()
            for m, v in md.items()
            if m in ("instances", "kept", "decided_by")
        }
    )
