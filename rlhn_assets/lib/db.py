"""DuckDB tables of the pipeline, created idempotently. Column order is fixed here: every insert names
its columns (DuckDB inserts are positional otherwise; dagster-notes pitfall 1)."""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import duckdb

# Stage tables. Every row carries its dataset (the partition key) so a partition is replaced by
# `DELETE ... WHERE dataset = ?` + insert inside one transaction.
DDL = [
    """CREATE TABLE IF NOT EXISTS raw_queries (
        dataset VARCHAR NOT NULL, query_id VARCHAR NOT NULL, query VARCHAR NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS raw_passages (
        dataset VARCHAR NOT NULL, docid VARCHAR NOT NULL, title VARCHAR, text VARCHAR NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS raw_instances (
        dataset VARCHAR NOT NULL, instance_id VARCHAR NOT NULL, query_id VARCHAR NOT NULL,
        positive_ids VARCHAR[] NOT NULL, negative_ids VARCHAR[] NOT NULL,
        source_file VARCHAR NOT NULL, line_no BIGINT NOT NULL, source_format VARCHAR NOT NULL,
        prompt VARCHAR)""",
    """CREATE TABLE IF NOT EXISTS raw_quarantine (
        dataset VARCHAR NOT NULL, source_file VARCHAR NOT NULL, line_no BIGINT NOT NULL,
        reason VARCHAR NOT NULL, detail VARCHAR, raw_line VARCHAR)""",
    """CREATE TABLE IF NOT EXISTS pruned_instances (
        dataset VARCHAR NOT NULL, instance_id VARCHAR NOT NULL, query_id VARCHAR NOT NULL,
        positive_ids VARCHAR[] NOT NULL, negative_ids VARCHAR[] NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS pruned_decisions (
        dataset VARCHAR NOT NULL, kept BOOLEAN NOT NULL, decided_by VARCHAR NOT NULL, reason VARCHAR,
        raw_instances BIGINT, kept_instances BIGINT, duplicates_removed BIGINT,
        overlap_negatives_removed BIGINT, capped_negatives_removed BIGINT)""",
]


def ensure_schema(conn: duckdb.DuckDBPyConnection) -> None:
    for stmt in DDL:
        conn.execute(stmt)


@contextmanager
def connect(database: str | Path, *, read_only: bool = False, config: dict | None = None,
            retries: int = 12, first_delay: float = 0.1) -> Iterator[duckdb.DuckDBPyConnection]:
    """Open a DuckDB connection and always close it.

    DuckDB allows one writer process per file; a second process gets an IOException while another holds
    the lock. Keep connections short and retry with doubling back-off (0.1 s .. ~7 min total), like
    dagster-duckdb does, but close the connection on any exception (dagster-duckdb leaks it)."""
    Path(database).parent.mkdir(parents=True, exist_ok=True)
    delay = first_delay
    for attempt in range(retries + 1):
        try:
            conn = duckdb.connect(str(database), read_only=read_only, config=config or {})
            break
        except duckdb.IOException:
            if attempt == retries:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 60)
    try:
        yield conn
    finally:
        conn.close()


def replace_partition(conn: duckdb.DuckDBPyConnection, tables: list[str], dataset: str) -> None:
    for t in tables:
        conn.execute(f"DELETE FROM {t} WHERE dataset = ?", [dataset])
