"""The one BEIR reader (lib/beir_data.py) and its grade-0 rule, seen from both callers: mining and evaluation.

Fixture ``fixtures/beir_grade0``: q1 judged d1=1, d2=0; q2 judged only d3=0; q3 judged d4=2; q4 not judged."""

from __future__ import annotations

import gzip
import json
import math
import re
import shutil

import pytest

from rlhn_assets.lib import beir_data, mining
from rlhn_assets.lib.evaluation import evaluate, load_beir_eval
from rlhn_assets.registry import MiningSpec
from rlhn_assets_tests.conftest import FIXTURES

TINY = FIXTURES / "beir_grade0"
FILES = (TINY / "corpus.jsonl", TINY / "queries.jsonl", TINY / "qrels" / "test.tsv")


def test_the_reader_keeps_every_judgment_and_every_judged_query():
    data = beir_data.load(*FILES)
    assert list(data.corpus) == ["d1", "d2", "d3", "d4"]
    assert data.corpus["d4"] == {"title": "", "text": "Regular exercise lowers resting blood pressure."}
    assert list(data.queries) == ["q1", "q2", "q3"]  # q2 (judged 0 only) is a judged query; q4 is not
    assert data.qrels == {"q1": {"d1": 1, "d2": 0}, "q2": {"d3": 0}, "q3": {"d4": 2}}


def test_grade_zero_is_never_a_positive():
    assert beir_data.load(*FILES).positives() == {"q1": {"d1": 1}, "q3": {"d4": 2}}


def test_mining_reads_positives_only_and_may_use_a_grade_zero_passage_as_a_negative(tmp_path):
    split = mining.load_beir(*FILES)
    assert split.qrels == {"q1": {"d1": 1}, "q3": {"d4": 2}}
    assert set(split.queries) == {"q1", "q3"}  # a query with no positive is not mined
    spec = MiningSpec(
        corpus="", queries="", qrels="", output="", method="bm25", range_min=0, range_max=10, num_negatives=3
    )
    out = tmp_path / "mined.jsonl.gz"
    stats = mining.mine(spec, split, "tiny", out)
    rows = {r["query_id"]: r for r in map(json.loads, gzip.open(out, "rt"))}
    assert set(rows) == {"q1", "q3"} and stats.queries == 2
    assert [p["docid"] for p in rows["q1"]["positive_passages"]] == ["d1"]
    assert {p["docid"] for p in rows["q1"]["negative_passages"]} == {"d2", "d3", "d4"}  # d2: judged not relevant
    assert [p["docid"] for p in rows["q3"]["positive_passages"]] == ["d4"]


def test_evaluation_scores_grade_zero_as_not_relevant_and_counts_its_query(tmp_path):
    folder = tmp_path / "tiny"
    shutil.copytree(TINY, folder)
    ds = load_beir_eval(folder)
    assert ds.qrels == beir_data.load(*FILES).qrels  # grade 0 is kept: pytrec_eval needs it as a judgment
    # q1 ranks its grade-0 passage first and the relevant one second; q2 has nothing to find; q3 is perfect
    run = {"q1": {"d2": 2.0, "d1": 1.0}, "q2": {"d3": 1.0}, "q3": {"d4": 1.0}}
    m = evaluate(ds.qrels, run)
    assert m["queries_scored"] == 3  # as BEIR: a query judged only with grade 0 enters the mean (with 0)
    assert m["per_query_ndcg@10"] == pytest.approx({"q1": 1 / math.log2(3), "q2": 0.0, "q3": 1.0})
    assert m["ndcg@10"] == pytest.approx((1 / math.log2(3) + 1) / 3, abs=1e-5)  # beir rounds to 5 places
    assert m["mrr@10"] == pytest.approx((1 / 2 + 0 + 1) / 3, abs=1e-5)


def test_a_pair_judged_twice_keeps_its_last_grade(tmp_path):
    """For both callers (mining used to keep a positive that a later row judged 0)."""
    qrels = tmp_path / "qrels.tsv"
    qrels.write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td2\t1\nq1\td2\t0\n")
    data = beir_data.load(FILES[0], FILES[1], qrels)
    assert data.qrels == {"q1": {"d1": 1, "d2": 0}} and data.positives() == {"q1": {"d1": 1}}


@pytest.mark.parametrize("header", ["query-id\tcorpus-id\tscore\n", "qid\tdocid\tgrade\n", ""])
def test_line_one_is_a_header_only_when_its_score_is_not_a_number(tmp_path, header):
    qrels = tmp_path / "qrels.tsv"
    qrels.write_text(header + "q1\td1\t1\nq3\td4\t2\n")
    assert beir_data.load(FILES[0], FILES[1], qrels).qrels == {"q1": {"d1": 1}, "q3": {"d4": 2}}


@pytest.mark.parametrize(
    "line, why",
    [("q1\td2", "expected 'query-id"), ("q1\td2\thigh", "not an integer"), ("q1\td2\t1\textra", "expected 'query-id")],
)
def test_malformed_qrels_fail_for_mining_too(tmp_path, line, why):
    qrels = tmp_path / "qrels.tsv"
    qrels.write_text(f"query-id\tcorpus-id\tscore\nq1\td1\t1\n{line}\n")
    with pytest.raises(ValueError, match=re.escape(f"{qrels}:3:") + ".*" + re.escape(why)):
        mining.load_beir(FILES[0], FILES[1], qrels)


def test_a_judged_query_missing_from_the_queries_file_fails_for_mining_too(tmp_path):
    qrels = tmp_path / "qrels.tsv"
    qrels.write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq9\td2\t1\n")
    with pytest.raises(ValueError, match=re.escape(f"{qrels}:3: query 'q9' is not in {FILES[1]}")):
        mining.load_beir(FILES[0], FILES[1], qrels)


def test_gzipped_inputs_read_the_same(tmp_path):
    gz = []
    for p in FILES:
        dst = tmp_path / (p.name + ".gz")
        dst.write_bytes(gzip.compress(p.read_bytes()))
        gz.append(dst)
    assert beir_data.load(*gz) == beir_data.load(*FILES)
