"""The checks-only jobs: which checks they hold, and that running one re-runs checks and materializes nothing."""

import dagster as dg
import duckdb
import pytest

from rlhn_assets.definitions import defs
from rlhn_assets.lib.schema import apply_schema
from rlhn_assets.partitions import dataset_pd, dataset_variant_pd

JOBS = {"dataset_checks_job": dataset_pd, "dataset_variant_checks_job": dataset_variant_pd}


@pytest.fixture(scope="module")
def definitions():
    return defs()


def _job_checks(definitions, name):
    return set(definitions.resolve_job_def(name).asset_layer.asset_graph.asset_check_keys)


def _checks_of_assets_partitioned_by(definitions, partitions_def):
    graph = definitions.resolve_asset_graph()
    return {k for k in graph.asset_check_keys if graph.get(k.asset_key).partitions_def == partitions_def}


@pytest.mark.parametrize("name", JOBS)
def test_checks_job_holds_every_check_of_its_partitioning_and_no_asset(definitions, name):
    job = definitions.resolve_job_def(name)
    expected = _checks_of_assets_partitioned_by(definitions, JOBS[name])
    assert _job_checks(definitions, name) == expected
    assert not job.asset_layer.selected_asset_keys  # checks only
    assert job.partitions_def == JOBS[name]  # a partition picker in the UI, and typed keys


def test_the_two_jobs_cover_every_per_dataset_stage(definitions):
    per_dataset = _job_checks(definitions, "dataset_checks_job")
    assert {k.asset_key.to_user_string() for k in per_dataset} >= {
        "raw_bge",
        "pruned",
        "tier1_judgments",
        "tier2_judgments",
    }
    assert {
        "tier1_every_negative_judged_once",
        "tier1_error_rate",
        "tier2_covers_exactly_the_forwarded",
        "tier2_error_rate",
    } <= {k.name for k in per_dataset}
    assert {k.name for k in _job_checks(definitions, "dataset_variant_checks_job")} == {"relabeled_invariants"}
    # every check of an asset partitioned by dataset (alone or with the variant) is in one of the two jobs
    graph = definitions.resolve_asset_graph()
    dataset_checks = {
        k for k in graph.asset_check_keys if "dataset" in _dimensions(graph.get(k.asset_key).partitions_def)
    }
    assert dataset_checks == per_dataset | _job_checks(definitions, "dataset_variant_checks_job")


def _dimensions(pd) -> set[str]:
    if isinstance(pd, dg.MultiPartitionsDefinition):
        return {d.name for d in pd.partitions_defs}
    return {"dataset"} if pd == dataset_pd else set()


def _bound(definitions, resources):
    return dg.Definitions(
        assets=definitions.assets, asset_checks=definitions.asset_checks, jobs=definitions.jobs, resources=resources
    )


def test_one_run_of_the_checks_job_runs_every_check_and_materializes_nothing(definitions, resources, instance, db_path):
    # Real ingest + the cost estimate for fiqa; tier-1 verdicts planted for every negative but one, teacher scores
    # for every pair.
    upstream = ["hard_negative_mining", "raw_bge", "pruned", "judging_cost_estimate"]
    assert dg.materialize(
        list(definitions.assets), selection=upstream, partition_key="fiqa", resources=resources, instance=instance
    ).success
    with duckdb.connect(str(db_path)) as c:
        apply_schema(c)
        c.execute("""INSERT INTO judgments (dataset, tier, instance_id, docid, neg_index, verdict)
                     SELECT dataset, 1, instance_id, unnest(negative_ids), generate_subscripts(negative_ids, 1),
                            'not_relevant' FROM pruned_instances WHERE dataset = 'fiqa'""")
        c.execute(
            "DELETE FROM judgments WHERE (instance_id, neg_index) IN "
            "(SELECT instance_id, neg_index FROM judgments ORDER BY ALL LIMIT 1)"
        )
        # teacher scores for every pruned pair (teacher_scores_complete passes)
        c.execute("""INSERT INTO teacher_scores (dataset, instance_id, docid, role, neg_index, score, teacher)
                     SELECT dataset, instance_id, unnest(positive_ids), 'pos', NULL, 0.5, 'planted'
                     FROM pruned_instances WHERE dataset = 'fiqa'
                     UNION ALL
                     SELECT dataset, instance_id, unnest(negative_ids), 'neg', generate_subscripts(negative_ids, 1),
                            0.25, 'planted' FROM pruned_instances WHERE dataset = 'fiqa'""")
    before = {k: instance.get_latest_materialization_event(dg.AssetKey(k)).run_id for k in upstream}

    bound = _bound(definitions, resources)
    result = bound.resolve_job_def("dataset_checks_job").execute_in_process(
        partition_key="fiqa", instance=instance, raise_on_error=False
    )

    evaluations = result.get_asset_check_evaluations()
    assert {e.asset_check_key for e in evaluations} == _job_checks(definitions, "dataset_checks_job")
    assert all(e.partition == "fiqa" for e in evaluations)
    failed = {e.check_name for e in evaluations if not e.passed}
    assert failed == {"tier1_every_negative_judged_once"}  # the planted gap, and nothing else
    assert not result.get_asset_materialization_events()
    assert {k: instance.get_latest_materialization_event(dg.AssetKey(k)).run_id for k in upstream} == before


def test_one_run_of_the_variant_checks_job_runs_the_relabel_check(definitions, resources, instance, db_path):
    assert dg.materialize(
        list(definitions.assets),
        selection=["hard_negative_mining", "raw_bge", "pruned"],
        partition_key="fiqa",
        resources=resources,
        instance=instance,
    ).success
    with duckdb.connect(str(db_path)) as c:  # the `default` variant is the pruned data unchanged
        apply_schema(c)
        c.execute("""INSERT INTO relabeled_instances SELECT dataset, 'default', instance_id, query_id, positive_ids,
                     negative_ids, 0 FROM pruned_instances WHERE dataset = 'fiqa'""")
    result = (
        _bound(definitions, resources)
        .resolve_job_def("dataset_variant_checks_job")
        .execute_in_process(partition_key="fiqa|default", instance=instance, raise_on_error=False)
    )
    evaluations = result.get_asset_check_evaluations()
    assert [(e.check_name, e.partition, e.passed) for e in evaluations] == [
        ("relabeled_invariants", "fiqa|default", True)
    ]
    assert not result.get_asset_materialization_events()
