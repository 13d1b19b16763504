"""raw_bge / pruned as Dagster assets: in-process materializations, metadata and asset checks."""

import json

import dagster as dg
import duckdb
import pytest
import yaml

from rlhn_assets.definitions import defs
from rlhn_assets.resources import DatasetRegistryResource
from rlhn_assets_tests.conftest import make_resources

INGEST_KEYS = ("hard_negative_mining", "raw_bge", "pruned")
INGEST = dg.AssetSelection.assets(*INGEST_KEYS) | dg.AssetSelection.checks_for_assets(*INGEST_KEYS)


@pytest.fixture(scope="module")
def definitions():
    return defs()


def _materialize(definitions, partition, resources, instance, selection=INGEST):
    d = definitions
    return dg.materialize(
        list(d.assets) + list(d.asset_checks),
        selection=selection,
        partition_key=partition,
        resources=resources,
        instance=instance,
        raise_on_error=False,
    )


def _checks(result):
    return {e.check_name: e.passed for e in result.get_asset_check_evaluations()}


def test_defs_load_and_partitions_come_from_the_registry(definitions):
    dg.Definitions.validate_loadable(definitions)
    raw = definitions.resolve_assets_def("raw_bge")
    assert set(raw.partitions_def.get_partition_keys()) == {"msmarco_passage", "fiqa", "nq", "scifact"}


@pytest.mark.parametrize("partition", ["msmarco_passage", "fiqa", "nq"])
def test_sample_partitions_materialize_with_checks_passing(definitions, resources, instance, db_path, partition):
    result = _materialize(definitions, partition, resources, instance)
    assert result.success
    checks = _checks(result)
    assert len(checks) == 8 and all(checks.values()), checks
    md = result.asset_materializations_for_node("raw_bge")[0].metadata
    for key in (
        "instances",
        "passages",
        "positives_per_query_mean",
        "negatives_per_query_mean",
        "passage_length_chars",
        "quarantine_by_reason",
        "preview",
    ):
        assert key in md
    assert "| instance_id |" in md["preview"].value
    pruned_md = result.asset_materializations_for_node("pruned")[0].metadata
    assert pruned_md["kept"].value is True and pruned_md["decided_by"].value == "default"


def test_two_partitions_side_by_side_and_rematerialize_replaces(definitions, resources, instance, db_path):
    for p in ("fiqa", "nq", "fiqa"):
        assert _materialize(definitions, p, resources, instance).success
    with duckdb.connect(str(db_path), read_only=True) as c:
        assert c.execute("SELECT dataset, count(*) FROM raw_instances GROUP BY 1 ORDER BY 1").fetchall() == [
            ("fiqa", 25),
            ("nq", 10),
        ]
        assert c.execute("SELECT dataset, count(*) FROM pruned_instances GROUP BY 1 ORDER BY 1").fetchall() == [
            ("fiqa", 25),
            ("nq", 10),
        ]
    assert instance.get_materialized_partitions(dg.AssetKey("raw_bge")) == {"fiqa", "nq"}


def _edited_registry(tmp_data, edit):
    reg_path = tmp_data / "datasets.yaml"
    doc = yaml.safe_load(reg_path.read_text())
    edit(doc["datasets"])
    reg_path.write_text(yaml.safe_dump(doc))
    return DatasetRegistryResource(path=str(reg_path))


def test_checks_fail_on_planted_bad_data(definitions, instance, db_path, tmp_data):
    # 'nq' now points at a file where most rows are broken: the quarantine-rate check (blocking) fails,
    # and pruned is not materialized.
    bad = tmp_data / "raw" / "nq" / "bad.jsonl"
    good = '{"query": "q%d", "pos": ["p%d"], "neg": ["n%d"]}'
    bad.write_text("\n".join([good % (i, i, i) for i in range(3)] + ["{broken"] * 5) + "\n")
    registry = _edited_registry(tmp_data, lambda d: d["nq"].update(files=[{"path": "raw/nq/bad.jsonl"}]))
    result = _materialize(definitions, "nq", make_resources(db_path, registry), instance)
    assert not result.success
    checks = _checks(result)
    assert checks["raw_bge_quarantine_rate"] is False
    assert checks["raw_bge_every_instance_has_a_positive"] is True
    assert not result.asset_materializations_for_node("pruned")


def test_invariant_checks_fail_when_the_table_is_corrupted(definitions, resources, instance, db_path):
    assert _materialize(definitions, "fiqa", resources, instance).success
    with duckdb.connect(str(db_path)) as c:  # plant violations behind the stage's back
        c.execute("UPDATE raw_instances SET positive_ids = [] WHERE line_no = 1")
        c.execute(
            "UPDATE raw_instances SET negative_ids = list_append(negative_ids, positive_ids[1]) WHERE line_no = 2"
        )
        c.execute("INSERT INTO raw_instances SELECT * FROM raw_instances WHERE line_no = 3")
    # The checks-only job, bound to the test's resources; checks are per partition (the partition tag).
    job = dg.Definitions(
        assets=definitions.assets, asset_checks=definitions.asset_checks, jobs=definitions.jobs, resources=resources
    ).resolve_job_def("dataset_checks_job")
    result = job.execute_in_process(tags={"dagster/partition": "fiqa"}, instance=instance, raise_on_error=False)
    checks = {k: v for k, v in _checks(result).items() if k.startswith("raw_bge")}
    assert checks == {
        "raw_bge_every_instance_has_a_positive": False,
        "raw_bge_unique_ids": False,
        "raw_bge_no_passage_both_positive_and_negative": False,
        "raw_bge_quarantine_rate": True,
    }


def test_pruned_away_dataset_is_an_empty_partition_that_says_why(definitions, instance, db_path, tmp_data):
    # A leave-one-out recommendation prunes nq and fiqa; a manual keep: true on fiqa wins.
    (tmp_data / "pruning").mkdir(exist_ok=True)  # a data dir a demo ran in already has it
    (tmp_data / "pruning" / "recommendation.json").write_text(
        json.dumps(
            {
                "rule": "prune when leaving it out raises the average",
                "datasets": {"nq": {"keep": False, "reason": "w/o nq: avg +0.6"}, "fiqa": {"keep": False}},
            }
        )
    )
    registry = _edited_registry(tmp_data, lambda d: d["fiqa"].update(keep=True))
    res = make_resources(db_path, registry)
    nq = _materialize(definitions, "nq", res, instance)
    fiqa = _materialize(definitions, "fiqa", res, instance)
    assert nq.success and fiqa.success
    md = nq.asset_materializations_for_node("pruned")[0].metadata
    assert md["kept"].value is False and md["instances"].value == 0
    assert md["decided_by"].value == "recommendation" and "avg +0.6" in md["decision_reason"].value
    md = fiqa.asset_materializations_for_node("pruned")[0].metadata
    assert md["kept"].value is True and md["decided_by"].value == "manual" and md["instances"].value == 25


def test_pruning_cleans_duplicates_overlaps_and_caps(definitions, instance, db_path, tmp_data):
    rows = [
        {
            "query_id": "a",
            "query": "qa",
            "positive_passages": [{"docid": "p", "text": "P"}],
            "negative_passages": [{"docid": f"n{i}", "text": f"N{i}"} for i in range(5)],
        },
    ]
    f = tmp_data / "raw" / "nq" / "dups.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows + rows) + "\n")  # exact duplicate instance
    registry = _edited_registry(tmp_data, lambda d: d["nq"].update(files=[{"path": "raw/nq/dups.jsonl"}]))
    result = dg.materialize(
        list(definitions.assets) + list(definitions.asset_checks),
        selection=INGEST,
        partition_key="nq",
        instance=instance,
        raise_on_error=False,
        resources=make_resources(db_path, registry),
        run_config={"ops": {"pruned": {"config": {"max_negatives_per_instance": 3}}}},
    )
    assert result.success
    md = result.asset_materializations_for_node("pruned")[0].metadata
    assert md["duplicates_removed"].value == 1 and md["capped_negatives_removed"].value == 2
    with duckdb.connect(str(db_path), read_only=True) as c:
        assert c.execute("SELECT negative_ids FROM pruned_instances").fetchall() == [(["n0", "n1", "n2"],)]


def test_single_run_backfill_of_pruned_over_a_range_runs_its_checks_for_every_dataset(
    definitions, resources, instance, db_path
):
    # `pruned` has a single-run backfill policy: one run covers a partition range (here fiqa..nq in registry
    # order), and its per-partition checks must evaluate every dataset of the range, not just one.
    for p in ("fiqa", "nq"):
        assert _materialize(definitions, p, resources, instance, selection=["raw_bge"]).success
    sel = dg.AssetSelection.assets("pruned") | dg.AssetSelection.checks_for_assets("pruned")
    result = dg.materialize(
        list(definitions.assets) + list(definitions.asset_checks),
        selection=sel,
        resources=resources,
        instance=instance,
        tags={"dagster/asset_partition_range_start": "fiqa", "dagster/asset_partition_range_end": "nq"},
    )
    assert result.success
    evals = result.get_asset_check_evaluations()
    assert evals and all(e.passed for e in evals)
    decision = next(e for e in evals if e.check_name == "pruned_decision_applied")
    assert "fiqa" in decision.description and "nq" in decision.description
    assert instance.get_materialized_partitions(dg.AssetKey("pruned")) == {"fiqa", "nq"}
