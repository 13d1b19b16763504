"""SQL invariants over an instance table (``raw_instances`` / ``pruned_instances``), shared by the
asset checks of several stages. Each returns (number of violations, a few example instance ids)."""

from __future__ import annotations

import duckdb


def _count_and_examples(conn: duckdb.DuckDBPyConnection, sql: str, params: list) -> tuple[int, list[str]]:
    rows = conn.execute(sql, params).fetchall()
    return len(rows), [str(r[0]) for r in rows[:5]]


def without_positive(conn, table: str, dataset: str) -> tuple[int, list[str]]:
    return _count_and_examples(
        conn, f"SELECT instance_id FROM {table} WHERE dataset = ? AND len(positive_ids) = 0", [dataset]
    )


def duplicate_instance_ids(conn, table: str, dataset: str) -> tuple[int, list[str]]:
    return _count_and_examples(
        conn, f"SELECT instance_id FROM {table} WHERE dataset = ? GROUP BY instance_id HAVING count(*) > 1", [dataset]
    )


def duplicate_passage_ids(conn, dataset: str) -> tuple[int, list[str]]:
    return _count_and_examples(
        conn, "SELECT docid FROM raw_passages WHERE dataset = ? GROUP BY docid HAVING count(*) > 1", [dataset]
    )


def duplicate_query_ids(conn, dataset: str) -> tuple[int, list[str]]:
    return _count_and_examples(
        conn, "SELECT query_id FROM raw_queries WHERE dataset = ? GROUP BY query_id HAVING count(*) > 1", [dataset]
    )


def dangling_passage_refs(conn, table: str, dataset: str) -> tuple[int, list[str]]:
    return _count_and_examples(
        conn,
        f"""SELECT DISTINCT i.instance_id FROM (
                    SELECT instance_id, unnest(positive_ids || negative_ids) AS docid FROM {table} WHERE dataset = ?
                  ) i ANTI JOIN (SELECT docid FROM raw_passages WHERE dataset = ?) p USING (docid)""",
        [dataset, dataset],
    )


def positive_also_negative(conn, table: str, dataset: str) -> tuple[int, list[str]]:
    return _count_and_examples(
        conn,
        f"""SELECT instance_id FROM {table} WHERE dataset = ?
                  AND len(list_intersect(positive_ids, negative_ids)) > 0""",
        [dataset],
    )
