"""The response cache can never hand one model's answers to another (issue "Safe with money", item 2): the
model's identity (a local GGUF's sha256; a remote endpoint's URL + model name) is part of the cache key and is
recorded with every verdict, so switching `local_model` under the same alias re-judges and says which model did."""

import os
import stat
import sys
from pathlib import Path

import duckdb
import pytest

from rlhn_assets.lib import local_llm
from rlhn_assets.lib.judging.judges import Instance, Passage
from rlhn_assets.lib.judging.store import write_judgments
from rlhn_assets.lib.llm.client import EndpointSettings, LLMRequest, request_key
from rlhn_assets.lib.schema import apply_schema
from rlhn_assets.resources import JudgeTierResource

FAKE = Path(__file__).parent / "fake_llama_server.py"


def test_the_key_holds_the_model_identity():
    req = LLMRequest(messages=({"role": "user", "content": "q"},), prompt_version="p")
    a = EndpointSettings(model="alias", model_identity="gguf-sha256:aaa")
    b = EndpointSettings(model="alias", model_identity="gguf-sha256:bbb")
    assert request_key(a, req) != request_key(b, req)
    assert request_key(a, req) == request_key(
        EndpointSettings(model="alias", model_identity="gguf-sha256:aaa", base_url="http://127.0.0.1:4242/v1"), req
    )
    # remote: the same model name behind two endpoints may be two models (e.g. two vLLM checkpoints)
    one = EndpointSettings(model="my-model", base_url="http://gpu-a:8000/v1")
    two = EndpointSettings(model="my-model", base_url="http://gpu-b:8000/v1")
    assert one.identity == "http://gpu-a:8000/v1|my-model" and request_key(one, req) != request_key(two, req)
    assert EndpointSettings(model="gpt-4o").identity == "https://api.openai.com/v1|gpt-4o"


@pytest.fixture
def fake_server(tmp_path, monkeypatch):
    """The llama-server test double (answers 'Yes' with logprobs) as the binary; a private install cache."""
    monkeypatch.setenv("RLHN_CACHE", str(tmp_path / "install-cache"))
    server = tmp_path / "llama-server"
    server.write_text(f'#!/bin/sh\nexec {sys.executable} {FAKE} "$@"\n')
    server.chmod(server.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("RLHN_LLAMA_SERVER", str(server))
    for k in ("FAKE_LLAMA_CRASH", "FAKE_LLAMA_CRASH_ALWAYS", "FAKE_LLAMA_HANG"):
        monkeypatch.delenv(k, raising=False)


def _gguf(tmp_path, name: str) -> Path:
    p = tmp_path / "models" / f"{name}.Q4_K_M.gguf"
    p.parent.mkdir(exist_ok=True)
    p.write_bytes(b"GGUF" + os.urandom(64))
    return p


INST = Instance(
    "i0",
    "what is a widget?",
    (Passage("p", "", "a widget is a small device"),),
    (Passage("n1", "", "widgets are small devices"), Passage("n2", "", "the weather in Oslo")),
)


def _judge_once(res: JudgeTierResource, db, tier: int):
    with res.open_judge() as judge:
        rows = judge.judge([INST])
        with duckdb.connect(str(db)) as conn:
            apply_schema(conn)
            write_judgments(conn, "toy", tier, judge, rows)
        return judge.stats


def test_two_local_models_under_one_alias_never_share_a_cache_entry(tmp_path, fake_server, monkeypatch):
    models = {"model-a": _gguf(tmp_path, "model-a"), "model-b": _gguf(tmp_path, "model-b")}
    monkeypatch.setattr(local_llm, "assemble_gguf", lambda name, cache_dir=None: models[name])
    common = dict(
        tier=2,
        kind="pointwise",
        model="the-alias",
        temperature=0.0,
        concurrency=1,
        cache_path=str(tmp_path / "llm.duckdb"),
        max_retries=0,
        timeout_s=30,
    )
    db = tmp_path / "j.duckdb"

    first = _judge_once(JudgeTierResource(local_model="model-a", **common), db, 1)
    assert first.calls == 2 and first.cache_hits == 0
    again = _judge_once(JudgeTierResource(local_model="model-a", **common), db, 1)
    assert again.calls == 0 and again.cache_hits == 2  # the same model: served from the cache
    other = _judge_once(JudgeTierResource(local_model="model-b", **common), db, 2)
    assert other.calls == 2 and other.cache_hits == 0  # same alias, another GGUF: asked again

    with duckdb.connect(str(db), read_only=True) as conn:
        recorded = dict(
            conn.execute("SELECT tier, any_value(judge_model_identity) FROM judgments GROUP BY 1").fetchall()
        )
        aliases = {m for (m,) in conn.execute("SELECT DISTINCT judge_model FROM judgments").fetchall()}
    assert aliases == {"the-alias"}
    assert recorded[1] == f"gguf-sha256:{local_llm.model_sha256(models['model-a'])}"
    assert recorded[2] == f"gguf-sha256:{local_llm.model_sha256(models['model-b'])}"
