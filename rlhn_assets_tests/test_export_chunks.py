"""lib/relabel.export_variant builds the export a chunk of instances at a time (bounded memory at 100K instances,
docs/benchmarks.md): the files must hold every instance once, in instance_id order, with each instance's passages
in their stored order, whatever the chunk size; an empty variant still writes both files with the schema."""

import gzip
import json

import pyarrow.parquet as pq

from rlhn_assets.lib.relabel import export_variant
from rlhn_assets_tests.conftest import tiny_corpus_db


def _db(n: int = 7):
    conn = tiny_corpus_db(n)
    conn.execute(
        """INSERT INTO relabeled_instances
             (dataset, variant, instance_id, query_id, positive_ids, negative_ids, false_negatives)
           SELECT 'ds', 'v', printf('i%02d', i), 'q' || i, ['d' || (3 * i)],
                  ['d' || (3 * i + 2), 'd' || (3 * i + 1)], 0
           FROM range($1) t(i) ORDER BY random()""",
        [n],
    )
    return conn


def _read(tmp_path, name):
    rows = [json.loads(line) for line in gzip.open(tmp_path / f"{name}.jsonl.gz", "rt")]
    return rows, pq.read_table(tmp_path / f"{name}.parquet").to_pylist()


def test_chunked_export_equals_one_chunk_in_instance_order(tmp_path):
    conn = _db(7)
    for name, chunk in (("one", 100), ("chunked", 2)):
        assert (
            export_variant(
                conn, "ds", "v", tmp_path / f"{name}.parquet", tmp_path / f"{name}.jsonl.gz", chunk_instances=chunk
            )
            == 7
        )
    one, chunked = _read(tmp_path, "one"), _read(tmp_path, "chunked")
    assert one == chunked
    jsonl, parquet = chunked
    assert jsonl == parquet
    assert [r["query_id"] for r in jsonl] == [f"q{i}" for i in range(7)]
    assert [p["docid"] for p in jsonl[1]["negative_passages"]] == ["d5", "d4"]  # stored order, not sorted
    assert jsonl[1]["positive_passages"] == [{"docid": "d3", "title": "", "text": "text 3"}]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".export-")]  # the parts are removed
    assert conn.execute("SELECT count(*) FROM duckdb_tables() WHERE temporary").fetchone()[0] == 0


def test_empty_variant_writes_both_files(tmp_path):
    conn = _db(3)
    assert export_variant(conn, "ds", "none", tmp_path / "e.parquet", tmp_path / "e.jsonl.gz") == 0
    jsonl, parquet = _read(tmp_path, "e")
    assert jsonl == [] and parquet == []
    assert "negative_passages" in pq.read_schema(tmp_path / "e.parquet").names
