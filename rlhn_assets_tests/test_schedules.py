"""The nightly backfill schedule requests exactly the missing or stale per-dataset partitions: the datasets not
materialized yet (all seven assets each), then nothing once everything is materialized, then only the dataset
whose source file changed; never a dataset with a run in progress."""

import gzip
import uuid

import dagster as dg
import yaml
from dagster._core.definitions.observe import observe  # dagster 1.13 has no public observe()

from rlhn_assets.definitions import defs
from rlhn_assets.defs.schedules import NIGHTLY_TAG, PER_DATASET_ASSETS, nightly_backfill
from rlhn_assets.partitions import DATASETS
from rlhn_assets.resources import DatasetRegistryResource, RLHNDuckDB


def _requests(d: dg.Definitions, instance) -> dict[str, list[str]] | str:
    ctx = dg.build_schedule_context(instance=instance, repository_def=d.get_repository_def())
    result = nightly_backfill(ctx)
    if isinstance(result, dg.SkipReason):
        return result.skip_message
    out = {}
    for rr in result:
        assert rr.partition_key == rr.run_key and rr.tags[NIGHTLY_TAG] == "true"
        out[rr.partition_key] = sorted(k.to_user_string() for k in rr.asset_selection)
    return out


def test_nightly_backfill_requests_missing_then_nothing_then_stale(tmp_data, db_path, instance):
    # judge: false everywhere: tier 1/2 and teacher_scores materialize without loading a model or starting
    # llama.cpp, so the test needs no judge; the schedule only looks at statuses, not at what the assets computed.
    reg_path = tmp_data / "datasets.yaml"
    reg = yaml.safe_load(reg_path.read_text())
    for entry in reg["datasets"].values():
        entry["judge"] = False
    reg_path.write_text(yaml.safe_dump(reg))
    registry = DatasetRegistryResource(path=str(reg_path))
    d = defs()
    resources = {**d.resources, "duckdb": RLHNDuckDB(database=str(db_path)), "registry": registry}
    d = dg.Definitions(
        assets=d.assets, asset_checks=d.asset_checks, schedules=d.schedules, jobs=d.jobs, resources=resources
    )
    assert nightly_backfill.default_status == dg.DefaultScheduleStatus.STOPPED
    assert nightly_backfill.cron_schedule == "0 2 * * *"

    from rlhn_assets.defs.sources.assets import raw_dataset_files as source

    observe([source], instance=instance, resources={"registry": registry})
    sel = dg.AssetSelection.assets(*PER_DATASET_ASSETS) | dg.AssetSelection.checks_for_assets(*PER_DATASET_ASSETS)
    all_assets = list(d.assets) + list(d.asset_checks)

    def materialize(ds):
        assert dg.materialize(
            all_assets, selection=sel, partition_key=ds, resources=resources, instance=instance
        ).success

    # One dataset materialized, the others never: one run per missing dataset, with all seven assets.
    materialize("fiqa")
    expected_all = sorted(PER_DATASET_ASSETS)
    assert _requests(d, instance) == {ds: expected_all for ds in DATASETS if ds != "fiqa"}

    # A partial partition: only the missing assets of that dataset.
    assert dg.materialize(
        all_assets,
        selection=dg.AssetSelection.assets("hard_negative_mining", "raw_bge"),
        partition_key="nq",
        resources=resources,
        instance=instance,
    ).success
    got = _requests(d, instance)
    assert got["nq"] == sorted(
        ["pruned", "tier1_judgments", "judging_cost_estimate", "tier2_judgments", "teacher_scores"]
    )

    # A dataset with a run in progress is left alone.
    instance.add_run(
        dg.DagsterRun(
            job_name="some_job",
            run_id=str(uuid.uuid4()),
            status=dg.DagsterRunStatus.STARTED,
            tags={"dagster/partition": "nq"},
        )
    )
    assert "nq" not in _requests(d, instance)

    # Everything materialized: nothing to do.
    for ds in DATASETS:
        if ds != "fiqa":
            materialize(ds)
    assert "materialized and fresh" in _requests(d, instance)

    # fiqa's file changes (drop its last row) and the source is observed: only fiqa, every asset (stale
    # propagates from hard_negative_mining down).
    path = tmp_data / "raw" / "fiqa" / "rlhn_judge_sample.jsonl.gz"
    lines = gzip.open(path, "rt").read().splitlines(True)
    with gzip.open(path, "wt") as f:
        f.writelines(lines[:-1])
    observe([source], instance=instance, resources={"registry": registry})
    assert _requests(d, instance) == {"fiqa": expected_all}
    materialize("fiqa")
    assert isinstance(_requests(d, instance), str)


def test_schedule_is_in_the_code_location():
    d = defs()
    assert d.get_schedule_def("nightly_backfill").job_name == "nightly_backfill_job"
    job = d.resolve_job_def("nightly_backfill_job")
    assert job.partitions_def is not None and set(job.partitions_def.get_partition_keys()) == set(DATASETS)
