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
    assert (s.precision, s.recall, s.f1) == (pytest.approx(precision_score(g, p)), pytest.approx(recall_score(g, p)),
                                             pytest.approx(f1_score(g, p)))


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
