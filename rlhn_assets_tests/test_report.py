"""The comparison report (Table 3 shape) renders every column, the average row and deltas vs default, also from
tables written before the seed column existed (one unnamed seed per model) and without trained_models."""

import csv

import duckdb
import numpy as np

from rlhn_assets.lib import report


def _legacy_db():
    rng = np.random.default_rng(0)
    c = duckdb.connect(":memory:")
    # the eval tables as the evaluation asset created them before seeds (no seed column)
    c.execute("""CREATE TABLE eval_scores (eval_set VARCHAR, model VARCHAR, stage VARCHAR, ndcg_at_10 DOUBLE,
                 recall_at_100 DOUBLE, mrr_at_10 DOUBLE, queries_scored INTEGER, queries_total INTEGER,
                 model_version VARCHAR, corpus_hash VARCHAR, seconds DOUBLE)""")
    c.execute("""CREATE TABLE eval_per_query (eval_set VARCHAR, model VARCHAR, stage VARCHAR, query_id VARCHAR,
                 ndcg_at_10 DOUBLE)""")
    for e, base in (("scifact", 0.60), ("cranfield", 0.30), ("cisi", 0.20)):
        for i, m in enumerate(report.MODEL_ORDER):
            for stage, step in (("retriever", 0.01), ("reranker", 0.02)):
                if stage == "reranker" and m == "base":
                    continue
                v = base + step * i
                c.execute(
                    "INSERT INTO eval_scores (eval_set, model, stage, ndcg_at_10, recall_at_100, mrr_at_10) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    [e, m, stage, v, v, v],
                )
                # per query: v + zero-mean noise (its own per model), so the mean is v and the interval has a width
                noise = rng.normal(0, 0.03, 20)
                c.executemany(
                    "INSERT INTO eval_per_query VALUES (?, ?, ?, ?, ?)",
                    [[e, m, stage, f"q{q}", v + x] for q, x in enumerate(noise - noise.mean())],
                )
    return c


def test_report_has_all_columns_average_and_deltas(tmp_path):
    c = _legacy_db()
    rep = report.build_report(c, n_boot=200)
    md = report.to_markdown(rep)
    header = next(line for line in md.splitlines() if line.startswith("| eval set"))
    assert all(m in header for m in report.MODEL_ORDER)
    assert "**Avg**" in md and "### Reranker" in md
    assert "### Training runs" not in md and "### What the judge did" not in md  # tables absent
    # deltas: s2_rlhn is 6 columns after default in MODEL_ORDER -> +6.0 points on every row, with an interval
    d = rep.deltas["retriever"][("s2_rlhn", "Avg")]
    assert round(d.delta, 6) == 6.0 and d.ci_low < 6.0 < d.ci_high and d.excludes_zero
    assert "s2_rlhn vs default on Avg: +6.0 points" in md
    avg = rep.summaries["retriever"].cells[("base", "Avg", "ndcg_at_10")]
    assert abs(avg.mean - (0.60 + 0.30 + 0.20) / 3) < 1e-9 and avg.n == 1 and avg.std is None
    assert rep.summaries["reranker"].models == list(report.MODEL_ORDER[1:])
    report.write_csv(rep, tmp_path / "c.csv")
    rows = list(csv.DictReader(open(tmp_path / "c.csv")))
    assert {r["model"] for r in rows} == set(report.MODEL_ORDER)
    assert {r["metric"] for r in rows} == set(report.METRICS)
    png = report.chart_png(rep)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
