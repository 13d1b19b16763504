"""A snapshot of what the code location defines, compared with the committed ``snapshots/defs.json``: every asset
(group, partitions, code_version, kinds, upstream assets, observable or materializable), every asset check and its
asset, every job with what it selects and its partitions, every schedule and sensor.

A change to any of these shows up here as a diff to review with the change that caused it (a renamed asset, a
check that left a job, a code_version bump that will re-materialize an asset under declarative automation).
When the change is intended, refresh the file and commit it with the change:

    RLHN_UPDATE_SNAPSHOT=1 .venv/bin/python -m pytest rlhn_assets_tests/test_defs_snapshot.py

Partition keys come from the bundled registry and ``data/eval/``: run it without ``RLHN_DATA_DIR`` /
``RLHN_REGISTRY`` pointing elsewhere (as ``make test`` and CI do).
"""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path

import dagster as dg
import pytest

SNAPSHOT = Path(__file__).parent / "snapshots" / "defs.json"
UPDATE_ENV = "RLHN_UPDATE_SNAPSHOT"
REFRESH = f"{UPDATE_ENV}=1 .venv/bin/python -m pytest rlhn_assets_tests/test_defs_snapshot.py"


def _partitions(pd: dg.PartitionsDefinition | None) -> dict | None:
    if pd is None:
        return None
    if isinstance(pd, dg.MultiPartitionsDefinition):
        return {"type": "multi", "dimensions": {d.name: _partitions(d.partitions_def) for d in pd.partitions_defs}}
    if isinstance(pd, dg.StaticPartitionsDefinition):
        return {"type": "static", "keys": list(pd.get_partition_keys())}
    return {"type": type(pd).__name__, "description": str(pd)}  # time windows, dynamic: no fixed key list


def _check(key: dg.AssetCheckKey) -> str:
    return f"{key.asset_key.to_user_string()}:{key.name}"


def snapshot(defs: dg.Definitions) -> dict:
    """Plain JSON (sorted keys and lists) of the parts of ``defs`` listed in the module docstring."""
    graph = defs.resolve_asset_graph()
    assets = {}
    for key in sorted(graph.get_all_asset_keys(), key=lambda k: k.to_user_string()):
        node = graph.get(key)
        assets[key.to_user_string()] = {
            "group": node.group_name,
            "partitions": _partitions(node.partitions_def),
            "code_version": node.code_version,
            "kinds": sorted(node.kinds),
            "deps": sorted(k.to_user_string() for k in node.parent_keys),
            "execution": "observable"
            if node.is_observable
            else "materializable"
            if node.is_materializable
            else "external",
        }
    jobs = {}
    for job in sorted(defs.resolve_all_job_defs(), key=lambda j: j.name):
        if job.name.startswith("__"):  # Dagster's implicit asset jobs
            continue
        layer = job.asset_layer
        jobs[job.name] = {
            "assets": sorted(k.to_user_string() for k in layer.selected_asset_keys),
            "checks": sorted(_check(k) for k in layer.asset_graph.asset_check_keys),
            "partitions": _partitions(job.partitions_def),
        }
    return {
        "assets": assets,
        "asset_checks": sorted(_check(k) for k in graph.asset_check_keys),
        "jobs": jobs,
        "schedules": sorted(s.name for s in defs.schedules or []),
        "sensors": sorted(s.name for s in defs.sensors or []),
    }


def _dump(data: dict) -> str:
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def test_definitions_match_the_committed_snapshot():
    from rlhn_assets.definitions import defs

    current = _dump(snapshot(defs()))
    if os.environ.get(UPDATE_ENV) == "1":
        SNAPSHOT.parent.mkdir(parents=True, exist_ok=True)
        SNAPSHOT.write_text(current)
        return
    if not SNAPSHOT.exists():
        pytest.fail(f"{SNAPSHOT} is missing; create it with\n    {REFRESH}")
    committed = SNAPSHOT.read_text()
    if current != committed:
        diff = "".join(
            difflib.unified_diff(
                committed.splitlines(True),
                current.splitlines(True),
                "snapshots/defs.json (committed)",
                "definitions (now)",
            )
        )
        pytest.fail(
            "the code location's definitions differ from the committed snapshot. If the change is "
            f"intended, refresh it and commit the file:\n    {REFRESH}\n\n{diff}"
        )


def test_the_snapshot_sees_what_it_claims_to():
    """The snapshot would notice a change to each recorded field (so a refresh is never a silent no-op)."""

    @dg.asset(
        group_name="g", code_version="7", kinds={"duckdb"}, partitions_def=dg.StaticPartitionsDefinition(["a", "b"])
    )
    def up():
        return 1

    @dg.asset(deps=[up])
    def down():
        return 2

    @dg.asset_check(asset=up)
    def up_ok():
        return dg.AssetCheckResult(passed=True)

    job = dg.define_asset_job("j", selection=["down"])
    snap = snapshot(dg.Definitions(assets=[up, down], asset_checks=[up_ok], jobs=[job]))
    assert snap["assets"]["up"] == {
        "group": "g",
        "partitions": {"type": "static", "keys": ["a", "b"]},
        "code_version": "7",
        "kinds": ["duckdb"],
        "deps": [],
        "execution": "materializable",
    }
    assert snap["assets"]["down"]["deps"] == ["up"] and snap["assets"]["down"]["code_version"] is None
    assert snap["asset_checks"] == ["up:up_ok"]
    assert snap["jobs"] == {"j": {"assets": ["down"], "checks": [], "partitions": None}}
    assert snap["schedules"] == [] and snap["sensors"] == []
