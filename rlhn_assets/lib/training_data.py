"""Training instances read from DuckDB: a variant's relabeled rows (the union of its kept datasets), or the
raw ingested rows of every dataset (the leave-one-out pruning study, which judges datasets before pruning)."""

from __future__ import annotations

import duckdb

from rlhn_assets.lib.training import TrainingInstance


def load_training_instances(
    conn: duckdb.DuckDBPyConnection,
    variant: str | None,
    *,
    max_negatives: int,
    exclude_datasets: tuple[str, ...] = (),
    max_per_dataset: int | None = None,
) -> tuple[list[TrainingInstance], dict[str, int]]:
    """(instances, rows per dataset) of ``variant`` (None: ``raw_instances`` of every dataset), without
    ``exclude_datasets``, at most ``max_per_dataset`` per dataset (the first by instance id); passages are
    'title text' with the title folded in."""
    source = (
        "SELECT dataset, instance_id, query_id, positive_ids, negative_ids FROM raw_instances"
        if variant is None
        else "SELECT dataset, instance_id, query_id, positive_ids, negative_ids FROM relabeled_instances "
        "WHERE variant = $variant"
    )
    cap = f"WHERE n <= {int(max_per_dataset)}" if max_per_dataset else ""
    rows = conn.execute(
        f"""
        WITH r AS (SELECT * EXCLUDE (n) FROM (
                     SELECT *, row_number() OVER (PARTITION BY dataset ORDER BY instance_id) AS n
                     FROM ({source}) WHERE NOT list_contains($excluded::VARCHAR[], dataset)) {cap}),
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
        ORDER BY r.dataset, r.instance_id""",
        {"excluded": list(exclude_datasets), **({} if variant is None else {"variant": variant})},
    ).fetchall()
    sizes: dict[str, int] = {}
    out = []
    for ds, q, pos, neg in rows:
        sizes[ds] = sizes.get(ds, 0) + 1
        out.append(TrainingInstance(q, tuple(pos or ()), tuple(neg)))
    return out, sizes
