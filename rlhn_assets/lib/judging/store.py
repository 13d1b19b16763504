"""Reading instances to judge from DuckDB in bounded batches, and writing judgments back.

Connections stay short (read a batch -> close -> judge -> open -> write): judging takes minutes to hours
and DuckDB allows one writer process per file."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import duckdb

from rlhn_assets.lib.judging.judges import Instance, NegativeJudgment, Passage


def count_instances(conn: duckdb.DuckDBPyConnection, dataset: str, only: str | None = None) -> int:
    where = f" AND instance_id IN ({only})" if only else ""
    return conn.execute(f"SELECT count(*) FROM pruned_instances WHERE dataset = $1{where}", [dataset]).fetchall()[0][0]


def load_instances(
    conn: duckdb.DuckDBPyConnection,
    dataset: str,
    *,
    limit: int,
    after: str | None = None,
    only: str | None = None,
) -> list[Instance]:
    """Up to ``limit`` instances ordered by instance_id, those after ``after`` (keyset pagination: each batch is one
    top-N scan, where LIMIT/OFFSET re-sorted and skipped everything before it); ``only`` is a SQL subquery of
    instance ids (over dataset $1). The passages of the batch come in one join against the batch's id list (a list
    parameter, not a row-by-row insert)."""
    where = f" AND i.instance_id IN ({only})" if only else ""
    params: list = [dataset]
    if after is not None:
        where += " AND i.instance_id > $2"
        params.append(after)
    rows = conn.execute(
        f"""SELECT i.instance_id, q.query, i.positive_ids, i.negative_ids
            FROM pruned_instances i JOIN raw_queries q USING (dataset, query_id)
            WHERE i.dataset = $1{where} ORDER BY i.instance_id LIMIT {int(limit)}""",
        params,
    ).fetchall()
    if not rows:
        return []
    ids = sorted({d for r in rows for d in r[2] + r[3]})
    texts = {
        d: Passage(d, t or "", x)
        for d, t, x in conn.execute(
            """SELECT p.docid, p.title, p.text FROM raw_passages p
               JOIN (SELECT unnest($2::VARCHAR[]) AS docid) w USING (docid) WHERE p.dataset = $1""",
            [dataset, ids],
        ).fetchall()
    }
    return [Instance(iid, q, tuple(texts[d] for d in pos), tuple(texts[d] for d in neg)) for iid, q, pos, neg in rows]


def iter_batches(open_conn, dataset: str, batch_size: int, only: str | None = None) -> Iterator[list[Instance]]:
    after = None
    while True:
        with open_conn() as conn:
            batch = load_instances(conn, dataset, limit=batch_size, after=after, only=only)
        if not batch:
            return
        yield batch
        after = batch[-1].instance_id


def write_judgments(
    conn: duckdb.DuckDBPyConnection, dataset: str, tier: int, judge, rows: Sequence[NegativeJudgment]
) -> None:
    if not rows:
        return
    import pyarrow as pa

    t = pa.table(
        {
            "dataset": [dataset] * len(rows),
            "tier": [tier] * len(rows),
            "instance_id": [r.instance_id for r in rows],
            "docid": [r.docid for r in rows],
            "neg_index": [r.neg_index for r in rows],
            "verdict": [r.verdict for r in rows],
            "score": pa.array([r.score for r in rows], pa.float64()),
            "judge_kind": [judge.kind] * len(rows),
            "judge_model": [judge.model] * len(rows),
            "judge_model_identity": [getattr(judge, "model_identity", None)] * len(rows),
            "prompt_version": [judge.prompt_version] * len(rows),
            "response_key": pa.array([r.response_key for r in rows], pa.string()),
            "detail": pa.array([r.detail for r in rows], pa.string()),
        }
    )
    conn.register("_j", t)
    conn.execute("""INSERT INTO judgments (dataset, tier, instance_id, docid, neg_index, verdict, score, judge_kind,
                                           judge_model, judge_model_identity, prompt_version, response_key, detail)
                    SELECT dataset, tier, instance_id, docid, neg_index, verdict, score, judge_kind, judge_model,
                           judge_model_identity, prompt_version, response_key, detail FROM _j""")
    conn.unregister("_j")
