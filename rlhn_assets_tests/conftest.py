import os

# Nothing may download a model or dataset at run time: make a mistake fail at once.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import shutil
from pathlib import Path

import dagster as dg
import pytest

from rlhn_assets import settings
from rlhn_assets.resources import DatasetRegistryResource, RLHNDuckDB

FIXTURES = Path(__file__).parent / "fixtures"
DATA = settings.PROJECT_ROOT / "data"


@pytest.fixture
def db_path(tmp_path) -> Path:
    return tmp_path / "test.duckdb"


def make_resources(db_path, registry: DatasetRegistryResource | None = None) -> dict:
    """Every resource of the code location (the `local` judge preset: no server starts unless a judge is
    opened), with DuckDB on ``db_path`` and the given (or bundled) registry."""
    from rlhn_assets.defs.resources import PRESETS
    from rlhn_assets.resources import BaseModelsResource, JudgingBudgetResource

    return {
        **PRESETS["local"],
        "duckdb": RLHNDuckDB(database=str(db_path)),
        "registry": registry or DatasetRegistryResource(),
        "judging_budget": JudgingBudgetResource(),
        "base_models": BaseModelsResource(),  # the packaged MiniLM, its own prompts (none), auto device
    }


@pytest.fixture
def resources(db_path):
    """The real resources, on a temporary DuckDB file and the bundled registry."""
    return make_resources(db_path)


@pytest.fixture
def instance(tmp_path):
    home = tmp_path / "dagster_home"
    home.mkdir()
    with dg.instance_for_test(temp_dir=str(home)) as inst:
        yield inst


@pytest.fixture
def tmp_data(tmp_path) -> Path:
    """A private copy of the bundled data directory (registry + raw files) that a test may edit: only what the
    repository ships, never a checkout's local state (experiment runs, model store, logs, caches), which made
    tests slow and order-dependent on a used checkout."""
    dst = tmp_path / "data"
    shutil.copytree(
        DATA,
        dst,
        ignore=shutil.ignore_patterns(
            "*.duckdb*", "cache", "models", "reports", "exports", "experiment", "logs", "leave_one_out.*"
        ),
    )
    return dst


def tiny_corpus_db(n: int):
    """An in-memory pipeline database of dataset 'ds' with ``n`` queries q<i> ("query <i>") and ``3n`` passages
    d<k> ("text <k>", no title): instance i of the tests that use it has positive d<3i> and negatives d<3i+2>,
    d<3i+1> (stored order, not sorted)."""
    import duckdb

    from rlhn_assets.lib.schema import apply_schema

    conn = duckdb.connect()
    apply_schema(conn)
    conn.execute("INSERT INTO raw_queries SELECT 'ds', 'q' || i, 'query ' || i FROM range($1) t(i)", [n])
    conn.execute("INSERT INTO raw_passages SELECT 'ds', 'd' || i, NULL, 'text ' || i FROM range($1) t(i)", [n * 3])
    return conn


def tiny_beir_copy(src: Path, dst: Path, *, queries: int = 12, extra_docs: int = 60, split: str = "test") -> None:
    """A small BEIR folder cut from ``src``: the first ``queries`` judged queries, their relevant passages and
    the first ``extra_docs`` other passages (distractors), so an eval set costs seconds instead of minutes."""
    import gzip
    import json

    corpus_src = next(p for p in (src / "corpus.jsonl", src / "corpus.jsonl.gz") if p.exists())
    lines = (src / "qrels" / f"{split}.tsv").read_text().splitlines()
    by_q: dict[str, list[str]] = {}
    for line in lines[1:]:
        q, d, g = line.split("\t")
        if int(g) > 0:
            by_q.setdefault(q, []).append(line)
    keep_q = list(by_q)[:queries]
    wanted = {line.split("\t")[1] for q in keep_q for line in by_q[q]}
    dst.mkdir(parents=True)
    (dst / "qrels").mkdir()
    opener = gzip.open if corpus_src.suffix == ".gz" else open
    extra = 0
    with opener(corpus_src, "rt") as f, open(dst / "corpus.jsonl", "w") as out:
        for line in f:
            doc_id = json.loads(line)["_id"]
            if doc_id in wanted or extra < extra_docs:
                extra += doc_id not in wanted
                out.write(line)
    with open(src / "queries.jsonl") as f, open(dst / "queries.jsonl", "w") as out:
        out.writelines(line for line in f if json.loads(line)["_id"] in set(keep_q))
    (dst / "qrels" / f"{split}.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(line + "\n" for q in keep_q for line in by_q[q])
    )


def build_tiny_bert(folder: Path, prompts: dict[str, str] | None = None, seed: int = 0) -> Path:
    """A small sentence-transformers model that is not MiniLM, built offline: a 2-layer BERT (hidden 32) with random
    weights and MiniLM's tokenizer files, mean pooling, max 64 tokens, ``prompts`` in its own config."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    from transformers import BertConfig, BertModel

    from rlhn_assets.lib.embeddings import base_model_path

    hf = folder.parent / f"{folder.name}-hf"
    hf.mkdir(parents=True)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(base_model_path() / name, hf / name)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    BertModel(config).save_pretrained(hf)
    transformer = Transformer(str(hf), max_seq_length=64)
    model = SentenceTransformer(
        modules=[transformer, Pooling(transformer.get_word_embedding_dimension(), "mean")], prompts=prompts or {}
    )
    model.save(str(folder))
    return folder


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """build_tiny_bert with E5-style prompts of its own ("query: " / "passage: ")."""
    return build_tiny_bert(tmp_path_factory.mktemp("bases") / "tiny-bert", {"query": "query: ", "passage": "passage: "})


class TokenizerSpy(list):
    """Every text the sentence-transformers tokenizer receives, after any prompt was prepended (a spy on the
    Transformer module's processor call, which training, ``encode`` and cross-encoders all go through);
    ``.training`` holds the ones tokenized for training batches (inside the trainer's data collator), without the
    model card's example sentences that sentence-transformers encodes on its own."""

    def __init__(self):
        super().__init__()
        self.training: list = []
        self.in_collator = False


@pytest.fixture
def encoder_texts(monkeypatch) -> TokenizerSpy:
    from sentence_transformers.base.data_collator import BaseDataCollator
    from sentence_transformers.base.modules.transformer import Transformer

    seen = TokenizerSpy()
    real_call, real_collate = Transformer._call_processor, BaseDataCollator.__call__

    def spy(self, modality, processor_inputs, *args, **kwargs):
        if modality == "text":
            seen.extend(processor_inputs["text"])
            if seen.in_collator:
                seen.training.extend(processor_inputs["text"])
        return real_call(self, modality, processor_inputs, *args, **kwargs)

    def collate(self, features):
        seen.in_collator = True
        try:
            return real_collate(self, features)
        finally:
            seen.in_collator = False

    monkeypatch.setattr(Transformer, "_call_processor", spy)
    monkeypatch.setattr(BaseDataCollator, "__call__", collate)
    return seen


# The LLM client's tests (test_llm_client.py, test_batch_scale.py): the mock OpenAI transport and an in-memory
# response cache.
@pytest.fixture
def api():
    from rlhn_assets_tests.test_llm_client import FakeAPI

    return FakeAPI()


@pytest.fixture
def cache():
    from rlhn_assets.lib.llm.cache import ResponseCache

    with ResponseCache(":memory:") as c:
        yield c
