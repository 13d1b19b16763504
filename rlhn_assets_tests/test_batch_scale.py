"""Batch mode at scale: jobs bounded by request count and file bytes, the whole-dataset prefetch (submit all, then
wait; an interrupted run resumes without resubmitting), and the fake OpenAI server's listwise verdicts and
Files/Batches endpoints through the real client (``benchmarks/bench_scale.py`` runs the same at 100K)."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from rlhn_assets.lib.judging.parsing import parse_listwise
from rlhn_assets.lib.judging.prompts import render_listwise
from rlhn_assets.lib.llm.cache import ResponseCache
from rlhn_assets.lib.llm.client import (
    BatchChunker,
    EndpointSettings,
    LLMClient,
    LLMRequest,
    batch_line,
    chunk_batch_lines,
    request_key,
)
from rlhn_assets_tests.fake_openai_server import get_stats, listwise_verdict, passage_share, running_server
from rlhn_assets_tests.test_llm_client import SECRET, make_client, req, settings


# ------------------------------------------------------------------------------------------------ chunking
def lines(sizes: list[int]) -> list[tuple[str, bytes]]:
    return [(f"k{i}", b"x" * (n - 1) + b"\n") for i, n in enumerate(sizes)]


def test_chunks_bounded_by_request_count():
    chunks = list(chunk_batch_lines(lines([10] * 7), max_requests=3, max_bytes=10**9))
    assert [keys for keys, _ in chunks] == [["k0", "k1", "k2"], ["k3", "k4", "k5"], ["k6"]]
    assert [len(data) for _, data in chunks] == [30, 30, 10]


def test_chunks_bounded_by_bytes():
    # 40 + 50 = 90 fits 100; + 20 = 110 does not: a new file starts
    chunks = list(chunk_batch_lines(lines([40, 50, 20, 60, 45]), max_requests=100, max_bytes=100))
    assert [keys for keys, _ in chunks] == [["k0", "k1"], ["k2", "k3"], ["k4"]]
    assert all(len(data) <= 100 for _, data in chunks)
    assert b"".join(data for _, data in chunks) == b"".join(line for _, line in lines([40, 50, 20, 60, 45]))


def test_a_line_larger_than_the_byte_limit_gets_a_file_of_its_own():
    chunks = list(chunk_batch_lines(lines([10, 500, 10]), max_requests=100, max_bytes=100))
    assert [keys for keys, _ in chunks] == [["k0"], ["k1"], ["k2"]]
    with pytest.raises(ValueError):
        BatchChunker(0, 10)


def test_endpoint_defaults_sit_at_openai_limits_and_the_tier_sets_them():
    from rlhn_assets.resources import JudgeTierResource

    s = EndpointSettings(model="m")
    assert s.batch_chunk_size == 50_000 and 150_000_000 <= s.batch_chunk_bytes < 200_000_000
    tier = JudgeTierResource(tier=1, kind="listwise", mode="batch", batch_chunk_size=250, batch_chunk_bytes=10**6)
    es = tier.endpoint_settings()
    assert (es.batch_chunk_size, es.batch_chunk_bytes) == (250, 10**6)
    with pytest.raises(ValueError):
        JudgeTierResource(tier=1, kind="listwise", batch_chunk_size=50_001)  # above OpenAI's per-file limit
    with pytest.raises(ValueError):
        EndpointSettings(model="m", batch_chunk_bytes=0)


def test_batch_jobs_split_by_bytes_through_the_client(api, cache):
    requests = [req(f"payload {i} " + "y" * 200) for i in range(6)]
    one_line = len(batch_line(EndpointSettings(model="judge-model", base_url="http://x/v1"), "k" * 64, requests[0]))
    client = make_client(api, cache, mode="batch", batch_chunk_bytes=int(one_line * 2.5))
    out = client.complete_many(requests)
    assert all(r.error is None for r in out)
    assert api.paths[("POST", "/v1/batches")] == 3  # 2 + 2 + 2 lines
    assert [j.requests for j in client.batch_jobs.values()] == [2, 2, 2]
    assert all(j.input_bytes <= one_line * 2.5 for j in client.batch_jobs.values())
    assert sum(len(lines) for lines in api.batch_inputs.values()) == 6
    assert all(j.submitted and j.status == "completed" and j.answers == 2 for j in client.batch_jobs.values())


# ------------------------------------------------------------------------------------------------ prefetch
def test_prefetch_submits_the_whole_stream_then_judging_hits_the_cache(api, cache):
    rounds = [[req(f"p{r}-{i}") for i in range(5)] for r in range(4)]
    client = make_client(api, cache, mode="batch", batch_chunk_size=8)
    msgs: list[str] = []
    counts = client.batch_prefetch(iter(rounds), progress=msgs.append)
    assert counts["requests"] == 20 and counts["submitted"] == 20 and counts["jobs_submitted"] == 3  # 8 + 8 + 4
    assert counts["answers"] == 20 and cache.count() == 20
    assert any("submitted job" in m for m in msgs) and any("completed" in m for m in msgs)
    # the request bodies are stored with the answers (read back from the spooled input files, then dropped)
    stored = json.loads(cache._c().execute("SELECT request_json FROM llm_responses LIMIT 1").fetchall()[0][0])
    assert stored["model"] == "judge-model" and stored["messages"][-1]["content"].startswith("p")
    assert client._spool_mem == {}
    # the judging pass: everything cached, no call, no job
    again = make_client(api, cache, mode="batch")
    out = again.complete_many([r for rs in rounds for r in rs])
    assert all(r.cached for r in out) and api.paths[("POST", "/v1/batches")] == 3
    # a second prefetch finds everything cached
    assert make_client(api, cache, mode="batch").batch_prefetch(rounds)["cached"] == 20


def test_prefetch_interrupted_after_submit_resumes_without_resubmitting(api, cache):
    rounds = [[req(f"q{r}-{i}") for i in range(3)] for r in range(3)]
    api.fail_batch_get = True  # the run dies while waiting (like a kill between submit and completion)
    with pytest.raises(openai.InternalServerError):
        make_client(api, cache, mode="batch", batch_chunk_size=4, max_retries=0).batch_prefetch(rounds)
    assert api.paths[("POST", "/v1/batches")] == 3 and len(cache.batches(open_only=True)) == 3
    api.fail_batch_get = False
    client = make_client(api, cache, mode="batch", batch_chunk_size=4)
    counts = client.batch_prefetch(rounds)
    assert counts["resumed"] == 9 and counts["submitted"] == 0 and counts["jobs_submitted"] == 0
    assert api.paths[("POST", "/v1/batches")] == 3 and api.paths[("POST", "/v1/files")] == 3
    assert client.stats.batches_resumed == 3 and client.stats.calls_made == 0
    assert cache.count() == 9 and cache.batches(open_only=True) == []
    assert {j.submitted for j in client.batch_jobs.values()} == {False}


def test_prefetch_spools_inputs_beside_a_file_cache_and_resume_reads_them(api, tmp_path):
    rounds = [[req(f"s{i}") for i in range(3)]]
    with ResponseCache(tmp_path / "llm.duckdb") as cache:
        api.fail_batch_get = True
        with pytest.raises(openai.InternalServerError):
            make_client(api, cache, mode="batch", max_retries=0).batch_prefetch(rounds)
        spool = list((tmp_path / "llm.duckdb.batch_inputs").iterdir())
        assert len(spool) == 1 and spool[0].read_bytes().count(b"\n") == 3
        api.fail_batch_get = False
        make_client(api, cache, mode="batch").batch_prefetch(rounds)  # a new client: the spool is on disk
        bodies = [json.loads(r[0]) for r in cache._c().execute("SELECT request_json FROM llm_responses").fetchall()]
        assert sorted(b["messages"][-1]["content"] for b in bodies) == ["s0", "s1", "s2"]
        assert list((tmp_path / "llm.duckdb.batch_inputs").iterdir()) == []


def test_has_many(cache, api):
    make_client(api, cache).complete_many([req("h1"), req("h2")])
    keys = [request_key(make_client(api, cache).settings, req(x)) for x in ("h1", "h2", "h3")]
    assert cache.has_many(keys) == set(keys[:2])
    assert cache.has_many([]) == set()


def test_keep_loop_reuses_one_loop_and_client_until_close(api, cache):
    http = httpx.AsyncClient(transport=httpx.MockTransport(api.handler))
    client = LLMClient(settings(), cache, http_client=http, api_key=SECRET, keep_loop=True)
    assert client.complete_many([req("k1")])[0].text == "ans:k1"
    state, (loop, thread) = client._state, client._bg
    assert state.loop is loop and thread.is_alive()
    assert client.complete_many([req("k2"), req("k1")])[0].text == "ans:k2"
    assert client._state is state  # the same openai client and semaphore: connections are kept
    assert api.paths[("POST", "/v1/chat/completions")] == 2 and cache.count() == 2
    client.close()
    assert not thread.is_alive() and client._bg is None and loop.is_closed()
    client.close()  # idempotent


# ------------------------------------------------------------------------------------------------ the fake server
def _listwise(docs: list[str]) -> LLMRequest:
    r = render_listwise("tier1", "what is x?", [("", "x is y.")], [(f"d{i}", "", t) for i, t in enumerate(docs)])
    return LLMRequest(messages=r.messages, prompt_version=r.prompt_version)


def test_fake_listwise_verdict_flags_the_share_by_passage_hash():
    docs = [f"passage number {i} about things" for i in range(400)]
    r = _listwise(docs[:25])
    content = r.messages[0]["content"]
    v = parse_listwise(listwise_verdict(content, 0.3), 25)
    shares = [passage_share(d) for d in docs[:25]]
    assert set(v.better) == {i + 1 for i, u in enumerate(shares) if u < 0.15}
    assert set(v.worse) == {i + 1 for i, u in enumerate(shares) if 0.15 <= u < 0.3}
    # about the share over many passages; a smaller share flags a subset (tier 2 confirms part of tier 1's flags)
    flagged = [u < 0.1 for u in map(passage_share, docs)]
    assert 0.06 < sum(flagged) / len(docs) < 0.14
    assert listwise_verdict("no documents block here", 0.5) is None


def test_fake_server_batches_through_the_client(tmp_path):
    docs = [f"doc {i} text" for i in range(60)]
    requests = [_listwise(docs[i : i + 20]) for i in range(0, 60, 20)] + [req("plain")]
    with running_server(0.0, flag_shares={"fake-t1": 0.5}, batch_delay_s=0.3) as url:
        s = EndpointSettings(
            model="fake-t1", base_url=url, mode="batch", batch_chunk_size=2, batch_poll_s=0.1, api_key_env="NO_KEY_X"
        )
        with ResponseCache(tmp_path / "c.duckdb") as cache:
            client = LLMClient(s, cache)
            out = client.complete_many(requests)
            stats = get_stats(url, by_content=False)
        assert all(r.error is None for r in out)
        assert stats["batches"] == 2 and stats["batch_requests"] == 4 == stats["batch_requests_distinct"]
        assert stats["total"] == 0  # no online call
        for r, rq in zip(out[:3], requests[:3]):
            v = parse_listwise(r.text, 20)
            assert r.text == listwise_verdict(rq.messages[0]["content"], 0.5)
            assert len(v.better) + len(v.worse) > 0
        assert out[3].text.startswith("answer:")  # not a listwise prompt: the plain answer
        assert [j.status for j in client.batch_jobs.values()] == ["completed", "completed"]
        # online, the same answers
        with ResponseCache(tmp_path / "c2.duckdb") as cache2:
            online = LLMClient(EndpointSettings(model="fake-t1", base_url=url, api_key_env="NO_KEY_X"), cache2)
            assert [r.text for r in online.complete_many(requests)] == [r.text for r in out]


def test_fake_server_file_content_roundtrip():
    with running_server(0.0) as url:
        payload = b'{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {}}\n'
        with httpx.Client(base_url=url.rsplit("/v1", 1)[0]) as h:
            f = h.post("/v1/files", files={"file": ("in.jsonl", payload)}, data={"purpose": "batch"}).json()
            assert f["bytes"] == len(payload) and f["purpose"] == "batch"
            assert h.get(f"/v1/files/{f['id']}/content").content == payload
            assert h.get("/v1/files/file-nope/content").status_code == 404
            b = h.post("/v1/batches", json={"input_file_id": f["id"], "endpoint": "/v1/chat/completions"}).json()
            assert b["status"] == "in_progress" and json.loads(h.get("/stats").text)["batch_requests"] == 1


assert SECRET  # the shared test key (never sent anywhere but the mock transport)
