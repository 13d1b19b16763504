"""Fan-out of one dataset's judging over shards (docs/deploy.md, "Fan-out of one dataset's judging").

DuckDB allows one writing process per file, and shard steps run in other processes (Celery workers, Kubernetes
pods, possibly on other machines). So shards never open the pipeline database: the planning step stages each
shard's instances (query, positives and negatives with their texts) as Parquet files, a shard judges from its
files and writes its verdicts as Parquet files, and the merging step loads them all into ``judgments`` in one
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


# Instances per staged file. Each file's passages are gathered by one GROUP BY with list() aggregates, which DuckDB
# holds in memory: staging a whole dataset in one query ran out of the pipeline connection's 1 GB memory_limit at
# 100,000 instances x 25 negatives (docs/benchmarks.md, bench_scale). 10,000 instances of ~26 passages of ~350
# characters are ~100 MB; every chunk re-reads the dataset's raw_passages once.
STAGE_CHUNK_INSTANCES = 10_000


@dataclass(frozen=True)
class StagedShard:
    index: int
    instances_paths: tuple[str, ...]  # in instance_id order: each file sorted, file k+1 after file k
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
    chunk_instances: int = STAGE_CHUNK_INSTANCES,
) -> list[StagedShard]:
    """Split the instances to judge (``pruned_instances`` of dataset $1, restricted to the subquery ``only`` of
    instance ids) into ``shards`` contiguous ranges of instance_id of near-equal size and write each range to
    ``<staging>/shard-<k>/instances-<c>.parquet`` files of at most ``chunk_instances`` rows each: instance_id,
    query, positives and negatives as lists of {docid, title, text} in their stored order, and ``positions`` - the
    1-based negative positions to judge, from the subquery ``positions`` of (instance_id, neg_index), or NULL for
    every negative. Empty shards are not written (fewer instances than shards). A docid without a passage fails
    here, not in a shard."""
    if chunk_instances < 1:
        raise ValueError(f"chunk_instances must be >= 1, got {chunk_instances}")
    where = f" AND i.instance_id IN ({only})" if only else ""
    conn.execute(
        f"""CREATE OR REPLACE TEMP TABLE _shard_inst AS
            SELECT i.instance_id, q.query, i.positive_ids, i.negative_ids,
                   ntile({int(shards)}) OVER (ORDER BY i.instance_id) - 1 AS shard,
                   row_number() OVER (ORDER BY i.instance_id) - 1 AS rn
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
        conn.execute("DROP TABLE _shard_inst")
        raise ValueError(f"{dataset}: {missing} positive/negative ids of the instances to judge have no passage")
    if positions:  # the subquery may use $1 (the dataset)
        conn.execute(
            f"""CREATE OR REPLACE TEMP TABLE _shard_pos AS
                SELECT instance_id, list(neg_index ORDER BY neg_index) AS positions FROM ({positions}) GROUP BY 1""",
            [dataset] if "$1" in positions else [],
        )
    else:
        conn.execute("CREATE OR REPLACE TEMP TABLE _shard_pos (instance_id VARCHAR, positions INTEGER[])")

    def passages(column: str) -> str:
        return f"""SELECT u.instance_id,
                          list({{'docid': u.docid, 'title': coalesce(p.title, ''), 'text': p.text}} ORDER BY u.k) AS v
                   FROM (SELECT instance_id, unnest({column}) AS docid, generate_subscripts({column}, 1) AS k
                         FROM _chunk) u
                   JOIN raw_passages p ON p.dataset = $1 AND p.docid = u.docid
                   GROUP BY u.instance_id"""

    out = []
    for k, n, first, last, lo, hi in conn.execute(
        """SELECT shard, count(*), min(instance_id), max(instance_id), min(rn), max(rn)
           FROM _shard_inst GROUP BY 1 ORDER BY 1"""
    ).fetchall():
        paths = []
        for c, start in enumerate(range(int(lo), int(hi) + 1, chunk_instances)):
            path = join(staging, f"shard-{k}", f"instances-{c:05d}.parquet")
            if not is_remote(path):
                from pathlib import Path

                Path(path).parent.mkdir(parents=True, exist_ok=True)
            conn.execute(
                "CREATE OR REPLACE TEMP TABLE _chunk AS SELECT * FROM _shard_inst WHERE rn BETWEEN $1 AND $2",
                [start, min(start + chunk_instances - 1, int(hi))],
            )
            conn.execute(
                f"""COPY (SELECT c.instance_id, c.query, coalesce(pp.v, []) AS positives,
                                 coalesce(nn.v, []) AS negatives, fp.positions
                          FROM _chunk c
                          LEFT JOIN ({passages("positive_ids")}) pp USING (instance_id)
                          LEFT JOIN ({passages("negative_ids")}) nn USING (instance_id)
                          LEFT JOIN _shard_pos fp USING (instance_id)
                          ORDER BY c.instance_id) TO {_lit(path)} (FORMAT parquet)""",
                [dataset],
            )
            paths.append(path)
        out.append(StagedShard(int(k), tuple(paths), int(n), first, last))
    for table in ("_chunk", "_shard_pos", "_shard_inst"):
        conn.execute(f"DROP TABLE IF EXISTS {table}")
    return out


def _passages(items) -> tuple[Passage, ...]:
    return tuple(Passage(p["docid"], p["title"], p["text"]) for p in items or [])


def iter_shard(paths: str | Sequence[str], batch_size: int) -> Iterator[tuple[list[Instance], dict[str, list[int]]]]:
    """The staged instances of one shard (its files in order) in instance_id order, ``batch_size`` at a time, with
    the staged negative positions of the instances that have some (``stage_shards``' ``positions``). Each file is
    read in its stored order (sorted when written; DuckDB keeps a file's row order, ``preserve_insertion_order``),
    not sorted again, so a shard process never holds more than a round's rows; the order is checked as it goes."""
    paths = [paths] if isinstance(paths, str) else list(paths)
    last = None
    with duckdb.connect() as conn:
        for path in paths:
            cur = conn.execute(
                f"SELECT instance_id, query, positives, negatives, positions FROM read_parquet({_lit(path)})"
            )
            while rows := cur.fetchmany(batch_size):
                if (last is not None and rows[0][0] <= last) or any(a[0] >= b[0] for a, b in zip(rows, rows[1:])):
                    raise ValueError(f"{path}: staged instances are not in instance_id order (near {rows[0][0]})")
                last = rows[-1][0]
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
