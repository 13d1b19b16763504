"""Two runs writing the same DuckDB file at once (two processes, like two Dagster runs) both succeed: DuckDB
lets one process hold the file at a time, and `lib.db.open_with_lock_retry` waits for the other's lock.

Each child process materializes raw_bge + pruned (+ checks) for its own dataset. They start together (a file
barrier after the imports), and every connection is held 0.3 s longer than its work needs (a patched
`apply_schema`), so the two processes' connections overlap for sure; the test asserts that at least one of
them logged a lock wait. The negative control runs the same pair with RLHN_DUCKDB_LOCK_TIMEOUT_S=0 (one
attempt, i.e. no retry): then a run fails with the lock error."""

import os
import subprocess
import sys
import time

import duckdb
import pytest

from rlhn_assets import settings

PARTITIONS = ("fiqa", "msmarco_passage")
EXPECTED_INSTANCES = {"fiqa": 25, "msmarco_passage": 35}

CHILD = r"""
import os, sys, time, pathlib
partition, barrier = sys.argv[1], pathlib.Path(sys.argv[2])
import dagster as dg
import rlhn_assets.resources as res
from rlhn_assets.definitions import defs
from rlhn_assets.resources import DatasetRegistryResource
from rlhn_assets_tests.conftest import make_resources

_apply_schema = res.apply_schema
def slow_apply_schema(conn):  # every connection of the run holds the file lock a little longer
    _apply_schema(conn)
    time.sleep(0.3)
res.apply_schema = slow_apply_schema

d = defs()
assets = ["raw_bge", "pruned"]
selection = dg.AssetSelection.assets(*assets) | dg.AssetSelection.checks_for_assets(*assets)
resources = make_resources(os.environ["RLHN_DUCKDB"],
                           DatasetRegistryResource(path=os.path.join(os.environ["RLHN_DATA_DIR"], "datasets.yaml")))
(barrier / partition).touch()
deadline = time.monotonic() + 120
while len(list(barrier.iterdir())) < 2:
    assert time.monotonic() < deadline, "the other process never reached the barrier"
    time.sleep(0.01)
t0 = time.monotonic()
result = dg.materialize(list(d.assets) + list(d.asset_checks), selection=selection, partition_key=partition,
                        resources=resources, raise_on_error=False)
print(f"RESULT {partition} success={result.success} seconds={time.monotonic() - t0:.2f} start={t0:.3f}", flush=True)
sys.exit(0 if result.success else 1)
"""


def _run_pair(tmp_path, tmp_data, db_path, lock_timeout: str) -> list[subprocess.CompletedProcess]:
    barrier = tmp_path / f"barrier_{lock_timeout}"
    barrier.mkdir()
    env = {
        **os.environ,
        "RLHN_DATA_DIR": str(tmp_data),
        "RLHN_DUCKDB": str(db_path),
        "RLHN_DUCKDB_LOCK_TIMEOUT_S": lock_timeout,
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("DAGSTER_HOME", None)  # dg.materialize uses an ephemeral instance; never the repo's .dagster/
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, p, str(barrier)],
            cwd=settings.PROJECT_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for p in PARTITIONS
    ]
    out = []
    for p in procs:
        stdout, _ = p.communicate(timeout=600)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, ""))
    return out


def _tail(done) -> str:
    return "\n\n".join(f"--- {d.args[3]} rc={d.returncode}\n" + d.stdout[-3000:] for d in done)


def test_two_runs_writing_one_duckdb_file_at_once_both_succeed(tmp_path, tmp_data, db_path):
    t0 = time.monotonic()
    done = _run_pair(tmp_path, tmp_data, db_path, lock_timeout="120")
    assert all(d.returncode == 0 for d in done), _tail(done)
    waits = sum(d.stdout.count("is locked by another process; waiting") for d in done)
    assert waits >= 1, "the two runs never contended for the lock: the test did not test anything\n" + _tail(done)
    with duckdb.connect(str(db_path), read_only=True) as conn:
        raw = dict(conn.execute("SELECT dataset, count(*) FROM raw_instances GROUP BY dataset").fetchall())
        pruned = dict(conn.execute("SELECT dataset, count(*) FROM pruned_instances GROUP BY dataset").fetchall())
    assert raw == EXPECTED_INSTANCES and pruned == EXPECTED_INSTANCES
    print(f"lock waits logged: {waits}; wall {time.monotonic() - t0:.1f} s")


def test_without_waiting_for_the_lock_one_run_fails(tmp_path, tmp_data, db_path):
    """Negative control: one connection attempt (timeout 0) is what plain duckdb.connect does."""
    done = _run_pair(tmp_path, tmp_data, db_path, lock_timeout="0")
    failed = [d for d in done if d.returncode != 0]
    if not failed:
        pytest.fail("both runs succeeded without the lock wait: the runs did not overlap\n" + _tail(done))
    assert any(
        "stayed locked by another process" in d.stdout and "Could not set lock on file" in d.stdout for d in failed
    ), _tail(done)
