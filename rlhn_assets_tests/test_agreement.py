"""Agreement metrics on hand-made label vectors with known answers, and the labeled-file reader."""

import pytest

from rlhn_assets.lib.agreement import binary_scores, load_judge_eval
from rlhn_assets_tests.conftest import DATA


def test_known_values():
    # gold 1 1 1 0 0 0 0 0 ; pred 1 1 0 1 0 0 0 0 -> tp 2, P 2/3, R 2/3, po 6/8
    s = binary_scores([1, 1, 1, 0, 0, 0, 0, 0], [1, 1, 0, 1, 0, 0, 0, 0])
    assert (s.tp, s.precision, s.recall, s.f1) == (2, pytest.approx(2 / 3), pytest.approx(2 / 3), pytest.approx(2 / 3))
    pe = (3 / 8) * (3 / 8) + (5 / 8) * (5 / 8)
    assert s.kappa == pytest.approx((6 / 8 - pe) / (1 - pe)) == pytest.approx(0.4666667)


def test_kappa_matches_sklearn_on_a_random_case():
    import random

    from sklearn.metrics import cohen_kappa_score, f1_score, precision_score, recall_score

    rng = random.Random(3)
    g = [rng.random() < 0.3 for _ in range(200)]
    p = [x if rng.random() < 0.8 else not x for x in g]
    s = binary_scores(g, p)
    assert s.kappa == pytest.approx(cohen_kappa_score(g, p))
    assert (s.precision, s.recall, s.f1) == (
        pytest.approx(precision_score(g, p)),
        pytest.approx(recall_score(g, p)),
        pytest.approx(f1_score(g, p)),
    )


def test_perfect_and_inverted():
    assert binary_scores([1, 0, 1, 0], [1, 0, 1, 0]).kappa == 1.0
    assert binary_scores([1, 0, 1, 0], [0, 1, 0, 1]).kappa == pytest.approx(-1.0)


def test_degenerate_no_gold_positives():
    s = binary_scores([0, 0, 0, 0], [1, 0, 0, 0])
    assert s.recall == 0.0 and s.precision == 0.0 and s.f1 == 0.0 and s.kappa == pytest.approx(0.0)


def test_degenerate_nothing_predicted():
    s = binary_scores([1, 0, 1, 0], [0, 0, 0, 0])
    assert s.precision == 0.0 and s.recall == 0.0 and s.f1 == 0.0 and s.kappa == pytest.approx(0.0)


def test_degenerate_all_one_class_on_both_sides():
    assert binary_scores([1, 1, 1], [1, 1, 1]).kappa == 1.0  # chance agreement 1: the 0/0 case, defined as 1
    assert binary_scores([0, 0], [0, 0]).kappa == 1.0
    s = binary_scores([1, 1, 1], [1, 1, 1])
    assert (s.precision, s.recall, s.f1) == (1.0, 1.0, 1.0)


def test_errors():
    with pytest.raises(ValueError):
        binary_scores([1], [1, 0])
    with pytest.raises(ValueError):
        binary_scores([], [])


def test_dl19_file_excludes_unjudged_negatives():
    data = load_judge_eval(DATA / "judge_eval/dl19/judge_eval.tasb_top30.jsonl.gz")
    assert len(data.instances) == 43
    assert data.unjudged_excluded == 351  # SOURCE note: 351 unjudged
    grades = list(data.grades.values())
    assert sum(1 for g in grades if g >= 2) == 213 + 330  # graded 3 / 2 in the SOURCE note


def test_bootstrap_ci_brackets_the_estimate_and_resamples_queries():
    import random

    from rlhn_assets.lib.agreement import bootstrap_ci

    rnd = random.Random(0)
    groups = [f"q{i // 20}" for i in range(800)]  # 40 queries x 20 negatives
    gold = [int(rnd.random() < 0.4) for _ in groups]
    pred = [g if rnd.random() < 0.8 else 1 - g for g in gold]  # a decent judge
    point = binary_scores(gold, pred)
    ci = bootstrap_ci(gold, pred, groups, n_boot=500, seed=1)
    for name in ("kappa", "precision", "recall", "f1"):
        lo, hi = ci[name]
        assert lo <= getattr(point, name) <= hi, (name, lo, hi)
        assert hi - lo > 0.01
    assert ci == bootstrap_ci(gold, pred, groups, n_boot=500, seed=1)  # deterministic
    # same items in one group each: the CI of a single query cannot vary (every resample is that query)
    one = bootstrap_ci(gold, pred, ["q"] * len(gold), n_boot=50)
    assert one["kappa"][0] == one["kappa"][1] == pytest.approx(point.kappa)
    # 4x the queries -> about half the width
    ci4 = bootstrap_ci(gold * 4, pred * 4, [f"{g}-{k}" for k in range(4) for g in groups], n_boot=500, seed=1)
    assert (ci4["kappa"][1] - ci4["kappa"][0]) < 0.7 * (ci["kappa"][1] - ci["kappa"][0])


def test_score_aucs():
    from rlhn_assets.lib.agreement import score_aucs

    r = score_aucs([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    assert r["roc_auc"] == pytest.approx(0.75)
    assert r["pr_auc"] == pytest.approx((1 + 2 / 3) / 2)
    assert score_aucs([0, 1], [0.2, None]) == {"roc_auc": None, "pr_auc": None}
    assert score_aucs([1, 1], [0.2, 0.3]) == {"roc_auc": None, "pr_auc": None}
