import hashlib
import json
import time
from datetime import UTC, datetime
from typing import Literal

import dagster as dg
from pydantic import Field

from rlhn_assets import settings
from rlhn_assets.conditions import PIPELINE
from rlhn_assets.defs.relabel.assets import relabeled
from rlhn_assets.defs.sources.assets import reranker_base_model, retriever_base_model
from rlhn_assets.lib.markdown import md_table
from rlhn_assets.partitions import variant_pd
from rlhn_assets.resources import BaseModelsResource, RLHNDuckDB

_BY_VARIANT = dg.MultiToSingleDimensionPartitionMapping(partition_dimension_name="variant")


class TrainConfig(dg.Config):
    epochs: int = 1
    batch_size: int = 16  # the global batch (split across processes when num_processes > 1)
    learning_rate: float = 2e-5
    hard_negatives: int = 7  # 1 positive + up to 7 hard negatives per query, as in the paper
    scale: float = 20.0  # MNRL scale = 1 / temperature (paper: 0.01 -> 100)
    # tokens per text; None = the base model's own (sentence_bert_config.json: 256 for the packaged MiniLM)
    max_seq_length: int | None = None
    # One model per seed: the seed is part of each model's identity (model store key, `trained_models` row,
    # metadata), and the report aggregates over seeds (mean +- std, bootstrap CIs pooled across seeds).
    seeds: list[int] = [13]
    max_steps: int = -1  # cap for demos (-1 = all)
    reranker_negatives: int = 3
    # "auto" = bf16 mixed precision where the CPU/GPU has native bf16 (1.8x faster steps on an AVX512_BF16 CPU,
    # benchmarks/bench_train_step.py), else fp32; "fp32" / "bf16" force one; "fp16" = fp16 mixed precision, CUDA
    # only. The resolved value is part of the model's identity.
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    # "mnrl" = MultipleNegativesRankingLoss; "cached_mnrl" = its GradCache version (CachedMultipleNegativesRankingLoss):
    # the same loss in chunks of `mini_batch_size` texts, so a large batch (e.g. 128 queries x 8 passages) fits on
    # one GPU. The retriever only.
    loss: Literal["mnrl", "cached_mnrl"] = "mnrl"
    mini_batch_size: int = Field(default=32, ge=1)
    gradient_checkpointing: bool = False  # recompute activations in the backward pass: less memory, slower steps
    # > 1: DDP with this many processes on this machine (torchrun, lib/train_cli.py; one per GPU); rank 0 saves.
    num_processes: int = Field(default=1, ge=1)


def _settings(config: TrainConfig, seed: int, base=None, device: str = "auto", kind: str = "retriever"):
    """The lib TrainSettings of one seed, resolved for this machine (device, precision) and ``base`` (its own
    max_seq_length when the config leaves it to the model). The reranker trains with BCE whatever ``loss`` says: its
    settings keep the default loss, so switching the retriever's loss does not retrain rerankers."""
    from rlhn_assets.lib.training import TrainSettings

    max_len = config.max_seq_length
    if max_len is None:
        max_len = base.max_seq_length if base is not None else 256
    return TrainSettings(
        epochs=config.epochs,
        batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        hard_negatives=config.hard_negatives,
        scale=config.scale,
        max_seq_length=max_len,
        seed=seed,
        max_steps=config.max_steps,
        reranker_negatives=config.reranker_negatives,
        precision=config.precision,
        device=device,
        loss=config.loss if kind == "retriever" else "mnrl",
        mini_batch_size=config.mini_batch_size,
        gradient_checkpointing=config.gradient_checkpointing,
        num_processes=config.num_processes,
    ).resolved()


def model_store():
    from rlhn_assets.lib.model_store import ModelStore

    return ModelStore(settings.data_dir() / "models")


def train_one(kind: str, instances, train_settings, output_dir, base, log):
    """Train one model in this process, or in ``num_processes`` DDP processes (torchrun)."""
    from rlhn_assets.lib import training

    if train_settings.num_processes > 1:
        from rlhn_assets.lib.train_cli import train_in_processes

        return train_in_processes(
            kind, instances, train_settings, output_dir, base=base, nproc=train_settings.num_processes, log=log
        )
    fn = training.train_retriever if kind == "retriever" else training.train_reranker
    return fn(instances, train_settings, output_dir, base=base, log=log)


def _train(
    context, kind: str, config: TrainConfig, duckdb: RLHNDuckDB, base_models: BaseModelsResource
) -> dg.MaterializeResult:
    from rlhn_assets.lib.model_store import input_key
    from rlhn_assets.lib.training_data import load_training_instances

    variant = context.partition_key
    seeds = sorted(set(config.seeds))
    if not seeds:
        raise dg.Failure("TrainConfig.seeds is empty: give at least one seed, e.g. seeds: [13]")
    with duckdb.get_connection() as conn:
        instances, sizes = load_training_instances(conn, variant, max_negatives=max(config.hard_negatives, 25))
    if not instances:
        raise dg.Failure(f"variant {variant!r} has no training instances: materialize `relabeled` for it first")
    context.log.info(f"{kind}[{variant}]: {len(instances):,} queries from {sizes}; seeds {seeds}")
    store = model_store()
    base = base_models.retriever_base() if kind == "retriever" else base_models.reranker_base()
    device = base_models.resolved_device()
    context.log.info(
        f"{kind}[{variant}]: base {base.name} ({base.path}, weights {base.content_hash[:12]}), prompts query "
        f"{base.query_prompt!r} passage {base.passage_prompt!r}, device {device}"
    )
    runs = []
    for i, seed in enumerate(seeds, start=1):
        train_settings = _settings(config, seed, base, device, kind)
        # the base's identity (weights + prompts) and the settings that change the result (precision, device kind,
        # loss, processes) are part of the key: a new base or prompt trains anew, an unchanged one reuses
        key = input_key(kind, train_settings.identity(), base.identity, instances)
        found = store.find(kind, variant, seed, key)
        if found:  # same data, settings, seed, base model and code: the model exists, do not train it again
            context.log.info(
                f"{kind}[{variant}] seed {seed} ({i}/{len(seeds)}): reusing {found['path']} "
                f"(trained {found.get('trained_at', '?')}, same inputs {key[:12]})"
            )
            runs.append({**found, "seed": seed, "reused": True})
            continue
        context.log.info(f"{kind}[{variant}] seed {seed} ({i}/{len(seeds)}): training")
        staged = store.staging_dir(kind, variant, seed)
        t0 = time.perf_counter()
        result = train_one(kind, instances, train_settings, staged, base, context.log.info)
        summary = {
            "variant": variant,
            "seed": seed,
            "train_rows": result.train_rows,
            "steps": result.steps,
            "final_loss": result.final_loss,
            "training_set_sizes": sizes,
            "queries": len(instances),
            "seconds": round(time.perf_counter() - t0, 1),
            "settings": result.settings,
            "loss_history": result.loss_history,
            "base_model": base.describe(),
            "trained_at": datetime.now(UTC).isoformat(),
        }
        path = store.publish(kind, variant, seed, staged, result.data_version, key, summary)
        runs.append(
            {**summary, "path": str(path), "data_version": result.data_version, "input_key": key, "reused": False}
        )
    with duckdb.get_connection() as conn:
        conn.execute("BEGIN TRANSACTION")
        conn.execute("DELETE FROM trained_models WHERE kind = $1 AND variant = $2", [kind, variant])
        conn.executemany(
            """INSERT INTO trained_models (kind, variant, seed, input_key, model_version, path, queries, train_rows,
                                           steps, final_loss, seconds, settings_json, training_set_sizes_json,
                                           trained_at)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
            [
                [
                    kind,
                    variant,
                    r["seed"],
                    r["input_key"],
                    r["data_version"][:16],
                    r["path"],
                    r["queries"],
                    r["train_rows"],
                    r["steps"],
                    r["final_loss"],
                    r["seconds"],
                    json.dumps(r["settings"], default=str),
                    json.dumps(r["training_set_sizes"]),
                    r.get("trained_at"),
                ]
                for r in runs
            ],
        )
        conn.execute("COMMIT")
    # the asset's data version: its models' content hashes, so retraining one seed changes it
    version = hashlib.sha256("|".join(f"{r['seed']}:{r['data_version']}" for r in runs).encode()).hexdigest()[:16]
    # each model with the prompts it was trained with: evaluation encodes with exactly these
    models = [
        {
            "seed": r["seed"],
            "path": r["path"],
            "version": r["data_version"][:16],
            "query_prompt": base.query_prompt,
            "passage_prompt": base.passage_prompt,
        }
        for r in runs
    ]
    trained = [r for r in runs if not r["reused"]]
    return dg.MaterializeResult(
        data_version=dg.DataVersion(version),
        metadata={
            "models": dg.MetadataValue.json(models),
            "seeds": dg.MetadataValue.json(seeds),
            "model_path": dg.MetadataValue.path(runs[0]["path"]),  # the first seed's, for a quick look in the UI
            "model_data_version": version,
            "base_model": base.name,
            "base_model_path": dg.MetadataValue.path(str(base.path)),
            "base_model_hash": base.content_hash[:16],
            "base_model_identity": base.version,
            "query_prompt": base.query_prompt,
            "passage_prompt": base.passage_prompt,
            "device": device,
            "precision": _settings(config, seeds[0], base, device, kind).precision,
            "loss": config.loss if kind == "retriever" else "bce",
            "num_processes": config.num_processes,
            "trained": len(trained),
            "reused": len(runs) - len(trained),
            "queries": len(instances),
            "train_rows": runs[0]["train_rows"],
            "steps": runs[0]["steps"],
            "final_loss": float(runs[0]["final_loss"]) if runs[0]["final_loss"] is not None else float("nan"),
            "seconds": round(sum(r["seconds"] for r in trained), 1),
            "training_set_sizes": dg.MetadataValue.md(md_table(["dataset", "queries"], sorted(sizes.items()))),
            "runs": dg.MetadataValue.md(
                md_table(
                    ["seed", "model version", "steps", "final loss", "seconds", "reused"],
                    [
                        (
                            r["seed"],
                            r["data_version"][:12],
                            r["steps"],
                            round(r["final_loss"], 4) if r["final_loss"] is not None else "n/a",
                            r["seconds"],
                            r["reused"],
                        )
                        for r in runs
                    ],
                )
            ),
            "loss_curve": dg.MetadataValue.md(
                md_table(["step", "loss"], [tuple(x) for x in (runs[0].get("loss_history") or [])[-20:]])
            ),
        },
    )


# What both trained_* assets share: one partition per variant, the `training` pool (dagster.yaml: one training at a
# time), one run per variant in backfills.
_TRAINED_ASSET = dict(
    partitions_def=variant_pd,
    group_name="train",
    code_version="2",
    automation_condition=PIPELINE,
    kinds={"pytorch", "sentence_transformers"},
    pool="training",
    backfill_policy=dg.BackfillPolicy.multi_run(1),
)


@dg.asset(
    **_TRAINED_ASSET,
    deps=[dg.AssetDep(relabeled, partition_mapping=_BY_VARIANT), retriever_base_model],
    description=(
        "A retriever fine-tuned per variant: the base model of resource `base_models` (default the packaged "
        "all-MiniLM-L6-v2, loaded by path) with its query/passage prompts, trained with sentence-transformers' "
        "SentenceTransformerTrainer and MultipleNegativesRankingLoss (InfoNCE, in-batch + hard negatives; or its "
        "GradCache version), 1 positive (sampled per query per epoch, so RLHN's extra positives enter training) + up "
        "to 7 hard negatives, on the union of the variant's kept datasets. Saved under data/models/retriever/"
        "<variant>/seed-<seed>/<data version>/ (one model per seed in `seeds`; a model already trained from the same "
        "inputs is reused), listed in table `trained_models`."
    ),
)
def trained_retriever(
    context: dg.AssetExecutionContext, config: TrainConfig, duckdb: RLHNDuckDB, base_models: BaseModelsResource
) -> dg.MaterializeResult:
    return _train(context, "retriever", config, duckdb, base_models)


@dg.asset(
    **_TRAINED_ASSET,
    deps=[dg.AssetDep(relabeled, partition_mapping=_BY_VARIANT), reranker_base_model],
    description=(
        "A reranker per variant: a sentence-transformers CrossEncoder initialized from the reranker base of resource "
        "`base_models` (default the retriever's base) "
        "(new 1-logit head), trained with BinaryCrossEntropyLoss on the variant's (query, positive) = 1 / "
        "(query, hard negative) = 0 pairs. Evaluated by re-ranking the trained retriever's top-100."
    ),
)
def trained_reranker(
    context: dg.AssetExecutionContext, config: TrainConfig, duckdb: RLHNDuckDB, base_models: BaseModelsResource
) -> dg.MaterializeResult:
    return _train(context, "reranker", config, duckdb, base_models)
