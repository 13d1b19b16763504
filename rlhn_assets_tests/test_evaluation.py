"""rlhn_assets.lib.evaluation: loading BEIR folders, metric correctness, and the dense-search anchor."""

from __future__ import annotations

import math
import os
import re

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from rlhn_assets import settings
from rlhn_assets.lib.evaluation import (
    BeirDataset,
    corpus_hash,
    doc_text,
    evaluate,
    list_eval_sets,
    load_beir_eval,
    rerank,
)

EVAL_ROOT = settings.PROJECT_ROOT / "data" / "eval"


# ------------------------------------------------------------------------------------------ helpers


def _tokens(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def _bm25_run(ds: BeirDataset, top_k: int = 100) -> dict[str, dict[str, float]]:
    """A cheap deterministic run. Scores are 100, 99, ... by rank (ties broken by corpus order), so no two
    documents of a query tie and every evaluator sees the same ranking."""
    from rank_bm25 import BM25Okapi

    doc_ids = list(ds.corpus)
    bm25 = BM25Okapi([_tokens(doc_text(ds.corpus[d])) for d in doc_ids], k1=0.9, b=0.4)
    run = {}
    for qid, text in ds.queries.items():
        scores = bm25.get_scores(_tokens(text))
        order = np.argsort(-scores, kind="stable")[:top_k]
        run[qid] = {doc_ids[i]: float(top_k - r) for r, i in enumerate(order)}
    return run


def _hand_metrics(qrels, run) -> dict[str, float]:
    """pytrec_eval directly, averaged by hand over *all* qrels queries (a query missing from the run = 0).
    MRR@10 = recip_rank on the run cut to its 10 best documents."""
    import pytrec_eval

    ev = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10", "recall.100", "recip_rank"})
    full = ev.evaluate(run)
    top10 = {q: dict(sorted(d.items(), key=lambda kv: -kv[1])[:10]) for q, d in run.items()}
    cut = ev.evaluate(top10)
    n = len(qrels)
    return {
        "ndcg@10": sum(full[q]["ndcg_cut_10"] for q in full) / n,
        "recall@100": sum(full[q]["recall_100"] for q in full) / n,
        "mrr@10": sum(cut[q]["recip_rank"] for q in cut) / n,
        "per_query": {q: full.get(q, {}).get("ndcg_cut_10", 0.0) for q in qrels},
    }


# ------------------------------------------------------------------------------------------ loading


def test_bundled_eval_sets_load():
    assert {"scifact", "cranfield", "cisi"} <= set(list_eval_sets(EVAL_ROOT))
    sci = load_beir_eval(EVAL_ROOT / "scifact")
    assert (len(sci.corpus), len(sci.queries), sum(map(len, sci.qrels.values()))) == (5183, 300, 339)
    assert set(sci.queries) == set(sci.qrels)
    assert len(load_beir_eval(EVAL_ROOT / "scifact", split="train").queries) == 809
    cisi = load_beir_eval(EVAL_ROOT / "cisi")
    assert len(cisi.queries) == 76  # of 112: only judged queries are kept
    cran = load_beir_eval(EVAL_ROOT / "cranfield")
    assert {g for rels in cran.qrels.values() for g in rels.values()} == {1, 2, 3, 4}
    assert corpus_hash(cran) == corpus_hash(load_beir_eval(EVAL_ROOT / "cranfield")) != corpus_hash(cisi)


def _write_set(root, qrels_lines, corpus_name="corpus.jsonl"):
    root.mkdir(parents=True, exist_ok=True)
    (root / "qrels").mkdir(exist_ok=True)
    (root / corpus_name).write_text('{"_id": "d1", "title": "T", "text": "one"}\n{"_id": "d2", "text": "two"}\n')
    (root / "queries.jsonl").write_text('{"_id": "q1", "text": "first"}\n{"_id": "q2", "text": "second"}\n')
    (root / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(l + "\n" for l in qrels_lines))
    return root


def test_load_small_set_and_list(tmp_path):
    folder = _write_set(tmp_path / "tiny", ["q1\td1\t1", "q1\td2\t0"])
    (tmp_path / "not_a_set").mkdir()
    assert list_eval_sets(tmp_path) == ["tiny"]
    ds = load_beir_eval(folder)
    assert ds.name == "tiny"
    assert ds.queries == {"q1": "first"}  # q2 has no qrels
    assert ds.qrels == {"q1": {"d1": 1, "d2": 0}}
    assert doc_text(ds.corpus["d1"]) == "T one" and doc_text(ds.corpus["d2"]) == "two"


@pytest.mark.parametrize(
    "bad, why",
    [("q1\td2", "expected 'query-id"), ("q1\td2\thigh", "not an integer"), ("q1 d2 1", "expected 'query-id")],
)
def test_malformed_qrels_line_names_file_and_line(tmp_path, bad, why):
    folder = _write_set(tmp_path / "bad", ["q1\td1\t1", bad])
    with pytest.raises(ValueError) as exc:
        load_beir_eval(folder)
    msg = str(exc.value)
    assert f"{folder / 'qrels' / 'test.tsv'}:3:" in msg and why in msg


def test_malformed_corpus_line_and_unknown_query(tmp_path):
    folder = _write_set(tmp_path / "c", ["q1\td1\t1"])
    (folder / "corpus.jsonl").write_text('{"_id": "d1", "text": "one"}\n{"_id": "d2", "text": \n')
    with pytest.raises(ValueError, match=re.escape(f"{folder / 'corpus.jsonl'}:2:")):
        load_beir_eval(folder)
    folder = _write_set(tmp_path / "u", ["q1\td1\t1", "q9\td2\t1"])
    with pytest.raises(ValueError, match=re.escape(f"{folder / 'qrels' / 'test.tsv'}:3: query 'q9'")):
        load_beir_eval(folder)


# ------------------------------------------------------------------------------------------ metrics


def test_toy_ndcg_is_trec_eval_linear_gain():
    # A toy checked by hand below: q1 judged d1=1, d2=0, d3=2; q2 judged d4=1.
    qrels = {"q1": {"d1": 1, "d2": 0, "d3": 2}, "q2": {"d4": 1}}
    # The run that gives the documented 0.66921 / MRR 0.75: q1 ranks d1, d2, (unjudged), d3; q2 ranks d4 second.
    run = {"q1": {"d1": 4.0, "d2": 3.0, "x": 2.0, "d3": 1.0}, "q2": {"y": 2.0, "d4": 1.0}}
    m = evaluate(qrels, run)
    q1 = (1 + 2 / math.log2(5)) / (2 + 1 / math.log2(3))  # linear gain; exponential gain would give 0.63109 overall
    q2 = 1 / math.log2(3)
    assert m["ndcg@10"] == pytest.approx(0.66921, abs=1e-5) == pytest.approx((q1 + q2) / 2, abs=1e-5)
    assert m["per_query_ndcg@10"] == pytest.approx({"q1": q1, "q2": q2})
    assert m["mrr@10"] == pytest.approx(0.75) and m["recall@100"] == pytest.approx(1.0)
    assert m["queries_scored"] == 2
    # The literal ranking d1, d2, d3 (and d4 first for q2): q1 = (1 + 2/log2(4)) / IDCG, q2 = 1.
    m2 = evaluate(qrels, {"q1": {"d1": 3.0, "d2": 2.0, "d3": 1.0}, "q2": {"d4": 1.0}})
    assert m2["ndcg@10"] == pytest.approx((2 / (2 + 1 / math.log2(3)) + 1) / 2, abs=1e-5)


def test_identical_ids_are_kept_and_missing_queries_count_zero():
    qrels = {"1": {"1": 1}, "2": {"5": 1}, "3": {"7": 1}, "4": {"9": 1}}
    run = {"1": {"1": 1.0}, "2": {}, "4": {"9": 1.0}, "99": {"1": 1.0}}  # "3" absent, "2" empty, "99" unjudged
    m = evaluate(qrels, run)
    assert m["queries_scored"] == 4
    assert m["ndcg@10"] == pytest.approx(0.5) and m["mrr@10"] == pytest.approx(0.5)
    assert m["per_query_ndcg@10"] == {"1": 1.0, "2": 0.0, "3": 0.0, "4": 1.0}
    assert run == {"1": {"1": 1.0}, "2": {}, "4": {"9": 1.0}, "99": {"1": 1.0}}  # input not modified
    assert evaluate(qrels, {})["ndcg@10"] == 0.0


@pytest.mark.parametrize("name", ["cranfield", "cisi"])
def test_evaluate_matches_hand_pytrec_eval(name):
    ds = load_beir_eval(EVAL_ROOT / name)
    run = _bm25_run(ds)
    dropped = sorted(run)[:2]  # two queries with no result must still count (as 0)
    for q in dropped:
        del run[q]
    m = evaluate(ds.qrels, run)
    hand = _hand_metrics(ds.qrels, run)
    assert m["queries_scored"] == len(ds.qrels)
    for key in ("ndcg@10", "recall@100", "mrr@10"):
        assert 0.0 <= m[key] <= 1.0
        assert m[key] == pytest.approx(hand[key], abs=1e-5), key
    assert m["per_query_ndcg@10"] == pytest.approx(hand["per_query"])
    assert all(m["per_query_ndcg@10"][q] == 0.0 for q in dropped)
    # BM25 sanity vs SOURCE.md (plain BM25 nDCG@10 ~0.31 Cranfield, ~0.24 CISI), over the undropped run
    full = evaluate(ds.qrels, _bm25_run(ds))
    print(f"\n{name} BM25: " + ", ".join(f"{k} {full[k]:.4f}" for k in ("ndcg@10", "recall@100", "mrr@10")))
    assert full["ndcg@10"] > 0.15


def test_rerank_with_stub_cross_encoder():
    ds = BeirDataset(
        "t",
        {"a": {"title": "", "text": "x"}, "b": {"title": "B", "text": "yy"}, "c": {"title": "", "text": "zzz"}},
        {"q": "query"},
        {"q": {"c": 1}},
    )

    class Stub:
        calls = []

        def predict(self, pairs, batch_size=32, show_progress_bar=False):
            self.calls.append(list(pairs))
            return np.array([len(p) for _, p in pairs], dtype=np.float32)

    stub = Stub()
    out = rerank(stub, ds, {"q": {"a": 0.9, "b": 0.5, "c": 0.1}, "unknown": {"a": 1.0}}, top_k=2)
    assert stub.calls == [[("query", "x"), ("query", "B yy")]]  # only the 2 best candidates, BEIR passage text
    assert out == {"q": {"a": 1.0, "b": 4.0}}


# ------------------------------------------------------------------------------------------ anchor (real model)


@pytest.mark.slow
def test_dense_search_matches_plain_sentence_transformers_on_scifact(tmp_path):
    from beir.retrieval.evaluation import EvaluateRetrieval

    from rlhn_assets.lib.embeddings import base_model_path, dir_hash, load_model
    from rlhn_assets.lib.evaluation import dense_search

    ds = load_beir_eval(EVAL_ROOT / "scifact")
    model = load_model()
    version = dir_hash(base_model_path())

    results, info = dense_search(model, version, ds, top_k=100, cache_dir=tmp_path / "emb")
    assert not info["corpus_cache_hit"] and info["passages"] == 5183 and info["queries"] == 300
    ours = evaluate(ds.qrels, results)

    # Independent plain path: SentenceTransformer.encode + numpy cosine + beir's evaluator.
    doc_ids = list(ds.corpus)
    texts = [(ds.corpus[d]["title"] + " " + ds.corpus[d]["text"]).strip() for d in doc_ids]
    qids = list(ds.queries)
    d_emb = model.encode(texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True)
    q_emb = model.encode([ds.queries[q] for q in qids], batch_size=64, normalize_embeddings=True, convert_to_numpy=True)
    sims = q_emb @ d_emb.T
    plain = {}
    for row, qid in enumerate(qids):
        top = np.argsort(-sims[row])[:100]
        plain[qid] = {doc_ids[i]: float(sims[row, i]) for i in top}
    ndcg, _, recall, _ = EvaluateRetrieval.evaluate(ds.qrels, plain, [10, 100], ignore_identical_ids=False)

    print(
        f"\nSciFact test, base all-MiniLM-L6-v2: dense_search nDCG@10 {ours['ndcg@10']:.5f} "
        f"Recall@100 {ours['recall@100']:.5f} MRR@10 {ours['mrr@10']:.5f} | plain path nDCG@10 "
        f"{ndcg['NDCG@10']:.5f} Recall@100 {recall['Recall@100']:.5f} | cold call {info}"
    )
    assert abs(ours["ndcg@10"] - ndcg["NDCG@10"]) < 5e-4
    assert abs(ours["recall@100"] - recall["Recall@100"]) < 5e-4
    assert 0.55 < ours["ndcg@10"] < 0.75  # published all-MiniLM-L6-v2 SciFact nDCG@10 is ~0.65

    again, info2 = dense_search(model, version, ds, top_k=100, cache_dir=tmp_path / "emb")
    assert info2["corpus_cache_hit"]
    assert list(again) == list(results)
    for q in results:
        assert list(again[q]) == list(results[q])
        assert np.allclose(list(again[q].values()), list(results[q].values()), atol=1e-6)
    print(f"warm call {info2}")
