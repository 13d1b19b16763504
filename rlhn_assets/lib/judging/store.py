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


def judgments_table(dataset: str, tier: int, judge, rows: Sequence[NegativeJudgment]):
    """The ``judgments`` rows of ``rows`` as an Arrow table (the table's columns, judge fields filled in)."""
    import pyarrow as pa

    return pa.table(
        {
            "dataset": pa.array([dataset] * len(rows), pa.string()),
            "tier": pa.array([tier] * len(rows), pa.int32()),
            "instance_id": pa.array([r.instance_id for r in rows], pa.string()),
            "docid": pa.array([r.docid for r in rows], pa.string()),
            "neg_index": pa.array([r.neg_index for r in rows], pa.int32()),
            "verdict": pa.array([r.verdict for r in rows], pa.string()),
            "score": pa.array([r.score for r in rows], pa.float64()),
            "judge_kind": pa.array([judge.kind] * len(rows), pa.string()),
            "judge_model": pa.array([judge.model] * len(rows), pa.string()),
            "judge_model_identity": pa.array([getattr(judge, "model_identity", None)] * len(rows), pa.string()),
            "prompt_version": pa.array([judge.prompt_version] * len(rows), pa.string()),
            "response_key": pa.array([r.response_key for r in rows], pa.string()),
            "detail": pa.array([r.detail for r in rows], pa.string()),
        }
    )


JUDGMENT_COLUMNS = (
    "dataset, tier, instance_id, docid, neg_index, verdict, score, judge_kind, judge_model, judge_model_identity, "
    "prompt_version, response_key, detail"
)


def write_judgments(
    conn: duckdb.DuckDBPyConnection, dataset: str, tier: int, judge, rows: Sequence[NegativeJudgment]
) -> None:
    if not rows:
        return
    conn.register("_j", judgments_table(dataset, tier, judge, rows))
    conn.execute(f"INSERT INTO judgments ({JUDGMENT_COLUMNS}) SELECT {JUDGMENT_COLUMNS} FROM _j")
    conn.unregister("_j")
