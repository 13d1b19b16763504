"""The comparison report with several training seeds per variant: mean ± std over seeds (checked by hand), paired
bootstrap CIs over queries (a variant better on every query excludes 0, one identical to default includes it,
the same numbers on every run), the judge section's counts on a tiny cascade, and the Dagster asset end to end."""

import csv
import json

import dagster as dg
import duckdb
import numpy as np
import pytest

from rlhn_assets.lib import relabel, report
from rlhn_assets.lib.schema import apply_schema

SEEDS = (1, 2, 3)
# eval_scores nDCG@10 per seed, chosen for hand computation; recall@100 = nDCG + 0.3, MRR@10 = nDCG + 0.1
NDCG = {
    "base": {"scifact": [0.45], "cisi": [0.25]},
    "default": {"scifact": [0.50, 0.52, 0.54], "cisi": [0.30, 0.31, 0.35]},
    "s1_remove": {"scifact": [0.50, 0.52, 0.54], "cisi": [0.30, 0.31, 0.35]},
    "s2_remove": {"scifact": [0.50, 0.52, 0.54], "cisi": [0.30, 0.31, 0.35]},
    "s2_rlhn": {"scifact": [0.55, 0.57, 0.59], "cisi": [0.36, 0.36, 0.39]},
}
QUERIES = {"scifact": 40, "cisi": 30}


def per_query_values() -> dict[tuple[str, str], np.ndarray]:
    """{(model, eval_set): array (seeds, queries)} of per-query nDCG@10; base has one row (no seed)."""
    rng = np.random.default_rng(7)
    out = {}
    for e, n in QUERIES.items():
        base = rng.uniform(0.2, 0.7, size=n)
        default = base + 0.05 + rng.normal(0, 0.03, size=(3, n))
        out[("base", e)] = base[None, :]
        out[("default", e)] = default
        out[("s1_remove", e)] = default.copy()  # identical to default
        out[("s2_remove", e)] = default + np.where(np.arange(n) % 2 == 0, 0.05, -0.05)  # zero mean, not zero
        out[("s2_rlhn", e)] = default + 0.02 + 0.04 * rng.uniform(size=(3, n))  # better on every query
    return out


def write_eval_tables(conn) -> None:
    apply_schema(conn)
    for m, by_set in NDCG.items():
        for e, vals in by_set.items():
            for seed, v in zip((None,) if m == "base" else SEEDS, vals):
                conn.execute(
                    "INSERT INTO eval_scores (eval_set, model, stage, ndcg_at_10, recall_at_100, mrr_at_10, "
                    "queries_scored, queries_total, seed) VALUES (?, ?, 'retriever', ?, ?, ?, ?, ?, ?)",
                    [e, m, v, v + 0.3, v + 0.1, QUERIES[e], QUERIES[e], seed],
                )
    # an eval set only default has: not in the table, not in Avg
    conn.execute(
        "INSERT INTO eval_scores (eval_set, model, stage, ndcg_at_10, recall_at_100, mrr_at_10, seed) "
        "VALUES ('nfcorpus', 'default', 'retriever', 0.9, 0.9, 0.9, 1)"
    )
    rows = []
    for (m, e), a in per_query_values().items():
        for i, seed in enumerate((None,) if m == "base" else SEEDS):
            rows += [[e, m, "retriever", f"q{q:03d}", float(a[i, q]), seed] for q in range(a.shape[1])]
    conn.executemany(
        "INSERT INTO eval_per_query (eval_set, model, stage, query_id, ndcg_at_10, seed) VALUES (?, ?, ?, ?, ?, ?)",
        rows,
    )


@pytest.fixture
def conn():
    c = duckdb.connect(":memory:")
    write_eval_tables(c)
    yield c
    c.close()


def test_mean_and_std_over_seeds_match_hand_computation(conn):
    s = report.summarize_scores(report.load_scores(conn))["retriever"]
    assert s.models == ["base", "default", "s1_remove", "s2_remove", "s2_rlhn"]
    assert s.eval_sets == ["cisi", "scifact"] and s.dropped_eval_sets == ["nfcorpus"]
    c = s.cells[("default", "scifact", "ndcg_at_10")]
    assert (c.n, round(c.mean, 10), round(c.std, 10)) == (3, 0.52, 0.02)
    c = s.cells[("default", "scifact", "recall_at_100")]
    assert (round(c.mean, 10), round(c.std, 10)) == (0.82, 0.02)
    # Avg per seed first: (0.50+0.30)/2, (0.52+0.31)/2, (0.54+0.35)/2 = 0.40, 0.415, 0.445
    c = s.cells[("default", "Avg", "ndcg_at_10")]
    assert c.n == 3 and c.mean == pytest.approx(0.42)
    assert c.std == pytest.approx(np.sqrt(((0.40 - 0.42) ** 2 + (0.415 - 0.42) ** 2 + (0.445 - 0.42) ** 2) / 2))
    c = s.cells[("base", "Avg", "mrr_at_10")]
    assert (c.n, c.std) == (1, None) and c.mean == pytest.approx(0.45)
    md = report.to_markdown(report.build_report(conn, n_boot=200))
    assert "| scifact | 0.450 | 0.520 ± 0.020 |" in md  # one seed: the mean alone
    assert "nfcorpus" in md.split("#### Retriever nDCG@10")[0]  # named as left out
    assert "| nfcorpus |" not in md


def test_paired_bootstrap_ci_excludes_zero_for_a_better_variant_and_includes_it_for_an_identical_one(conn):
    # per-query rows of a seed without an eval_scores row (left over) are not part of the comparison
    conn.execute(
        "INSERT INTO eval_per_query SELECT eval_set, model, stage, query_id, 1.0, 99 FROM eval_per_query "
        "WHERE model = 's1_remove' AND seed = 1"
    )
    rep = report.build_report(conn, n_boot=2000, boot_seed=0)
    d = rep.deltas["retriever"]
    pq = per_query_values()
    # the point estimate: per query, mean over seeds, then the mean difference (points)
    expect = {e: 100 * float((pq[("s2_rlhn", e)].mean(0) - pq[("default", e)].mean(0)).mean()) for e in QUERIES}
    assert d[("s2_rlhn", "scifact")].delta == pytest.approx(expect["scifact"])
    assert d[("s2_rlhn", "Avg")].delta == pytest.approx((expect["scifact"] + expect["cisi"]) / 2)
    for e in ("scifact", "cisi", "Avg"):
        better = d[("s2_rlhn", e)]
        assert 0 < better.ci_low < better.delta < better.ci_high and better.excludes_zero
        same = d[("s1_remove", e)]
        assert (same.delta, same.ci_low, same.ci_high) == (0, 0, 0) and not same.excludes_zero
        noisy = d[("s2_remove", e)]
        assert noisy.ci_low < 0 < noisy.ci_high and not noisy.excludes_zero
    # the interval has the size of the mean's sampling error: close to the normal approximation
    diff = pq[("s2_rlhn", "scifact")].mean(0) - pq[("default", "scifact")].mean(0)
    half = 100 * 1.96 * diff.std(ddof=1) / np.sqrt(len(diff))
    b = d[("s2_rlhn", "scifact")]
    assert (b.ci_high - b.ci_low) / 2 == pytest.approx(half, rel=0.2)
    assert d[("s2_rlhn", "scifact")].n_queries == 40 and d[("s2_rlhn", "Avg")].n_queries == 70
    # base is compared too, and the "does training work" figure: default vs base
    assert d[("base", "Avg")].ci_high < 0
    vb = rep.deltas_vs_base["retriever"]
    assert vb[("default", "scifact")].ci_low > 0
    assert vb[("default", "scifact")].delta == pytest.approx(-d[("base", "scifact")].delta)


def test_bootstrap_is_deterministic(conn):
    a = report.build_report(conn, n_boot=500, boot_seed=3).deltas["retriever"]
    b = report.build_report(conn, n_boot=500, boot_seed=3).deltas["retriever"]
    c = report.build_report(conn, n_boot=500, boot_seed=4).deltas["retriever"]
    assert a == b
    key = ("s2_rlhn", "Avg")
    assert c[key].delta == a[key].delta and c[key].ci_low != a[key].ci_low
    x = np.linspace(-1, 1, 50)
    assert np.array_equal(
        report.bootstrap_means(x, n_boot=300, seed=1, stream="s"),
        report.bootstrap_means(x, n_boot=300, seed=1, stream="s"),
    )


def test_markdown_states_what_each_interval_allows(conn):
    rep = report.build_report(conn, n_boot=1000)
    md = report.to_markdown(rep, {"date": "2026-01-01", "code version": "abc123"})
    assert md.index("- **date**: 2026-01-01") < md.index("### Retriever")
    d = rep.deltas["retriever"][("s2_rlhn", "Avg")]
    better = (
        f"s2_rlhn vs default on Avg: +{d.delta:.1f} points [+{d.ci_low:.1f}, +{d.ci_high:.1f}]: "
        "the interval excludes 0: s2_rlhn is better"
    )
    assert better in md
    assert (
        "s1_remove vs default on Avg: +0.0 points [+0.0, +0.0]: the interval includes 0, so no difference is "
        "established"
    ) in md
    assert "s2_remove vs default on Avg: " in md
    s2_remove = next(line for line in md.splitlines() if "s2_remove vs default on Avg" in line)
    assert s2_remove.endswith("the interval includes 0, so no difference is established.")
    for e in ("scifact", "cisi", "Avg"):
        line = next(line for line in md.splitlines() if line.startswith(f"- default vs base on {e}: "))
        assert line.endswith("the interval excludes 0: default is better.")
    assert "| eval set | base | default | s1_remove | s2_remove | s2_rlhn |" in md and "**Avg**" in md
    assert report.delta_sentence(report.Delta("x", "default", "cisi", -1.24, -2.0, -0.5, 10)) == (
        "x vs default on cisi: \u22121.2 points [\u22122.0, \u22120.5]: the interval excludes 0: x is worse"
    )


def _tiny_cascade(c) -> None:
    """fiqa: 3 pruned instances; tier 1 flags i1/n1 better, i1/n2 worse, fails on i2/n5; tier 2 re-judges i1 and
    i2 (forwarded) and finds n1 and n5 better. Teacher scores: i1/n1 (0.79 vs 0.8) and i3/n6 (0.58 vs 0.6) are within
    95% of their positive, so TopK-PercPos drops them."""
    apply_schema(c)
    c.executemany(
        "INSERT INTO pruned_instances VALUES ('fiqa', ?, ?, ?, ?)",
        [["i1", "q1", ["p1"], ["n1", "n2", "n3"]], ["i2", "q2", ["p2"], ["n4", "n5"]], ["i3", "q3", ["p3"], ["n6"]]],
    )
    t1 = [
        ("i1", "n1", 1, "better", 0.8),
        ("i1", "n2", 2, "worse", 0.6),
        ("i1", "n3", 3, "not_relevant", 0.1),
        ("i2", "n4", 1, "not_relevant", 0.1),
        ("i2", "n5", 2, "error", None),
        ("i3", "n6", 1, "not_relevant", 0.0),
    ]
    t2 = [
        ("i1", "n1", 1, "better", 0.9),
        ("i1", "n2", 2, "not_relevant", 0.2),
        ("i1", "n3", 3, "not_relevant", 0.1),
        ("i2", "n4", 1, "not_relevant", 0.1),
        ("i2", "n5", 2, "better", 0.7),
    ]
    c.executemany(
        "INSERT INTO judgments (dataset, tier, instance_id, docid, neg_index, verdict, score) "
        "VALUES ('fiqa', ?, ?, ?, ?, ?, ?)",
        [[1, *r] for r in t1] + [[2, *r] for r in t2],
    )
    c.executemany(
        "INSERT INTO raw_queries VALUES ('fiqa', ?, ?)", [["q1", "what is a bond"], ["q2", "an etf?"], ["q3", "stocks"]]
    )
    c.executemany(
        "INSERT INTO raw_passages VALUES ('fiqa', ?, ?, ?)",
        [["n1", "Bonds", "A bond is a loan. " * 40], ["n5", "", "ETFs trade on exchanges."]]
        + [[d, "", f"text {d}"] for d in ("p1", "p2", "p3", "n2", "n3", "n4", "n6")],
    )
    c.executemany(
        "INSERT INTO teacher_scores (dataset, instance_id, docid, role, neg_index, score, teacher) "
        "VALUES ('fiqa', ?, ?, ?, ?, ?, 'test')",
        [
            ("i1", "p1", "pos", None, 0.8),
            ("i1", "n1", "neg", 1, 0.79),
            ("i1", "n2", "neg", 2, 0.5),
            ("i1", "n3", "neg", 3, 0.1),
            ("i2", "p2", "pos", None, 0.5),
            ("i2", "n4", "neg", 1, 0.2),
            ("i2", "n5", "neg", 2, 0.3),
            ("i3", "p3", "pos", None, 0.6),
            ("i3", "n6", "neg", 1, 0.58),
        ],
    )
    for v in relabel.VARIANTS:
        relabel.build_variant(c, "fiqa", v)


def test_judge_section_counts(conn):
    _tiny_cascade(conn)
    (j,) = report.judge_summary(conn)
    assert (j.dataset, j.tier1_negatives, j.tier1_flagged, j.tier1_verdicts["error"]) == ("fiqa", 6, 2, 1)
    assert (j.tier2_instances, j.tier2_negatives) == (2, 5)
    assert j.tier2_verdicts == {"better": 2, "not_relevant": 3}
    eff = {
        v.variant: (v.kept, v.dropped, v.negatives_removed, v.relabeled_positives) for v in report.variant_effects(conn)
    }
    assert eff == {
        "default": (3, 0, 0, 0),
        "s1_remove": (2, 1, 0, 0),
        "s1_hn_remove": (3, 0, 1, 0),
        "s1_rlhn": (3, 0, 0, 1),  # relabeled, not removed: a negative counts once
        "s2_remove": (1, 2, 0, 0),
        "s2_hn_remove": (3, 0, 2, 0),
        "s2_rlhn": (3, 0, 0, 2),
        "s2_rlhn_filter": (3, 0, 0, 2),  # tier 2 said no `worse`: the same as s2_rlhn here
        "topk_percpos": (3, 0, 2, 0),
    }
    ex = report.relabel_examples(conn, n=5)
    assert [(x.instance_id, x.docid, x.tier2_score) for x in ex] == [("i1", "n1", 0.9), ("i2", "n5", 0.7)]
    assert ex[0].query == "what is a bond" and ex[0].passage.startswith("Bonds: A bond is a loan.")
    assert len(ex[0].passage) <= 200 and ex[0].passage.endswith("…")
    assert [x.docid for x in report.relabel_examples(conn, n=1)] == ["n1"]
    md = report.to_markdown(report.build_report(conn, n_boot=100))
    assert "### What the judge did" in md
    assert "| fiqa | 6 | 2 | 1 | 2 | 5 | 2 | 0 | 3 | 0 |" in md
    assert "| fiqa | s2_rlhn | 3 | 0 | 0 | 2 |" in md and "| fiqa | s2_remove | 1 | 2 | 0 | 0 |" in md
    assert "| fiqa | topk_percpos | 3 | 0 | 2 | 0 |" in md
    assert "ETFs trade on exchanges." in md


def _trained_models(c) -> None:
    apply_schema(c)
    settings = {
        "epochs": 1,
        "batch_size": 8,
        "learning_rate": 2e-5,
        "hard_negatives": 3,
        "scale": 20.0,
        "max_seq_length": 128,
    }
    for v in ("default", "s1_remove", "s2_remove", "s2_rlhn"):
        for s in SEEDS:
            c.execute(
                "INSERT INTO trained_models VALUES ('retriever', ?, ?, 'k', 'mv', '/m', 70, 210, 27, ?, 12.5, "
                "?, ?, now())",
                [v, s, 0.5 + s / 100, json.dumps(settings | {"seed": s}), json.dumps({"fiqa": 40, "nq": 30})],
            )


def test_training_runs_section(conn):
    _trained_models(conn)
    md = report.to_markdown(report.build_report(conn, n_boot=100))
    assert "### Training runs" in md and "| retriever | s2_rlhn | 2 | 70 | fiqa 40, nq 30 | 210 | 27 | 0.5200 |" in md
    assert md.count("Settings (every run): max_seq_length 128, hard_negatives 3, batch_size 8") == 1


def test_asset_materializes_with_metadata_and_files(conn, db_path, resources, instance, tmp_path, monkeypatch):
    from rlhn_assets.defs.report.assets import comparison_report

    _tiny_cascade(conn)
    _trained_models(conn)
    conn.execute(f"ATTACH '{db_path}' AS f")
    for t in (
        "eval_scores",
        "eval_per_query",
        "trained_models",
        "judgments",
        "relabeled_instances",
        "pruned_instances",
        "raw_queries",
        "raw_passages",
    ):
        conn.execute(f"CREATE TABLE f.{t} AS SELECT * FROM memory.{t}")
    conn.execute("DETACH f")
    monkeypatch.setenv("RLHN_DATA_DIR", str(tmp_path / "data"))

    result = dg.materialize(
        [comparison_report],
        resources=resources,
        instance=instance,
        run_config={"ops": {"comparison_report": {"config": {"n_bootstrap": 500}}}},
    )
    assert result.success
    md = result.asset_materializations_for_node("comparison_report")[0].metadata
    assert md["delta_s2_rlhn_vs_default_ci_low"].value > 0 and md["delta_s2_rlhn_vs_default"].value > 0
    assert md["delta_s1_remove_vs_default"].value == 0
    assert md["delta_default_vs_base_scifact_ci_low"].value > 0 and "delta_default_vs_base" in md
    assert md["avg_ndcg@10_default"].value == pytest.approx(0.42) and md["n_seeds_default"].value == 3
    assert md["training_runs"].value == 12
    out = tmp_path / "data" / "reports"
    text = (out / "comparison.md").read_text()
    assert "- **code version**:" in text and "s2_rlhn vs default on Avg:" in text and "### What the judge did" in text
    rows = list(csv.DictReader(open(out / "comparison.csv")))
    assert tuple(rows[0]) == report.CSV_HEADER
    r = next(r for r in rows if (r["model"], r["eval_set"], r["metric"]) == ("s2_rlhn", "Avg", "ndcg_at_10"))
    assert float(r["ci_low"]) > 0 and r["n_seeds"] == "3"
    assert (out / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert md["chart"].value.startswith("![")


def test_asset_fails_without_eval_scores(resources, instance, tmp_path, monkeypatch):
    from rlhn_assets.defs.report.assets import comparison_report

    monkeypatch.setenv("RLHN_DATA_DIR", str(tmp_path / "data"))
    result = dg.materialize([comparison_report], resources=resources, instance=instance, raise_on_error=False)
    assert not result.success
