import time

import dagster as dg

from rlhn_assets import settings
from rlhn_assets.conditions import PIPELINE
from rlhn_assets.defs.relabel.assets import relabeled
from rlhn_assets.lib.markdown import md_table
from rlhn_assets.partitions import variant_pd
from rlhn_assets.resources import RLHNDuckDB

_BY_VARIANT = dg.MultiToSingleDimensionPartitionMapping(partition_dimension_name="variant")


class TrainConfig(dg.Config):
    epochs: int = 1
    batch_size: int = 16
    learning_rate: float = 2e-5
    hard_negatives: int = 7  # 1 positive + up to 7 hard negatives per query, as in the paper
    scale: float = 20.0  # MNRL scale = 1 / temperature (paper: 0.01 -> 100)
    max_seq_length: int = 256
    seed: int = 13
    max_steps: int = -1  # cap for demos (-1 = all)
    reranker_negatives: int = 3


def _settings(config: TrainConfig):
    from rlhn_assets.lib.training import TrainSettings

    return TrainSettings(epochs=config.epochs, batch_size=config.batch_size, learning_rate=config.learning_rate,
                         hard_negatives=config.hard_negatives, scale=config.scale,
                         max_seq_length=config.max_seq_length, seed=config.seed, max_steps=config.max_steps,
                         reranker_negatives=config.reranker_negatives)


def model_store():
    from rlhn_assets.lib.model_store import ModelStore

    return ModelStore(settings.data_dir() / "models")


def _train(context, kind: str, config: TrainConfig, duckdb: RLHNDuckDB) -> dg.MaterializeResult:
    from rlhn_assets.lib import training
    from rlhn_assets.lib.training_data import load_training_instances

    variant = context.partition_key
    with duckdb.get_connection() as conn:
        instances, sizes = load_training_instances(conn, variant, max_negatives=max(config.hard_negatives, 25))
    if not instances:
        raise dg.Failure(f"variant {variant!r} has no training instances: materialize `relabeled` for it first")
    context.log.info(f"{kind}[{variant}]: {len(instances):,} queries from {sizes}")
    store = model_store()
    staged = store.staging_dir(kind, variant)
    fn = training.train_retriever if kind == "retriever" else training.train_reranker
    t0 = time.perf_counter()
    result = fn(instances, _settings(config), staged, log=context.log.info)
    summary = {"variant": variant, "seed": config.seed, "train_rows": result.train_rows, "steps": result.steps,
               "final_loss": result.final_loss, "training_set_sizes": sizes, "queries": len(instances),
               "seconds": round(time.perf_counter() - t0, 1), "settings": result.settings}
    path = store.publish(kind, variant, staged, result.data_version, summary)
    return dg.MaterializeResult(
        data_version=dg.DataVersion(result.data_version[:16]),
        metadata={
            "model_path": dg.MetadataValue.path(str(path)),
            "model_data_version": result.data_version[:16],
            "queries": len(instances),
            "train_rows": result.train_rows,
            "steps": result.steps,
            "final_loss": float(result.final_loss) if result.final_loss is not None else float("nan"),
            "seed": config.seed,
            "seconds": round(time.perf_counter() - t0, 1),
            "training_set_sizes": dg.MetadataValue.md(md_table(["dataset", "queries"], sorted(sizes.items()))),
            "loss_curve": dg.MetadataValue.md(md_table(["step", "loss"], result.loss_history[-20:])),
        })


@dg.asset(
    partitions_def=variant_pd,
    group_name="train",
    code_version="1",
    automation_condition=PIPELINE,
    deps=[dg.AssetDep(relabeled, partition_mapping=_BY_VARIANT)],
    kinds={"pytorch", "sentence_transformers"},
    pool="training",
    backfill_policy=dg.BackfillPolicy.multi_run(1),  # backfills: one run per variant
    description=(
        "A retriever fine-tuned per variant: the packaged all-MiniLM-L6-v2 (loaded by path) trained with "
        "sentence-transformers' SentenceTransformerTrainer and MultipleNegativesRankingLoss (InfoNCE, in-batch + "
        "hard negatives), 1 positive (sampled per query per epoch, so RLHN's extra positives enter training) + up "
        "to 7 hard negatives, on the union of the variant's kept datasets. Saved under data/models/retriever/"
        "<variant>/<data version>/; the data version is the model folder's content hash."
    ),
)
def trained_retriever(context: dg.AssetExecutionContext, config: TrainConfig, duckdb: RLHNDuckDB) -> dg.MaterializeResult:
    return _train(context, "retriever", config, duckdb)


@dg.asset(
    partitions_def=variant_pd,
    group_name="train",
    code_version="1",
    automation_condition=PIPELINE,
    deps=[dg.AssetDep(relabeled, partition_mapping=_BY_VARIANT)],
    kinds={"pytorch", "sentence_transformers"},
    pool="training",
    backfill_policy=dg.BackfillPolicy.multi_run(1),  # backfills: one run per variant
    description=(
        "A reranker per variant: a sentence-transformers CrossEncoder initialized from the same MiniLM weights "
        "(new 1-logit head), trained with BinaryCrossEntropyLoss on the variant's (query, positive) = 1 / "
        "(query, hard negative) = 0 pairs. Evaluated by re-ranking the trained retriever's top-100."
    ),
)
def trained_reranker(context: dg.AssetExecutionContext, config: TrainConfig, duckdb: RLHNDuckDB) -> dg.MaterializeResult:
    return _train(context, "reranker", config, duckdb)
