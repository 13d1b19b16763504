"""lib/schema.py: one versioned schema per DuckDB file, applied when the resource opens the file."""

import duckdb
import pytest

from rlhn_assets.lib import schema
from rlhn_assets.lib.llm.cache import CACHE_SCHEMA_VERSION, ResponseCache
from rlhn_assets.resources import RLHNDuckDB


def _tables(conn) -> set[str]:
    return {r[0] for r in conn.execute("SELECT table_name FROM information_schema.tables").fetchall()}


def test_a_new_file_gets_every_table_and_the_version_once():
    c = duckdb.connect()
    assert schema.apply_schema(c) is True
    assert set(schema.PIPELINE_TABLES) | {"rlhn_schema_version"} <= _tables(c)
    assert schema.stored_version(c, "pipeline") == schema.PIPELINE_SCHEMA_VERSION
    assert schema.apply_schema(c) is False  # current: nothing executed
    assert c.execute("SELECT count(*) FROM rlhn_schema_version").fetchall() == [(1,)]


def test_an_unversioned_file_is_migrated_and_keeps_its_rows():
    c = duckdb.connect()
    # a file as written before the model identity and the seeds were recorded (no version table)
    c.execute("""CREATE TABLE judgments (dataset VARCHAR NOT NULL, tier INTEGER NOT NULL, instance_id VARCHAR NOT NULL,
                 docid VARCHAR NOT NULL, neg_index INTEGER NOT NULL, verdict VARCHAR NOT NULL, score DOUBLE,
                 judge_kind VARCHAR, judge_model VARCHAR, prompt_version VARCHAR, response_key VARCHAR,
                 detail VARCHAR)""")
    c.execute("INSERT INTO judgments VALUES ('fiqa', 1, 'i', 'd', 0, 'better', 0.9, 'k', 'm', 'p', NULL, NULL)")
    c.execute("""CREATE TABLE eval_scores (eval_set VARCHAR NOT NULL, model VARCHAR NOT NULL, stage VARCHAR NOT NULL,
                 ndcg_at_10 DOUBLE, recall_at_100 DOUBLE, mrr_at_10 DOUBLE, queries_scored INTEGER,
                 queries_total INTEGER, model_version VARCHAR, corpus_hash VARCHAR, seconds DOUBLE)""")
    assert schema.stored_version(c, "pipeline") == 0
    assert schema.apply_schema(c) is True
    cols = {r[0] for r in c.execute("DESCRIBE judgments").fetchall()}
    assert "judge_model_identity" in cols
    assert "seed" in {r[0] for r in c.execute("DESCRIBE eval_scores").fetchall()}
    assert c.execute("SELECT verdict, judge_model_identity FROM judgments").fetchall() == [("better", None)]


def test_a_version_1_file_gets_the_teacher_scores_table_and_keeps_its_rows():
    c = duckdb.connect()
    # a file as written at version 1: every table but teacher_scores (added in 2), its version row
    schema.apply_versioned(c, "pipeline", 1, {k: v for k, v in schema.PIPELINE_TABLES.items() if k != "teacher_scores"})
    c.execute(
        "INSERT INTO judgments (dataset, tier, instance_id, docid, neg_index, verdict) "
        "VALUES ('f', 1, 'i', 'd', 1, 'worse')"
    )
    assert "teacher_scores" not in _tables(c) and schema.stored_version(c, "pipeline") == 1
    assert schema.PIPELINE_SCHEMA_VERSION == 2
    assert schema.apply_schema(c) is True
    assert "teacher_scores" in _tables(c) and schema.stored_version(c, "pipeline") == 2
    assert [r[0] for r in c.execute("DESCRIBE teacher_scores").fetchall()] == [
        "dataset",
        "instance_id",
        "docid",
        "role",
        "neg_index",
        "score",
        "teacher",
    ]
    assert c.execute("SELECT verdict FROM judgments").fetchall() == [("worse",)]
    assert schema.apply_schema(c) is False


def test_a_file_of_a_newer_version_is_refused():
    c = duckdb.connect()
    schema.apply_schema(c)
    c.execute(
        "INSERT INTO rlhn_schema_version (schema, version) VALUES ('pipeline', $1)",
        [schema.PIPELINE_SCHEMA_VERSION + 1],
    )
    with pytest.raises(schema.SchemaTooNew, match="newer than this code"):
        schema.apply_schema(c)


def test_the_resource_applies_the_schema_when_it_opens_the_file(tmp_path):
    db = tmp_path / "rlhn.duckdb"
    with RLHNDuckDB(database=str(db)).get_connection() as conn:
        assert "judgments" in _tables(conn) and "eval_per_query" in _tables(conn)
    with duckdb.connect(str(db), read_only=True) as conn:
        assert schema.stored_version(conn, "pipeline") == schema.PIPELINE_SCHEMA_VERSION


def test_the_llm_cache_file_has_its_own_versioned_schema(tmp_path):
    path = tmp_path / "cache.duckdb"
    with ResponseCache(path):
        pass
    with duckdb.connect(str(path), read_only=True) as conn:
        assert {"llm_responses", "llm_batches"} <= _tables(conn)
        assert schema.stored_version(conn, "llm_cache") == CACHE_SCHEMA_VERSION
        assert schema.stored_version(conn, "pipeline") == 0  # not the pipeline's tables
        assert "judgments" not in _tables(conn)
