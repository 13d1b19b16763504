"""Hard-negative mining for a dataset that has queries + positives + a corpus but no negatives.

Like sentence-transformers' ``mine_hard_negatives`` / FlagEmbedding's ``hn_mine``: retrieve candidates
(dense with the retriever base of the ``base_models`` resource, by default the packaged all-MiniLM-L6-v2, with its
query/passage prompts; or BM25), skip every labelled positive of the query, keep the
rank window [range_min, range_max), optionally drop candidates within a relative margin of the positive
score (NV-Retriever TopK-PercPos), and take N negatives (the top ones or a seeded random sample, kept
in rank order). We do not call ``mine_hard_negatives`` itself: it works on texts, not docids, excludes
only the pair's own positive, and has no BM25.

The output is a Tevatron/rlhn JSONL.gz that ``raw_bge`` ingests like any other file.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from rlhn_assets.lib import beir_data
from rlhn_assets.registry import MiningSpec


@dataclass
class BeirSplit:
    corpus: dict[str, dict]  # docid -> {"title", "text"}
    queries: dict[str, str]  # qid -> text (only queries with >= 1 positive in the split)
    qrels: dict[str, dict[str, int]]  # qid -> {docid: grade}, the positives only (grade > 0)


def load_beir(corpus: Path, queries: Path, qrels: Path) -> BeirSplit:
    """Read a BEIR-layout corpus / queries / qrels (TSV with header) triple with ``lib.beir_data``, keeping the
    positives: a grade-0 judgment is "judged, not relevant", never a positive (so never excluded from the
    negatives either), and a query without a positive is not mined."""
    data = beir_data.load(corpus, queries, qrels)
    positives = data.positives()
    return BeirSplit(
        corpus=data.corpus, queries={q: t for q, t in data.queries.items() if q in positives}, qrels=positives
    )


def passage_text(doc: dict) -> str:
    return (doc["title"] + " " + doc["text"]).strip() if doc.get("title") else doc["text"]


_TOKEN = re.compile(r"[a-z0-9]+")


def _tokens(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


@dataclass
class MiningStats:
    queries: int = 0
    queries_skipped_no_positive_in_corpus: int = 0
    queries_short_of_negatives: int = 0
    negatives: int = 0
    positives_skipped_in_window: int = 0
    margin_skipped: int = 0
    cache_hit: bool = False


def score_candidates(
    spec: MiningSpec,
    split: BeirSplit,
    doc_ids: list[str],
    qids: list[str],
    *,
    model=None,
    model_version: str = "",
    cache_dir: Path | None = None,
    progress: Callable[[str], None] | None = None,
    query_prompt: str | None = None,
    passage_prompt: str | None = None,
) -> tuple[np.ndarray, bool]:
    """Query x corpus score matrix (cosine for dense, BM25 otherwise). Dense: queries and passages are encoded with
    their prompts (None: the model's own)."""
    texts = [passage_text(split.corpus[d]) for d in doc_ids]
    if spec.method == "bm25":
        from rank_bm25 import BM25Okapi

        bm25 = BM25Okapi([_tokens(t) for t in texts], k1=0.9, b=0.4)
        scores = np.stack([bm25.get_scores(_tokens(split.queries[q])) for q in qids]).astype(np.float32)
        return scores, False
    from rlhn_assets.lib.embeddings import encode_cached, load_model

    model = model or load_model()
    doc_emb, hit = encode_cached(
        model,
        model_version,
        texts,
        cache_dir,
        batch_size=spec.batch_size,
        progress=progress,
        role="passage",
        prompt=passage_prompt,
    )
    q_emb, _ = encode_cached(
        model,
        model_version,
        [split.queries[q] for q in qids],
        None,
        batch_size=spec.batch_size,
        role="query",
        prompt=query_prompt,
    )
    return q_emb @ doc_emb.T, hit


def select_negatives(
    spec: MiningSpec, ranked: list[int], scores: np.ndarray, positives: set[int], rng: random.Random, stats: MiningStats
) -> list[int]:
    """From candidates in rank order, drop positives, keep the window, apply the margin, sample N."""
    pos_score = min(float(scores[p]) for p in positives)
    window: list[int] = []
    rank = 0
    for c in ranked:
        if c in positives:
            stats.positives_skipped_in_window += 1
            continue
        if rank >= spec.range_max:
            break
        if rank >= spec.range_min:
            if spec.relative_margin is not None and scores[c] > (1 - spec.relative_margin) * pos_score:
                stats.margin_skipped += 1
            else:
                window.append(c)
        rank += 1
    if spec.sampling == "random" and len(window) > spec.num_negatives:
        keep = set(rng.sample(range(len(window)), spec.num_negatives))
        window = [c for i, c in enumerate(window) if i in keep]
    return window[: spec.num_negatives]


def mine(
    spec: MiningSpec,
    split: BeirSplit,
    subset: str,
    output: Path,
    *,
    model=None,
    model_version: str = "",
    cache_dir: Path | None = None,
    progress: Callable[[str], None] | None = None,
    query_prompt: str | None = None,
    passage_prompt: str | None = None,
) -> MiningStats:
    stats = MiningStats()
    doc_ids = sorted(split.corpus)
    index = {d: i for i, d in enumerate(doc_ids)}
    qids = []
    for q in sorted(split.queries, key=lambda x: (len(x), x)):
        if any(d in index for d in split.qrels[q]):
            qids.append(q)
        else:
            stats.queries_skipped_no_positive_in_corpus += 1
    scores, stats.cache_hit = score_candidates(
        spec,
        split,
        doc_ids,
        qids,
        model=model,
        model_version=model_version,
        cache_dir=cache_dir,
        progress=progress,
        query_prompt=query_prompt,
        passage_prompt=passage_prompt,
    )
    rng = random.Random(spec.seed)
    depth = min(len(doc_ids), spec.range_max + max(len(split.qrels[q]) for q in qids) + 1) if qids else 0
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".tmp")
    # mtime=0: the file's bytes (and so its data version) depend only on its content.
    with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
        for qi, q in enumerate(qids):
            row = scores[qi]
            top = np.argpartition(-row, depth - 1)[:depth] if depth < len(row) else np.arange(len(row))
            ranked = sorted(top.tolist(), key=lambda c: (-row[c], c))
            positives = {index[d] for d in split.qrels[q] if d in index}
            negs = select_negatives(spec, ranked, row, positives, rng, stats)
            if len(negs) < spec.num_negatives:
                stats.queries_short_of_negatives += 1
            stats.queries += 1
            stats.negatives += len(negs)
            rec = {
                "query_id": q,
                "query": split.queries[q],
                "positive_passages": [
                    dict(docid=doc_ids[p], **split.corpus[doc_ids[p]])
                    for p in sorted(positives, key=lambda p: doc_ids[p])
                ],
                "negative_passages": [dict(docid=doc_ids[c], **split.corpus[doc_ids[c]]) for c in negs],
                "subset": subset,
            }
            gz.write((json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8"))
            if progress and (qi + 1) % 200 == 0:
                progress(f"mined {qi + 1:,}/{len(qids):,} queries")
    tmp.replace(output)
    return stats


def spec_fingerprint(spec: MiningSpec, input_paths: list[Path], model_version: str) -> str:
    """Changes when the settings, an input file or the model change: then the output is rewritten. For dense mining
    ``model_version`` is the base's identity (lib/base_models: weights, plus prompts when there are any)."""
    h = hashlib.sha256(json.dumps(asdict(spec), sort_keys=True).encode())
    h.update(model_version.encode())
    for p in input_paths:
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()
