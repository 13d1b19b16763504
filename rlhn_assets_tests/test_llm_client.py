"""LLMClient / ResponseCache: a real ``openai.AsyncOpenAI`` driven through ``httpx.MockTransport`` (no network)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import time
from collections import Counter

import httpx
import openai
import pytest

from rlhn_assets.lib.llm.cache import ResponseCache
from rlhn_assets.lib.llm.client import (
    EndpointSettings,
    LLMClient,
    LLMConfigError,
    LLMRequest,
    request_key,
)

SECRET = "sk-test-SECRET-0123456789abcdef"
BASE_URL = "http://stub.invalid/v1"


def settings(**kw) -> EndpointSettings:
    base = dict(
        model="judge-model",
        base_url=BASE_URL,
        concurrency=4,
        max_retries=3,
        backoff_base_s=0.001,
        backoff_max_s=0.01,
        timeout_s=5.0,
        batch_poll_s=0.005,
    )
    base.update(kw)
    return EndpointSettings(**base)


def req(content: str, **kw) -> LLMRequest:
    return LLMRequest(
        messages=({"role": "system", "content": "judge"}, {"role": "user", "content": content}),
        prompt_version=kw.pop("prompt_version", "v1"),
        **kw,
    )


def completion(text: str, *, usage: bool = True, logprobs: list | None = None, finish: str = "stop") -> dict:
    choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
    if logprobs is not None:
        choice["logprobs"] = {"content": logprobs}
    out = {"id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": "judge-model", "choices": [choice]}
    if usage:
        out["usage"] = {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14}
    return out


class FakeAPI:
    """A minimal OpenAI API: chat completions, files, batches. ``script`` maps a user message to a list of
    outcomes consumed one per attempt ("429", "500", "400", "timeout", or a dict = a completion body)."""

    def __init__(self):
        self.chat_bodies: list[dict] = []
        self.auth_headers: list[str] = []
        self.attempts: Counter = Counter()
        self.script: dict[str, list] = {}
        self.retry_after: str | None = None
        self.delay_s = 0.0
        self.in_flight = 0
        self.max_in_flight = 0
        self.usage = True
        self.logprobs: list | None = None
        # batch API state
        self.files: dict[str, bytes] = {}
        self.batches: dict[str, dict] = {}
        self.batch_inputs: dict[str, list[dict]] = {}
        self.paths: Counter = Counter()
        self.fail_batch_get = False
        self.polls_before_done = 1
        self.final_status = "completed"
        self.drop_from_output: set[str] = set()  # user contents whose answer is missing from the output file
        self.error_lines: set[str] = set()  # user contents answered in the error file

    @staticmethod
    def user_content(body: dict) -> str:
        return body["messages"][-1]["content"]

    def answer(self, body: dict) -> dict:
        return completion("ans:" + self.user_content(body), usage=self.usage, logprobs=self.logprobs)

    async def handler(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        self.paths[(request.method, path if not path.startswith("/v1/batches/") else "/v1/batches/{id}")] += 1
        self.auth_headers.append(request.headers.get("authorization", ""))
        if path == "/v1/chat/completions":
            return await self.chat(request)
        if path == "/v1/files" and request.method == "POST":
            return self.upload(request)
        if path == "/v1/batches" and request.method == "POST":
            return self.create_batch(request)
        if path.startswith("/v1/batches/") and request.method == "GET":
            return self.get_batch(path.rsplit("/", 1)[1])
        if path.startswith("/v1/files/") and path.endswith("/content"):
            return httpx.Response(200, content=self.files[path.split("/")[3]])
        return httpx.Response(404, json={"error": {"message": f"no route {path}"}})

    async def chat(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        self.chat_bodies.append(body)
        content = self.user_content(body)
        self.attempts[content] += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
        finally:
            self.in_flight -= 1
        plan = self.script.get(content)
        outcome = plan.pop(0) if plan else None
        if outcome == "429":
            headers = {"retry-after": self.retry_after} if self.retry_after else {}
            return httpx.Response(429, headers=headers, json={"error": {"message": "slow down"}})
        if outcome == "500":
            return httpx.Response(500, json={"error": {"message": "boom"}})
        if outcome == "400":
            return httpx.Response(400, json={"error": {"message": "bad request"}})
        if outcome == "timeout":
            raise httpx.ReadTimeout("timed out", request=request)
        return httpx.Response(200, json=outcome if isinstance(outcome, dict) else self.answer(body))

    # ---- batch API
    def upload(self, request: httpx.Request) -> httpx.Response:
        lines = [
            json.loads(ln)
            for ln in request.content.decode().splitlines()  # the JSONL part of the multipart
            if ln.startswith("{") and '"custom_id"' in ln
        ]
        fid = f"file-in-{len(self.files)}"
        self.files[fid] = b"".join(json.dumps(x).encode() + b"\n" for x in lines)
        self.batch_inputs[fid] = lines
        return httpx.Response(
            200,
            json={
                "id": fid,
                "object": "file",
                "bytes": len(self.files[fid]),
                "created_at": 0,
                "filename": "batch_input.jsonl",
                "purpose": "batch",
                "status": "processed",
            },
        )

    def batch_obj(self, bid: str) -> dict:
        b = self.batches[bid]
        return {
            "id": bid,
            "object": "batch",
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
            "created_at": 0,
            "input_file_id": b["input_file_id"],
            "status": b["status"],
            "output_file_id": b.get("output_file_id"),
            "error_file_id": b.get("error_file_id"),
        }

    def create_batch(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        assert body["endpoint"] == "/v1/chat/completions" and body["completion_window"] == "24h"
        bid = f"batch_{len(self.batches)}"
        self.batches[bid] = {"input_file_id": body["input_file_id"], "status": "validating", "polls": 0}
        return httpx.Response(200, json=self.batch_obj(bid))

    def get_batch(self, bid: str) -> httpx.Response:
        if self.fail_batch_get:
            return httpx.Response(500, json={"error": {"message": "poll failed"}})
        b = self.batches[bid]
        b["polls"] += 1
        if b["status"] not in ("completed", "expired", "cancelled", "failed"):
            if b["polls"] <= self.polls_before_done:
                b["status"] = "in_progress"
            else:
                self.finish_batch(bid)
        return httpx.Response(200, json=self.batch_obj(bid))

    def finish_batch(self, bid: str) -> None:
        b = self.batches[bid]
        out, err = [], []
        for line in self.batch_inputs[b["input_file_id"]]:
            content = self.user_content(line["body"])
            if content in self.drop_from_output:
                continue
            if content in self.error_lines:
                err.append(
                    {
                        "id": "r",
                        "custom_id": line["custom_id"],
                        "error": None,
                        "response": {"status_code": 400, "body": {"error": {"message": "context too long"}}},
                    }
                )
                continue
            out.append(
                {
                    "id": "r",
                    "custom_id": line["custom_id"],
                    "error": None,
                    "response": {"status_code": 200, "request_id": "q", "body": self.answer(line["body"])},
                }
            )
        for kind, rows in (("output", out), ("error", err)):
            if rows:
                fid = f"file-{kind}-{bid}"
                self.files[fid] = b"".join(json.dumps(r).encode() + b"\n" for r in rows)
                b[f"{kind}_file_id"] = fid
        b["status"] = self.final_status


def make_client(api: FakeAPI, cache: ResponseCache, **kw) -> LLMClient:
    api_key = kw.pop("api_key", SECRET)
    http = httpx.AsyncClient(transport=httpx.MockTransport(api.handler))
    return LLMClient(settings(**kw), cache, http_client=http, api_key=api_key)


# ----------------------------------------------------------------------------------------------------- online
def test_success_tokens_order_dedup_and_cache_hit(api, cache):
    client = make_client(api, cache)
    msgs: list[str] = []
    requests = [req("a"), req("b"), req("a"), req("c")]
    out = client.complete_many(requests, progress=msgs.append)
    assert [r.text for r in out] == ["ans:a", "ans:b", "ans:a", "ans:c"]
    assert all(r.error is None and not r.cached and r.finish_reason == "stop" for r in out)
    assert (out[0].tokens_in, out[0].tokens_out) == (11, 3)
    assert len(api.chat_bodies) == 3  # the duplicate was asked once
    st = client.stats
    assert (st.calls_made, st.cache_hits, st.errors, st.tokens_in, st.tokens_out) == (3, 0, 0, 33, 9)
    assert cache.count() == 3
    assert msgs and "3/3" in msgs[-1]
    assert all(h == f"Bearer {SECRET}" for h in api.auth_headers)

    client2 = make_client(api, cache)
    again = client2.complete_many(requests)
    assert client2.stats.calls_made == 0 and client2.stats.cache_hits == 3
    assert len(api.chat_bodies) == 3
    assert [r.text for r in again] == ["ans:a", "ans:b", "ans:a", "ans:c"]
    assert all(r.cached for r in again)
    assert (again[0].tokens_in, again[0].tokens_out) == (11, 3)


def test_429_then_success_honours_retry_after(api, cache):
    api.script["x"] = ["429"]
    api.retry_after = "0.15"
    client = make_client(api, cache)  # backoff_max_s=0.01 caps the 0.15 s Retry-After
    [r] = client.complete_many([req("x")])
    assert r.text == "ans:x" and r.error is None
    assert api.attempts["x"] == 2 and client.stats.retries == 1
    # with a larger cap the header decides the wait (the jittered backoff alone would be <= 1 ms)
    api.script["y"] = ["429"]
    client = make_client(api, cache, backoff_max_s=1.0)
    t0 = time.perf_counter()
    [r] = client.complete_many([req("y")])
    assert r.text == "ans:y" and time.perf_counter() - t0 >= 0.15


def test_500_then_success(api, cache):
    api.script["x"] = ["500", "500"]
    client = make_client(api, cache)
    [r] = client.complete_many([req("x")])
    assert r.text == "ans:x" and api.attempts["x"] == 3 and client.stats.retries == 2
    assert cache.count() == 1


def test_timeout_then_success(api, cache):
    api.script["x"] = ["timeout"]
    client = make_client(api, cache)
    [r] = client.complete_many([req("x")])
    assert r.text == "ans:x" and api.attempts["x"] == 2 and client.stats.retries == 1


def test_persistent_500_gives_error_response_not_cached(api, cache):
    api.script["x"] = ["500"] * 10
    client = make_client(api, cache, max_retries=2)
    [r] = client.complete_many([req("x")])
    assert r.error is not None and "500" in r.error and r.text is None
    assert api.attempts["x"] == 3  # 1 + max_retries
    assert client.stats.errors == 1 and client.stats.retries == 2
    assert cache.count() == 0
    # a later run asks again (errors are not cached)
    [r2] = make_client(api, cache, max_retries=2).complete_many([req("x")])
    assert api.attempts["x"] == 6 and r2.error is not None


def test_400_not_retried(api, cache):
    api.script["x"] = ["400"]
    client = make_client(api, cache)
    [r] = client.complete_many([req("x")])
    assert r.error is not None and "400" in r.error
    assert api.attempts["x"] == 1 and client.stats.retries == 0 and cache.count() == 0


def test_missing_usage_counts_zero(api, cache):
    api.usage = False
    client = make_client(api, cache)
    [r] = client.complete_many([req("x")])
    assert r.text == "ans:x" and (r.tokens_in, r.tokens_out) == (0, 0)


def test_logprobs_requested_parsed_and_cached(api, cache):
    api.logprobs = [
        {
            "token": "Yes",
            "logprob": -0.1,
            "top_logprobs": [{"token": "Yes", "logprob": -0.1}, {"token": "No", "logprob": -2.4}],
        },
        {"token": "!", "logprob": -0.5, "top_logprobs": [{"token": "!", "logprob": -0.5}]},
    ]
    client = make_client(api, cache)
    [r] = client.complete_many([req("x", top_logprobs=2)])
    assert api.chat_bodies[-1]["logprobs"] is True and api.chat_bodies[-1]["top_logprobs"] == 2
    assert r.top_logprobs == [[("Yes", -0.1), ("No", -2.4)], [("!", -0.5)]]
    [c] = make_client(api, cache).complete_many([req("x", top_logprobs=2)])
    assert c.cached and c.top_logprobs == r.top_logprobs
    # not requested -> not sent, not parsed
    [plain] = client.complete_many([req("z")])
    assert "logprobs" not in api.chat_bodies[-1] and plain.top_logprobs is None


SCHEMA = {"type": "object", "properties": {"relevant": {"type": "boolean"}}, "required": ["relevant"]}


@pytest.mark.parametrize(
    "style,expected",
    [
        ("json_schema", {"type": "json_schema", "json_schema": {"name": "verdict", "schema": SCHEMA, "strict": True}}),
        ("json_object_schema", {"type": "json_object", "schema": SCHEMA}),
        ("none", None),
    ],
)
def test_response_format_styles(api, cache, style, expected):
    client = make_client(api, cache, response_format_style=style, seed=7, max_tokens=64)
    client.complete_many([req("x", json_schema=SCHEMA), req("y")])
    by_content = {b["messages"][-1]["content"]: b for b in api.chat_bodies}
    assert by_content["x"].get("response_format") == expected
    assert "response_format" not in by_content["y"]  # no schema -> nothing sent
    body = by_content["x"]
    assert body["model"] == "judge-model" and body["seed"] == 7 and body["max_tokens"] == 64
    assert body["temperature"] == pytest.approx(0.1)


def test_request_max_tokens_overrides_settings(api, cache):
    client = make_client(api, cache, max_tokens=100)
    client.complete_many([req("x", max_tokens=5)])
    assert api.chat_bodies[-1]["max_tokens"] == 5


def test_request_key_contents():
    s = settings()
    base = request_key(s, req("x"))
    assert base == request_key(settings(api_key_env="OTHER"), req("x"))
    # the endpoint is part of a remote model's identity (test_model_identity.py); an explicit identity wins
    assert base != request_key(settings(base_url="http://elsewhere/v1"), req("x"))
    assert request_key(
        settings(base_url="http://127.0.0.1:1/v1", model_identity="gguf-sha256:a"), req("x")
    ) == request_key(settings(base_url="http://127.0.0.1:2/v1", model_identity="gguf-sha256:a"), req("x"))
    assert base != request_key(s, req("x", attempt=1))
    assert base != request_key(s, req("x", prompt_version="v2"))
    assert base != request_key(settings(model="other"), req("x"))
    assert base != request_key(settings(temperature=0.0), req("x"))
    assert base != request_key(settings(seed=1), req("x"))
    assert base != request_key(s, req("x", top_logprobs=5))
    assert base == request_key(s, req("x", max_tokens=s.max_tokens))  # effective max_tokens
    assert request_key(settings(response_format_style="json_schema"), req("x", json_schema=SCHEMA)) != request_key(
        settings(response_format_style="json_object_schema"), req("x", json_schema=SCHEMA)
    )
    assert len(base) == 64 and int(base, 16) >= 0


def test_api_key_never_stored_or_shown(api, cache, monkeypatch):
    monkeypatch.setenv("JUDGE_KEY_FOR_TEST", SECRET)
    http = httpx.AsyncClient(transport=httpx.MockTransport(api.handler))
    s = settings(api_key_env="JUDGE_KEY_FOR_TEST")
    client = LLMClient(s, cache, http_client=http)  # key from the environment
    client.complete_many([req("x", json_schema=SCHEMA, top_logprobs=1)])
    explicit = make_client(api, cache, mode="batch")  # explicit key, batch mode tables too
    explicit.complete_many([req("y")])
    assert all(h == f"Bearer {SECRET}" for h in api.auth_headers)
    assert SECRET not in repr(s) and SECRET not in repr(client) and SECRET not in repr(explicit)
    assert SECRET not in str(vars(explicit)) and SECRET not in repr(cache)
    conn = cache._conn
    for table in ("llm_responses", "llm_batches"):
        cols = [r[0] for r in conn.execute(f"DESCRIBE {table}").fetchall()]
        rows = conn.execute(f"SELECT * FROM {table}").fetchall()
        assert rows, table
        for row in rows:
            for col, val in zip(cols, row):
                assert SECRET not in str(val), (table, col)
                assert "authorization" not in str(val).lower(), (table, col)


def test_missing_api_key_for_api_openai_com(cache, monkeypatch):
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    client = LLMClient(EndpointSettings(model="gpt-x", api_key_env="NO_SUCH_KEY_VAR"), cache)
    with pytest.raises(LLMConfigError, match="NO_SUCH_KEY_VAR"):
        client.complete_many([req("x")])


def test_concurrency_limit_respected(api, cache):
    api.delay_s = 0.01
    client = make_client(api, cache, concurrency=3)
    out = client.complete_many([req(f"q{i}") for i in range(20)])
    assert all(r.error is None for r in out)
    assert api.max_in_flight == 3


def test_two_threads_share_one_limit_and_ask_a_shared_request_once(api, cache):
    """Two rounds of a judging step overlap (defs/judge/assets.py): two threads call complete_many on one
    keep_loop client at once. They share its concurrency limit, a request both need is sent once (the second
    gets the first's answer, counted as a cache hit), and every answer is in the cache when the calls return."""
    api.delay_s = 0.05
    http = httpx.AsyncClient(transport=httpx.MockTransport(api.handler))
    client = LLMClient(settings(concurrency=4), cache, http_client=http, api_key=SECRET, keep_loop=True)
    first = [req(f"a{i}") for i in range(12)] + [req("shared")]
    second = [req("shared")] + [req(f"b{i}") for i in range(12)]
    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            one, two = pool.map(client.complete_many, [first, second])
    finally:
        client.close()
    assert [r.text for r in one] == [f"ans:a{i}" for i in range(12)] + ["ans:shared"]
    assert [r.text for r in two] == ["ans:shared"] + [f"ans:b{i}" for i in range(12)]
    assert api.max_in_flight == 4
    sent = [b["messages"][-1]["content"] for b in api.chat_bodies]
    assert sorted(sent) == sorted({*(f"a{i}" for i in range(12)), *(f"b{i}" for i in range(12)), "shared"})
    assert [r.cached for r in (one[-1], two[0])].count(True) == 1  # one of the two made the call
    assert client.stats.calls_made == 25 and cache.count() == 25


def test_complete_many_inside_running_loop(api, cache):
    client = make_client(api, cache)

    async def main():
        return client.complete_many([req("x")])  # falls back to a helper thread with its own loop

    [r] = asyncio.run(main())
    assert r.text == "ans:x"


def test_cancellation_flushes_answers_already_received(api, cache):
    fast = [req(f"fast{i}") for i in range(5)]
    slow = [req(f"slow{i}") for i in range(3)]

    async def handler(request):
        body = json.loads(request.content)
        if body["messages"][-1]["content"].startswith("slow"):
            await asyncio.sleep(30)
        return httpx.Response(200, json=completion("ok"))

    http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    client = LLMClient(settings(concurrency=8), cache, http_client=http, api_key=SECRET)
    client.flush_interval_s = 60.0  # only the final flush can save them

    async def main():
        task = asyncio.create_task(client.acomplete_many(slow + fast))
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert cache.count() == 5


# ----------------------------------------------------------------------------------------------------- batch
def test_batch_end_to_end(api, cache):
    client = make_client(api, cache, mode="batch", batch_chunk_size=2)
    requests = [req(f"b{i}") for i in range(5)] + [req("b0")]
    msgs: list[str] = []
    out = client.complete_many(requests, progress=msgs.append)
    assert [r.text for r in out] == [f"ans:b{i}" for i in range(5)] + ["ans:b0"]
    assert all(r.error is None and not r.cached for r in out)
    assert api.paths[("POST", "/v1/batches")] == 3 and api.paths[("POST", "/v1/files")] == 3
    assert api.paths[("POST", "/v1/chat/completions")] == 0
    # the JSONL lines: custom_id = key, body = the online body
    lines = [ln for lines in api.batch_inputs.values() for ln in lines]
    assert len(lines) == 5
    assert all(ln["method"] == "POST" and ln["url"] == "/v1/chat/completions" for ln in lines)
    assert {ln["custom_id"] for ln in lines} == {r.key for r in out}
    assert lines[0]["body"]["model"] == "judge-model" and "messages" in lines[0]["body"]
    assert cache.count() == 5
    assert {b.status for b in cache.batches()} == {"completed"}
    assert client.stats.batches_submitted == 3 and client.stats.calls_made == 5
    assert client.stats.tokens_in == 55
    assert any("submitted" in m for m in msgs)
    # everything cached: a re-run submits nothing
    again = make_client(api, cache, mode="batch").complete_many(requests)
    assert all(r.cached for r in again) and api.paths[("POST", "/v1/batches")] == 3


def test_batch_resume_after_interrupted_polling(api, cache):
    requests = [req(f"r{i}") for i in range(4)]
    api.fail_batch_get = True
    client = make_client(api, cache, mode="batch", max_retries=1)
    with pytest.raises(openai.InternalServerError):
        client.complete_many(requests)
    assert api.paths[("POST", "/v1/batches")] == 1
    [rec] = cache.batches(open_only=True)
    assert rec.status == "validating" and len(rec.keys) == 4
    assert cache.count() == 0

    api.fail_batch_get = False
    client2 = make_client(api, cache, mode="batch")
    out = client2.complete_many(requests)
    assert [r.text for r in out] == [f"ans:r{i}" for i in range(4)]
    assert api.paths[("POST", "/v1/batches")] == 1 and api.paths[("POST", "/v1/files")] == 1  # not resubmitted
    assert client2.stats.calls_made == 0 and client2.stats.batches_submitted == 0
    assert cache.count() == 4 and cache.batches(open_only=True) == []


def test_batch_expired_partial_output_saved_missing_reported(api, cache):
    api.final_status = "expired"
    api.drop_from_output = {"e1"}
    api.error_lines = {"e2"}
    requests = [req(f"e{i}") for i in range(4)]
    client = make_client(api, cache, mode="batch")
    out = client.complete_many(requests)
    assert [r.text for r in out] == ["ans:e0", None, None, "ans:e3"]
    assert out[1].error and "expired" in out[1].error
    assert out[2].error and "context too long" in out[2].error
    assert client.stats.errors == 2
    assert cache.count() == 2
    [rec] = cache.batches()
    assert rec.status == "expired" and rec.output_file_id and rec.error_file_id

    # a re-run resubmits only what did not come back
    api.final_status = "completed"
    api.drop_from_output, api.error_lines = set(), set()
    out2 = make_client(api, cache, mode="batch").complete_many(requests)
    assert all(r.error is None for r in out2)
    assert [r.cached for r in out2] == [True, False, False, True]
    newest = api.batch_inputs[api.batches["batch_1"]["input_file_id"]]
    assert sorted(FakeAPI.user_content(ln["body"]) for ln in newest) == ["e1", "e2"]
    assert cache.count() == 4


# ----------------------------------------------------------------------------------------------------- cache
def test_cache_waits_for_the_file_lock_of_another_process(tmp_path):
    import subprocess
    import sys

    import duckdb

    path = tmp_path / "sub" / "llm.duckdb"
    with ResponseCache(path) as c:  # creates the parent dir and the tables
        assert c.count() == 0
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import duckdb, sys, time; c = duckdb.connect(sys.argv[1]); print('locked', flush=True); "
            "time.sleep(0.8); c.close()",
            str(path),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(duckdb.IOException):
            ResponseCache(path, open_timeout_s=0.2, first_delay_s=0.05)
        t0 = time.perf_counter()
        with ResponseCache(path, open_timeout_s=30, first_delay_s=0.05) as c:
            assert c.count() == 0
        assert time.perf_counter() - t0 < 10
    finally:
        holder.wait(10)
