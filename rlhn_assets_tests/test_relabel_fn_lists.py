"""Stage 2's false-negative lists: `auto` counts `better`+`worse` for one-token judges (whose `worse` is the tuned
relevance cut) and `better` only for listwise ones (whose `worse` means "relevant but not preferred", the paper's
negative); an explicit setting always wins. The listwise case on the authors' recorded verdicts is pinned in
test_cascade_assets.py (s2_rlhn relabels 2 FiQA negatives)."""

import duckdb
import pytest

from rlhn_assets.defs.relabel.assets import stage2_fn_lists
from rlhn_assets.lib.schema import apply_schema


@pytest.fixture
def conn():
    c = duckdb.connect()
    apply_schema(c)
    for ds, kind in [("a", "graded+calibrated"), ("b", "pointwise"), ("c", "listwise"), ("d", "graded")]:
        c.execute(
            "INSERT INTO judgments (dataset, tier, instance_id, docid, neg_index, verdict, judge_kind) "
            "VALUES (?, 2, 'i', 'x', 0, 'worse', ?)",
            [ds, kind],
        )
        c.execute(
            "INSERT INTO judgments (dataset, tier, instance_id, docid, neg_index, verdict, judge_kind) "
            "VALUES (?, 1, 'i', 'x', 0, 'worse', 'embedding_margin')",
            [ds],
        )
    # a dataset judged by both kinds (re-judged with another preset): not all one-token -> the paper's rule
    c.execute(
        "INSERT INTO judgments (dataset, tier, instance_id, docid, neg_index, verdict, judge_kind) "
        "VALUES ('e', 2, 'i', 'x', 0, 'worse', 'pointwise'), ('e', 2, 'j', 'y', 0, 'worse', 'listwise')"
    )
    return c


def test_auto_follows_the_tier2_judge_kind(conn):
    assert [stage2_fn_lists(conn, ds, "auto") for ds in "abcde"] == [
        "better+worse",
        "better+worse",
        "better",
        "better+worse",
        "better",
    ]
    assert stage2_fn_lists(conn, "never-judged", "auto") == "better"


def test_an_explicit_setting_wins(conn):
    assert stage2_fn_lists(conn, "a", "better") == "better"
    assert stage2_fn_lists(conn, "c", "better+worse") == "better+worse"
