import time

import dagster as dg

from rlhn_assets import settings
from rlhn_assets.conditions import PIPELINE
from rlhn_assets.defs.train.assets import model_store, trained_reranker, trained_retriever
from rlhn_assets.partitions import eval_pd
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


class EvalConfig(dg.Config):
    top_k: int = 100
    batch_size: int = 64
    max_seq_length: int = 256  # tokens per passage at encoding time (the model's own limit is 256)
    rerank: bool = True
    rerank_top_k: int = 100  # the reranker re-scores the retriever's top-k (paper: 100)


def resolve_model(kind: str, model: str) -> tuple[str, str]:
    """(path, data version) of the base model or of a variant's latest trained model."""
    if model == "base":
        from rlhn_assets.lib.embeddings import base_model_path, dir_hash

        path = base_model_path()
        return str(path), dir_hash(path)[:16]
    latest = model_store().latest(kind, model)
    if latest is None:
        raise dg.Failure(f"no trained {kind} for variant {model!r}: materialize trained_{kind}[{model}] first")
    return latest["path"], latest["data_version"][:16]


def retrieve(ds, model_name: str, config: EvalConfig, log=None):
    """Dense exact search with a (base or trained) retriever; corpus embeddings cached by model version."""
    from rlhn_assets.lib.embeddings import load_model
    from rlhn_assets.lib.evaluation import dense_search

    path, version = resolve_model("retriever", model_name)
    model = load_model(path)
    model.max_seq_length = config.max_seq_length
    results, info = dense_search(model, f"{version}:len{config.max_seq_length}", ds, top_k=config.top_k,
                                 cache_dir=settings.cache_dir() / "embeddings", batch_size=config.batch_size,
                                 progress=log)
    return results, info, version


@dg.asset(
    partitions_def=eval_pd,
    group_name="evaluate",
    code_version="1",
    automation_condition=PIPELINE,
    deps=[dg.AssetDep(trained_retriever, partition_mapping=dg.AllPartitionMapping()),
          dg.AssetDep(trained_reranker, partition_mapping=dg.AllPartitionMapping())],
    kinds={"beir", "duckdb"},
    description=(
        "nDCG@10, Recall@100 and MRR@10 (beir's EvaluateRetrieval / pytrec_eval) of a model on a BEIR-layout eval "
        "set, exact search over the full corpus; partitions = eval set (every folder in data/eval/) x model (the "
        "untrained `base` + each variant's trained retriever, and its reranker re-scoring the retriever's top-k). "
        "Corpus embeddings are cached by (model version, corpus), so an unchanged model costs no encoding. "
        "Tables `eval_scores`, `eval_per_query`."
    ),
)
def eval_scores(context: dg.AssetExecutionContext, config: EvalConfig, duckdb: RLHNDuckDB) -> dg.MaterializeResult:
    from rlhn_assets.lib.evaluation import corpus_hash, evaluate, load_beir_eval, rerank

    keys = context.partition_key.keys_by_dimension
    eval_set, model_name = keys["eval_set"], keys["model"]
    ds = load_beir_eval(settings.data_dir() / "eval" / eval_set, "test")
    t0 = time.perf_counter()
    results, info, version = retrieve(ds, model_name, config, context.log.info)
    rows = [("retriever", evaluate(ds.qrels, results), version, time.perf_counter() - t0)]
    if config.rerank and model_name != "base":  # the base MiniLM has no trained cross-encoder head
        from sentence_transformers.cross_encoder import CrossEncoder

        t1 = time.perf_counter()
        path, rversion = resolve_model("reranker", model_name)
        reranked = rerank(CrossEncoder(path, device="cpu"), ds, results, top_k=config.rerank_top_k,
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
          "corpus_cache_hit": bool(info.get("corpus_cache_hit")), "encode_seconds": round(info.get("encode_seconds", 0), 1)}
    for stage, m, _, secs in rows:
        md |= {f"{stage}_ndcg@10": round(m["ndcg@10"], 4), f"{stage}_recall@100": round(m["recall@100"], 4),
               f"{stage}_mrr@10": round(m["mrr@10"], 4), f"{stage}_seconds": round(secs, 1)}
    context.log.info(f"{eval_set}/{model_name}: " + ", ".join(f"{s} nDCG@10 {m['ndcg@10']:.4f}" for s, m, _, _ in rows))
    return dg.MaterializeResult(metadata=md)
