"""judge_agreement on the bundled DL19 labels with embedding judges in both tiers (no LLM): the report carries
point estimates, 95% bootstrap CIs over queries and, for scored judges, ROC-AUC / PR-AUC."""

from __future__ import annotations

import csv

import dagster as dg

from rlhn_assets.defs.agreement.assets import HEADERS, judge_agreement
from rlhn_assets.resources import JudgeTierResource


def test_judge_agreement_reports_cis_and_aucs(tmp_data, monkeypatch, instance):
    monkeypatch.setenv("RLHN_DATA_DIR", str(tmp_data))
    t1 = JudgeTierResource(tier=1, kind="embedding_margin", margin=0.2)
    t2 = JudgeTierResource(tier=2, kind="embedding_margin", margin=0.05)
    res = dg.materialize(
        [judge_agreement],
        instance=instance,
        resources={"tier1_judge": t1, "tier2_judge": t2},
        run_config={"ops": {"judge_agreement": {"config": {"max_instances": 6, "tier2_standalone": True}}}},
    )
    assert res.success
    rows = list(csv.DictReader(open(tmp_data / "reports" / "judge_agreement.csv")))
    assert [r["judge"] for r in rows] == [
        "tier 1 (embedding_margin)",
        "cascade (tier 2: embedding_margin)",
        "tier 2 alone (embedding_margin)",
    ]
    assert list(rows[0]) == HEADERS
    for r in rows:
        lo, hi = (float(x) for x in r["kappa 95% CI"].strip("[]").split(","))
        assert lo <= float(r["kappa"]) <= hi
    # scored single judges get AUCs; the cascade mixes two judges' scales and gets none
    assert 0 <= float(rows[0]["ROC-AUC"]) <= 1 and 0 <= float(rows[0]["PR-AUC"]) <= 1
    assert rows[1]["ROC-AUC"] == "-"
    assert (
        "95% CIs: percentile bootstrap over the 6 queries" in (tmp_data / "reports" / "judge_agreement.md").read_text()
    )
