"""The pipeline database's tables (``data/rlhn.duckdb``), in one place, with a schema version.

``apply_schema`` is called by the DuckDB resource when it opens the file (``rlhn_assets/resources.py``), so assets
and checks find every table; code that opens the file itself (tests, the experiment's tools) calls it once. A file
at the current version costs one query; an older file gets the missing tables and the migrations below (each one
idempotent), and its version row is bumped; a file written by a newer version of rlhn_assets is refused rather than
half-understood.

Column order is fixed here: every insert names its columns (DuckDB inserts are positional otherwise, so a column
added in the middle of a table would silently shift values). Every stage row carries its partition key (dataset,
or eval set + model) so a partition is replaced by ``DELETE ... WHERE`` + insert inside one transaction.

The LLM response cache is another file with its own schema (``lib/llm/cache.py``), versioned the same way
through ``apply_versioned``.
"""

from __future__ import annotations

import duckdb

# 1: the tables as of the seeds refactor (unversioned files count as 0); 2: + teacher_scores (a new table: a file at
# version 1 just gets it from its CREATE TABLE IF NOT EXISTS, no migration statement). Bump when a table or column
# changes and add the statement that brings an older file up to date to PIPELINE_MIGRATIONS.
PIPELINE_SCHEMA_VERSION = 2

PIPELINE_TABLES: dict[str, str] = {
    # ingest (lib/ingest.py)
    "raw_queries": """CREATE TABLE IF NOT EXISTS raw_queries (
        dataset VARCHAR NOT NULL, query_id VARCHAR NOT NULL, query VARCHAR NOT NULL)""",
    "raw_passages": """CREATE TABLE IF NOT EXISTS raw_passages (
        dataset VARCHAR NOT NULL, docid VARCHAR NOT NULL, title VARCHAR, text VARCHAR NOT NULL)""",
    "raw_instances": """CREATE TABLE IF NOT EXISTS raw_instances (
        dataset VARCHAR NOT NULL, instance_id VARCHAR NOT NULL, query_id VARCHAR NOT NULL,
        positive_ids VARCHAR[] NOT NULL, negative_ids VARCHAR[] NOT NULL,
        source_file VARCHAR NOT NULL, line_no BIGINT NOT NULL, source_format VARCHAR NOT NULL,
        prompt VARCHAR)""",
    "raw_quarantine": """CREATE TABLE IF NOT EXISTS raw_quarantine (
        dataset VARCHAR NOT NULL, source_file VARCHAR NOT NULL, line_no BIGINT NOT NULL,
        reason VARCHAR NOT NULL, detail VARCHAR, raw_line VARCHAR)""",
    # prune (lib/pruning.py)
    "pruned_instances": """CREATE TABLE IF NOT EXISTS pruned_instances (
        dataset VARCHAR NOT NULL, instance_id VARCHAR NOT NULL, query_id VARCHAR NOT NULL,
        positive_ids VARCHAR[] NOT NULL, negative_ids VARCHAR[] NOT NULL)""",
    "pruned_decisions": """CREATE TABLE IF NOT EXISTS pruned_decisions (
        dataset VARCHAR NOT NULL, kept BOOLEAN NOT NULL, decided_by VARCHAR NOT NULL, reason VARCHAR,
        raw_instances BIGINT, kept_instances BIGINT, duplicates_removed BIGINT,
        overlap_negatives_removed BIGINT, capped_negatives_removed BIGINT)""",
    # judge (lib/judging/budget.py, lib/judging/store.py)
    "judging_estimates": """CREATE TABLE IF NOT EXISTS judging_estimates (
        dataset VARCHAR NOT NULL, tier INTEGER NOT NULL, kind VARCHAR, model VARCHAR, endpoint VARCHAR,
        paid BOOLEAN, priced BOOLEAN, instances BIGINT, negatives BIGINT, calls BIGINT, tokens_in BIGINT,
        tokens_out_typical BIGINT, tokens_out_max BIGINT, usd_typical DOUBLE, usd_max DOUBLE, run_id VARCHAR,
        estimated_at TIMESTAMP DEFAULT current_timestamp)""",
    "judgments": """CREATE TABLE IF NOT EXISTS judgments (
        dataset VARCHAR NOT NULL, tier INTEGER NOT NULL, instance_id VARCHAR NOT NULL, docid VARCHAR NOT NULL,
        neg_index INTEGER NOT NULL, verdict VARCHAR NOT NULL, score DOUBLE, judge_kind VARCHAR, judge_model VARCHAR,
        prompt_version VARCHAR, response_key VARCHAR, detail VARCHAR, judge_model_identity VARCHAR)""",
    # relabel: teacher scores of every pruned (query, passage) pair (lib/teacher.py; role 'pos' / 'neg', neg_index
    # 1-based like judgments.neg_index, NULL for a positive), read by the topk_percpos variant
    "teacher_scores": """CREATE TABLE IF NOT EXISTS teacher_scores (
        dataset VARCHAR NOT NULL, instance_id VARCHAR NOT NULL, docid VARCHAR NOT NULL, role VARCHAR NOT NULL,
        neg_index INTEGER, score DOUBLE NOT NULL, teacher VARCHAR NOT NULL)""",
    # relabel (lib/relabel.py)
    "relabeled_instances": """CREATE TABLE IF NOT EXISTS relabeled_instances (
        dataset VARCHAR NOT NULL, variant VARCHAR NOT NULL, instance_id VARCHAR NOT NULL, query_id VARCHAR NOT NULL,
        positive_ids VARCHAR[] NOT NULL, negative_ids VARCHAR[] NOT NULL, false_negatives INTEGER NOT NULL)""",
    # train (defs/train/assets.py)
    "trained_models": """CREATE TABLE IF NOT EXISTS trained_models (
        kind VARCHAR NOT NULL, variant VARCHAR NOT NULL, seed INTEGER NOT NULL, input_key VARCHAR NOT NULL,
        model_version VARCHAR NOT NULL, path VARCHAR NOT NULL, queries INTEGER, train_rows INTEGER, steps INTEGER,
        final_loss DOUBLE, seconds DOUBLE, settings_json VARCHAR, training_set_sizes_json VARCHAR,
        trained_at TIMESTAMP)""",
    # evaluate (defs/evaluate/assets.py); seed NULL = the untrained base
    "eval_scores": """CREATE TABLE IF NOT EXISTS eval_scores (
        eval_set VARCHAR NOT NULL, model VARCHAR NOT NULL, stage VARCHAR NOT NULL, ndcg_at_10 DOUBLE,
        recall_at_100 DOUBLE, mrr_at_10 DOUBLE, queries_scored INTEGER, queries_total INTEGER,
        model_version VARCHAR, corpus_hash VARCHAR, seconds DOUBLE, seed INTEGER)""",
    "eval_per_query": """CREATE TABLE IF NOT EXISTS eval_per_query (
        eval_set VARCHAR NOT NULL, model VARCHAR NOT NULL, stage VARCHAR NOT NULL, query_id VARCHAR NOT NULL,
        ndcg_at_10 DOUBLE, seed INTEGER)""",
}

# Statements that bring a file made by an older (or unversioned) rlhn_assets up to date. Each is idempotent, so
# they all run whenever the stored version is behind.
PIPELINE_MIGRATIONS: tuple[str, ...] = (
    # files made before the judge model's identity was recorded (an alias alone could name two models)
    "ALTER TABLE judgments ADD COLUMN IF NOT EXISTS judge_model_identity VARCHAR",
    # files made before trained models had seeds
    "ALTER TABLE eval_scores ADD COLUMN IF NOT EXISTS seed INTEGER",
    "ALTER TABLE eval_per_query ADD COLUMN IF NOT EXISTS seed INTEGER",
)

_VERSION_DDL = """CREATE TABLE IF NOT EXISTS rlhn_schema_version (
    schema VARCHAR NOT NULL, version INTEGER NOT NULL, applied_at TIMESTAMP DEFAULT current_timestamp)"""


class SchemaTooNew(RuntimeError):
    """The file was written by a newer rlhn_assets whose tables this version does not know."""


def stored_version(conn: duckdb.DuckDBPyConnection, schema: str) -> int:
    """The schema version recorded in the file (0 for a file made before versions were recorded, or a new one)."""
    has = conn.execute(
        "SELECT count(*) FROM information_schema.tables WHERE table_name = 'rlhn_schema_version' "
        "AND table_schema = current_schema()"
    ).fetchall()[0][0]
    if not has:
        return 0
    (row,) = conn.execute("SELECT max(version) FROM rlhn_schema_version WHERE schema = $1", [schema]).fetchall()
    return int(row[0]) if row and row[0] is not None else 0


def apply_versioned(
    conn: duckdb.DuckDBPyConnection,
    schema: str,
    version: int,
    tables: dict[str, str] | list[str],
    migrations: tuple[str, ...] = (),
) -> bool:
    """Create ``tables`` and run ``migrations`` unless the file already records ``version`` of ``schema``;
    returns True when it changed the file. Raises SchemaTooNew for a file of a later version."""
    current = stored_version(conn, schema)
    if current == version:
        return False
    if current > version:
        raise SchemaTooNew(
            f"{schema} schema version {current} in this DuckDB file is newer than this code's "
            f"({version}): upgrade rlhn_assets, or use another file"
        )
    statements = list(tables.values() if isinstance(tables, dict) else tables)
    conn.execute("BEGIN TRANSACTION")
    try:
        for stmt in (*statements, *migrations, _VERSION_DDL):
            conn.execute(stmt)
        conn.execute("INSERT INTO rlhn_schema_version (schema, version) VALUES ($1, $2)", [schema, version])
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return True


def apply_schema(conn: duckdb.DuckDBPyConnection) -> bool:
    """Bring the pipeline database to PIPELINE_SCHEMA_VERSION (a no-op when it is there)."""
    return apply_versioned(conn, "pipeline", PIPELINE_SCHEMA_VERSION, PIPELINE_TABLES, PIPELINE_MIGRATIONS)
