import time

import dagster as dg
from pydantic import Field

from rlhn_assets import settings
from rlhn_assets.conditions import PIPELINE
from rlhn_assets.defs.evaluate.assets import eval_scores
from rlhn_assets.lib import provenance, report
from rlhn_assets.resources import RLHNDuckDB


class ReportConfig(dg.Config):
    n_bootstrap: int = Field(default=2000, ge=100, description="bootstrap resamples of the queries per CI")
    bootstrap_seed: int = Field(default=0, description="seed of the bootstrap generator (reproducible report)")
    examples: int = Field(default=5, ge=0, description="relabeled s2_rlhn pairs shown in the judge section")


@dg.asset(
    group_name="evaluate",
    code_version="2",
    automation_condition=PIPELINE,
    deps=[eval_scores],
    kinds={"duckdb", "markdown"},
    description=(
        "A table shaped like the paper's Table 3 per stage (retriever, reranker): rows = eval sets and their "
        "average, columns = base and every variant; nDCG@10, Recall@100 and MRR@10 as mean ± std over training "
        "seeds; nDCG@10 deltas against `default` (and default vs base) with 95% paired-bootstrap CIs over queries "
        "and one sentence each on what the interval allows; what the judge cascade did per dataset and variant, "
        "with relabeled examples; and the training runs (trained_models). Written to "
        "data/reports/comparison.{md,csv,png}."
    ),
)
def comparison_report(
    context: dg.AssetExecutionContext, config: ReportConfig, duckdb: RLHNDuckDB
) -> dg.MaterializeResult:
    t0 = time.perf_counter()
    with duckdb.get_connection() as conn:
        if (
            not report.has_table(conn, "eval_scores")
            or not conn.execute("SELECT count(*) FROM eval_scores").fetchall()[0][0]
        ):
            raise dg.Failure("no eval_scores yet: materialize eval_scores first")
        rep = report.build_report(
            conn, n_boot=config.n_bootstrap, boot_seed=config.bootstrap_seed, n_examples=config.examples
        )
    host = provenance.machine()
    header = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "code version": provenance.code_version(),
        "machine": f"{host['cores']} CPUs ({host['cpu']}), load average {host['load_avg_1m']:.2f} (1 min) / "
        f"{host['load_avg_5m']:.2f} (5 min)",
        "run": f"Dagster run {context.run_id}",
        "settings": f"bootstrap B = {config.n_bootstrap}, seed {config.bootstrap_seed}; CI level 95%",
    }
    md = report.to_markdown(rep, header)
    out = settings.data_dir() / "reports"
    out.mkdir(parents=True, exist_ok=True)
    (out / "comparison.md").write_text(md)
    report.write_csv(rep, out / "comparison.csv")
    png = report.chart_png(rep)
    (out / "comparison.png").write_bytes(png)
    context.log.info("\n" + md)
    return dg.MaterializeResult(
        metadata={
            "comparison": dg.MetadataValue.md(md),
            "chart": dg.MetadataValue.md(report.png_markdown(png)),
            "report_markdown": dg.MetadataValue.path(str(out / "comparison.md")),
            "report_csv": dg.MetadataValue.path(str(out / "comparison.csv")),
            "report_png": dg.MetadataValue.path(str(out / "comparison.png")),
            "training_runs": len(rep.runs),
            "seconds": round(time.perf_counter() - t0, 2),
            **report.report_metadata(rep),
        }
    )
