"""Cascade rule and the relabeled dataset variants, as DuckDB SQL over the ``judgments`` table.

Cascade (paper §2.1): tier 2 re-judges only instances in which tier 1 listed any negative as ``better``
or ``worse`` (and, by our default, instances where tier 1 produced an ``error``: an unreadable answer is
not evidence of a clean instance). Tier 2's verdict is final; other instances keep tier 1's.

Variants (RLHN paper, arXiv 2505.16967 §3), each from stage 1 alone (``s1_``) and from the full cascade (``s2_``):
- ``default``: the pruned data, unchanged;
- ``remove``: drop an instance with >= 1 false negative;
- ``hn_remove``: drop just the false negatives from the negatives;
- ``rlhn``: move the false negatives to the positives (appended in negative order).
``hn_remove`` / ``rlhn`` drop instances with more than ``k`` false negatives (ambiguous queries; paper k=7).
Which verdicts count as a false negative is a setting: ``better`` (the paper) or ``better+worse``
(the authors' release script for stage 2).

Comparison treatments:
- ``s2_rlhn_filter``: ARHN's combined treatment "R+F" (relabel + filter, arXiv 2604.11092) on our stage-2
  (cascade) verdicts: negatives judged ``better`` (ranked above the positive) move to the positives (appended in
  negative order, as in ``rlhn``), negatives judged ``worse`` (relevant but below the positive) are removed from
  the negatives, the rest stay. The ambiguity rule counts everything the treatment touches, ``better`` + ``worse``:
  an instance with more than ``k`` of them is dropped (a query with that many relevant "negatives" is as
  ambiguous whichever way they are then used). The ``fn_lists`` setting does not apply: the two lists have fixed
  roles here. ``relabeled_instances.false_negatives`` holds that better + worse count.
- ``topk_percpos``: NV-Retriever's TopK-PercPos (arXiv 2407.15831; the RLHN paper's first baseline), no judge:
  a negative whose teacher score (``teacher_scores``, ``lib/teacher.py``) is at least ``percpos_threshold``
  (default 0.95) x the weakest positive's score is removed from the negatives; positives and instances all stay.
  ``relabeled_instances.false_negatives`` holds the number of negatives removed.

Datasets configured as never judged (``judge: false``) pass through unchanged in every variant, the two
comparison treatments included.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import duckdb

from rlhn_assets.lib.teacher import DEFAULT_THRESHOLD, check_threshold, unscored_pairs_sql

TREATMENTS = ("remove", "hn_remove", "rlhn")
# the comparison treatments, after the paper's: ARHN's relabel + filter (stage 2), NV-Retriever's TopK-PercPos
COMPARISON_VARIANTS = ("s2_rlhn_filter", "topk_percpos")
VARIANTS = ("default",) + tuple(f"{s}_{t}" for s in ("s1", "s2") for t in TREATMENTS) + COMPARISON_VARIANTS
FnLists = Literal["better", "better+worse"]


def variant_treatment(variant: str) -> tuple[int, str]:
    """(judge stage the variant reads: 0 none, 1, 2; treatment) of a variant name."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
    if variant in ("default", "topk_percpos"):
        return 0, variant
    return int(variant[1]), variant.split("_", 1)[1]


def forwarded_sql(forward_errors: bool) -> str:
    """Instance ids of a dataset ($1) that tier 1 forwards to tier 2."""
    verdicts = "('better', 'worse', 'error')" if forward_errors else "('better', 'worse')"
    return f"""SELECT DISTINCT instance_id FROM judgments
               WHERE dataset = $1 AND tier = 1 AND verdict IN {verdicts}"""


def flagged_negatives_sql(forward_errors: bool) -> str:
    """(instance_id, neg_index) of dataset $1 that tier 1 flagged (or failed on, with forward_errors)."""
    verdicts = "('better', 'worse', 'error')" if forward_errors else "('better', 'worse')"
    return f"""SELECT instance_id, neg_index FROM judgments
               WHERE dataset = $1 AND tier = 1 AND verdict IN {verdicts}"""


def verdicts_sql(stage: int) -> str:
    """Per (instance_id, docid, neg_index) the stage's verdict for dataset $1."""
    if stage == 1:
        return "SELECT instance_id, docid, neg_index, verdict FROM judgments WHERE dataset = $1 AND tier = 1"
    return """SELECT t1.instance_id, t1.docid, t1.neg_index, coalesce(t2.verdict, t1.verdict) AS verdict
              FROM (SELECT * FROM judgments WHERE dataset = $1 AND tier = 1) t1
              LEFT JOIN (SELECT * FROM judgments WHERE dataset = $1 AND tier = 2) t2
                USING (instance_id, docid, neg_index)"""


@dataclass
class VariantStats:
    instances_in: int = 0
    instances_out: int = 0
    instances_with_fn: int = 0  # instances the treatment acts on (>= 1 false negative / touched negative)
    false_negatives: int = 0  # negatives the treatment acts on, over all instances (the ``false_negatives`` column)
    dropped_ambiguous: int = 0
    dropped_remove: int = 0
    error_verdicts: int = 0
    # over the instances kept, against their pruned originals (as the comparison report counts them):
    relabeled_positives: int = 0  # former negatives now positives
    negatives_removed: int = 0  # negatives gone from the instance (neither negative nor positive any more)


def _actions_sql(stage: int, treatment: str, fn_verdicts: str, threshold: float) -> str:
    """(instance_id, docid, neg_index, act) of dataset $1: what the treatment does to each negative it touches,
    ``act`` = 'relabel' (to the positives) or 'drop' (out of the negatives)."""
    if treatment == "topk_percpos":
        limit = f"'{threshold!r}'::DOUBLE"  # a string cast parses the float exactly (a bare literal is a DECIMAL)
        return f"""SELECT t.instance_id, t.docid, t.neg_index, 'drop' AS act
                   FROM teacher_scores t
                   JOIN (SELECT instance_id, min(score) AS min_pos FROM teacher_scores
                         WHERE dataset = $1 AND role = 'pos' GROUP BY instance_id) r USING (instance_id)
                   WHERE t.dataset = $1 AND t.role = 'neg' AND t.score >= {limit} * r.min_pos"""
    if treatment == "rlhn_filter":
        act = "CASE verdict WHEN 'better' THEN 'relabel' WHEN 'worse' THEN 'drop' END"
    else:
        act = f"CASE WHEN verdict IN {fn_verdicts} THEN '{'relabel' if treatment == 'rlhn' else 'drop'}' END"
    return f"""SELECT * FROM (SELECT instance_id, docid, neg_index, {act} AS act FROM ({verdicts_sql(stage)}) v)
               WHERE act IS NOT NULL"""


def build_variant(
    conn: duckdb.DuckDBPyConnection,
    dataset: str,
    variant: str,
    *,
    fn_lists: FnLists = "better",
    ambiguity_k: int = 7,
    judged: bool = True,
    percpos_threshold: float = DEFAULT_THRESHOLD,
) -> VariantStats:
    """Replace ``relabeled_instances`` for (dataset, variant). ``topk_percpos`` needs ``teacher_scores`` of every
    pruned pair of the dataset (ValueError otherwise)."""
    stage, treatment = variant_treatment(variant)
    if fn_lists not in ("better", "better+worse"):
        raise ValueError("fn_lists must be 'better' or 'better+worse'")
    threshold = check_threshold(percpos_threshold)
    stats = VariantStats()
    fn_verdicts = "('better')" if fn_lists == "better" else "('better', 'worse')"
    if not judged:
        stage, treatment = 0, "default"
    if treatment == "topk_percpos":
        missing, stale, _, _ = conn.execute(unscored_pairs_sql(), [dataset]).fetchall()[0]
        if missing or stale:
            raise ValueError(
                f"{dataset}: teacher_scores does not match pruned_instances ({missing:,} pruned pairs without a "
                f"score, {stale:,} scores of pairs no longer pruned): materialize teacher_scores[{dataset}] first"
            )
    fn_cte = (
        f"""SELECT instance_id,
                   coalesce(list(docid ORDER BY neg_index) FILTER (WHERE act = 'relabel'), []) AS rel_ids,
                   coalesce(list(docid ORDER BY neg_index) FILTER (WHERE act = 'drop'), []) AS drop_ids,
                   count(*) AS n_fn
            FROM ({_actions_sql(stage, treatment, fn_verdicts, threshold)}) a GROUP BY instance_id"""
        if treatment != "default"
        else "SELECT NULL::VARCHAR AS instance_id, []::VARCHAR[] AS rel_ids, []::VARCHAR[] AS drop_ids, 0 AS n_fn "
        "WHERE false"
    )
    keep = {
        "default": "true",
        "topk_percpos": "true",
        "remove": "n_fn = 0",
        "hn_remove": f"n_fn <= {int(ambiguity_k)}",
        "rlhn": f"n_fn <= {int(ambiguity_k)}",
        "rlhn_filter": f"n_fn <= {int(ambiguity_k)}",
    }[treatment]
    # `remove` keeps only untouched instances, whose lists need no change
    positives = "p.positive_ids || rel_ids" if treatment in ("rlhn", "rlhn_filter") else "p.positive_ids"
    negatives = (
        "list_filter(p.negative_ids, lambda x: NOT list_contains(rel_ids || drop_ids, x))"
        if treatment != "remove"
        else "p.negative_ids"
    )
    conn.execute("BEGIN TRANSACTION")
    try:
        conn.execute("DELETE FROM relabeled_instances WHERE dataset = $1 AND variant = $2", [dataset, variant])
        conn.execute(
            f"""
            CREATE OR REPLACE TEMP TABLE _rel AS
            SELECT p.instance_id, p.query_id, p.positive_ids, p.negative_ids,
                   coalesce(f.rel_ids, []::VARCHAR[]) AS rel_ids, coalesce(f.drop_ids, []::VARCHAR[]) AS drop_ids,
                   coalesce(f.n_fn, 0) AS n_fn
            FROM pruned_instances p LEFT JOIN ({fn_cte}) f USING (instance_id)
            WHERE p.dataset = $1""",
            [dataset],
        )
        conn.execute(
            f"""
            INSERT INTO relabeled_instances (dataset, variant, instance_id, query_id, positive_ids, negative_ids,
                                             false_negatives)
            SELECT $1, $2, p.instance_id, p.query_id, {positives}, {negatives}, n_fn
            FROM _rel p WHERE {keep} ORDER BY p.instance_id""",
            [dataset, variant],
        )
        n_in, n_fn_inst, n_fn, n_amb = conn.execute(
            f"SELECT count(*), count(*) FILTER (WHERE n_fn > 0), coalesce(sum(n_fn), 0), "
            f"count(*) FILTER (WHERE n_fn > {int(ambiguity_k)}) FROM _rel"
        ).fetchall()[0]
        conn.execute("DROP TABLE _rel")
        conn.execute("COMMIT")
    except Exception:
        conn.execute("ROLLBACK")
        raise
    stats.instances_in, stats.instances_with_fn, stats.false_negatives = n_in, n_fn_inst, int(n_fn)
    stats.instances_out, stats.relabeled_positives, stats.negatives_removed = (
        int(x or 0)
        for x in conn.execute(
            """SELECT count(*),
                      sum(len(list_filter(r.positive_ids, lambda x: NOT list_contains(p.positive_ids, x)))),
                      sum(len(list_filter(p.negative_ids, lambda x: NOT list_contains(r.negative_ids, x)
                                                                    AND NOT list_contains(r.positive_ids, x))))
               FROM relabeled_instances r JOIN pruned_instances p USING (dataset, instance_id)
               WHERE r.dataset = $1 AND r.variant = $2""",
            [dataset, variant],
        ).fetchall()[0]
    )
    if treatment in ("rlhn", "hn_remove", "rlhn_filter"):
        stats.dropped_ambiguous = n_amb
    elif treatment == "remove":
        stats.dropped_remove = n_fn_inst
    if stage:
        stats.error_verdicts = conn.execute(
            f"SELECT count(*) FROM ({verdicts_sql(stage)}) v WHERE verdict = 'error'", [dataset]
        ).fetchall()[0][0]
    return stats


# Instances per export chunk, and rows per Parquet row group. Each chunk's passage lists are one SQL aggregation that
# DuckDB holds in memory, and the Parquet writer buffers a whole row group: exporting 100,000 instances x 25
# negatives in one query ran out of the pipeline connection's 1 GB memory_limit (docs/benchmarks.md, bench_scale).
EXPORT_CHUNK_INSTANCES = 10_000
EXPORT_ROW_GROUP = 2048


def export_variant(
    conn: duckdb.DuckDBPyConnection,
    dataset: str,
    variant: str,
    parquet_path,
    jsonl_path,
    *,
    chunk_instances: int = EXPORT_CHUNK_INSTANCES,
) -> int:
    """Write (dataset, variant) in the rlhn/Tevatron schema ``query_id, query, positive_passages[{docid,
    title,text}], negative_passages[...], subset`` as Parquet and JSONL.gz (loadable by HF datasets,
    Tevatron and sentence-transformers), rows in instance_id order. Built ``chunk_instances`` instances at a
    time into temporary Parquet parts next to the output, then streamed into the two files, so memory does not
    grow with the dataset. Returns the row count."""
    import shutil
    import tempfile
    from pathlib import Path

    select = """
      WITH r AS (SELECT r.* FROM relabeled_instances r JOIN _export_ids e USING (instance_id)
                 WHERE r.dataset = $1 AND r.variant = $2 AND e.rn BETWEEN $3 AND $4),
      refs AS (
        SELECT instance_id, 'pos' AS side, unnest(positive_ids) AS docid, generate_subscripts(positive_ids, 1) AS i
        FROM r
        UNION ALL
        SELECT instance_id, 'neg', unnest(negative_ids), generate_subscripts(negative_ids, 1) FROM r),
      lists AS (
        SELECT instance_id,
               list({'docid': x.docid, 'title': coalesce(p.title, ''), 'text': p.text} ORDER BY x.i)
                 FILTER (WHERE side = 'pos') AS positive_passages,
               list({'docid': x.docid, 'title': coalesce(p.title, ''), 'text': p.text} ORDER BY x.i)
                 FILTER (WHERE side = 'neg') AS negative_passages
        FROM refs x JOIN raw_passages p ON p.dataset = $1 AND p.docid = x.docid
        GROUP BY instance_id)
      SELECT r.query_id, q.query, l.positive_passages,
             coalesce(l.negative_passages, []) AS negative_passages, $1 AS subset
      FROM r JOIN lists l USING (instance_id)
      JOIN raw_queries q ON q.dataset = $1 AND q.query_id = r.query_id
      ORDER BY r.instance_id"""
    if chunk_instances < 1:
        raise ValueError(f"chunk_instances must be >= 1, got {chunk_instances}")
    for path in (parquet_path, jsonl_path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    conn.execute(
        """CREATE OR REPLACE TEMP TABLE _export_ids AS
           SELECT instance_id, row_number() OVER (ORDER BY instance_id) - 1 AS rn
           FROM relabeled_instances WHERE dataset = $1 AND variant = $2""",
        [dataset, variant],
    )
    n = conn.execute("SELECT count(*) FROM _export_ids").fetchall()[0][0]
    parts_dir = Path(tempfile.mkdtemp(prefix=".export-", dir=Path(parquet_path).parent))
    try:
        parts = []
        for c, start in enumerate(range(0, max(n, 1), chunk_instances)):  # one (empty) part when n = 0: the schema
            part = parts_dir / f"part-{c:05d}.parquet"
            conn.execute(
                f"COPY ({select}) TO '{part}' (FORMAT parquet, ROW_GROUP_SIZE {EXPORT_ROW_GROUP})",
                [dataset, variant, start, start + chunk_instances - 1],
            )
            parts.append(f"'{part}'")
        # read back in part order, each part's rows in stored order (preserve_insertion_order): instance_id order
        src = f"SELECT * FROM read_parquet([{', '.join(parts)}])"
        conn.execute(f"COPY ({src}) TO '{parquet_path}' (FORMAT parquet, ROW_GROUP_SIZE {EXPORT_ROW_GROUP})")
        # JSONL.gz: one gzip member per part, concatenated (a valid gzip file: gzip, zcat, HF datasets read every
        # member). One ordered JSON COPY of 100,000 instances ran out of the 1 GB memory_limit (bench_scale).
        with open(jsonl_path, "wb") as out:
            for c, part in enumerate(parts):
                member = parts_dir / f"part-{c:05d}.json.gz"
                conn.execute(f"COPY (SELECT * FROM read_parquet({part})) TO '{member}' (FORMAT json, COMPRESSION gzip)")
                with open(member, "rb") as f:
                    shutil.copyfileobj(f, out)
                member.unlink()
    finally:
        shutil.rmtree(parts_dir, ignore_errors=True)
        conn.execute("DROP TABLE IF EXISTS _export_ids")
    return int(n)
