"""`teacher_scores`: the embedding teacher's score of every pruned (query, passage) pair, which the `topk_percpos`
variant of `relabeled` reads (NV-Retriever's TopK-PercPos, lib/teacher.py), and its check."""

import time

import dagster as dg

from rlhn_assets import settings
from rlhn_assets.conditions import PIPELINE
from rlhn_assets.defs.prune.assets import pruned
from rlhn_assets.lib.markdown import md_table
from rlhn_assets.lib.teacher import DEFAULT_THRESHOLD, percpos_drop_share, score_dataset, unscored_pairs_sql
from rlhn_assets.partitions import dataset_pd
from rlhn_assets.resources import DatasetRegistryResource, RLHNDuckDB

# drop shares reported in the metadata besides the default threshold (the one `relabeled` applies is its config)
REPORTED_THRESHOLDS = (0.90, DEFAULT_THRESHOLD, 0.99)


class TeacherConfig(dg.Config):
    # A sentence-transformers model folder; "" = the packaged all-MiniLM-L6-v2 (the pipeline's embedding model).
    model_path: str = ""
    device: str = "auto"  # auto (RLHN_DEVICE, else CUDA, MPS, CPU), cpu, cuda[:N], mps
    batch_size: int = 64
    chunk_instances: int = 2048  # instances read, encoded and written per round (bounds memory)
    cache_embeddings: bool = True  # passage embeddings cached under <cache dir>/embeddings by model + texts


@dg.asset(
    partitions_def=dataset_pd,
    group_name="relabel",
    code_version="1",
    automation_condition=PIPELINE,
    deps=[pruned],
    kinds={"duckdb", "sentence_transformers"},
    description=(
        "Teacher scores for NV-Retriever's TopK-PercPos (arXiv 2407.15831; the `topk_percpos` variant of "
        "`relabeled`): the cosine of every pruned (query, positive) and (query, negative) pair under the "
        "embedding model (default the packaged all-MiniLM-L6-v2), no LLM. Metadata: pairs scored and the share of "
        "negatives TopK-PercPos would drop at 90/95/99% of the weakest positive's score. A dataset that is never "
        "judged (registry `judge: false`) is not scored: every variant keeps its data. Table `teacher_scores`."
    ),
)
def teacher_scores(
    context: dg.AssetExecutionContext, config: TeacherConfig, duckdb: RLHNDuckDB, registry: DatasetRegistryResource
) -> dg.MaterializeResult:
    from rlhn_assets.lib.base_models import content_hash
    from rlhn_assets.lib.embeddings import base_model_path, load_model

    dataset = context.partition_key
    if not registry.load().get(dataset).judge:
        with duckdb.get_connection() as conn:
            conn.execute("DELETE FROM teacher_scores WHERE dataset = $1", [dataset])
        reason = "never judged or relabeled (registry: judge: false): topk_percpos keeps the data unchanged"
        context.log.info(f"{dataset}: {reason}")
        return dg.MaterializeResult(metadata={"status": reason, "pairs_scored": 0, "dagster/row_count": 0})
    path = config.model_path or str(base_model_path())
    version = content_hash(path)  # the teacher's weights, hashed once per process (lib/base_models)
    teacher = (config.model_path or "all-MiniLM-L6-v2") + f"@{version[:12]}"
    t0 = time.perf_counter()
    model = load_model(path, device=config.device)
    with duckdb.get_connection() as conn:
        stats = score_dataset(
            conn,
            dataset,
            model,
            teacher,
            model_version=version,
            cache_dir=settings.cache_dir() / "embeddings" if config.cache_embeddings else None,
            batch_size=config.batch_size,
            chunk_instances=config.chunk_instances,
            progress=context.log.info,
        )
        shares = {t: percpos_drop_share(conn, dataset, t) for t in REPORTED_THRESHOLDS}
    seconds = time.perf_counter() - t0
    drop, neg = shares[DEFAULT_THRESHOLD]
    context.log.info(
        f"{dataset}: {stats.pairs:,} pairs scored by {teacher} in {seconds:.1f}s; TopK-PercPos at "
        f"{DEFAULT_THRESHOLD:.0%} would drop {drop:,} of {neg:,} negatives"
    )
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": stats.pairs,
            "pairs_scored": stats.pairs,
            "instances": stats.instances,
            "positives_scored": stats.positives,
            "negatives_scored": stats.negatives,
            "teacher": teacher,
            "percpos_threshold": DEFAULT_THRESHOLD,
            "percpos_would_drop": drop,
            "percpos_drop_share": round(drop / neg, 4) if neg else 0.0,
            "percpos_drop_shares": dg.MetadataValue.md(
                md_table(
                    ["threshold (x weakest positive)", "negatives dropped", "share"],
                    [[f"{t:.2f}", d, f"{d / n:.1%}" if n else "–"] for t, (d, n) in shares.items()],
                )
            ),
            "embedding_cache_hits": stats.cache_hits,
            "seconds": round(seconds, 1),
        }
    )


@dg.asset_check(
    asset=teacher_scores,
    partitions_def=dataset_pd,
    blocking=True,
    description="Every pruned (query, positive / negative) pair of the dataset has exactly one teacher score, no "
    "score belongs to a pair that is no longer pruned, and every score is a finite cosine in [-1, 1] (a dataset "
    "that is never judged has no scores at all).",
)
def teacher_scores_complete(
    context: dg.AssetCheckExecutionContext, duckdb: RLHNDuckDB, registry: DatasetRegistryResource
) -> dg.AssetCheckResult:
    dataset = context.partition_key
    if not registry.load().get(dataset).judge:
        with duckdb.get_connection() as conn:
            (n,) = conn.execute("SELECT count(*) FROM teacher_scores WHERE dataset = $1", [dataset]).fetchall()[0]
        return dg.AssetCheckResult(
            passed=n == 0,
            description=f"never judged (judge: false): {n} scores (expected none)",
            metadata={"scored": n},
        )
    with duckdb.get_connection() as conn:
        missing, stale, duplicates, bad = conn.execute(unscored_pairs_sql(), [dataset]).fetchall()[0]
        (scored,) = conn.execute("SELECT count(*) FROM teacher_scores WHERE dataset = $1", [dataset]).fetchall()[0]
    md = {"scored": scored, "unscored": missing, "stale": stale, "duplicates": duplicates, "invalid_scores": bad}
    return dg.AssetCheckResult(
        passed=not (missing or stale or duplicates or bad),
        description=f"{scored:,} scores; {missing:,} pruned pairs unscored, {stale:,} scores of pairs not pruned, "
        f"{duplicates:,} duplicates, {bad:,} not finite or outside [-1, 1]",
        metadata=md,
    )
