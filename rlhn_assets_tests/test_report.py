"""The comparison report (Table 3 shape) renders every column, the average row and deltas vs default."""

import csv

from rlhn_assets.lib import report


def _rows():
    out = []
    for e, base in (("scifact", 0.60), ("cranfield", 0.30), ("cisi", 0.20)):
        for i, m in enumerate(report.MODEL_ORDER):
            out.append((e, m, "retriever", base + 0.01 * i))
            if m != "base":
                out.append((e, m, "reranker", base + 0.02 * i))
    return out


def test_report_has_all_columns_average_and_deltas(tmp_path):
    table = report.build_table(_rows())
    md = report.to_markdown(table, {"default": {"seed": 13, "queries": 80, "training_set_sizes": {"fiqa": 30, "nq": 10},
                                                "steps": 5, "final_loss": 1.23}})
    header = next(l for l in md.splitlines() if l.startswith("| eval set"))
    assert all(m in header for m in report.MODEL_ORDER)
    assert "**Avg**" in md and "### Reranker" in md and "### Training runs" in md and "fiqa 30, nq 10" in md
    # deltas: s2_rlhn is 6 columns after default in MODEL_ORDER -> +6.0 points on every row
    assert "(+6.0)" in md
    avg = table["retriever"]["Avg"]
    assert abs(avg["base"] - (0.60 + 0.30 + 0.20) / 3) < 1e-9
    report.write_csv(table, tmp_path / "c.csv")
    rows = list(csv.DictReader(open(tmp_path / "c.csv")))
    assert {r["model"] for r in rows} == set(report.MODEL_ORDER)
    png = report.chart_png(table)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
