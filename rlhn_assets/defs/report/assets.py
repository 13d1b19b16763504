import dagster as dg

from rlhn_assets import settings
from rlhn_assets.conditions import PIPELINE
from rlhn_assets.defs.evaluate.assets import EVAL_DDL, eval_scores
from rlhn_assets.defs.train.assets import model_store
from rlhn_assets.lib import report
from rlhn_assets.lib.relabel import VARIANTS
from rlhn_assets.resources import RLHNDuckDB


@dg.asset(
    group_name="evaluate",
    code_version="1",
    automation_condition=PIPELINE,
    deps=[eval_scores],
    kinds={"duckdb", "markdown"},
    description=(
        "A table shaped like the paper's Table 3: rows = eval sets and their average, columns = base and every "
        "variant (stage 1 / stage 2) for the retriever and the reranker, with deltas against `default`; plus each "
        "training run's seed and training-set sizes. Written to data/reports/comparison.{md,csv,png}."
    ),
)
def comparison_report(context: dg.AssetExecutionContext, duckdb: RLHNDuckDB) -> dg.MaterializeResult:
    with duckdb.get_connection() as conn:
        for ddl in EVAL_DDL:
            conn.execute(ddl)
        rows = conn.execute("SELECT eval_set, model, stage, ndcg_at_10 FROM eval_scores").fetchall()
    if not rows:
        raise dg.Failure("no eval_scores yet: materialize eval_scores first")
    table = report.build_table(rows)
    store = model_store()
    runs = {v: store.latest("retriever", v) for v in VARIANTS if store.latest("retriever", v)}
    md = report.to_markdown(table, runs)
    out = settings.data_dir() / "reports"
    out.mkdir(parents=True, exist_ok=True)
    (out / "comparison.md").write_text(md + "\n")
    report.write_csv(table, out / "comparison.csv")
    png = report.chart_png(table)
    (out / "comparison.png").write_bytes(png)
    context.log.info("\n" + md)
    avg = table.get("retriever", {}).get("Avg", {})
    return dg.MaterializeResult(metadata={
        "comparison": dg.MetadataValue.md(md),
        "chart": dg.MetadataValue.md(report.png_markdown(png)),
        "report_markdown": dg.MetadataValue.path(str(out / "comparison.md")),
        "report_csv": dg.MetadataValue.path(str(out / "comparison.csv")),
        "report_png": dg.MetadataValue.path(str(out / "comparison.png")),
        **{f"avg_ndcg@10_{m}": round(v, 4) for m, v in avg.items()},
    })
