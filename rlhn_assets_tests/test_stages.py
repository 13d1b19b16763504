"""The stage order of `make demo`, `make experiment` and the nightly schedule comes from the asset graph."""

import dagster as dg

from rlhn_assets import demo, experiment
from rlhn_assets.definitions import defs
from rlhn_assets.defs.schedules import PER_DATASET_ASSETS
from rlhn_assets.lib.relabel import VARIANTS
from rlhn_assets.partitions import BASE_MODEL, DATASETS, EVAL_SETS
from rlhn_assets.stages import graph_stages, per_dataset_assets


def _check_order(graph, plan, excluded):
    order = [k for keys, _ in plan for k in keys]
    materializable = {k.to_user_string() for k in graph.materializable_asset_keys}
    assert sorted(order) == sorted(materializable - set(excluded)), "every asset once, none left behind"
    stage_of = {k: i for i, (keys, _) in enumerate(plan) for k in keys}
    for k in order:
        for parent in graph.get(dg.AssetKey.from_user_string(k)).parent_keys:
            p = parent.to_user_string()
            if p in stage_of:
                assert stage_of[p] <= stage_of[k], f"{p} must run before {k}"
    for keys, _ in plan:  # a stage = one group and one partitions definition
        nodes = [graph.get(dg.AssetKey.from_user_string(k)) for k in keys]
        assert len({(n.group_name, id(n.partitions_def)) for n in nodes}) == 1, keys


def test_demo_stages_cover_the_graph_in_dependency_order():
    graph = defs().resolve_asset_graph()
    plan = demo.stages(("default", "s2_rlhn"))
    _check_order(graph, plan, demo.DEMO_EXCLUDED)
    by_first = {keys[0]: parts for keys, parts in plan}
    assert ["hard_negative_mining", "raw_bge", "pruned"] in [keys for keys, _ in plan]
    assert by_first["hard_negative_mining"] == list(DATASETS)
    assert sorted(by_first["trained_reranker"]) == ["default", "s2_rlhn"]
    assert sorted(by_first["eval_model"]) == sorted([BASE_MODEL, "default", "s2_rlhn"])
    assert len(by_first["eval_scores"]) == 3 * len(EVAL_SETS)
    assert len(by_first["relabeled"]) == len(DATASETS) * len(VARIANTS) == len(DATASETS) * 9  # all built, some trained
    assert by_first["teacher_scores"] == list(DATASETS)  # TopK-PercPos's teacher scores, before relabeled
    assert by_first["comparison_report"] == [None]


def test_experiment_plan_leaves_out_only_what_it_says():
    graph = defs().resolve_asset_graph()
    _check_order(graph, experiment.plan(), experiment.EXPERIMENT_EXCLUDED)


def test_schedule_selection_is_every_dataset_partitioned_asset():
    assert sorted(PER_DATASET_ASSETS) == sorted(per_dataset_assets(defs().resolve_asset_graph()))


def test_grouping_on_a_toy_graph():
    pd = dg.StaticPartitionsDefinition(["x", "y"])

    @dg.asset(partitions_def=pd, group_name="a")
    def a1(): ...

    @dg.asset(partitions_def=pd, group_name="a", deps=[a1])
    def a2(): ...

    @dg.asset(group_name="a", deps=[a1])
    def summary(): ...

    @dg.asset(partitions_def=pd, group_name="b", deps=[a2])
    def b1(): ...

    @dg.asset(group_name="b", deps=[b1, summary])
    def report(): ...

    graph = dg.Definitions(assets=[a1, a2, summary, b1, report]).resolve_asset_graph()
    plan = graph_stages(graph)
    assert plan[0] == (["a1", "a2"], ["x", "y"])
    assert {tuple(k) for k, _ in plan[1:3]} == {("summary",), ("b1",)}
    assert plan[-1] == (["report"], [None])
    assert graph_stages(graph, exclude=["summary"], keep_partition=lambda _pd, key: key == "x")[0] == (
        ["a1", "a2"],
        ["x"],
    )
