"""Fan-out of one dataset's judging over shards (docs/deploy.md, "Fan-out of one dataset's judging").

DuckDB allows one writing process per file, and shard steps run in other processes (Celery workers, Kubernetes
pods, possibly on other machines). So shards never open the pipeline database: the planning step stages each
shard's instances (query, positives and negatives with their texts) as one Parquet file, a shard judges from its
file and writes its verdicts as Parquet files, and the merging step loads them all into ``judgments`` in one
transaction, ordered by (instance_id, neg_index), whatever order the shards finished in. Every file goes through
DuckDB's COPY / read_parquet, so a staging directory on object storage (``s3://...`` with DuckDB's httpfs
extension and a secret) works like a local one.

Plain module: no Dagster imports.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import duckdb

from rlhn_assets.lib.judging.judges import Instance, NegativeJudgment, Passage
from rlhn_assets.lib.judging.store import JUDGMENT_COLUMNS, judgments_table


def _lit(value: str) -> str:
    """A SQL string literal (COPY and read_parquet take file names as literals, not parameters)."""
    return "'" + str(value).replace("'", "''") + "'"


def is_remote(path: str) -> bool:
    """An object-storage URL (s3://, gs://, az://, https://...) rather than a local path."""
    return "://" in str(path)


def join(base: str, *parts: str) -> str:
    """``base/part/...`` for a local path or a URL alike."""
    return "/".join([str(base).rstrip("/"), *parts])


@dataclass(frozen=True)
class StagedShard:
    index: int
    instances_path: str
    instances: int
    first_instance: str
    last_instance: str


def stage_shards(
    conn: duckdb.DuckDBPyConnection,
    dataset: str,
    shards: int,
    staging: str,
    *,
    only: str | None = None,
    positions: str | None = None,
) -> list[StagedShard]:
    """Split the instances to judge (``pruned_instances`` of dataset $1, restricted to the subquery ``only`` of
    instance ids) into ``shards`` contiguous ranges of instance_id of near-equal size and write each range to
    ``<staging>/shard-<k>/instances.parquet``: instance_id, query, positives and negatives as lists of
    {docid, title, text} in their stored order, and ``positions`` - the 1-based negative positions to judge, from
    the subquery ``positions`` of (instance_id, neg_index), or NULL for every negative. Empty shards are not
    written (fewer instances than shards). A docid without a passage fails here, not in a shard."""
    where = f" AND i.instance_id IN ({only})" if only else ""
    conn.execute(
        f"""CREATE OR REPLACE TEMP TABLE _shard_inst AS
            SELECT i.instance_id, q.query, i.positive_ids, i.negative_ids,
                   ntile({int(shards)}) OVER (ORDER BY i.instance_id) - 1 AS shard
            FROM pruned_instances i JOIN raw_queries q USING (dataset, query_id)
            WHERE i.dataset = $1{where}""",
        [dataset],
    )
    missing = conn.execute(
        """SELECT count(*) FROM (SELECT unnest(positive_ids || negative_ids) AS docid FROM _shard_inst) d
           ANTI JOIN (SELECT docid FROM raw_passages WHERE dataset = $1) p USING (docid)""",
        [dataset],
    ).fetchall()[0][0]
    if missing:
        raise ValueError(f"{dataset}: {missing} positive/negative ids of the instances to judge have no passage")
    pos_sql = (
        f"""SELECT instance_id, list(neg_index ORDER BY neg_index) AS positions FROM ({positions}) GROUP BY 1"""
        if positions
        else "SELECT NULL::VARCHAR AS instance_id, NULL::INTEGER[] AS positions WHERE false"
    )

    def passages(column: str) -> str:
        return f"""SELECT u.instance_id,
                          list({{'docid': u.docid, 'title': coalesce(p.title, ''), 'text': p.text}} ORDER BY u.k) AS v
                   FROM (SELECT instance_id, unnest({column}) AS docid, generate_subscripts({column}, 1) AS k
                         FROM _shard_inst) u
                   JOIN raw_passages p ON p.dataset = $1 AND p.docid = u.docid
                   GROUP BY u.instance_id"""

    conn.execute(
        f"""CREATE OR REPLACE TEMP TABLE _shard_rows AS
            SELECT s.shard, s.instance_id, s.query, coalesce(pp.v, []) AS positives, coalesce(nn.v, []) AS negatives,
                   fp.positions
            FROM _shard_inst s
            LEFT JOIN ({passages("positive_ids")}) pp USING (instance_id)
            LEFT JOIN ({passages("negative_ids")}) nn USING (instance_id)
            LEFT JOIN ({pos_sql}) fp USING (instance_id)""",
        [dataset],
    )
    out = []
    for k, n, first, last in conn.execute(
        "SELECT shard, count(*), min(instance_id), max(instance_id) FROM _shard_rows GROUP BY 1 ORDER BY 1"
    ).fetchall():
        path = join(staging, f"shard-{k}", "instances.parquet")
        if not is_remote(path):
            from pathlib import Path

            Path(path).parent.mkdir(parents=True, exist_ok=True)
        conn.execute(
            f"""COPY (SELECT instance_id, query, positives, negatives, positions FROM _shard_rows
                      WHERE shard = {int(k)} ORDER BY instance_id) TO {_lit(path)} (FORMAT parquet)"""
        )
        out.append(StagedShard(int(k), path, int(n), first, last))
    conn.execute("DROP TABLE _shard_rows")
    conn.execute("DROP TABLE _shard_inst")
    return out


def _passages(items) -> tuple[Passage, ...]:
    return tuple(Passage(p["docid"], p["title"], p["text"]) for p in items or [])


def iter_shard(path: str, batch_size: int) -> Iterator[tuple[list[Instance], dict[str, list[int]]]]:
    """The staged instances of one shard in instance_id order, ``batch_size`` at a time, with the staged negative
    positions of the instances that have some (``stage_shards``' ``positions``)."""
    with duckdb.connect() as conn:
        cur = conn.execute(
            f"SELECT instance_id, query, positives, negatives, positions FROM read_parquet({_lit(path)}) "
            "ORDER BY instance_id"
        )
        while rows := cur.fetchmany(batch_size):
            batch = [Instance(i, q, _passages(p), _passages(n)) for i, q, p, n, _ in rows]
            yield batch, {r[0]: list(r[4]) for r in rows if r[4] is not None}


def only_positions(batch: Sequence[Instance], positions: dict[str, list[int]]) -> tuple[list[Instance], dict]:
    """Keep each instance's negatives at ``positions`` (1-based); return the reduced instances and, per
    instance, the original position of each kept negative (to map judged positions back)."""
    import dataclasses

    out, kept = [], {}
    for inst in batch:
        keep = [k for k in positions.get(inst.instance_id, []) if 1 <= k <= len(inst.negatives)]
        if keep:
            out.append(dataclasses.replace(inst, negatives=tuple(inst.negatives[k - 1] for k in keep)))
            kept[inst.instance_id] = keep
    return out, kept


def write_verdicts(path: str, dataset: str, tier: int, judge, rows: Sequence[NegativeJudgment]) -> None:
    """One batch of a shard's verdicts as a Parquet file with the ``judgments`` table's columns."""
    if not is_remote(path):
        from pathlib import Path

        Path(path).parent.mkdir(parents=True, exist_ok=True)
    with duckdb.connect() as conn:
        conn.register("_j", judgments_table(dataset, tier, judge, rows))
        conn.execute(f"COPY (SELECT {JUDGMENT_COLUMNS} FROM _j) TO {_lit(path)} (FORMAT parquet)")


def merge_verdicts(conn: duckdb.DuckDBPyConnection, dataset: str, tier: int, paths: Sequence[str]) -> int:
    """Replace the tier's verdicts of ``dataset`` by those in ``paths`` in one transaction, inserted in
    (instance_id, neg_index) order, so the table is the same whatever order or number of shards produced them.
    Fails (and changes nothing) when the files hold another dataset's or tier's rows or a negative twice."""
    conn.execute("BEGIN TRANSACTION")
    try:
        conn.execute("DELETE FROM judgments WHERE dataset = $1 AND tier = $2", [dataset, tier])
        n = 0
        if paths:
            files = "[" + ", ".join(_lit(p) for p in paths) + "]"
            conn.execute(f"CREATE OR REPLACE TEMP TABLE _merged AS SELECT * FROM read_parquet({files})")
            bad, dup = conn.execute(
                """SELECT count(*) FILTER (WHERE dataset IS DISTINCT FROM $1 OR tier IS DISTINCT FROM $2),
                          count(*) - count(DISTINCT (instance_id, neg_index)) FROM _merged""",
                [dataset, tier],
            ).fetchall()[0]
            if bad or dup:
                raise ValueError(
                    f"{dataset} tier {tier}: the shards' verdicts hold {bad} rows of another dataset/tier and "
                    f"{dup} duplicated negatives; nothing merged"
                )
            conn.execute(
                f"INSERT INTO judgments ({JUDGMENT_COLUMNS}) SELECT {JUDGMENT_COLUMNS} FROM _merged "
                "ORDER BY instance_id, neg_index"
            )
            n = conn.execute("SELECT count(*) FROM _merged").fetchall()[0][0]
            conn.execute("DROP TABLE _merged")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return int(n)
