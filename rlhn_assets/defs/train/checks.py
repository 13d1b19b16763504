"""Blocking checks of the trained models: every seed's model loads from the model store and produces sane scores,
so a broken training run (NaN loss, collapsed or missing weights) stops before the hour of evaluation."""

import math

import dagster as dg

from rlhn_assets.defs.train.assets import trained_reranker, trained_retriever
from rlhn_assets.partitions import variant_pd
from rlhn_assets.resources import BaseModelsResource, RLHNDuckDB

# A fixed probe: a query, a passage that answers it and one that does not (not from any dataset: a health check,
# not a measurement; the scores must differ and be finite, not be in a given order).
PROBE_QUERY = "what is the boiling point of water at sea level"
PROBE_PASSAGES = (
    "At sea level, pure water boils at 100 degrees Celsius (212 degrees Fahrenheit).",
    "The stock market closed higher on Friday after strong quarterly earnings reports.",
)


def _models(conn, kind: str, variant: str) -> list[tuple]:
    return conn.execute(
        "SELECT seed, path, final_loss FROM trained_models WHERE kind = $1 AND variant = $2 ORDER BY seed",
        [kind, variant],
    ).fetchall()


def _probe(kind: str, path: str, device: str = "auto") -> list[float]:
    if kind == "retriever":
        from rlhn_assets.lib.embeddings import encode_texts, load_model

        # with the prompts the model was trained with (saved in its folder)
        model = load_model(path, device=device)
        q = encode_texts(model, [PROBE_QUERY], "query")
        p = encode_texts(model, list(PROBE_PASSAGES), "passage")
        return [float(x) for x in (p @ q[0])]
    from rlhn_assets.lib.embeddings import load_cross_encoder

    pairs = [(PROBE_QUERY, t) for t in PROBE_PASSAGES]
    return [float(x) for x in load_cross_encoder(path, device=device).predict(pairs)]


def _check(context, kind: str, duckdb: RLHNDuckDB, device: str = "auto") -> dg.AssetCheckResult:
    variant = context.partition_key
    with duckdb.get_connection() as conn:
        rows = _models(conn, kind, variant)
    if not rows:
        return dg.AssetCheckResult(passed=False, description=f"no {kind} of variant {variant} in trained_models")
    problems, scores = [], {}
    for seed, path, final_loss in rows:
        if final_loss is not None and not math.isfinite(final_loss):
            problems.append(f"seed {seed}: final training loss {final_loss}")
        try:
            s = _probe(kind, path, device)
        except Exception as e:  # noqa: BLE001 - a model that does not load is exactly what this check reports
            problems.append(f"seed {seed}: {path} does not load: {type(e).__name__}: {e}")
            continue
        scores[seed] = [round(x, 4) for x in s]
        if not all(math.isfinite(x) for x in s):
            problems.append(f"seed {seed}: non-finite scores {s}")
        elif abs(s[0] - s[1]) < 1e-6:
            problems.append(f"seed {seed}: the same score for both probe passages (collapsed model) {s}")
    return dg.AssetCheckResult(
        passed=not problems,
        description="; ".join(problems) or f"{len(rows)} seed(s) load and score the probe: {scores}",
        metadata={"seeds": len(rows), "probe_scores": dg.MetadataValue.json({str(k): v for k, v in scores.items()})},
    )


def _loads_and_scores(asset, kind: str):
    @dg.asset_check(
        asset=asset,
        name=f"trained_{kind}_loads_and_scores",
        partitions_def=variant_pd,
        blocking=True,
        description=f"Every seed's {kind} loads from the model store, its final loss is finite, and it "
        "gives finite, distinct scores to a relevant and an unrelated probe passage.",
    )
    def check(
        context: dg.AssetCheckExecutionContext, duckdb: RLHNDuckDB, base_models: BaseModelsResource
    ) -> dg.AssetCheckResult:
        return _check(context, kind, duckdb, base_models.device)

    return check


trained_retriever_loads_and_scores = _loads_and_scores(trained_retriever, "retriever")
trained_reranker_loads_and_scores = _loads_and_scores(trained_reranker, "reranker")
