"""Training instances of a variant, read from DuckDB: the union of the kept datasets' relabeled rows."""

from __future__ import annotations

import duckdb

from rlhn_assets.lib.training import TrainingInstance


def load_training_instances(conn: duckdb.DuckDBPyConnection, variant: str, *, max_negatives: int,
                            exclude_datasets: tuple[str, ...] = ()
                            ) -> tuple[list[TrainingInstance], dict[str, int]]:
    """(instances, rows per dataset) of ``variant``; passages are 'title text' with the title folded in."""
    excl = ",".join(f"'{d}'" for d in exclude_datasets) or "''"
    rows = conn.execute(f"""
        WITH r AS (SELECT * FROM relabeled_instances WHERE variant = $1 AND dataset NOT IN ({excl})),
        refs AS (
          SELECT dataset, instance_id, 'pos' AS side, unnest(positive_ids) AS docid,
                 generate_subscripts(positive_ids, 1) AS i FROM r
          UNION ALL
          SELECT dataset, instance_id, 'neg', unnest(negative_ids[1:{int(max_negatives)}]),
                 generate_subscripts(negative_ids[1:{int(max_negatives)}], 1) FROM r),
        texts AS (
          SELECT x.dataset, x.instance_id,
                 list(trim(coalesce(p.title, '') || ' ' || p.text) ORDER BY x.i) FILTER (WHERE side = 'pos') AS pos,
                 list(trim(coalesce(p.title, '') || ' ' || p.text) ORDER BY x.i) FILTER (WHERE side = 'neg') AS neg
          FROM refs x JOIN raw_passages p ON p.dataset = x.dataset AND p.docid = x.docid
          GROUP BY ALL)
        SELECT r.dataset, q.query, t.pos, coalesce(t.neg, [])
        FROM r JOIN texts t USING (dataset, instance_id)
        JOIN raw_queries q ON q.dataset = r.dataset AND q.query_id = r.query_id
        ORDER BY r.dataset, r.instance_id""", [variant]).fetchall()
    sizes: dict[str, int] = {}
    out = []
    for ds, q, pos, neg in rows:
        sizes[ds] = sizes.get(ds, 0) + 1
        out.append(TrainingInstance(q, tuple(pos or ()), tuple(neg)))
    return out, sizes
