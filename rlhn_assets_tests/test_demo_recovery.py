"""A killed demo leaves a STARTED run holding a pool slot (no daemon frees it in process): the next demo
releases it, and only for demo runs whose process is gone."""

import os
import subprocess
import sys

import dagster as dg
from dagster._core.storage.dagster_run import DagsterRun

from rlhn_assets.demo import DEMO_PID_TAG, release_dead_demo_runs


def _started_run(instance, run_id: str, pid: int | None) -> None:
    tags = {DEMO_PID_TAG: str(pid)} if pid is not None else {}
    instance.add_run(
        DagsterRun(job_name="__ephemeral_asset_job__", run_id=run_id, status=dg.DagsterRunStatus.STARTED, tags=tags)
    )
    instance.event_log_storage.set_concurrency_slots("llm_judge", 1)
    instance.event_log_storage.claim_concurrency_slot("llm_judge", run_id, "tier1_judgments")


def test_slots_of_dead_demo_runs_are_freed_and_live_ones_kept(instance):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _started_run(instance, "deadrun", dead.pid)
    assert instance.event_log_storage.get_concurrency_info("llm_judge").claimed_slots
    assert release_dead_demo_runs(instance, log=lambda m: None) == 1
    assert not instance.event_log_storage.get_concurrency_info("llm_judge").claimed_slots
    assert instance.get_run_by_id("deadrun").status == dg.DagsterRunStatus.FAILURE

    _started_run(instance, "liverun", os.getpid())  # this process: alive
    _started_run(instance, "uirun", None)  # not a demo run (e.g. launched from the UI): never touched
    assert release_dead_demo_runs(instance, log=lambda m: None) == 0
    assert instance.get_run_by_id("liverun").status == dg.DagsterRunStatus.STARTED
