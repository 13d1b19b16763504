"""Seeds are part of a trained model's identity, and training resumes: trained_retriever[<variant>] trains one
model per seed (its own store folder, `trained_models` row and metadata entry), and a re-run with the same
inputs reuses the stored models instead of training again; changed inputs (data, settings) train anew."""

import json

import dagster as dg
import pytest

# imported before a test points RLHN_DATA_DIR at its temporary folder (the partitions read the bundled registry)
from rlhn_assets.defs.train.assets import trained_retriever
from rlhn_assets.lib import training
from rlhn_assets.lib.model_store import ModelStore, input_key
from rlhn_assets.lib.training import TrainingInstance
from rlhn_assets.resources import BaseModelsResource, RLHNDuckDB

TINY = {"max_steps": 1, "batch_size": 4, "max_seq_length": 32, "hard_negatives": 1}


def _seed_db(db_path, n=8, suffix=""):
    from rlhn_assets.lib.db import connect
    from rlhn_assets.lib.schema import apply_schema

    with connect(db_path) as conn:
        apply_schema(conn)
        conn.execute("DELETE FROM raw_queries; DELETE FROM raw_passages; DELETE FROM relabeled_instances")
        for i in range(n):
            conn.execute(
                "INSERT INTO raw_queries VALUES ('fiqa', ?, ?)", [f"q{i}", f"how do I file tax form {i}{suffix}"]
            )
            conn.execute("INSERT INTO raw_passages VALUES ('fiqa', ?, '', ?)", [f"p{i}", f"form {i} is filed in April"])
            conn.execute("INSERT INTO raw_passages VALUES ('fiqa', ?, '', ?)", [f"n{i}", f"unrelated passage {i}"])
            conn.execute(
                "INSERT INTO relabeled_instances VALUES ('fiqa', 'default', ?, ?, [?], [?], 0)",
                [f"i{i}", f"q{i}", f"p{i}", f"n{i}"],
            )


def _materialize(instance, db_path, seeds, **extra):
    # A fresh ephemeral instance per run: reuse must come from the model store on disk, not Dagster's history.
    # Entered (`with`), because resolving the job's Definitions reads the *current* defs-state storage (a context
    # variable that `DagsterInstance.__enter__` sets); in the full suite an earlier test can leave it pointing at a
    # storage whose instance was garbage-collected ("Attempted to resolve undefined DagsterInstance weakref").
    with dg.DagsterInstance.ephemeral() as run_instance:
        return dg.materialize(
            [trained_retriever],
            partition_key="default",
            instance=run_instance,
            resources={"duckdb": RLHNDuckDB(database=str(db_path)), "base_models": BaseModelsResource()},
            run_config={"ops": {"trained_retriever": {"config": {**TINY, "seeds": seeds, **extra}}}},
        )


def _md(result):
    return result.get_asset_materialization_events()[0].event_specific_data.materialization.metadata


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("RLHN_DATA_DIR", str(tmp_path / "data"))
    return tmp_path / "data"


def test_one_model_per_seed_then_reused_on_rerun(data_dir, db_path, instance, monkeypatch):
    _seed_db(db_path)
    first = _materialize(instance, db_path, [13, 14])
    md = _md(first)
    models = md["models"].value
    assert [m["seed"] for m in models] == [13, 14] and md["trained"].value == 2 and md["reused"].value == 0
    paths = [m["path"] for m in models]
    assert all(f"/seed-{m['seed']}/" in m["path"] for m in models) and len(set(paths)) == 2
    with RLHNDuckDB(database=str(db_path)).get_connection() as conn:
        rows = conn.execute(
            "SELECT seed, path, model_version, steps, settings_json FROM trained_models "
            "WHERE kind = 'retriever' AND variant = 'default' ORDER BY seed"
        ).fetchall()
    assert [(r[0], r[1], r[2]) for r in rows] == [(m["seed"], m["path"], m["version"]) for m in models]
    assert [json.loads(r[4])["seed"] for r in rows] == [13, 14]
    # two seeds give two different models (positive sampling, batch order and dropout are seeded)
    assert models[0]["version"] != models[1]["version"]

    # Re-run, same inputs: nothing is trained (training would raise), the same models come back.
    def _no_training(*a, **k):
        raise AssertionError("trained again although the inputs did not change")

    real_training = training.train_retriever
    monkeypatch.setattr(training, "train_retriever", _no_training)
    again = _materialize(instance, db_path, [13, 14])
    assert _md(again)["models"].value == models and _md(again)["reused"].value == 2
    assert again.get_asset_materialization_events()[0].event_specific_data.materialization.tags.get(
        "dagster/data_version"
    ) == first.get_asset_materialization_events()[0].event_specific_data.materialization.tags.get(
        "dagster/data_version"
    )
    # a third seed: only it is trained
    monkeypatch.setattr(training, "train_retriever", real_training)
    third = _materialize(instance, db_path, [13, 14, 15])
    assert _md(third)["trained"].value == 1 and _md(third)["reused"].value == 2


def test_changed_data_or_settings_train_anew(data_dir, db_path, instance):
    _seed_db(db_path)
    v1 = _md(_materialize(instance, db_path, [13]))["models"].value[0]
    v_lr = _md(_materialize(instance, db_path, [13], learning_rate=5e-5))
    assert v_lr["trained"].value == 1 and v_lr["models"].value[0]["path"] != v1["path"]
    _seed_db(db_path, suffix=" (edited)")
    v_data = _md(_materialize(instance, db_path, [13]))
    assert v_data["trained"].value == 1 and v_data["models"].value[0]["version"] != v1["version"]


def test_input_key_covers_texts_settings_and_base_model(tmp_path):
    a = [TrainingInstance("q", ("p",), ("n1", "n2"))]
    k = input_key("retriever", {"seed": 13}, "base1", a)
    assert k == input_key("retriever", {"seed": 13}, "base1", list(a))
    assert k != input_key("retriever", {"seed": 14}, "base1", a)
    assert k != input_key("reranker", {"seed": 13}, "base1", a)
    assert k != input_key("retriever", {"seed": 13}, "base2", a)
    assert k != input_key("retriever", {"seed": 13}, "base1", [TrainingInstance("q", ("p",), ("n2", "n1"))])
    # boundaries are part of the hash: moving text between fields changes it
    assert input_key("r", {}, "b", [TrainingInstance("qp", (), ())]) != input_key(
        "r", {}, "b", [TrainingInstance("q", ("p",), ())]
    )
    store = ModelStore(tmp_path)
    staged = store.staging_dir("retriever", "default", 13)
    staged.mkdir(parents=True)
    (staged / "w").write_text("x")
    final = store.publish("retriever", "default", 13, staged, "f" * 64, k, {"steps": 1})
    assert store.find("retriever", "default", 13, k)["path"] == str(final)
    assert store.find("retriever", "default", 14, k) is None  # another seed is another model
    import shutil

    shutil.rmtree(final)
    assert store.find("retriever", "default", 13, k) is None  # a deleted folder is not reused


def test_trained_models_check_loads_every_seed_and_fails_on_a_broken_model(data_dir, db_path):
    from pathlib import Path

    from rlhn_assets.defs.train.checks import trained_retriever_loads_and_scores

    _seed_db(db_path)
    resources = {"duckdb": RLHNDuckDB(database=str(db_path)), "base_models": BaseModelsResource()}
    config = {"ops": {"trained_retriever": {"config": {**TINY, "seeds": [13, 14]}}}}
    with dg.DagsterInstance.ephemeral() as inst:
        ok = dg.materialize(
            [trained_retriever, trained_retriever_loads_and_scores],
            partition_key="default",
            instance=inst,
            resources=resources,
            run_config=config,
        )
        [ev] = ok.get_asset_check_evaluations()
        assert ev.passed and ev.metadata["seeds"].value == 2, ev.description
        models = _md(ok)["models"].value
        for f in Path(models[1]["path"]).glob("model.safetensors"):
            f.write_bytes(b"not a model")  # the second seed's weights are corrupt
        # Re-running the check alone: a selection of only a check has no partitions definition for Dagster to
        # pick, so call the check's body the way the check op does, on the same partition.
        from types import SimpleNamespace

        from rlhn_assets.defs.train.checks import _check

        ev = _check(SimpleNamespace(partition_key="default"), "retriever", resources["duckdb"])
        assert not ev.passed and "seed 14" in ev.description and "does not load" in ev.description, ev.description
