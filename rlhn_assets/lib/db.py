"""The one way to open a DuckDB file (``open_with_lock_retry`` / ``connect``) and replace a partition's rows.
The tables themselves are defined in ``lib/schema.py`` (pipeline database) and ``lib/llm/cache.py`` (LLM cache)."""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import duckdb

_log = logging.getLogger(__name__)


class DuckDBLockTimeout(duckdb.IOException):
    """Another process held the DuckDB file's write lock for longer than the lock timeout."""


LOCK_TIMEOUT_ENV = "RLHN_DUCKDB_LOCK_TIMEOUT_S"


def lock_timeout_s() -> float:
    """How long a connection waits for another process's lock: ``RLHN_DUCKDB_LOCK_TIMEOUT_S`` (default 600 s)."""
    raw = os.environ.get(LOCK_TIMEOUT_ENV, "600")
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"{LOCK_TIMEOUT_ENV}={raw!r} is not a number of seconds") from None


# What DuckDB (1.x and 2.x) says when another process holds the file:
#   IO Error: Could not set lock on file "<path>": Conflicting lock is held in <program> (PID n)
# Only this is worth waiting for. A looser test (any message with "lock" in it) would also wait out the whole
# timeout on e.g. a corrupt file whose message mentions a "block".
_LOCK_CONFLICT_MARKERS = ("could not set lock on file", "conflicting lock")


def is_lock_conflict(exc: BaseException) -> bool:
    """True for DuckDB's "another process holds this file's lock" error, False for every other error."""
    msg = str(exc).lower()
    return isinstance(exc, duckdb.IOException) and any(m in msg for m in _LOCK_CONFLICT_MARKERS)


def open_with_lock_retry(
    database: str | Path,
    *,
    read_only: bool = False,
    config: dict | None = None,
    timeout_s: float | None = None,
    first_delay: float = 0.05,
    max_delay: float = 2.0,
    log: logging.Logger | None = None,
) -> duckdb.DuckDBPyConnection:
    """``duckdb.connect`` that waits for another process's file lock. The one way this project opens a
    DuckDB file that another process may hold (the pipeline's database and the LLM response cache).

    DuckDB allows one writer process per file (readers too are blocked by a writer); a second process gets
    ``IOException: Could not set lock on file``. Only that error is retried, with doubling, jittered back-off
    capped at ``max_delay`` (short, so a lock held for a few seconds costs a few seconds) until ``timeout_s``
    (default ``RLHN_DUCKDB_LOCK_TIMEOUT_S``, 600 s), then ``DuckDBLockTimeout`` names the file, the wait and the
    env var. Every other IO error (a corrupt or unreadable file, a missing directory) is raised at once, with the
    file's name in the message. Waits are logged."""
    log = log or _log
    timeout_s = lock_timeout_s() if timeout_s is None else timeout_s
    t0 = time.monotonic()
    delay, attempt = first_delay, 0
    while True:
        try:
            conn = duckdb.connect(str(database), read_only=read_only, config=config or {})
        except duckdb.IOException as exc:
            if not is_lock_conflict(exc):
                if str(database) in str(exc):
                    raise
                raise duckdb.IOException(f"DuckDB file {database}: {exc}") from exc
            waited = time.monotonic() - t0
            if waited >= timeout_s:
                log.error(f"DuckDB {database}: still locked by another process after {waited:.1f} s; giving up")
                raise DuckDBLockTimeout(
                    f"DuckDB file {database} stayed locked by another process for {waited:.1f} s "
                    f"({attempt + 1} attempts; {LOCK_TIMEOUT_ENV}={timeout_s:g}). DuckDB allows one writer "
                    f"process per file: close other connections (a DuckDB CLI, a notebook) or run fewer runs at "
                    f"once. Last error: {exc}"
                ) from exc
            attempt += 1
            sleep = min(delay * random.uniform(0.5, 1.5), max_delay, timeout_s - waited)
            if attempt == 1 or attempt % 10 == 0:
                log.warning(
                    f"DuckDB {database} is locked by another process; waiting (attempt {attempt}, "
                    f"{waited:.1f} s so far, timeout {timeout_s:g} s)"
                )
            time.sleep(max(sleep, 0.0))
            delay = min(delay * 2, max_delay)
            continue
        if attempt:
            log.info(f"DuckDB {database}: lock acquired after {time.monotonic() - t0:.1f} s ({attempt} retries)")
        return conn


@contextmanager
def connect(
    database: str | Path,
    *,
    read_only: bool = False,
    config: dict | None = None,
    timeout_s: float | None = None,
    log: logging.Logger | None = None,
) -> Iterator[duckdb.DuckDBPyConnection]:
    """Open a DuckDB connection, waiting for another process's lock (``open_with_lock_retry``), and always
    close it. Keep connections short: read, close, compute, then open again to write."""
    if str(database) != ":memory:" and not str(database).startswith("md:"):
        Path(database).parent.mkdir(parents=True, exist_ok=True)
    conn = open_with_lock_retry(database, read_only=read_only, config=config, timeout_s=timeout_s, log=log)
    try:
        yield conn
    finally:
        conn.close()


def replace_partition(conn: duckdb.DuckDBPyConnection, tables: list[str], dataset: str) -> None:
    for t in tables:
        conn.execute(f"DELETE FROM {t} WHERE dataset = ?", [dataset])
