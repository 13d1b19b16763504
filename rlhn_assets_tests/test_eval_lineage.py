"""Evaluation follows the model it evaluates: eval_scores[<eval set>|<model>] depends on that model only
(eval_model[<model>] <- trained_retriever/trained_reranker[<variant>], or base_retriever[base]), so retraining one
variant makes only that variant's evaluations stale, and eval loads the files the upstream materialization
recorded, not the model store's latest.json. No training: upstream materializations are reported as runless
events with the real asset keys."""

import json

import dagster as dg
import pytest

# Not public API: the resolver behind the UI's Stale badges (rlhn_assets/defs/schedules.py uses it too).
from dagster._core.asset_graph_view.asset_graph_view import AssetGraphView, TemporalContext
from dagster._core.definitions.asset_checks.asset_check_evaluation import (
    AssetCheckEvaluationTargetMaterializationData,
)
from dagster._core.definitions.data_version import CachingStaleStatusResolver, StaleStatus
from dagster._core.events import DagsterEvent, DagsterEventType
from dagster._core.instance.utils import RUNLESS_JOB_NAME
from dagster._core.utils import make_new_run_id
from dagster._time import get_current_datetime

from rlhn_assets.definitions import defs
from rlhn_assets.partitions import EVAL_SETS, MODELS
from rlhn_assets.resources import BaseModelsResource, RLHNDuckDB
from rlhn_assets_tests.conftest import DATA, tiny_beir_copy

MODEL_ASSETS = ("base_retriever", "trained_retriever", "trained_reranker")
RETRAINED = "s2_rlhn"


@pytest.fixture(scope="module")
def graph():
    return defs().resolve_asset_graph()


def _model_ancestors(graph, key: dg.AssetKey, partition: str) -> set[tuple[str, str]]:
    """The partitions of the model assets that ``key[partition]`` depends on, through any number of hops;
    asserts along the way that no partition maps to an upstream partition that does not exist."""
    found, frontier = set(), [(key, partition)]
    while frontier:
        k, p = frontier.pop()
        parents = graph.get_parents_partitions(k, p)
        assert not parents.required_but_nonexistent_parents_partitions, (k, p)
        for parent in parents.parent_partitions:
            name = parent.asset_key.to_user_string()
            if name in MODEL_ASSETS:
                found.add((name, parent.partition_key))
            elif name == "eval_model":
                frontier.append((parent.asset_key, parent.partition_key))
    return found


def test_each_eval_partition_depends_on_its_own_model_only(graph):
    for pk in graph.get(dg.AssetKey("eval_scores")).partitions_def.get_partition_keys():
        model = pk.keys_by_dimension["model"]
        expected = (
            {("base_retriever", "base")}
            if model == "base"
            else {("trained_retriever", model), ("trained_reranker", model)}
        )
        assert _model_ancestors(graph, dg.AssetKey("eval_scores"), pk) == expected, pk
    # and downstream: one variant's training feeds exactly that variant's evaluations
    children = graph.get_child_partition_keys_of_parent(
        RETRAINED, dg.AssetKey("trained_retriever"), dg.AssetKey("eval_model")
    )
    assert children == [RETRAINED]


# The trained models' blocking checks (defs/train/checks.py) gate eval_model: a retrained model counts once its
# check passed on that materialization, so each reported training comes with a passed check, as a real run records.
# Reported under a fresh run id each (not public API): runless check evaluations all share run id "", and the check
# store keeps one row per (check, run, partition).
BLOCKING_CHECKS = {
    "trained_retriever": "trained_retriever_loads_and_scores",
    "trained_reranker": "trained_reranker_loads_and_scores",
}


def _report(instance, name: str, partition: str, **metadata):
    key = dg.AssetKey(name)
    instance.report_runless_asset_event(dg.AssetMaterialization(key, partition=partition, metadata=metadata))
    if name in BLOCKING_CHECKS:
        [record] = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=key, asset_partitions=[partition]), limit=1
        ).records
        evaluation = dg.AssetCheckEvaluation(
            asset_key=key,
            check_name=BLOCKING_CHECKS[name],
            passed=True,
            partition=partition,
            target_materialization_data=AssetCheckEvaluationTargetMaterializationData(
                storage_id=record.storage_id, run_id=record.run_id, timestamp=record.timestamp
            ),
        )
        instance.report_dagster_event(
            DagsterEvent(
                event_type_value=DagsterEventType.ASSET_CHECK_EVALUATION.value,
                job_name=RUNLESS_JOB_NAME,
                event_specific_data=evaluation,
            ),
            run_id=make_new_run_id(),
        )


def _stale(instance, graph, name: str) -> set[str]:
    view = AssetGraphView(
        temporal_context=TemporalContext(effective_dt=get_current_datetime(), last_event_id=None),
        instance=instance,
        asset_graph=graph,
    )
    resolver = CachingStaleStatusResolver(instance, graph, loading_context=view)
    key = dg.AssetKey(name)
    return {
        str(p)
        for p in graph.get(key).partitions_def.get_partition_keys()
        if resolver.get_status(key, p) == StaleStatus.STALE
    }


def test_retraining_one_variant_stales_only_that_variants_evaluations(graph, instance):
    # Everything materialized once, in graph order.
    for name in ("base_retriever", "trained_retriever", "trained_reranker", "eval_model", "eval_scores"):
        for p in graph.get(dg.AssetKey(name)).partitions_def.get_partition_keys():
            _report(instance, name, p)
    n_eval = len(EVAL_SETS) * len(MODELS)
    # 3 eval sets x (base + 9 variants)
    assert n_eval == 3 * 10 and not _stale(instance, graph, "eval_model") and not _stale(instance, graph, "eval_scores")
    d = defs()
    tick = dg.evaluate_automation_conditions(defs=d, instance=instance)  # the first tick only sets the cursor

    # Retrain one variant: only its eval_model partition is stale (Dagster marks direct children only) ...
    _report(instance, "trained_retriever", RETRAINED)
    _report(instance, "trained_reranker", RETRAINED)
    assert _stale(instance, graph, "eval_model") == {RETRAINED}
    assert _stale(instance, graph, "eval_scores") == set()  # before the fix: all 30, `base` included
    # ... and the automation sensor's next tick re-pins that model, nothing else (eval_scores cannot join that
    # run: another partitions definition) ...
    tick = dg.evaluate_automation_conditions(defs=d, instance=instance, cursor=tick.cursor)
    assert tick.get_requested_partitions(dg.AssetKey("eval_model")) == {RETRAINED}
    assert not tick.get_requested_partitions(dg.AssetKey("eval_scores"))

    # ... then its evaluations (3 of 30) are stale, and the tick after re-evaluates exactly those.
    _report(instance, "eval_model", RETRAINED)
    assert _stale(instance, graph, "eval_scores") == {f"{e}|{RETRAINED}" for e in EVAL_SETS}
    tick = dg.evaluate_automation_conditions(defs=d, instance=instance, cursor=tick.cursor)
    assert {str(p) for p in tick.get_requested_partitions(dg.AssetKey("eval_scores"))} == {
        f"{e}|{RETRAINED}" for e in EVAL_SETS
    }

    # The model=base partitions follow base_retriever, and only it.
    for p in graph.get(dg.AssetKey("eval_scores")).partitions_def.get_partition_keys():
        _report(instance, "eval_scores", p)
    _report(instance, "base_retriever", "base")
    assert _stale(instance, graph, "eval_model") == {"base"}
    _report(instance, "eval_model", "base")
    assert _stale(instance, graph, "eval_scores") == {f"{e}|base" for e in EVAL_SETS}


class _FakeRetriever:
    max_seq_length = 256


class _FakeCrossEncoder:
    def predict(self, pairs, **kwargs):
        return [float(len(p)) for _, p in pairs]


def test_eval_loads_the_model_recorded_by_the_upstream_materialization(tmp_path, db_path, instance, monkeypatch):
    from rlhn_assets.defs.evaluate.assets import eval_model, eval_scores
    from rlhn_assets.lib import embeddings, evaluation

    data = tmp_path / "data"
    tiny_beir_copy(DATA / "eval" / "cisi", data / "eval" / "cisi", queries=3, extra_docs=5)
    monkeypatch.setenv("RLHN_DATA_DIR", str(data))
    monkeypatch.setenv("RLHN_CACHE_DIR", str(tmp_path / "cache"))
    recorded = {}
    for kind in ("retriever", "reranker"):
        # the model store's pointer names a newer folder (another training since): eval must not follow it
        decoy = data / "models" / kind / RETRAINED / "decoy"
        decoy.mkdir(parents=True)
        (decoy.parent / "latest.json").write_text(json.dumps({"path": str(decoy), "data_version": "d" * 64}))
        recorded[kind] = (tmp_path / "recorded" / kind, kind[:2] * 8)
        recorded[kind][0].mkdir(parents=True)

    ds = evaluation.load_beir_eval(data / "eval" / "cisi")
    loaded = []
    monkeypatch.setattr(
        embeddings, "load_model", lambda path=None, device=None: loaded.append(str(path)) or _FakeRetriever()
    )
    monkeypatch.setattr(
        embeddings, "load_cross_encoder", lambda path, device=None: loaded.append(str(path)) or _FakeCrossEncoder()
    )
    monkeypatch.setattr(
        evaluation,
        "dense_search",
        lambda model, version, ds_, **kw: (
            {q: {d: 1.0 / (i + 1) for i, d in enumerate(ds.corpus)} for q in ds.queries},
            {},
        ),
    )
    resources = {"duckdb": RLHNDuckDB(database=str(db_path)), "base_models": BaseModelsResource()}
    partition = dg.MultiPartitionKey({"eval_set": "cisi", "model": RETRAINED})

    # Without upstream materializations: a Failure that names what to materialize.
    result = dg.materialize([eval_model], partition_key=RETRAINED, instance=instance, raise_on_error=False)
    assert not result.success
    assert f"materialize trained_retriever[{RETRAINED}] first" in str(
        result.get_step_failure_events()[0].event_specific_data.error
    )
    result = dg.materialize(
        [eval_scores], partition_key=partition, instance=instance, resources=resources, raise_on_error=False
    )
    assert f"materialize eval_model[{RETRAINED}] first" in str(
        result.get_step_failure_events()[0].event_specific_data.error
    )

    for kind, (path, version) in recorded.items():
        _report(
            instance,
            f"trained_{kind}",
            RETRAINED,
            models=dg.MetadataValue.json([{"seed": 13, "path": str(path), "version": version}]),
        )
    assert dg.materialize([eval_model], partition_key=RETRAINED, instance=instance).success
    assert dg.materialize([eval_scores], partition_key=partition, instance=instance, resources=resources).success

    assert loaded == [str(recorded["retriever"][0]), str(recorded["reranker"][0])]
    with resources["duckdb"].get_connection() as conn:
        rows = conn.execute(
            "SELECT stage, model_version, queries_scored, seed FROM eval_scores ORDER BY stage"
        ).fetchall()
    assert rows == [("reranker", recorded["reranker"][1], 3, 13), ("retriever", recorded["retriever"][1], 3, 13)]
