"""Leave-one-dataset-out pruning: the rule on the paper's Table 12, the recommendation feeding `pruned` (a manual
keep: wins), the data version of only the affected partition changing, and the asset end to end."""

import json

import dagster as dg
import pytest
import yaml

from rlhn_assets.lib import leave_one_out as loo
from rlhn_assets.lib.db import connect
from rlhn_assets.lib.fingerprint import dataset_fingerprint
from rlhn_assets.registry import load_registry
from rlhn_assets_tests.conftest import make_resources, tiny_beir_copy

# The paper's Table 12 (E5-base, 14 BEIR sets): Avg14 of ALL and of each "w/o X", the in-domain cell(s) of
# the datasets that have a BEIR counterpart (ALL value, w/o value), and the paper's keep decision.
PAPER_ALL_AVG = 0.519
PAPER_TABLE12 = {
    # dataset: (avg without it, {in-domain eval set: (ALL, without)}, paper keeps it)
    "eli5": (0.525, {}, False),
    "fever": (0.505, {"fever": (0.871, 0.787)}, True),
    "hotpotqa": (0.511, {"hotpotqa": (0.726, 0.642)}, True),
    "msmarco_document": (0.520, {}, False),
    "stackoverflow_dup": (0.517, {}, False),
    "triviaqa": (0.520, {}, False),
    "nli": (0.518, {}, False),
    "squad": (0.518, {}, False),
    "arguana": (0.506, {"arguana": (0.652, 0.434)}, True),
    "fiqa": (0.517, {"fiqa": (0.444, 0.428)}, True),
    "msmarco_passage": (0.508, {}, True),
    "nq": (0.517, {"nq": (0.595, 0.553)}, True),
    "quora": (0.522, {}, False),
    "scidocsrr": (0.518, {"scidocs": (0.233, 0.201)}, True),
    "sts": (0.517, {}, False),
}


def test_rule_reproduces_every_decision_of_the_papers_table12():
    # Two pseudo eval sets per dataset: its in-domain set (if any) and "rest", chosen so the average equals the
    # paper's Avg14 (the rule only sees the average and the in-domain deltas).
    decisions = {}
    for ds, (avg_without, own, _) in PAPER_TABLE12.items():
        sets = list(own) + ["rest"]
        all_scores = {e: v[0] for e, v in own.items()}
        without = {e: v[1] for e, v in own.items()}
        all_scores["rest"] = PAPER_ALL_AVG * len(sets) - sum(all_scores[e] for e in own)
        without["rest"] = avg_without * len(sets) - sum(without[e] for e in own)
        (row,) = loo.recommend(all_scores, {ds: without}, sets, {ds: list(own)}, {ds: 1}, loo.PruningRule())
        decisions[ds] = row.keep
    assert decisions == {ds: keep for ds, (_, _, keep) in PAPER_TABLE12.items()}


def test_rule_reasons_counts_and_document_shape():
    all_scores = {"a": 0.50, "b": 0.40}
    without = {
        "x": {"a": 0.52, "b": 0.41},  # better everywhere -> prune
        "y": {"a": 0.45, "b": 0.40},  # average -2.5 points -> keep
        "z": {"a": 0.53, "b": 0.385},
    }  # average +0.75 but in-domain b -1.5 -> keep
    rows = loo.recommend(all_scores, without, ["a", "b"], {"z": ["b"]}, {"x": 10, "y": 11, "z": 12}, loo.PruningRule())
    by = {r.dataset: r for r in rows}
    assert [by[d].keep for d in "xyz"] == [False, True, True]
    assert by["x"].up_1pt == 1 and by["x"].down_1pt == 0 and by["y"].down_1pt == 1
    assert "in-domain" in by["z"].reason and "b by 1.5" in by["z"].reason
    doc = loo.recommendation_doc(rows, loo.PruningRule(), {"seed": 13})
    assert doc["datasets"]["x"]["keep"] is False and doc["rule"].startswith("prune when")
    md = loo.to_markdown(["a", "b"], None, all_scores, 33, rows, loo.PruningRule())
    assert "| w/o x (10) |" in md and "**no**" in md and "ALL (33)" in md
    with pytest.raises(ValueError, match="no score for eval sets"):
        loo.recommend(all_scores, {"x": {"a": 0.5}}, ["a", "b"], {}, {}, loo.PruningRule())


def _materialize(keys, partition, resources, instance, config=None):
    from rlhn_assets.definitions import defs

    d = defs()
    sel = dg.AssetSelection.assets(*keys) | dg.AssetSelection.checks_for_assets(*keys)
    result = dg.materialize(
        list(d.assets) + list(d.asset_checks),
        selection=sel,
        partition_key=partition,
        resources=resources,
        instance=instance,
        run_config=config,
    )
    assert result.success
    return result


def test_recommendation_feeds_pruned_and_a_manual_keep_wins(tmp_data, db_path, instance, monkeypatch):
    from rlhn_assets.resources import DatasetRegistryResource

    monkeypatch.setenv("RLHN_DATA_DIR", str(tmp_data))
    reg_path = tmp_data / "datasets.yaml"
    resources = make_resources(db_path, DatasetRegistryResource(path=str(reg_path)))
    before = {n: dataset_fingerprint(load_registry(reg_path), n) for n in ("fiqa", "nq")}
    (tmp_data / "pruning").mkdir(exist_ok=True)
    (tmp_data / "pruning" / "recommendation.json").write_text(
        json.dumps({"rule": "test rule", "datasets": {"fiqa": {"keep": False, "reason": "left out it helps"}}})
    )
    after = {n: dataset_fingerprint(load_registry(reg_path), n) for n in ("fiqa", "nq")}
    assert after["fiqa"] != before["fiqa"] and after["nq"] == before["nq"]  # only fiqa's partitions re-run

    _materialize(["raw_bge", "pruned"], "fiqa", resources, instance)
    with connect(db_path, read_only=True) as conn:
        kept, by = conn.execute("SELECT kept, decided_by FROM pruned_decisions WHERE dataset='fiqa'").fetchall()[0]
        n = conn.execute("SELECT count(*) FROM pruned_instances WHERE dataset='fiqa'").fetchall()[0][0]
    assert (kept, by, n) == (False, "recommendation", 0)

    reg = yaml.safe_load(reg_path.read_text())
    reg["datasets"]["fiqa"]["keep"] = True
    reg_path.write_text(yaml.safe_dump(reg))
    _materialize(["pruned"], "fiqa", resources, instance)
    with connect(db_path, read_only=True) as conn:
        kept, by = conn.execute("SELECT kept, decided_by FROM pruned_decisions WHERE dataset='fiqa'").fetchall()[0]
        n = conn.execute("SELECT count(*) FROM pruned_instances WHERE dataset='fiqa'").fetchall()[0][0]
    assert (kept, by) == (True, "manual") and n == 25


@pytest.mark.slow
def test_dataset_pruning_asset_trains_leave_one_out_models_and_writes_the_recommendation(
    tmp_data, db_path, instance, monkeypatch, tmp_path
):
    from rlhn_assets.resources import DatasetRegistryResource

    monkeypatch.setenv("RLHN_DATA_DIR", str(tmp_data))
    monkeypatch.setenv("RLHN_CACHE_DIR", str(tmp_path / "cache"))
    tiny_beir_copy(tmp_data / "eval" / "cranfield", tmp_data / "eval" / "tiny")
    resources = make_resources(db_path, DatasetRegistryResource(path=str(tmp_data / "datasets.yaml")))
    for ds in ("msmarco_passage", "fiqa", "nq"):
        _materialize(["raw_bge"], ds, resources, instance)
    config = {
        "ops": {
            "dataset_pruning": {
                "config": {
                    "train": {"max_steps": 2, "batch_size": 4, "hard_negatives": 2, "max_seq_length": 32},
                    "eval_sets": ["tiny"],
                    "eval_max_seq_length": 64,
                    "max_instances_per_dataset": 6,
                }
            }
        }
    }
    result = _materialize(["dataset_pruning"], None, resources, instance, config)
    md = result.asset_materializations_for_node("dataset_pruning")[0].metadata
    assert md["models_trained"].value == 4  # ALL + 3 leave-one-out
    table = md["leave_one_out"].value
    for ds in ("msmarco_passage", "fiqa", "nq"):
        assert f"| w/o {ds} (12) |" in table  # 2 datasets x 6 instances
    assert "ALL (18)" in table and "base model (0)" in table
    doc = json.loads((tmp_data / "pruning" / "recommendation.json").read_text())
    assert set(doc["datasets"]) == {"msmarco_passage", "fiqa", "nq"}
    assert doc["provenance"]["max_instances_per_dataset"] == 6
    assert (tmp_data / "pruning" / "leave_one_out.csv").read_text().count("\n") == 5

    def model_folders():  # the study's models live in the shared model store (lib/model_store.py)
        return sorted(
            str(p.relative_to(tmp_data))
            for p in (tmp_data / "models" / "retriever").glob("leave-one-out-*/seed-*/*")
            if p.name != "inputs"
        )

    trained = model_folders()
    assert len(trained) == 4
    # a re-run with unchanged data and settings trains nothing new and gives the same table
    again = _materialize(["dataset_pruning"], None, resources, instance, config)
    assert model_folders() == trained
    assert again.asset_materializations_for_node("dataset_pruning")[0].metadata["leave_one_out"].value == table
