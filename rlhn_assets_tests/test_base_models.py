"""Train what the user trains (issue 18, part 1): the base model and its prompts are settings of one resource
(`base_models`), every stage that encodes reads them (training, mining, evaluation), the prompts reach the tokenizer
there, and the base's identity (weights + prompts) is part of the model store key, the asset data versions and the
lineage. Two genuinely different local bases: the packaged MiniLM and a tiny BERT built here (no download)."""

import json
import shutil

import dagster as dg
import pytest
import yaml
from dagster._core.definitions.observe import observe  # dagster 1.13 has no public observe()

from rlhn_assets.lib import base_models as bm
from rlhn_assets.lib.embeddings import base_model_path, dir_hash
from rlhn_assets.lib.model_store import input_key
from rlhn_assets.lib.training import TrainingInstance, TrainSettings, train_retriever
from rlhn_assets.resources import BaseModelsResource, RLHNDuckDB
from rlhn_assets_tests.conftest import DATA, make_resources, tiny_beir_copy

Q, P = "query: ", "passage: "


def _prompted(texts, prompt):
    """The texts that carry ``prompt`` (the tokenizer also sees the bare prompt once: sentence-transformers measures
    its length)."""
    return [t for t in texts if isinstance(t, str) and t.startswith(prompt) and t != prompt]


# ------------------------------------------------------------------------------------------ settings, identity


def test_two_bases_their_prompts_and_identities(tiny_bert):
    packaged = bm.resolve_base("")
    assert packaged.path == base_model_path() and packaged.prompts == {"query": "", "passage": ""}
    assert packaged.identity == dir_hash(base_model_path())  # no prompts: the keys of every existing model hold
    assert packaged.max_seq_length == 256

    tiny = bm.resolve_base(str(tiny_bert))
    assert tiny.prompts == {"query": Q, "passage": P}  # the model's own (config_sentence_transformers.json)
    assert tiny.max_seq_length == 64 and tiny.content_hash == dir_hash(tiny_bert)
    assert tiny.content_hash != packaged.content_hash and tiny.identity != tiny.content_hash
    # a prompt setting overrides the model's own; "" is "no prompt"; either changes the identity, not the weights
    plain = bm.resolve_base(str(tiny_bert), query_prompt="", passage_prompt="")
    assert plain.prompts == {"query": "", "passage": ""} and plain.identity == tiny.content_hash
    other = bm.resolve_base(str(tiny_bert), query_prompt="search_query: ")
    assert other.passage_prompt == P and len({tiny.identity, plain.identity, other.identity}) == 3
    assert other.without_prompts().identity == tiny.content_hash  # a cross-encoder takes no prompts

    # the resource: one place for both bases and the device
    res = BaseModelsResource(retriever=str(tiny_bert), query_prompt="q> ")
    assert res.retriever_base().prompts == {"query": "q> ", "passage": P}
    assert res.reranker_base().path == tiny_bert and not res.reranker_base().has_prompts  # follows the retriever
    assert BaseModelsResource(reranker=str(tiny_bert)).reranker_base().content_hash == tiny.content_hash
    assert BaseModelsResource().retriever_base().identity == packaged.identity
    with pytest.raises(Exception, match="gpu0"):
        BaseModelsResource(device="gpu0")


def test_settings_from_the_environment():
    assert bm.settings_from_env({}) == {
        "retriever": "",
        "reranker": "",
        "query_prompt": None,  # unset: the model's own
        "passage_prompt": None,
        "device": "auto",
    }
    env = {
        "RLHN_RETRIEVER_BASE": "/m/e5",
        "RLHN_QUERY_PROMPT": "query: ",
        "RLHN_PASSAGE_PROMPT": "",
        "RLHN_DEVICE": "cpu",
    }
    got = bm.settings_from_env(env)
    assert got["retriever"] == "/m/e5" and got["query_prompt"] == "query: " and got["passage_prompt"] == ""
    assert got["device"] == "cpu"


def test_the_code_location_binds_the_resource_from_the_environment(monkeypatch, tiny_bert):
    from rlhn_assets.defs.resources import base_models

    monkeypatch.setenv("RLHN_RETRIEVER_BASE", str(tiny_bert))
    monkeypatch.setenv("RLHN_QUERY_PROMPT", "")
    res = base_models()
    assert res.retriever == str(tiny_bert) and res.query_prompt == "" and res.passage_prompt is None


def test_a_hub_id_resolves_to_its_snapshot_in_the_local_cache(tmp_path, monkeypatch, tiny_bert):
    """Offline (HF_HUB_OFFLINE=1, as in every test): a hub id already in the Hugging Face cache resolves to its
    snapshot folder, whose files are hashed; one that is not there fails with what to do."""
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    repo = cache / "models--acme--tiny-e5"
    snapshot = repo / "snapshots" / "0123abcd"
    shutil.copytree(tiny_bert, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    base = bm.resolve_base("acme/tiny-e5")
    assert base.path == snapshot and base.name == "acme/tiny-e5"
    assert base.content_hash == dir_hash(tiny_bert) and base.prompts == {"query": Q, "passage": P}
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE"):
        bm.resolve_base("acme/not-downloaded")
    with pytest.raises(FileNotFoundError, match="no such folder"):
        bm.resolve_base(str(tmp_path / "missing"))


def test_embedding_caches_key_on_the_prompt(tiny_bert, tmp_path):
    from rlhn_assets.lib.embeddings import encode_cached, load_model

    model = load_model(tiny_bert)
    texts = ["a passage about tax forms", "another one about April"]
    own, hit = encode_cached(model, "v", texts, tmp_path)  # role passage, the model's own prompt ("passage: ")
    assert not hit
    explicit, hit = encode_cached(model, "v", texts, tmp_path, prompt=P)
    assert hit and (explicit == own).all()  # the same prompt text: the same entry
    bare, hit = encode_cached(model, "v", texts, tmp_path, prompt="")
    assert not hit and not (bare == own).all()
    as_query, hit = encode_cached(model, "v", texts, tmp_path, role="query")
    assert not hit and len(list(tmp_path.glob("*.npy"))) == 3


# ------------------------------------------------------------------------------------------ training

INSTANCES = [
    TrainingInstance(f"how do I file tax form {i}", (f"form {i} is filed in April",), (f"unrelated passage {i}",))
    for i in range(8)
]
TINY = TrainSettings(batch_size=4, hard_negatives=1, max_seq_length=32, max_steps=1, warmup_ratio=0.0, torch_threads=1)


def test_training_passes_the_prompts_to_the_trainer_and_saves_them(tiny_bert, tmp_path, encoder_texts):
    from sentence_transformers import SentenceTransformer

    base = bm.resolve_base(str(tiny_bert))
    result = train_retriever(INSTANCES, TINY, tmp_path / "m", base=base)
    # what the trainer tokenized for its batches of 4 (anchor, positive, negative; the data loader may prefetch one)
    batch = encoder_texts.training
    queries, passages = _prompted(batch, Q), _prompted(batch, P)
    assert queries and len(queries) % 4 == 0 and {t[len(Q) :] for t in queries} <= {i.query for i in INSTANCES}
    texts = {p for i in INSTANCES for p in i.positives + i.negatives}
    assert len(passages) == 2 * len(queries) and {t[len(P) :] for t in passages} <= texts
    assert all(t.startswith((Q, P)) for t in batch)  # nothing went in without its prompt
    assert result.settings["base_model"]["content_hash"] == base.content_hash
    assert result.settings["base_model"]["query_prompt"] == Q and result.settings["device"] == "cpu"
    saved = SentenceTransformer(str(result.model_dir))
    assert saved.prompts["query"] == Q and saved.prompts["document"] == P  # evaluation applies the same

    # the packaged MiniLM, prompts overridden by the setting: the same path, other prompts
    encoder_texts.clear()
    encoder_texts.training.clear()
    train_retriever(INSTANCES, TINY, tmp_path / "mini", base=bm.resolve_base("", "find: ", "doc: "))
    batch = encoder_texts.training
    assert _prompted(batch, "find: ") and len(_prompted(batch, "doc: ")) == 2 * len(_prompted(batch, "find: "))
    assert all(t.startswith(("find: ", "doc: ")) for t in batch)


def test_a_different_base_or_prompt_is_a_different_input_key(tiny_bert):
    settings = TINY.resolved().identity()
    keys = {
        input_key("retriever", settings, b.identity, INSTANCES)
        for b in (
            bm.resolve_base(""),
            bm.resolve_base(str(tiny_bert)),
            bm.resolve_base(str(tiny_bert), query_prompt=""),
            bm.resolve_base(str(tiny_bert), passage_prompt="doc: "),
        )
    }
    assert len(keys) == 4
    # the hardware and loss settings that change the result are in the key; at their old defaults they are not
    # (every model trained before they existed keeps its key)
    base = bm.resolve_base("").identity
    assert "device" not in TINY.resolved().identity() and "loss" not in TINY.resolved().identity()
    cached = TrainSettings(**{**TINY.to_dict(), "loss": "cached_mnrl", "mini_batch_size": 2}).resolved().identity()
    assert cached["loss"] == "cached_mnrl" and cached["mini_batch_size"] == 2
    assert input_key("retriever", cached, base, INSTANCES) != input_key("retriever", settings, base, INSTANCES)
    gpu = {**settings, "device": "cuda"}
    assert input_key("retriever", gpu, base, INSTANCES) != input_key("retriever", settings, base, INSTANCES)


# ------------------------------------------------------------------------------------------ Dagster assets


def _seed_db(db_path, n=8):
    from rlhn_assets.lib.db import connect
    from rlhn_assets.lib.schema import apply_schema

    with connect(db_path) as conn:
        apply_schema(conn)
        for i in range(n):
            conn.execute("INSERT INTO raw_queries VALUES ('fiqa', ?, ?)", [f"q{i}", f"how do I file tax form {i}"])
            conn.execute("INSERT INTO raw_passages VALUES ('fiqa', ?, '', ?)", [f"p{i}", f"form {i} is filed in April"])
            conn.execute("INSERT INTO raw_passages VALUES ('fiqa', ?, '', ?)", [f"n{i}", f"unrelated passage {i}"])
            conn.execute(
                "INSERT INTO relabeled_instances VALUES ('fiqa', 'default', ?, ?, [?], [?], 0)",
                [f"i{i}", f"q{i}", f"p{i}", f"n{i}"],
            )


def _md(result, node):
    return result.asset_materializations_for_node(node)[0].metadata


def _version(result, node):
    return result.asset_materializations_for_node(node)[0].tags["dagster/data_version"]


def test_trained_retriever_follows_the_base_and_its_prompts(tmp_path, db_path, monkeypatch, tiny_bert):
    from rlhn_assets.defs.train.assets import trained_retriever

    monkeypatch.setenv("RLHN_DATA_DIR", str(tmp_path / "data"))
    _seed_db(db_path)
    config = {"max_steps": 1, "batch_size": 4, "max_seq_length": 32, "hard_negatives": 1}

    def run(res: BaseModelsResource):
        with dg.DagsterInstance.ephemeral() as inst:
            return dg.materialize(
                [trained_retriever],
                partition_key="default",
                instance=inst,
                resources={"duckdb": RLHNDuckDB(database=str(db_path)), "base_models": res},
                run_config={"ops": {"trained_retriever": {"config": config}}},
            )

    tiny = run(BaseModelsResource(retriever=str(tiny_bert)))
    md = _md(tiny, "trained_retriever")
    assert md["base_model"].value == str(tiny_bert) and md["base_model_hash"].value == dir_hash(tiny_bert)[:16]
    assert (md["query_prompt"].value, md["passage_prompt"].value) == (Q, P) and md["trained"].value == 1
    [model] = md["models"].value
    assert (model["query_prompt"], model["passage_prompt"]) == (Q, P)  # what eval_model pins and eval_scores uses
    with RLHNDuckDB(database=str(db_path)).get_connection() as conn:
        [(settings_json,)] = conn.execute("SELECT settings_json FROM trained_models").fetchall()
    recorded = json.loads(settings_json)["base_model"]
    assert recorded["content_hash"] == dir_hash(tiny_bert) and recorded["query_prompt"] == Q

    assert _md(run(BaseModelsResource(retriever=str(tiny_bert))), "trained_retriever")["reused"].value == 1
    other_prompt = run(BaseModelsResource(retriever=str(tiny_bert), query_prompt="search_query: "))
    assert _md(other_prompt, "trained_retriever")["trained"].value == 1  # a new prompt: trained anew
    packaged = run(BaseModelsResource())
    assert _md(packaged, "trained_retriever")["trained"].value == 1
    versions = {_version(r, "trained_retriever") for r in (tiny, other_prompt, packaged)}
    assert len(versions) == 3


def test_base_retriever_version_and_eval_prompts_follow_the_setting(
    tmp_path, db_path, instance, monkeypatch, tiny_bert
):
    """base_retriever[base] takes the base's identity as its data version; eval_scores[<set>|base] encodes the
    eval set's queries and passages with the base's prompts."""
    from rlhn_assets.defs.evaluate.assets import base_retriever, eval_model, eval_scores

    data = tmp_path / "data"
    tiny_beir_copy(DATA / "eval" / "cisi", data / "eval" / "cisi", queries=3, extra_docs=5)
    monkeypatch.setenv("RLHN_DATA_DIR", str(data))
    monkeypatch.setenv("RLHN_CACHE_DIR", str(tmp_path / "cache"))
    duck = RLHNDuckDB(database=str(db_path))
    config = {"ops": {"eval_scores": {"config": {"rerank": False}}}}

    packaged = dg.materialize(
        [base_retriever], partition_key="base", instance=instance, resources={"base_models": BaseModelsResource()}
    )
    assert _version(packaged, "base_retriever") == dir_hash(base_model_path())[:16]  # unchanged for the default

    res = BaseModelsResource(retriever=str(tiny_bert))
    tiny = dg.materialize([base_retriever], partition_key="base", instance=instance, resources={"base_models": res})
    assert _version(tiny, "base_retriever") == res.retriever_base().version != _version(packaged, "base_retriever")
    assert _md(tiny, "base_retriever")["query_prompt"].value == Q
    # a prompt alone changes it too
    plain = BaseModelsResource(retriever=str(tiny_bert), query_prompt="", passage_prompt="")
    assert plain.retriever_base().version == dir_hash(tiny_bert)[:16] != res.retriever_base().version

    pinned = _md(dg.materialize([eval_model], partition_key="base", instance=instance), "eval_model")
    assert pinned["retriever_models"].value[0]["query_prompt"] == Q

    texts: list = []
    from sentence_transformers.base.modules.transformer import Transformer

    real = Transformer._call_processor

    def spy(self, modality, inputs, *a, **k):
        texts.extend(inputs["text"])
        return real(self, modality, inputs, *a, **k)

    monkeypatch.setattr(Transformer, "_call_processor", spy)
    partition = dg.MultiPartitionKey({"eval_set": "cisi", "model": "base"})
    result = dg.materialize(
        [eval_scores],
        partition_key=partition,
        instance=instance,
        resources={"duckdb": duck, "base_models": res},
        run_config=config,
    )
    assert result.success
    from rlhn_assets.lib.evaluation import doc_text, load_beir_eval

    ds = load_beir_eval(data / "eval" / "cisi")
    assert {t[len(Q) :] for t in _prompted(texts, Q)} == set(ds.queries.values())
    assert {t[len(P) :] for t in _prompted(texts, P)} == {doc_text(d) for d in ds.corpus.values()}
    assert not set(texts) & set(ds.queries.values())  # no query went in without its prompt


def test_changing_the_base_makes_what_depends_on_it_stale(tmp_path, db_path, instance, monkeypatch, tiny_bert):
    """The observable source retriever_base_model carries the base's identity into the lineage: after a switch to
    another base (or prompt), base_retriever and trained_retriever are stale because of it (the automation sensor
    then re-materializes them), while trained_reranker, whose base did not change, is not."""
    from dagster._core.asset_graph_view.asset_graph_view import AssetGraphView, TemporalContext
    from dagster._core.definitions.data_version import CachingStaleStatusResolver
    from dagster._time import get_current_datetime

    from rlhn_assets.definitions import defs
    from rlhn_assets.defs.evaluate.assets import base_retriever
    from rlhn_assets.defs.sources.assets import reranker_base_model, retriever_base_model
    from rlhn_assets.defs.train.assets import trained_reranker, trained_retriever

    monkeypatch.setenv("RLHN_DATA_DIR", str(tmp_path / "data"))
    _seed_db(db_path)
    graph = defs().resolve_asset_graph()
    tiny = BaseModelsResource(retriever=str(tiny_bert), reranker=str(tiny_bert))
    train = {"max_steps": 1, "batch_size": 4, "max_seq_length": 32, "hard_negatives": 1, "reranker_negatives": 1}

    def observe_with(res):
        observe([retriever_base_model, reranker_base_model], instance=instance, resources={"base_models": res})

    def stale_because_of(name, partition, source):
        """Whether ``name[partition]`` has a stale cause that is a new data version of ``source``."""
        view = AssetGraphView(
            temporal_context=TemporalContext(effective_dt=get_current_datetime(), last_event_id=None),
            instance=instance,
            asset_graph=graph,
        )
        causes = CachingStaleStatusResolver(instance, graph, loading_context=view).get_stale_causes(
            dg.AssetKey(name), partition
        )
        return any(c.dependency is not None and c.dependency.asset_key == dg.AssetKey(source) for c in causes)

    observe_with(tiny)
    resources = {"duckdb": RLHNDuckDB(database=str(db_path)), "base_models": tiny}
    assert dg.materialize([base_retriever], partition_key="base", instance=instance, resources=resources).success
    for asset in (trained_retriever, trained_reranker):
        run_config = {"ops": {asset.key.path[-1]: {"config": train}}}
        assert dg.materialize(
            [asset], partition_key="default", instance=instance, resources=resources, run_config=run_config
        ).success
    assert not stale_because_of("base_retriever", "base", "retriever_base_model")
    assert not stale_because_of("trained_retriever", "default", "retriever_base_model")

    # the packaged MiniLM as the retriever base; the reranker keeps the tiny one
    observe_with(BaseModelsResource(reranker=str(tiny_bert)))
    assert stale_because_of("base_retriever", "base", "retriever_base_model")
    assert stale_because_of("trained_retriever", "default", "retriever_base_model")
    assert not stale_because_of("trained_reranker", "default", "reranker_base_model")
    # back to the tiny base: its version again, nothing stale because of it
    observe_with(tiny)
    assert not stale_because_of("base_retriever", "base", "retriever_base_model")
    # a prompt alone is a new version of the retriever base, not of the reranker's
    observe_with(BaseModelsResource(retriever=str(tiny_bert), reranker=str(tiny_bert), query_prompt=""))
    assert stale_because_of("trained_retriever", "default", "retriever_base_model")
    assert not stale_because_of("trained_reranker", "default", "reranker_base_model")


# ------------------------------------------------------------------------------------------ mining


def test_mining_encodes_with_the_base_and_its_prompts(
    tmp_data, db_path, instance, monkeypatch, tiny_bert, encoder_texts
):
    """hard_negative_mining[scifact] (dense) with the tiny base: queries and passages reach the tokenizer with their
    prompts, the mined file is rewritten (the base is in its fingerprint), and the metadata names the base."""
    from rlhn_assets.defs.mining.assets import hard_negative_mining
    from rlhn_assets.resources import DatasetRegistryResource

    monkeypatch.setenv("RLHN_DATA_DIR", str(tmp_data))
    monkeypatch.setenv("RLHN_CACHE_DIR", str(tmp_data / "cache"))
    tiny_beir_copy(DATA / "eval" / "scifact", tmp_data / "eval" / "tiny_sci", queries=5, extra_docs=30, split="train")
    reg_path = tmp_data / "datasets.yaml"
    reg = yaml.safe_load(reg_path.read_text())
    mine = reg["datasets"]["scifact"]["mine"]
    mine.update(
        corpus="eval/tiny_sci/corpus.jsonl",
        queries="eval/tiny_sci/queries.jsonl",
        qrels="eval/tiny_sci/qrels/train.tsv",
        range_min=0,
        range_max=10,
        num_negatives=3,
    )
    reg_path.write_text(yaml.safe_dump(reg))
    resources = make_resources(db_path, DatasetRegistryResource(path=str(reg_path)))
    resources["base_models"] = BaseModelsResource(retriever=str(tiny_bert))
    result = dg.materialize([hard_negative_mining], partition_key="scifact", resources=resources, instance=instance)
    md = _md(result, "hard_negative_mining")
    assert md["status"].value == "mined" and md["queries"].value == 5 and md["base_model"].value == str(tiny_bert)
    from rlhn_assets.lib.mining import load_beir, passage_text

    split = load_beir(*(tmp_data / mine[k] for k in ("corpus", "queries", "qrels")))
    assert {t[len(Q) :] for t in _prompted(encoder_texts, Q)} == set(split.queries.values())
    assert {t[len(P) :] for t in _prompted(encoder_texts, P)} == {passage_text(d) for d in split.corpus.values()}
    sidecar = json.loads((tmp_data / (mine["output"] + ".mining.json")).read_text())
    assert sidecar["base_model"]["identity"] == BaseModelsResource(retriever=str(tiny_bert)).retriever_base().identity

    # the same base again: up to date, nothing encoded; another prompt: mined again
    encoder_texts.clear()
    again = dg.materialize([hard_negative_mining], partition_key="scifact", resources=resources, instance=instance)
    assert _md(again, "hard_negative_mining")["status"].value == "up to date" and not encoder_texts
    resources["base_models"] = BaseModelsResource(retriever=str(tiny_bert), query_prompt="")
    other = dg.materialize([hard_negative_mining], partition_key="scifact", resources=resources, instance=instance)
    assert _md(other, "hard_negative_mining")["status"].value == "mined"
    assert not _prompted(encoder_texts, Q) and _prompted(encoder_texts, P)
