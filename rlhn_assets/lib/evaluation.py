"""Retrieval evaluation on BEIR-layout test collections (SciFact, Cranfield, CISI, ...).

Plain module (no Dagster): load a BEIR folder, run exact dense search with a SentenceTransformer
(corpus embeddings through the on-disk cache of ``embeddings.encode_cached``), optionally re-rank with a
CrossEncoder, and score with beir's ``EvaluateRetrieval`` (trec_eval via pytrec_eval: nDCG is the
linear-gain trec_eval nDCG that BEIR reports).

torch / sentence-transformers / beir are imported inside the functions that need them, so importing this
module is cheap.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rlhn_assets.lib import beir_data
from rlhn_assets.lib.beir_data import CORPUS_FILES, corpus_file

# Stand-in document for queries that retrieved nothing, so pytrec_eval still scores them (with 0).
NO_RESULT_DOC = "__rlhn_no_result__"


@dataclass
class BeirDataset:
    name: str
    corpus: dict[str, dict]  # docid -> {"title": str, "text": str}
    queries: dict[str, str]  # qid -> text; only queries judged in the loaded split
    qrels: dict[str, dict[str, int]]  # qid -> {docid: grade}


# ----------------------------------------------------------------------------------------------- loading


def load_beir_eval(folder: Path, split: str = "test") -> BeirDataset:
    """Load a BEIR folder (``corpus.jsonl[.gz]``, ``queries.jsonl``, ``qrels/<split>.tsv``) with
    ``lib.beir_data``.

    Like BEIR's GenericDataLoader, only queries with at least one qrels row in the split are kept, and
    every qrels row (also grade 0: "judged, not relevant", which pytrec_eval scores as such) is kept; a query
    judged only with grade 0 is scored too (nDCG 0). A qrels query without a text in queries.jsonl is an error.
    """
    folder = Path(folder)
    corpus_path = corpus_file(folder)
    if corpus_path is None:
        raise FileNotFoundError(f"{folder}: no {' or '.join(CORPUS_FILES)}")
    queries_path = folder / "queries.jsonl"
    qrels_path = folder / "qrels" / f"{split}.tsv"
    for p in (queries_path, qrels_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p}: missing")
    data = beir_data.load(corpus_path, queries_path, qrels_path)
    return BeirDataset(name=folder.name, corpus=data.corpus, queries=data.queries, qrels=data.qrels)


def list_eval_sets(root: Path) -> list[str]:
    """Names of the subfolders of ``root`` that hold a corpus file, queries.jsonl and qrels/test.tsv."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(
        p.name
        for p in root.iterdir()
        if p.is_dir()
        and corpus_file(p) is not None
        and (p / "queries.jsonl").is_file()
        and (p / "qrels" / "test.tsv").is_file()
    )


def doc_text(doc: dict) -> str:
    """BEIR's passage text: title + " " + text, stripped."""
    return f"{doc.get('title') or ''} {doc.get('text') or ''}".strip()


def corpus_hash(ds: BeirDataset) -> str:
    """Content hash of the corpus (ids, titles, texts, in order)."""
    h = hashlib.sha256()
    for did, doc in ds.corpus.items():
        for part in (did, doc.get("title") or "", doc.get("text") or ""):
            h.update(part.encode("utf-8", errors="replace"))
            h.update(b"\x00")
        h.update(b"\x01")
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------- search


def dense_search(
    model,
    model_version: str,
    ds: BeirDataset,
    *,
    top_k: int = 100,
    cache_dir: Path | None = None,
    batch_size: int = 64,
    progress: Callable[[str], None] | None = None,
    query_chunk: int = 1024,
    precision: str = "fp32",
    query_prompt: str | None = None,
    passage_prompt: str | None = None,
) -> tuple[dict[str, dict[str, float]], dict]:
    """Exact cosine-similarity search of every query over the full corpus.

    Queries are encoded with ``query_prompt`` and passages with ``passage_prompt`` (None: the model's own prompts,
    ``embeddings.role_prompt``). Corpus embeddings go through ``encode_cached`` (keyed by ``model_version``, the
    passage prompt and the passage texts), so an unchanged model on an unchanged corpus costs no encoding; queries
    are encoded directly.
    Returns BEIR-style results ``{qid: {docid: score}}`` (the ``top_k`` best per query) and an info dict.
    """
    import torch

    from rlhn_assets.lib.embeddings import encode_cached, encode_texts, inference_precision, resolve_precision

    doc_ids = list(ds.corpus)
    qids = list(ds.queries)
    t0 = time.perf_counter()
    doc_emb, hit = encode_cached(
        model,
        model_version,
        [doc_text(ds.corpus[d]) for d in doc_ids],
        cache_dir,
        batch_size=batch_size,
        progress=progress,
        precision=precision,
        role="passage",
        prompt=passage_prompt,
    )
    corpus_seconds = time.perf_counter() - t0
    t1 = time.perf_counter()
    device = str(getattr(model, "device", "cpu"))
    resolved = resolve_precision(precision, device)
    if qids:
        with inference_precision(resolved, device):
            q_emb = encode_texts(model, [ds.queries[q] for q in qids], "query", query_prompt, batch_size=batch_size)
    else:
        q_emb = np.zeros((0, doc_emb.shape[1] if doc_emb.ndim == 2 else 0), dtype=np.float32)
    query_seconds = time.perf_counter() - t1

    t2 = time.perf_counter()
    results: dict[str, dict[str, float]] = {}
    k = min(top_k, len(doc_ids))
    if k > 0 and qids:
        docs_t = torch.from_numpy(np.ascontiguousarray(doc_emb))
        for start in range(0, len(qids), query_chunk):
            q_t = torch.from_numpy(np.ascontiguousarray(q_emb[start : start + query_chunk]))
            scores, idx = torch.topk(q_t @ docs_t.T, k, dim=1, largest=True, sorted=True)
            for qid, row_s, row_i in zip(qids[start : start + query_chunk], scores.tolist(), idx.tolist()):
                results[qid] = {doc_ids[i]: float(s) for i, s in zip(row_i, row_s)}
    else:
        results = {q: {} for q in qids}
    search_seconds = time.perf_counter() - t2
    if progress:
        progress(
            f"dense search: {len(qids):,} queries x {len(doc_ids):,} passages, top {k} "
            f"(corpus {'cache hit' if hit else f'encoded in {corpus_seconds:.1f}s'}, search {search_seconds:.2f}s)"
        )
    info = {
        "corpus_cache_hit": hit,
        "precision": resolved,
        "encode_seconds": round(corpus_seconds + query_seconds, 3),
        "corpus_encode_seconds": round(corpus_seconds, 3),
        "query_encode_seconds": round(query_seconds, 3),
        "search_seconds": round(search_seconds, 3),
        "passages": len(doc_ids),
        "queries": len(qids),
        "top_k": k,
    }
    return results, info


def rerank(
    cross_encoder,
    ds: BeirDataset,
    results: dict[str, dict[str, float]],
    *,
    top_k: int = 100,
    batch_size: int = 32,
    progress: Callable[[str], None] | None = None,
) -> dict[str, dict[str, float]]:
    """Re-score each query's ``top_k`` best candidates with a CrossEncoder (``predict`` on (query, passage)).

    Candidates below ``top_k`` are dropped; queries without text in ``ds`` are skipped.
    """
    pairs: list[tuple[str, str]] = []
    owners: list[tuple[str, str]] = []
    for qid, cands in results.items():
        if qid not in ds.queries:
            continue
        best = sorted(cands.items(), key=lambda kv: kv[1], reverse=True)[:top_k]
        for did, _ in best:
            pairs.append((ds.queries[qid], doc_text(ds.corpus[did])))
            owners.append((qid, did))
    out: dict[str, dict[str, float]] = {q: {} for q in results if q in ds.queries}
    if not pairs:
        return out
    if progress:
        progress(f"re-ranking {len(pairs):,} (query, passage) pairs")
    scores = cross_encoder.predict(pairs, batch_size=batch_size, show_progress_bar=False)
    # one score per pair; a multi-label head gives (n, labels): use the last label (the "relevant" class)
    for (qid, did), s in zip(owners, np.asarray(scores, dtype=np.float64).reshape(len(pairs), -1)[:, -1]):
        out[qid][did] = float(s)
    return out


# ----------------------------------------------------------------------------------------------- metrics


def evaluate(qrels: dict[str, dict[str, int]], results: dict[str, dict[str, float]]) -> dict:
    """nDCG@10, Recall@100, MRR@10 (means over every qrels query) + per-query nDCG@10.

    Computed with beir's ``EvaluateRetrieval``. Every qrels query is scored: a query with no (or an empty)
    result list gets a placeholder non-relevant document, so pytrec_eval scores it 0 instead of leaving it
    out of the mean. Result lists of queries that are not in qrels are ignored.
    """
    import pytrec_eval
    from beir.retrieval.evaluation import EvaluateRetrieval

    qrels = {q: {d: int(g) for d, g in rels.items()} for q, rels in qrels.items()}
    run: dict[str, dict[str, float]] = {}
    for qid in qrels:
        cands = results.get(qid) or {}
        run[qid] = {d: float(s) for d, s in cands.items()} if cands else {NO_RESULT_DOC: 0.0}
    if not qrels:
        return {"ndcg@10": 0.0, "recall@100": 0.0, "mrr@10": 0.0, "per_query_ndcg@10": {}, "queries_scored": 0}

    # ignore_identical_ids=False: in Cranfield, CISI and SciFact, query ids and document ids share one number
    # space ("1" is both a query and a document), so beir's default would drop genuine (and relevant) hits.
    ndcg, _map, recall, _p = EvaluateRetrieval.evaluate(qrels, run, [10, 100], ignore_identical_ids=False)
    mrr = EvaluateRetrieval.evaluate_custom(qrels, run, [10], metric="mrr")
    per_query = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10"}).evaluate(run)
    if len(per_query) != len(qrels):  # would mean beir averaged over fewer queries than qrels holds
        raise RuntimeError(f"pytrec_eval scored {len(per_query)} of {len(qrels)} queries")
    return {
        "ndcg@10": float(ndcg["NDCG@10"]),
        "recall@100": float(recall["Recall@100"]),
        "mrr@10": float(mrr["MRR@10"]),
        "per_query_ndcg@10": {q: float(per_query[q]["ndcg_cut_10"]) for q in qrels},
        "queries_scored": len(per_query),
    }
