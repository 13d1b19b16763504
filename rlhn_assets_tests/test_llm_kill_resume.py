"""SIGKILL a judging process mid-run, re-run it: nothing that reached the cache is asked twice.

A fake OpenAI-compatible server (``fake_openai_server.py``) runs in a subprocess and counts requests per
message content. DuckDB refuses a second process while the judging process holds the cache file, so the
kill is timed on the server's request count, and the cache is read only once the process is dead.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from rlhn_assets.lib.llm.cache import ResponseCache
from rlhn_assets.lib.llm.client import EndpointSettings, LLMRequest, request_key
from rlhn_assets_tests.fake_openai_server import answer_text, get_stats, running_server

ROOT = Path(__file__).resolve().parents[1]
N = 60

JUDGE_SCRIPT = textwrap.dedent("""
    import json, sys
    from rlhn_assets.lib.llm.cache import ResponseCache
    from rlhn_assets.lib.llm.client import EndpointSettings, LLMClient, LLMRequest

    base_url, cache_path, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    # a local server on a random port, like llama-server: the identity, not the URL, names the model
    settings = EndpointSettings(model="fake-judge", base_url=base_url, model_identity="fake-judge-weights",
                                api_key_env="FAKE_JUDGE_KEY_UNSET",
                                concurrency=4, max_retries=2, backoff_base_s=0.05, backoff_max_s=0.2,
                                timeout_s=30)
    requests = [LLMRequest(messages=({"role": "user", "content": f"kill-resume item {i}"},),
                           prompt_version="kr-v1") for i in range(n)]
    with ResponseCache(cache_path) as cache:
        client = LLMClient(settings, cache)
        out = client.complete_many(requests)
    print(json.dumps({"stats": client.stats.as_dict(), "errors": sum(r.error is not None for r in out),
                      "http_backend": client.http_backend_in_use,
                      "texts": [r.text for r in out]}))
""")


def contents() -> list[str]:
    return [f"kill-resume item {i}" for i in range(N)]


def expected_keys() -> set[str]:
    s = EndpointSettings(
        model="fake-judge",
        base_url="http://ignored/v1",
        model_identity="fake-judge-weights",
        api_key_env="FAKE_JUDGE_KEY_UNSET",
        concurrency=4,
        max_retries=2,
        backoff_base_s=0.05,
        backoff_max_s=0.2,
        timeout_s=30,
    )
    return {
        request_key(s, LLMRequest(messages=({"role": "user", "content": c},), prompt_version="kr-v1"))
        for c in contents()
    }


def cached_contents(cache_path: Path) -> dict[str, str]:
    """key -> user message content of every cached row (the process that wrote them must be gone)."""
    with ResponseCache(cache_path, open_timeout_s=30) as cache:
        rows = cache._conn.execute("SELECT key, request_json FROM llm_responses").fetchall()
    return {k: json.loads(rj)["messages"][-1]["content"] for k, rj in rows}


@pytest.fixture(scope="module")
def server():
    with running_server(delay_s=0.2) as base_url:
        yield base_url


def judge_env() -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    env.pop("FAKE_JUDGE_KEY_UNSET", None)  # no key: a local base_url works without one
    return env


def run_judge(script: Path, base_url: str, cache_path: Path) -> dict:
    env = judge_env()
    proc = subprocess.run(
        [sys.executable, str(script), base_url, str(cache_path), str(N)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_sigkill_then_resume_asks_nothing_twice(server, tmp_path):
    script = tmp_path / "judge.py"
    script.write_text(JUDGE_SCRIPT)
    cache_path = tmp_path / "cache" / "llm.duckdb"
    env = judge_env()

    total0 = get_stats(server)["total"]
    proc = subprocess.Popen(
        [sys.executable, str(script), server, str(cache_path), str(N)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    # 4 in flight x 0.2 s = 20 requests/s: after 32 requests the writer has flushed at least twice (0.5 s timer)
    deadline = time.monotonic() + 60
    while get_stats(server)["total"] - total0 < 32:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "judging process made no progress"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    assert proc.returncode == -signal.SIGKILL

    before = cached_contents(cache_path)
    assert 0 < len(before) < N, f"{len(before)} rows cached before the kill"
    asked_before = get_stats(server)["by_content"]
    assert all(asked_before.get(c) == 1 for c in before.values())

    # rerun to completion
    result = run_judge(script, server, cache_path)
    assert result["errors"] == 0
    assert result["texts"] == [answer_text(c) for c in contents()]
    assert result["stats"]["cache_hits"] == len(before)
    assert result["stats"]["calls_made"] == N - len(before)

    after = get_stats(server)["by_content"]
    final = cached_contents(cache_path)
    assert set(final) == expected_keys() and len(final) == N
    # nothing that was stored before the rerun was asked again
    assert {c: after[c] for c in before.values()} == {c: 1 for c in before.values()}
    # the rest was asked at most twice (once more if it was in flight when the process died)
    assert all(1 <= after[c] <= 2 for c in contents())

    # a third run: all cached, no request at all
    total_before_third = get_stats(server)["total"]
    third = run_judge(script, server, cache_path)
    assert third["stats"]["calls_made"] == 0 and third["stats"]["cache_hits"] == N
    assert get_stats(server)["total"] == total_before_third
    assert third["texts"] == result["texts"]
