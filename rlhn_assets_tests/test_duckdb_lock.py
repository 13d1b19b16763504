"""The one rule for opening a DuckDB file another process may hold (``lib.db.open_with_lock_retry``), for both
files of the project that use it: the pipeline database (``lib.db.connect``) and the LLM response cache
(``lib.llm.cache.ResponseCache``). Only DuckDB's lock-conflict error is waited for, up to
``RLHN_DUCKDB_LOCK_TIMEOUT_S``; every other IO error fails at once and names the file."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import duckdb
import pytest

from rlhn_assets.lib import db
from rlhn_assets.lib.llm.cache import ResponseCache

# Holds a DuckDB file open until its stdin closes (or 30 s pass, so a failing test never leaves it behind).
_HOLDER = (
    "import duckdb, select, sys; c = duckdb.connect(sys.argv[1]); print('locked', flush=True); "
    "select.select([sys.stdin], [], [], 30); c.close()"
)


@contextmanager
def held(path, release_after_s: float | None = None):
    """Another process holds ``path`` while the block runs (or only for ``release_after_s`` seconds)."""
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    timer = None
    try:
        assert holder.stdout.readline().strip() == "locked"
        if release_after_s is not None:
            timer = threading.Timer(release_after_s, holder.stdin.close)
            timer.start()
        yield holder
    finally:
        if timer:
            timer.cancel()
        if not holder.stdin.closed:
            holder.stdin.close()
        holder.wait(30)


def _open_db(path, **kw):
    with db.connect(path, **kw) as conn:
        return conn.execute("SELECT 42").fetchone()[0]


def _open_cache(path, timeout_s=None):
    with ResponseCache(path, open_timeout_s=timeout_s, first_delay_s=0.05) as cache:
        return cache.count()


OPENERS = {
    "pipeline_db": lambda path, timeout_s=None: _open_db(path, timeout_s=timeout_s),
    "llm_cache": _open_cache,
}


@pytest.fixture
def existing(tmp_path):
    path = tmp_path / "f.duckdb"
    with ResponseCache(path):  # a valid DuckDB file with the cache's tables (the pipeline opener needs none)
        pass
    return path


@pytest.mark.parametrize("opener", OPENERS)
def test_a_lock_held_by_another_process_is_waited_for(existing, opener, caplog):
    caplog.set_level(logging.INFO)
    t0 = time.monotonic()
    with held(existing, release_after_s=1.0):
        result = OPENERS[opener](existing, timeout_s=30)
    waited = time.monotonic() - t0
    assert result == (42 if opener == "pipeline_db" else 0)
    assert 0.5 < waited < 20, waited  # it did wait for the holder, and opened soon after the release
    assert "is locked by another process; waiting" in caplog.text
    assert "lock acquired after" in caplog.text


@pytest.mark.parametrize("opener", OPENERS)
def test_the_timeout_is_the_env_var_and_its_message_names_the_file_and_the_env_var(existing, opener, monkeypatch):
    monkeypatch.setenv("RLHN_DUCKDB_LOCK_TIMEOUT_S", "0.3")
    with held(existing):
        t0 = time.monotonic()
        with pytest.raises(db.DuckDBLockTimeout) as info:
            OPENERS[opener](existing)  # no explicit timeout: the env var's
        waited = time.monotonic() - t0
    msg = str(info.value)
    assert str(existing) in msg and "RLHN_DUCKDB_LOCK_TIMEOUT_S=0.3" in msg
    assert "Could not set lock on file" in msg  # DuckDB's own words are kept
    assert 0.3 <= waited < 10, waited
    assert isinstance(info.value, duckdb.IOException)  # callers that catch DuckDB's error still do


@pytest.mark.parametrize("opener", OPENERS)
def test_a_non_lock_io_error_fails_at_once_and_names_the_file(tmp_path, opener, monkeypatch):
    monkeypatch.setenv("RLHN_DUCKDB_LOCK_TIMEOUT_S", "30")
    bad = tmp_path / "not_a_database.duckdb"
    bad.write_text("this is not a DuckDB file\n" * 200)
    t0 = time.monotonic()
    with pytest.raises(duckdb.IOException) as info:
        OPENERS[opener](bad)
    assert time.monotonic() - t0 < 5  # no retries (a retry loop would run for 30 s)
    assert not isinstance(info.value, db.DuckDBLockTimeout)
    assert str(bad) in str(info.value)


def test_only_the_lock_conflict_is_retried(tmp_path, monkeypatch):
    """An IO error whose text merely contains "lock" (here: a "block") is not a lock conflict: one attempt, and
    the error names the file even when DuckDB's message does not."""
    calls = []

    def failing_connect(database, **kw):
        calls.append(database)
        raise duckdb.IOException("IO Error: Could not read block 7: checksum mismatch")

    monkeypatch.setattr(db.duckdb, "connect", failing_connect)
    path = tmp_path / "x.duckdb"
    with pytest.raises(duckdb.IOException, match=r"x\.duckdb.*Could not read block 7"):
        db.open_with_lock_retry(path, timeout_s=30)
    assert len(calls) == 1
    assert db.is_lock_conflict(
        duckdb.IOException(
            'IO Error: Could not set lock on file "/x.duckdb": Conflicting lock is held in python (PID 7)'
        )
    )
    assert not db.is_lock_conflict(duckdb.IOException("IO Error: Could not read block 7"))
    assert not db.is_lock_conflict(ValueError("Could not set lock on file"))  # only DuckDB's IO error


def test_a_malformed_timeout_env_var_is_named(monkeypatch):
    monkeypatch.setenv("RLHN_DUCKDB_LOCK_TIMEOUT_S", "ten minutes")
    with pytest.raises(ValueError, match="RLHN_DUCKDB_LOCK_TIMEOUT_S='ten minutes'"):
        db.lock_timeout_s()
