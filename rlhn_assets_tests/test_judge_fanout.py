"""Fan-out of one dataset's judging (docs/deploy.md, "Fan-out of one dataset's judging"): the tier-1 judging of a
synthetic dataset, split into shards that two Celery workers (dagster-celery, a throwaway Redis broker) judge at
the same time against the fake OpenAI endpoint, merges into exactly the verdicts of a single-step in-process run,
and the tier's asset checks pass over the whole dataset. The code location is the project's own
(rlhn_assets.definitions with RLHN_EXECUTOR=celery, the run config of deploy/celery.yaml); only the endpoint,
files and shard count are set for the test."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import duckdb
import pytest
import yaml

from rlhn_assets.resources import RLHNDuckDB
from rlhn_assets_tests.fake_openai_server import get_stats, running_server

ROOT = Path(__file__).resolve().parent.parent
DATASET = "fiqa"  # a partition of the bundled registry; its rows here are synthetic
INSTANCES, NEGATIVES = 24, 5
SHARD_STEP = "tier1_judgments.tier1_judge_shard"


def _seed(db: Path) -> None:
    """INSTANCES synthetic instances (one positive, NEGATIVES negatives each) as `pruned` leaves them."""
    with RLHNDuckDB(database=str(db)).get_connection() as c:
        c.execute(
            "INSERT INTO raw_queries SELECT $1, 'q' || i, 'synthetic question ' || i || '?' FROM range($2) t(i)",
            [DATASET, INSTANCES],
        )
        c.execute(
            "INSERT INTO raw_passages SELECT $1, 'd' || i, 'title ' || i, 'passage text number ' || i || '.' "
            "FROM range($2) t(i)",
            [DATASET, INSTANCES * (NEGATIVES + 1)],
        )
        c.execute(
            f"""INSERT INTO pruned_instances
                SELECT $1, printf('i%03d', i), 'q' || i, ['d' || (i * {NEGATIVES + 1})],
                       [('d' || (i * {NEGATIVES + 1} + k)) FOR k IN range(1, {NEGATIVES + 1})]
                FROM range($2) t(i)""",
            [DATASET, INSTANCES],
        )


def _tier1(base_url: str, cache: Path) -> dict:
    """A pointwise tier 1 on the fake endpoint (local, so unpaid: no budget needed)."""
    return {
        "tier": 1,
        "kind": "pointwise",
        "model": "fake-judge",
        "base_url": base_url,
        "cache_path": str(cache),
        "concurrency": 2,
        "threshold_relevant": 0.5,
        "threshold_better": 0.9,
    }


def _rows(db: Path) -> list[tuple]:
    with duckdb.connect(str(db), read_only=True) as c:
        return c.execute(
            "SELECT * EXCLUDE (judge_model_identity) FROM judgments WHERE dataset = $1 AND tier = 1 "
            "ORDER BY instance_id, neg_index",
            [DATASET],
        ).fetchall()


def nightly_job() -> dg.JobDefinition:
    """The project's dataset-partitioned job, loaded the way a Celery worker loads it (reconstructable)."""
    from rlhn_assets.definitions import defs

    return defs().resolve_job_def("nightly_backfill_job")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _redis_server() -> str | None:
    return shutil.which("redis-server") or next(
        (p for p in ("/usr/bin/redis-server", "/usr/sbin/redis-server") if os.path.exists(p)), None
    )


def _stop(proc: subprocess.Popen) -> None:
    """Stop a process started with ``start_new_session=True`` and everything it started: `dagster-celery worker
    start` runs `celery worker` as a child, which forks its pool; terminating the CLI alone would orphan them."""
    import signal

    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(wait)
            time.sleep(0.5)  # the group's other members exit right after the leader
        except subprocess.TimeoutExpired:
            continue
    proc.wait()


def test_shards_on_two_celery_workers_merge_to_the_single_step_verdicts(tmp_path, monkeypatch):
    server = _redis_server()
    if server is None:
        msg = (
            "redis-server not found: the Celery fan-out test needs Debian's redis-server (apt-get install redis-server)"
        )
        if os.environ.get("CI"):  # like test_postgres_storage.py: CI must run it
            pytest.fail(msg + " (CI is set: .ci/run installs it)")
        pytest.skip(msg)

    # --- the reference: shards = 1, in process (dg.materialize), its own database and cache
    single_db, fanout_db = tmp_path / "single.duckdb", tmp_path / "fanout.duckdb"
    _seed(single_db)
    _seed(fanout_db)
    from rlhn_assets.defs.judge import checks
    from rlhn_assets.defs.judge.assets import tier1_judgments
    from rlhn_assets_tests.conftest import make_resources

    with running_server(delay_s=0.25) as base_url:
        res = make_resources(single_db)
        res["tier1_judge"] = type(res["tier1_judge"])(**_tier1(base_url, tmp_path / "single_cache.duckdb"))
        (tmp_path / "home_single").mkdir()
        with dg.instance_for_test(temp_dir=str(tmp_path / "home_single")) as inst:
            single = dg.materialize(
                [tier1_judgments, checks.tier1_every_negative_judged_once, checks.tier1_error_rate],
                partition_key=DATASET,
                resources=res,
                instance=inst,
                run_config={"ops": {"tier1_judgments": {"config": {"staging_dir": str(tmp_path / "stage1")}}}},
            )
        assert single.success
        expected = _rows(single_db)
        assert len(expected) == INSTANCES * NEGATIVES
        verdicts = {r[5] for r in expected}
        assert {"better", "worse", "not_relevant"} <= verdicts, verdicts  # the fake endpoint's answers vary
        single_calls = get_stats(base_url)["total"]
        assert single_calls == INSTANCES * NEGATIVES

        # --- the fan-out: 2 shards on 2 Celery workers, a persistent instance shared with the workers
        port = _free_port()
        redis = subprocess.Popen(
            [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
            start_new_session=True,
        )
        home = tmp_path / "dagster_home"
        home.mkdir()
        env = {
            **os.environ,
            "DAGSTER_HOME": str(home),
            "RLHN_EXECUTOR": "celery",
            "RLHN_CELERY_BROKER": f"redis://127.0.0.1:{port}/0",
            "RLHN_CELERY_BACKEND": f"redis://127.0.0.1:{port}/1",
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            # `dagster-celery worker start` runs `celery` from PATH: the venv's, also when the tests run without
            # an activated venv (`make test` calls .venv/bin/python directly)
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        }
        for k in ("DAGSTER_HOME", "RLHN_EXECUTOR", "RLHN_CELERY_BROKER", "RLHN_CELERY_BACKEND"):
            monkeypatch.setenv(k, env[k])
        workers: list[subprocess.Popen] = []
        worker_logs = [open(tmp_path / f"{name}.log", "w") for name in ("w1", "w2")]
        try:
            deadline = time.monotonic() + 30
            while True:  # the broker answers PING
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                        s.sendall(b"PING\r\n")
                        if s.recv(16).startswith(b"+PONG"):
                            break
                except OSError:
                    pass
                assert redis.poll() is None and time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.1)
            # Create the instance's SQLite storage once here: two workers creating it at the same moment race on
            # its schema (sqlite3.IntegrityError on alembic_version, one worker dies).
            with dg.DagsterInstance.get():
                pass
            celery_cli = str(Path(sys.executable).parent / "dagster-celery")
            for name, log in zip(("w1", "w2"), worker_logs):
                cmd = ["worker", "start", "-A", "dagster_celery.app", "-y", str(ROOT / "deploy" / "celery.yaml")]
                cmd += ["-n", name, "--", "--concurrency", "1", "--pool", "prefork"]  # one step at a time each
                workers.append(
                    subprocess.Popen(
                        [celery_cli, *cmd],
                        cwd=ROOT,
                        env=env,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
            # Both workers up before the run: a worker that died at start-up would leave the run waiting for its
            # tasks forever (execute_job has no timeout).
            deadline = time.monotonic() + 120
            while not all(" ready." in (tmp_path / f"{n}.log").read_text() for n in ("w1", "w2")):
                dead = [n for n, w in zip(("w1", "w2"), workers) if w.poll() is not None]
                if dead or time.monotonic() > deadline:
                    logs_text = "".join((tmp_path / f"{n}.log").read_text()[-2000:] for n in ("w1", "w2"))
                    pytest.fail(f"celery worker(s) {dead or 'not ready in 120 s'}: {logs_text}")
                time.sleep(0.5)
            run_config = yaml.safe_load((ROOT / "deploy" / "celery.yaml").read_text())
            run_config["ops"] = {"tier1_judgments": {"config": {"shards": 2, "staging_dir": str(tmp_path / "stage2")}}}
            run_config["resources"] = {
                "duckdb": {"config": {"database": str(fanout_db)}},
                "tier1_judge": {"config": _tier1(base_url, tmp_path / "fanout_cache.duckdb")},
            }
            with dg.DagsterInstance.get() as instance:
                # the shard steps take the llm_judge pool: allow two at once (docs/deploy.md)
                instance.event_log_storage.set_concurrency_slots("llm_judge", 2)
                result = dg.execute_job(
                    dg.reconstructable(nightly_job),
                    instance=instance,
                    run_config=run_config,
                    tags={"dagster/partition": DATASET},
                    asset_selection=[dg.AssetKey("tier1_judgments")],
                )
                logs = instance.all_logs(result.run_id)
            logs_text = "".join((tmp_path / f"{n}.log").read_text() for n in ("w1", "w2"))
            assert result.success, logs_text[-3000:]
        finally:
            for w in workers:
                _stop(w)
            _stop(redis)
            for log in worker_logs:
                log.close()
        assert get_stats(base_url)["total"] == single_calls * 2  # its own cache: every call made again

    # the shard steps ran at the same time, on both workers
    spans: dict[str, list[float]] = {}
    hosts = {}
    for e in logs:
        if e.step_key and e.step_key.startswith(SHARD_STEP) and e.dagster_event is not None:
            kind = e.dagster_event.event_type_value
            if kind in ("STEP_START", "STEP_SUCCESS"):
                spans.setdefault(e.step_key, []).append(e.timestamp)
            if kind == "ENGINE_EVENT" and "celery worker" in (e.message or ""):
                md = e.dagster_event.engine_event_data.metadata
                hosts[e.step_key] = md["Celery worker"].value
    assert len(spans) == 2 and all(len(v) == 2 for v in spans.values()), spans
    (s0, e0), (s1, e1) = (sorted(v) for _, v in sorted(spans.items()))
    print("shard steps (start, end, worker):", {k: (*v, hosts.get(k)) for k, v in sorted(spans.items())})
    assert max(s0, s1) < min(e0, e1), f"shard steps did not overlap: {spans}"
    assert len(set(hosts.values())) == 2, hosts

    # the merged verdicts are the single-step run's, and the tier's checks pass over the whole dataset
    assert _rows(fanout_db) == expected
    checks_run = [
        e.dagster_event.event_specific_data
        for e in logs
        if e.dagster_event is not None and e.dagster_event.event_type_value == "ASSET_CHECK_EVALUATION"
    ]
    assert {c.check_name for c in checks_run} == {"tier1_every_negative_judged_once", "tier1_error_rate"}
    assert all(c.passed for c in checks_run)
    mat = [
        e.dagster_event.event_specific_data.materialization
        for e in logs
        if e.dagster_event is not None and e.dagster_event.event_type_value == "ASSET_MATERIALIZATION"
    ]
    assert mat[0].metadata["shards"].value == 2
    assert mat[0].metadata["negatives_judged"].value == INSTANCES * NEGATIVES
    assert mat[0].metadata["llm_calls"].value == INSTANCES * NEGATIVES
    # the shards' answers were merged into the shared cache: a rerun would be served from it
    with duckdb.connect(str(tmp_path / "fanout_cache.duckdb"), read_only=True) as c:
        assert c.execute("SELECT count(*) FROM llm_responses").fetchall()[0][0] == INSTANCES * NEGATIVES


def test_in_process_shards_of_both_tiers_equal_one_step(tmp_path):
    """Tier 1 and tier 2 (scope flagged_negatives: only tier 1's flagged positions travel through the staged
    Parquet and back) in 3 shards give the verdicts of 1 shard; the shards' answers land in the shared cache, so
    a rerun makes no call. The reference judges one round at a time, the shards two rounds at once (the
    default `rounds_in_flight`): the overlap changes neither the verdicts nor the number of calls."""
    from rlhn_assets.defs.judge import checks
    from rlhn_assets.defs.judge.assets import tier1_judgments, tier2_judgments
    from rlhn_assets_tests.conftest import make_resources

    assets = [
        tier1_judgments,
        tier2_judgments,
        checks.tier1_every_negative_judged_once,
        checks.tier2_covers_exactly_the_forwarded,
    ]

    def run(db: Path, shards: int, base_url: str, cache: Path, rounds_in_flight: int = 2):
        res = make_resources(db)
        tier_cls = type(res["tier1_judge"])
        res["tier1_judge"] = tier_cls(**_tier1(base_url, cache))
        res["tier2_judge"] = tier_cls(
            **{**_tier1(base_url, cache), "tier": 2, "scope": "flagged_negatives", "threshold_relevant": 0.3}
        )
        cfg = {
            "config": {
                "shards": shards,
                "batch_size": 5,
                "rounds_in_flight": rounds_in_flight,
                "staging_dir": str(tmp_path / f"stage-{db.stem}"),
            }
        }
        with dg.instance_for_test() as inst:
            r = dg.materialize(
                assets,
                partition_key=DATASET,
                resources=res,
                instance=inst,
                run_config={"ops": {"tier1_judgments": cfg, "tier2_judgments": cfg}},
            )
        assert r.success and all(e.passed for e in r.get_asset_check_evaluations())
        return {k: r.asset_materializations_for_node(k)[0].metadata for k in ("tier1_judgments", "tier2_judgments")}

    with running_server(delay_s=0.0) as base_url:
        one, three = tmp_path / "one.duckdb", tmp_path / "three.duckdb"
        _seed(one)
        _seed(three)
        ref = run(one, 1, base_url, tmp_path / "c1.duckdb", rounds_in_flight=1)
        md = run(three, 3, base_url, tmp_path / "c3.duckdb")
        assert md["tier1_judgments"]["shards"].value == 3 and md["tier2_judgments"]["shards"].value == 3
        for key in ("tier1_judgments", "tier2_judgments"):
            assert [md[key][m].value for m in ("llm_calls", "cache_hits")] == [
                ref[key][m].value for m in ("llm_calls", "cache_hits")
            ]
        assert md["tier1_judgments"]["llm_calls"].value > 0
        again = run(three, 3, base_url, tmp_path / "c3.duckdb")
    assert all(m["llm_calls"].value == 0 and m["cache_hits"].value > 0 for m in again.values())
    with duckdb.connect(str(one), read_only=True) as a, duckdb.connect(str(three), read_only=True) as b:
        q = "SELECT * FROM judgments ORDER BY tier, instance_id, neg_index"
        rows1, rows3 = a.execute(q).fetchall(), b.execute(q).fetchall()
    t2 = [r for r in rows1 if r[1] == 2]
    t1_flagged = [r for r in rows1 if r[1] == 1 and r[5] in ("better", "worse")]
    assert t2 and len(t2) == len(t1_flagged) < INSTANCES * NEGATIVES  # tier 2 judged only the flagged negatives
    assert {(r[2], r[4]) for r in t2} == {(r[2], r[4]) for r in t1_flagged}  # at their original positions
    assert rows3 == rows1
