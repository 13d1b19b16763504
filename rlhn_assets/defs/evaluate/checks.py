import dagster as dg

from rlhn_assets.defs.evaluate.assets import eval_scores
from rlhn_assets.partitions import eval_pd
from rlhn_assets.resources import RLHNDuckDB

# A trained retriever may lose this much SciFact nDCG@10 against the untrained base before the check fails:
# small demo trainings move scores by a point or two either way; a broken run (NaN loss, collapsed
# embeddings) loses tens of points.
BASE_TOLERANCE = 0.05


def _rows(conn, eval_set, model):
    return conn.execute(
        "SELECT stage, ndcg_at_10, recall_at_100, mrr_at_10, queries_scored, queries_total, seed "
        "FROM eval_scores WHERE eval_set = $1 AND model = $2 ORDER BY stage, seed",
        [eval_set, model],
    ).fetchall()


@dg.asset_check(
    asset=eval_scores,
    partitions_def=eval_pd,
    blocking=True,
    description="Scores are in [0, 1] and every query of the eval set was scored (per stage).",
)
def eval_scores_valid_and_complete(context: dg.AssetCheckExecutionContext, duckdb: RLHNDuckDB) -> dg.AssetCheckResult:
    k = context.partition_key.keys_by_dimension
    with duckdb.get_connection() as conn:
        rows = _rows(conn, k["eval_set"], k["model"])
    problems = []
    for stage, ndcg, rec, mrr, scored, total, seed in rows:
        what = stage if seed is None else f"{stage} seed {seed}"
        if not all(v is not None and 0.0 <= v <= 1.0 for v in (ndcg, rec, mrr)):
            problems.append(f"{what}: a score outside [0, 1]")
        if scored != total:
            problems.append(f"{what}: {scored}/{total} queries scored")
    return dg.AssetCheckResult(
        passed=bool(rows) and not problems,
        description="; ".join(problems) or f"{len(rows)} (stage, seed) row(s) valid and complete",
        metadata={"stages": len(rows)},
    )


@dg.asset_check(
    asset=eval_scores,
    partitions_def=eval_pd,
    blocking=True,
    description=f"On SciFact, a trained retriever loads and its nDCG@10 is at least the base model's minus "
    f"{BASE_TOLERANCE} (catches a broken training run). Other partitions: not applicable.",
)
def trained_retriever_not_worse_than_base(
    context: dg.AssetCheckExecutionContext, duckdb: RLHNDuckDB
) -> dg.AssetCheckResult:
    k = context.partition_key.keys_by_dimension
    if k["eval_set"] != "scifact" or k["model"] == "base":
        return dg.AssetCheckResult(passed=True, description="not applicable (SciFact, trained models only)")
    with duckdb.get_connection() as conn:
        mine = {r[6]: r[1] for r in _rows(conn, "scifact", k["model"]) if r[0] == "retriever"}  # per seed
        base = {r[0]: r[1] for r in _rows(conn, "scifact", "base")}
    if "retriever" not in base:
        return dg.AssetCheckResult(passed=False, description="evaluate eval_scores[scifact|base] first: no base score")
    if not mine:
        return dg.AssetCheckResult(passed=False, description=f"no retriever score for {k['model']} on SciFact")
    worst_seed = min(mine, key=lambda sd: mine[sd])  # every seed must pass: one broken run is a broken run
    ok = mine[worst_seed] >= base["retriever"] - BASE_TOLERANCE
    return dg.AssetCheckResult(
        passed=ok,
        description=f"nDCG@10 per seed {mine} vs base {base['retriever']:.4f} "
        f"(tolerance {BASE_TOLERANCE}; worst seed {worst_seed})",
        metadata={"ndcg@10": mine[worst_seed], "base_ndcg@10": base["retriever"], "seeds": len(mine)},
    )
