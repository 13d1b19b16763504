"""Retriever / reranker fine-tuning (rlhn_assets.lib.training): row building, and a few real training steps
on a tiny FiQA variant (short texts, tiny batches) to check loadability, logging and determinism."""

import gzip
import json
import math
from pathlib import Path

import numpy as np
import pytest

from rlhn_assets.lib import training
from rlhn_assets.lib.embeddings import base_model_path
from rlhn_assets.lib.training import (
    TrainingInstance,
    TrainSettings,
    reranker_pairs,
    retriever_rows,
    train_reranker,
    train_retriever,
)
from rlhn_assets_tests.conftest import DATA


def _inst(q, pos, neg):
    return TrainingInstance(q, tuple(pos), tuple(neg))


# ---------------------------------------------------------------------------------------------- rows


def test_one_positive_per_query_per_epoch_sampled_across_all_positives():
    insts = [_inst("q0", ["p0a", "p0b", "p0c"], ["n0"]), _inst("q1", ["p1"], ["n1"])]
    s = TrainSettings(epochs=6, hard_negatives=1)
    ds = retriever_rows(insts, s)
    assert len(ds) == 12
    # epoch-major: each block of 2 rows is one epoch with each query exactly once
    anchors = ds["anchor"]
    assert all(anchors[2 * e : 2 * e + 2] == ["q0", "q1"] for e in range(6))
    used = [p for a, p in zip(anchors, ds["positive"]) if a == "q0"]
    assert set(used) <= {"p0a", "p0b", "p0c"} and len(set(used)) > 1  # extra positives enter training
    assert [p for a, p in zip(anchors, ds["positive"]) if a == "q1"] == ["p1"] * 6
    assert retriever_rows(insts, s)["positive"] == ds["positive"]  # seeded
    # epoch e uses random.Random(seed * 1000 + e): a single-epoch table equals the first epoch of the long one
    assert retriever_rows(insts, TrainSettings(epochs=1, hard_negatives=1))["positive"] == ds["positive"][:2]


def test_negative_columns_and_fill_rules():
    insts = [
        _inst("many", ["pm"], ["a1", "a2", "a3", "a4", "a5"]),
        _inst("few", ["pf"], ["b1", "b2"]),
        _inst("none", ["pn", "b1"], []),
        _inst("self", ["ps"], ["ps", "c1"]),  # a negative identical to the positive is ignored
    ]
    s = TrainSettings(hard_negatives=3)
    ds = retriever_rows(insts, s)
    assert ds.column_names == ["anchor", "positive", "negative_1", "negative_2", "negative_3"]
    rows = {r["anchor"]: [r["negative_1"], r["negative_2"], r["negative_3"]] for r in ds}
    assert rows["many"] == ["a1", "a2", "a3"]  # the first k, in order
    assert rows["few"] == ["b1", "b2", "b1"]  # cycled
    assert rows["self"] == ["c1", "c1", "c1"]
    drawn = rows["none"]  # drawn from the other instances' negatives, never its own positives
    assert len(set(drawn)) == 3 and set(drawn) <= {"a1", "a2", "a3", "a4", "a5", "b2", "c1"}
    assert retriever_rows(insts, s)["negative_1"] == ds["negative_1"]  # seeded
    assert retriever_rows(insts, TrainSettings(hard_negatives=7)).column_names[-1] == "negative_7"


def test_no_negatives_anywhere_skips_everything_and_training_refuses():
    insts = [_inst("q0", ["p0"], []), _inst("q1", ["p1"], []), _inst("q2", [], ["x"])]
    ds = retriever_rows(insts, TrainSettings(hard_negatives=2))
    assert len(ds) == 0 and ds.column_names == ["anchor", "positive", "negative_1", "negative_2"]
    with pytest.raises(ValueError, match="no retriever training rows"):
        train_retriever(insts[:2], TrainSettings(hard_negatives=2), "/nonexistent/never-written")
    # hard_negatives=0: in-batch negatives only, every instance with a positive is kept
    ds0 = retriever_rows(insts, TrainSettings(hard_negatives=0, epochs=2))
    assert ds0.column_names == ["anchor", "positive"] and ds0["anchor"] == ["q0", "q1", "q0", "q1"]


def test_reranker_pairs_one_positive_then_k_negatives_per_query_per_epoch():
    insts = [_inst("q0", ["p0a", "p0b", "p0c"], ["n1", "n2", "n3", "n4"]), _inst("q1", ["p1"], ["m1"])]
    s = TrainSettings(epochs=4, reranker_negatives=3, hard_negatives=1)
    ds = reranker_pairs(insts, s)
    assert ds.column_names == ["query", "passage", "label"]
    assert len(ds) == 4 * 2 * 4
    assert ds["label"][:8] == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0]
    assert ds["passage"][1:4] == ["n1", "n2", "n3"] and ds["passage"][5:8] == ["m1", "m1", "m1"]
    # the positive of each (epoch, query) is the one the retriever rows use
    pos = [p for p, lab in zip(ds["passage"], ds["label"]) if lab == 1.0]
    assert pos == retriever_rows(insts, s)["positive"]


def test_saving_replaces_an_old_model_folder_completely(tmp_path):
    class FakeModel:
        def __init__(self, files):
            self.files = files

        def save(self, path):
            for name in self.files:
                (Path(path) / name).write_text(name)

    out = tmp_path / "model"
    training._save_atomically(FakeModel(["a.bin", "stale.bin"]), out)
    training._save_atomically(FakeModel(["a.bin"]), out)
    assert sorted(p.name for p in out.iterdir()) == ["a.bin"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no staging folder left behind


# ------------------------------------------------------------------------------------------ training
# Kept tiny on purpose (2-core CPU shared with other jobs): 12-word texts, 32 tokens, batch 4, ONE optimizer
# step without warmup (with warmup the first step runs at lr 0 and would not change the weights).


def _short(text, n=12):
    return " ".join(text.split()[:n])


@pytest.fixture(scope="module")
def fiqa_instances():
    with gzip.open(DATA / "raw/fiqa/rlhn_judge_sample.jsonl.gz", "rt") as fh:
        rows = [json.loads(line) for line in fh][:24]
    return [
        _inst(
            _short(r["query"]),
            [_short(p["text"]) for p in r["positive_passages"]],
            [_short(p["text"]) for p in r["negative_passages"]],
        )
        for r in rows
    ]


TINY = TrainSettings(
    batch_size=4,
    hard_negatives=2,
    reranker_negatives=1,
    max_seq_length=32,
    max_steps=1,
    warmup_ratio=0.0,
    torch_threads=1,
)


@pytest.fixture(scope="module")
def retrievers(fiqa_instances, tmp_path_factory):
    root = tmp_path_factory.mktemp("retrievers")
    lines: list[str] = []
    a = train_retriever(fiqa_instances, TINY, root / "a", log=lines.append)
    b = train_retriever(fiqa_instances, TINY, root / "b")
    c = train_retriever(fiqa_instances[:-1], TINY, root / "c")
    return a, b, c, lines


@pytest.mark.slow
def test_trained_retriever_loads_and_encodes(retrievers):
    from sentence_transformers import SentenceTransformer

    a, _, _, lines = retrievers
    assert a.steps == 1 and a.train_rows == 24 and a.final_loss is not None and math.isfinite(a.final_loss)
    assert a.settings["scale"] == TINY.scale and a.settings["kind"] == "retriever"
    assert any("retriever step 1/1 loss" in line for line in lines)
    model = SentenceTransformer(str(a.model_dir), device="cpu")
    emb = model.encode(["how do I file taxes"], normalize_embeddings=True)
    assert emb.shape == (1, 384)
    base = SentenceTransformer(str(base_model_path()), device="cpu").encode(
        ["how do I file taxes"], normalize_embeddings=True
    )
    assert not np.allclose(emb, base, atol=1e-7)  # the optimizer step really moved the weights


@pytest.mark.slow
def test_retriever_version_is_reproducible_and_tracks_the_data(retrievers):
    a, b, c, _ = retrievers
    assert a.loss_history == b.loss_history  # seeded
    assert a.data_version == b.data_version  # bit-identical weights (+ model card without the wall time)
    assert c.data_version != a.data_version  # one instance fewer -> another model


@pytest.mark.slow
def test_reranker_trains_and_scores(fiqa_instances, tmp_path):
    from sentence_transformers.cross_encoder import CrossEncoder

    lines: list[str] = []
    r = train_reranker(fiqa_instances, TINY, tmp_path / "rr", log=lines.append)
    assert r.steps == 1 and r.train_rows == 48 and r.settings["kind"] == "reranker"
    assert any("reranker step 1/1 loss" in line for line in lines)
    model = CrossEncoder(str(r.model_dir), device="cpu")
    inst = fiqa_instances[0]
    scores = model.predict([(inst.query, inst.positives[0]), (inst.query, inst.negatives[0])])
    assert len(scores) == 2 and all(math.isfinite(float(x)) for x in scores)


@pytest.mark.slow
def test_cached_mnrl_and_gradient_checkpointing(fiqa_instances, tmp_path):
    """loss: cached_mnrl (GradCache, mini-batches of 2 texts) with gradient checkpointing: one step trains, the loss is
    finite, the settings say what ran and the key-relevant identity holds them."""
    from sentence_transformers.sentence_transformer.losses import CachedMultipleNegativesRankingLoss

    settings = TrainSettings(**{**TINY.to_dict(), "loss": "cached_mnrl", "mini_batch_size": 2})
    settings = TrainSettings(**{**settings.to_dict(), "gradient_checkpointing": True})
    seen = {}
    real = CachedMultipleNegativesRankingLoss.forward

    def spy(self, *a, **k):
        seen["mini_batch_size"] = self.mini_batch_size
        seen["checkpointing"] = self.model[0].auto_model.is_gradient_checkpointing
        return real(self, *a, **k)

    CachedMultipleNegativesRankingLoss.forward = spy
    try:
        r = train_retriever(fiqa_instances, settings, tmp_path / "cached")
    finally:
        CachedMultipleNegativesRankingLoss.forward = real
    assert seen == {"mini_batch_size": 2, "checkpointing": True}
    assert r.steps == 1 and r.final_loss is not None and math.isfinite(r.final_loss)
    assert r.settings["loss"] == "CachedMultipleNegativesRankingLoss" and r.settings["gradient_checkpointing"]
    identity = settings.resolved().identity()
    assert identity["loss"] == "cached_mnrl" and identity["gradient_checkpointing"] is True
