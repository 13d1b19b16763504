"""Teacher scores of every (query, passage) pair of the pruned training data, and NV-Retriever's TopK-PercPos rule.

TopK-PercPos (Moreira et al., NV-Retriever, arXiv 2407.15831 §3; the RLHN paper's first baseline, §4): a negative
whose teacher score is at least ``threshold`` (95%) of the positive's score is treated as a likely false negative
and dropped from the negatives. With several positives the weakest one is the reference (a negative as close to the
query as any labelled positive is suspect) — the same rule ``lib/mining.py`` applies while mining. The teacher is
the configured embedding model (cosine of L2-normalized embeddings); no LLM is involved. The rule itself runs as
SQL over the stored scores in ``lib/relabel.build_variant`` (variant ``topk_percpos``); ``percpos_keep`` is the
same rule in Python, for callers with scores at hand and as its specification.

Scores are written per dataset to the ``teacher_scores`` table (``lib/schema.py``; one row per pair: role ``pos`` /
``neg``, the negative's 1-based index as in ``judgments``), in chunks of instances so memory stays bounded on large
datasets; the unique texts of a chunk are encoded once, and passage embeddings go through the embedding cache
(``lib/embeddings.encode_cached``), so re-scoring unchanged data with an unchanged model encodes only the queries.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np

DEFAULT_THRESHOLD = 0.95


def check_threshold(threshold: float) -> float:
    if not (isinstance(threshold, (int, float)) and math.isfinite(threshold) and 0 < threshold <= 1):
        raise ValueError(f"threshold {threshold!r}: expected a share of the positive's score in (0, 1]")
    return float(threshold)


def percpos_keep(
    pos_scores: Sequence[float], neg_scores: Sequence[float], threshold: float = DEFAULT_THRESHOLD
) -> list[bool]:
    """For each negative, whether TopK-PercPos keeps it: score < threshold x the weakest positive's score
    (a negative at exactly the limit is dropped)."""
    threshold = check_threshold(threshold)
    if len(pos_scores) == 0:
        raise ValueError("TopK-PercPos needs at least one positive score")
    limit = threshold * min(float(s) for s in pos_scores)
    return [float(s) < limit for s in neg_scores]


@dataclass
class TeacherStats:
    instances: int = 0
    pairs: int = 0
    positives: int = 0
    negatives: int = 0
    passages_encoded: int = 0  # unique passage texts, summed over chunks (cached ones included)
    cache_hits: int = 0  # chunks whose passage embeddings came from the cache


def _encode(model, texts: list[str], batch_size: int) -> np.ndarray:
    return model.encode(
        texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
    ).astype(np.float32)


def score_dataset(
    conn: duckdb.DuckDBPyConnection,
    dataset: str,
    model,
    teacher: str,
    *,
    model_version: str = "",
    cache_dir: Path | None = None,
    batch_size: int = 64,
    chunk_instances: int = 2048,
    progress: Callable[[str], None] | None = None,
) -> TeacherStats:
    """Replace ``teacher_scores`` of ``dataset`` with the cosine of every pruned (query, positive / negative) pair
    under ``model`` (named ``teacher`` in the rows). Passage text = title + " " + text, as the embedding judge and
    mining encode it. With ``cache_dir`` and ``model_version``, passage embeddings are cached per chunk."""
    from rlhn_assets.lib.embeddings import encode_cached
    from rlhn_assets.lib.mining import passage_text

    if chunk_instances < 1:
        raise ValueError("chunk_instances must be >= 1")
    stats = TeacherStats()
    ids = [
        r[0]
        for r in conn.execute(
            "SELECT instance_id FROM pruned_instances WHERE dataset = $1 ORDER BY instance_id", [dataset]
        ).fetchall()
    ]
    stats.instances = len(ids)
    conn.execute("BEGIN TRANSACTION")
    try:
        conn.execute("DELETE FROM teacher_scores WHERE dataset = $1", [dataset])
        for start in range(0, len(ids), chunk_instances):
            chunk = ids[start : start + chunk_instances]
            # instance ids are unique per dataset and sorted: [first, last] of the chunk is exactly the chunk
            pairs = conn.execute(
                """
                WITH p AS (SELECT * FROM pruned_instances WHERE dataset = $1 AND instance_id BETWEEN $2 AND $3),
                refs AS (SELECT instance_id, query_id, 'pos' AS role, unnest(positive_ids) AS docid,
                                NULL::INTEGER AS neg_index FROM p
                         UNION ALL
                         SELECT instance_id, query_id, 'neg', unnest(negative_ids),
                                generate_subscripts(negative_ids, 1) FROM p)
                SELECT r.instance_id, r.docid, r.role, r.neg_index, q.query, d.title, d.text
                FROM refs r
                JOIN raw_queries q ON q.dataset = $1 AND q.query_id = r.query_id
                JOIN raw_passages d ON d.dataset = $1 AND d.docid = r.docid
                ORDER BY r.instance_id, r.role DESC, r.neg_index, r.docid""",
                [dataset, chunk[0], chunk[-1]],
            ).fetchall()
            if not pairs:
                continue
            texts = [passage_text({"title": p[5], "text": p[6]}) for p in pairs]
            queries = sorted({p[4] for p in pairs})
            passages = sorted(set(texts))
            q_index = {t: i for i, t in enumerate(queries)}
            p_index = {t: i for i, t in enumerate(passages)}
            q_emb = _encode(model, queries, batch_size)
            if cache_dir is not None and model_version:
                p_emb, hit = encode_cached(model, model_version, passages, cache_dir, batch_size=batch_size)
                stats.cache_hits += int(hit)
            else:
                p_emb = _encode(model, passages, batch_size)
            qi = np.fromiter((q_index[p[4]] for p in pairs), dtype=np.int64, count=len(pairs))
            pi = np.fromiter((p_index[t] for t in texts), dtype=np.int64, count=len(pairs))
            scores = np.einsum("ij,ij->i", q_emb[qi], p_emb[pi]).astype(np.float64)
            import pyarrow as pa

            conn.register(
                "_teacher_rows",
                pa.table(
                    {
                        "instance_id": [p[0] for p in pairs],
                        "docid": [p[1] for p in pairs],
                        "role": [p[2] for p in pairs],
                        "neg_index": pa.array([p[3] for p in pairs], pa.int32()),
                        "score": scores,
                    }
                ),
            )
            try:
                conn.execute(
                    """INSERT INTO teacher_scores (dataset, instance_id, docid, role, neg_index, score, teacher)
                       SELECT $1, instance_id, docid, role, neg_index, score, $2 FROM _teacher_rows""",
                    [dataset, teacher],
                )
            finally:
                conn.unregister("_teacher_rows")
            stats.pairs += len(pairs)
            stats.positives += sum(1 for p in pairs if p[2] == "pos")
            stats.negatives += sum(1 for p in pairs if p[2] == "neg")
            stats.passages_encoded += len(passages)
            if progress:
                progress(
                    f"teacher scores {dataset}: {min(start + chunk_instances, len(ids)):,}/{len(ids):,} instances, "
                    f"{stats.pairs:,} pairs"
                )
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return stats


def percpos_drop_share(conn: duckdb.DuckDBPyConnection, dataset: str, threshold: float) -> tuple[int, int]:
    """(negatives TopK-PercPos would drop at ``threshold``, negatives scored) of ``dataset``'s teacher scores."""
    threshold = check_threshold(threshold)
    n_drop, n_neg = conn.execute(
        """WITH ref AS (SELECT instance_id, min(score) AS min_pos FROM teacher_scores
                        WHERE dataset = $1 AND role = 'pos' GROUP BY 1)
           SELECT count(*) FILTER (WHERE t.score >= $2 * ref.min_pos), count(*)
           FROM teacher_scores t JOIN ref USING (instance_id)
           WHERE t.dataset = $1 AND t.role = 'neg'""",
        [dataset, threshold],
    ).fetchall()[0]
    return int(n_drop), int(n_neg)


def unscored_pairs_sql() -> str:
    """Counts for dataset $1: (pruned pairs without a teacher score, teacher scores of no pruned pair, pairs scored
    more than once, scores that are not finite or outside [-1, 1] beyond float32 rounding)."""
    return """
        WITH p AS (SELECT * FROM pruned_instances WHERE dataset = $1),
        want AS (SELECT instance_id, 'pos' AS role, unnest(positive_ids) AS docid, NULL::INTEGER AS neg_index FROM p
                 UNION ALL
                 SELECT instance_id, 'neg', unnest(negative_ids), generate_subscripts(negative_ids, 1) FROM p),
        have AS (SELECT * FROM teacher_scores WHERE dataset = $1)
        SELECT
          (SELECT count(*) FROM want w ANTI JOIN have h
             ON h.instance_id = w.instance_id AND h.role = w.role AND h.docid = w.docid
            AND h.neg_index IS NOT DISTINCT FROM w.neg_index),
          (SELECT count(*) FROM have h ANTI JOIN want w
             ON h.instance_id = w.instance_id AND h.role = w.role AND h.docid = w.docid
            AND h.neg_index IS NOT DISTINCT FROM w.neg_index),
          (SELECT coalesce(sum(n - 1), 0) FROM (SELECT count(*) AS n FROM have
                                                GROUP BY instance_id, role, docid, neg_index) WHERE n > 1),
          (SELECT count(*) FROM have WHERE NOT isfinite(score) OR abs(score) > 1 + 1e-5)"""
