"""Several training processes through the existing engine (issue 18, part 2): the sentence-transformers trainer
under torchrun (DDP), here two CPU processes with the gloo backend on a tiny FiQA training set. Both ranks train
(each writes its own record, with the same final weights: DDP keeps them in step) and rank 0 alone saves one model,
which loads and scores. The Dagster side starts the same entry point when `num_processes > 1`."""

import gzip
import json
import math
import time

import numpy as np
import pytest

from rlhn_assets.lib.base_models import resolve_base
from rlhn_assets.lib.train_cli import train_in_processes
from rlhn_assets.lib.training import TrainingInstance, TrainSettings
from rlhn_assets_tests.conftest import DATA


def _short(text, n=12):
    return " ".join(text.split()[:n])


@pytest.fixture(scope="module")
def fiqa_instances():
    with gzip.open(DATA / "raw/fiqa/rlhn_judge_sample.jsonl.gz", "rt") as fh:
        rows = [json.loads(line) for line in fh][:16]
    return [
        TrainingInstance(
            _short(r["query"]),
            tuple(_short(p["text"]) for p in r["positive_passages"]),
            tuple(_short(p["text"]) for p in r["negative_passages"]),
        )
        for r in rows
    ]


# batch 4 = 2 per process; 2 optimizer steps without warmup, fp32 (bf16 autocast would work too, but costs the
# loaded 2-core machine time for nothing this test checks)
SETTINGS = TrainSettings(
    batch_size=4, hard_negatives=1, max_seq_length=32, max_steps=2, warmup_ratio=0.0, device="cpu", precision="fp32"
)


@pytest.mark.slow
def test_two_cpu_processes_train_one_model(fiqa_instances, tmp_path):
    from sentence_transformers import SentenceTransformer

    from rlhn_assets.defs.train.checks import PROBE_PASSAGES, PROBE_QUERY
    from rlhn_assets.lib.embeddings import encode_texts

    base = resolve_base("")
    lines: list[str] = []
    t0 = time.perf_counter()
    result = train_in_processes(
        "retriever",
        fiqa_instances,
        SETTINGS,
        tmp_path / "model",
        base=base,
        nproc=2,
        log=lines.append,
        rank_log=tmp_path / "ranks",
    )
    seconds = time.perf_counter() - t0
    print(f"\ntorchrun, 2 CPU processes (gloo), 2 steps of batch 4: {seconds:.1f} s")

    ranks = [json.loads((tmp_path / "ranks" / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert [r["rank"] for r in ranks] == [0, 1] and {r["world_size"] for r in ranks} == {2}
    assert ranks[0]["pid"] != ranks[1]["pid"]  # two processes
    assert [r["steps"] for r in ranks] == [2, 2] and all(r["device"] == "cpu" for r in ranks)
    assert ranks[0]["weights_sha"] == ranks[1]["weights_sha"] != ""  # the same weights after the all-reduces
    assert any(line.startswith("[rank 0/2]") for line in lines) and any(line.startswith("[rank 1/2]") for line in lines)

    # rank 0 saved one model: the folder of the returned result, hashed, loadable, scoring sanely
    assert result.rank == 0 and result.world_size == 2 and result.steps == 2
    assert result.settings["num_processes"] == 2 and result.data_version
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(("model", ".model"))] == ["model"]
    model = SentenceTransformer(str(result.model_dir))
    q = encode_texts(model, [PROBE_QUERY], "query")
    scores = encode_texts(model, list(PROBE_PASSAGES), "passage") @ q[0]
    assert all(math.isfinite(float(s)) for s in scores) and abs(float(scores[0] - scores[1])) > 1e-6
    before = encode_texts(SentenceTransformer(str(base.path)), [PROBE_QUERY], "query")
    assert not np.allclose(q, before, atol=1e-7)  # the two steps moved the weights


def test_the_asset_starts_torchrun_when_num_processes_is_above_one(monkeypatch, tmp_path):
    """trained_retriever's config `num_processes: 2` goes to train_in_processes with the settings that name it (and
    so are a different model store key than one process)."""
    from rlhn_assets.defs.train import assets
    from rlhn_assets.lib import train_cli

    calls = []
    monkeypatch.setattr(train_cli, "train_in_processes", lambda kind, inst, s, out, **kw: calls.append((kind, s, kw)))
    base = resolve_base("")
    settings = assets._settings(assets.TrainConfig(num_processes=2), 13, base, "cpu")
    assets.train_one("retriever", [], settings, tmp_path, base, print)
    [(kind, s, kw)] = calls
    assert kind == "retriever" and kw["nproc"] == 2 and s.num_processes == 2
    one = assets._settings(assets.TrainConfig(), 13, base, "cpu")
    assert s.identity()["num_processes"] == 2 and "num_processes" not in one.identity()


def test_the_entry_point_trains_a_variant_from_the_duckdb_file(tmp_path, db_path, tiny_bert, monkeypatch):
    """`python -m rlhn_assets.lib.train_cli --variant ...` without torchrun: one process, the variant's instances read
    from the pipeline's DuckDB file, the base and prompts from the command line (here the tiny BERT, its own
    prompts kept), rank 0's result as JSON."""
    from sentence_transformers import SentenceTransformer

    from rlhn_assets.lib.train_cli import result_from_json, run
    from rlhn_assets_tests.test_base_models import _seed_db

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    _seed_db(db_path)
    settings = {"batch_size": 4, "hard_negatives": 1, "max_seq_length": 32, "max_steps": 1, "warmup_ratio": 0.0}
    lines: list[str] = []
    args = ["--variant", "default", "--duckdb", str(db_path), "--output", str(tmp_path / "m")]
    args += ["--settings", json.dumps(settings), "--base", str(tiny_bert), "--result", str(tmp_path / "r.json")]
    run(args, log=lines.append)
    result = result_from_json(json.loads((tmp_path / "r.json").read_text()))
    assert result.steps == 1 and result.train_rows == 8 and result.settings["num_processes"] == 1
    assert result.settings["base_model"]["path"] == str(tiny_bert) and any("done: 1 steps" in x for x in lines)
    model = SentenceTransformer(str(result.model_dir))
    assert model.prompts["query"] == "query: " and model.prompts["document"] == "passage: "
