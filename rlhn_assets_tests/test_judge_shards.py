"""lib/judging/shards.py and the shard side of lib/llm/cache.py without Dagster: staging splits the instances into
contiguous, near-equal ranges, the merge is one all-or-nothing transaction whose result does not depend on the
order of the files, and a shard's cache reads through the shared one and hands its answers back."""

from __future__ import annotations

import pytest

from rlhn_assets.lib.judging.judges import NegativeJudgment
from rlhn_assets.lib.judging.shards import iter_shard, merge_verdicts, stage_shards, write_verdicts
from rlhn_assets.lib.llm.cache import ResponseCache
from rlhn_assets.lib.llm.types import CacheRow, LLMResponse
from rlhn_assets_tests.conftest import tiny_corpus_db


class _Judge:
    kind, model, model_identity, prompt_version = "pointwise", "m", "id", "v1"


def _db(n: int = 7):
    conn = tiny_corpus_db(n)
    conn.execute(
        """INSERT INTO pruned_instances SELECT 'ds', printf('i%02d', i), 'q' || i, ['d' || (3 * i)],
                  ['d' || (3 * i + 2), 'd' || (3 * i + 1)] FROM range($1) t(i)""",
        [n],
    )
    return conn


def test_staging_splits_contiguous_near_equal_ranges_with_texts_in_order(tmp_path):
    conn = _db(7)
    shards = stage_shards(conn, "ds", 3, str(tmp_path))
    assert [s.instances for s in shards] == [3, 2, 2]
    got = [inst for s in shards for batch, _ in iter_shard(s.instances_paths, 2) for inst in batch]
    assert [i.instance_id for i in got] == [f"i{k:02d}" for k in range(7)]  # every instance once, in order
    assert [n.docid for n in got[1].negatives] == ["d5", "d4"]  # the stored order, not sorted
    assert got[1].positives[0].text == "text 3" and got[1].positives[0].title == ""
    # more shards than instances: no empty files
    assert len(stage_shards(conn, "ds", 20, str(tmp_path / "many"))) == 7


def test_staging_writes_bounded_chunks_read_back_in_order(tmp_path):
    """A shard is staged as files of at most chunk_instances rows (one SQL aggregation each, so the memory of
    staging does not grow with the dataset), read back in instance_id order across files and rounds."""
    conn = _db(7)
    shards = stage_shards(conn, "ds", 2, str(tmp_path), chunk_instances=2)
    assert [s.instances for s in shards] == [4, 3]
    assert [len(s.instances_paths) for s in shards] == [2, 2]
    sizes = [
        conn.execute(f"SELECT count(*) FROM read_parquet('{p}')").fetchone()[0]
        for s in shards
        for p in s.instances_paths
    ]
    assert sizes == [2, 2, 2, 1]
    got = [i.instance_id for s in shards for batch, _ in iter_shard(s.instances_paths, 3) for i in batch]
    assert got == [f"i{k:02d}" for k in range(7)]
    # the staging temp tables are gone
    assert conn.execute("SELECT count(*) FROM duckdb_tables() WHERE temporary").fetchone()[0] == 0
    # files given out of order are refused, not judged in another order
    first, second = shards[0].instances_paths
    with pytest.raises(ValueError, match="not in instance_id order"):
        list(iter_shard([second, first], 10))


def test_staging_carries_positions_and_refuses_a_missing_passage(tmp_path):
    conn = _db(3)
    (s,) = stage_shards(conn, "ds", 1, str(tmp_path), positions="SELECT 'i01' AS instance_id, 2 AS neg_index")
    ((batch, positions),) = list(iter_shard(s.instances_paths, 10))
    assert positions == {"i01": [2]} and len(batch) == 3
    conn.execute("DELETE FROM raw_passages WHERE docid = 'd4'")
    with pytest.raises(ValueError, match="1 positive/negative ids"):
        stage_shards(conn, "ds", 1, str(tmp_path / "x"))


def _verdicts(path, rows):
    write_verdicts(str(path), "ds", 1, _Judge(), [NegativeJudgment(i, d, k, v) for i, d, k, v in rows])
    return str(path)


def test_merge_is_ordered_whatever_the_file_order_and_all_or_nothing(tmp_path):
    conn = _db(2)
    a = _verdicts(tmp_path / "a.parquet", [("i01", "d5", 1, "worse"), ("i01", "d4", 2, "not_relevant")])
    b = _verdicts(tmp_path / "b.parquet", [("i00", "d2", 1, "better"), ("i00", "d1", 2, "not_relevant")])
    q = "SELECT instance_id, neg_index, verdict FROM judgments"  # no ORDER BY: the insertion order
    assert merge_verdicts(conn, "ds", 1, [a, b]) == 4
    first = conn.execute(q).fetchall()
    assert merge_verdicts(conn, "ds", 1, [b, a]) == 4
    assert conn.execute(q).fetchall() == first == sorted(first)
    dup = _verdicts(tmp_path / "dup.parquet", [("i00", "d2", 1, "worse")])
    with pytest.raises(ValueError, match="1 duplicated"):
        merge_verdicts(conn, "ds", 1, [a, b, dup])
    assert conn.execute(q).fetchall() == first  # rolled back: the previous verdicts stay


def _row(key: str) -> CacheRow:
    return CacheRow(LLMResponse(key, "yes", "stop", 3, 1, 0.1, None, False), "m", "v1", {"k": key})


def test_shard_cache_reads_through_and_hands_answers_back(tmp_path):
    shared, shard = tmp_path / "shared.duckdb", tmp_path / "shard.duckdb"
    with ResponseCache(shared) as c:
        c.put_many([_row("old")])
    with ResponseCache(shard, read_through=[shared, tmp_path / "not-mounted.duckdb"]) as c:
        hits = c.get_many(["old", "new"])
        assert set(hits) == {"old"} and hits["old"].cached
        c.put_many([_row("new")])
        c.export_responses(str(tmp_path / "r.parquet"))
    with ResponseCache(shared) as c:
        # the shard's file holds only what it was answered now: "new"
        assert c.import_responses([str(tmp_path / "r.parquet")]) == 1
        assert c.keys() == ["new", "old"]


def test_import_in_chunks_keeps_the_first_row_of_a_key(tmp_path, monkeypatch):
    """The import commits every _IMPORT_CHUNK_ROWS rows of a file (bounded memory at 100K answers); a key that
    is already cached keeps its row, and within the files a key's first row wins, across chunk boundaries too."""
    import duckdb

    from rlhn_assets.lib.llm import cache as cache_mod

    monkeypatch.setattr(cache_mod, "_IMPORT_CHUNK_ROWS", 2)
    texts = [("a", "a1"), ("b", "b1"), ("c", "c1"), ("a", "a2"), ("d", "d1"), ("b", "b2"), ("e", "e1")]
    with ResponseCache(tmp_path / "src.duckdb") as src:
        src.put_many([_row("x")])
        src.export_responses(str(tmp_path / "one.parquet"))
    cols = ", ".join(cache_mod._RESPONSE_COLUMNS)
    with duckdb.connect() as con:  # a file with duplicated keys (not one of our exports), in this row order
        first = con.execute(f"SELECT {cols} FROM read_parquet('{tmp_path / 'one.parquet'}')").fetchall()[0]
        names = list(cache_mod._RESPONSE_COLUMNS)
        rows = [tuple(k if n == "key" else t if n == "text" else v for n, v in zip(names, first)) for k, t in texts]
        con.execute(f"CREATE TABLE r AS SELECT {cols} FROM read_parquet('{tmp_path / 'one.parquet'}') LIMIT 0")
        con.executemany(f"INSERT INTO r VALUES ({', '.join(['?'] * len(names))})", rows)
        con.execute(f"COPY r TO '{tmp_path / 'dup.parquet'}' (FORMAT parquet)")
    with ResponseCache(tmp_path / "shared.duckdb") as c:
        c.put_many([CacheRow(LLMResponse("c", "cached", "stop", 3, 1, 0.1, None, False), "m", "v1", {"k": "c"})])
        assert c.import_responses([str(tmp_path / "dup.parquet")]) == 4  # a, b, d, e
        got = {k: r.text for k, r in c.get_many(["a", "b", "c", "d", "e"]).items()}
    assert got == {"a": "a1", "b": "b1", "c": "cached", "d": "d1", "e": "e1"}
