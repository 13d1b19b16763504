"""A fake OpenAI-compatible chat-completions server for the LLM client's kill/resume test and benchmark.

Run as a subprocess::

    python rlhn_assets_tests/fake_openai_server.py --delay 0.2 [--port 0] [--ready-file PATH]

It binds 127.0.0.1 (port 0 = a free port), then prints ``PORT <n>`` on stdout (and writes the port to
``--ready-file`` if given). Endpoints:

* ``POST /v1/chat/completions`` - waits ``delay`` seconds (``asyncio.sleep``, so the server itself is never
  the bottleneck) and answers with a deterministic text derived from the message contents
  (``"answer:" + sha1(contents)[:12]``) plus ``usage``; a request with ``logprobs`` (a pointwise judge) gets
  ``yes``/``no`` with first-token top logprobs whose P(yes) is derived from the same hash;
* ``GET /stats`` - ``{"total": n, "in_flight": n, "max_in_flight": n, "by_content": {content: count}}``
  where ``content`` is the message contents joined by newlines;
* ``POST /reset`` - zero the counters.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route


def message_content(messages: list[dict]) -> str:
    return "\n".join(str(m.get("content", "")) for m in messages)


def answer_text(content: str) -> str:
    return "answer:" + hashlib.sha1(content.encode("utf-8")).hexdigest()[:12]


def yes_no_logprobs(content: str) -> tuple[str, dict]:
    """A deterministic P(yes) in [0, 1) from the contents' hash, as the first token's top logprobs (what the
    pointwise judge reads); the answer text is the likelier word."""
    import math

    p_yes = int(hashlib.sha1(content.encode("utf-8")).hexdigest()[:8], 16) / 16**8
    top = [("yes", max(p_yes, 1e-6)), ("no", max(1.0 - p_yes, 1e-6))]
    first = [{"token": t, "logprob": math.log(p)} for t, p in top]
    text = "yes" if p_yes >= 0.5 else "no"
    return text, {"content": [{"token": text, "logprob": math.log(max(p_yes, 1 - p_yes)), "top_logprobs": first}]}


def build_app(delay_s: float) -> Starlette:
    state = {"total": 0, "in_flight": 0, "max_in_flight": 0, "by_content": Counter()}

    async def chat(request: Request) -> Response:
        body = json.loads(await request.body())
        content = message_content(body.get("messages") or [])
        state["total"] += 1
        state["by_content"][content] += 1
        state["in_flight"] += 1
        state["max_in_flight"] = max(state["max_in_flight"], state["in_flight"])
        try:
            if delay_s > 0:
                await asyncio.sleep(delay_s)
        finally:
            state["in_flight"] -= 1
        text, logprobs = answer_text(content), None
        if body.get("logprobs"):  # a one-token (pointwise) judge: a yes/no answer with first-token logprobs
            text, logprobs = yes_no_logprobs(content)
        payload = {
            "id": "chatcmpl-fake-" + hashlib.sha1(content.encode()).hexdigest()[:16],
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", "fake"),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                    "logprobs": logprobs,
                }
            ],
            "usage": {
                "prompt_tokens": max(1, len(content) // 4),
                "completion_tokens": 5,
                "total_tokens": max(1, len(content) // 4) + 5,
            },
        }
        return Response(json.dumps(payload), media_type="application/json")

    async def stats(request: Request) -> Response:
        return Response(
            json.dumps(
                {
                    "total": state["total"],
                    "in_flight": state["in_flight"],
                    "max_in_flight": state["max_in_flight"],
                    "by_content": dict(state["by_content"]),
                }
            ),
            media_type="application/json",
        )

    async def reset(request: Request) -> Response:
        state.update(total=0, in_flight=0, max_in_flight=0, by_content=Counter())
        return Response("{}", media_type="application/json")

    return Starlette(
        routes=[
            Route("/v1/chat/completions", chat, methods=["POST"]),
            Route("/stats", stats, methods=["GET"]),
            Route("/reset", reset, methods=["POST"]),
        ]
    )


@contextlib.contextmanager
def running_server(delay_s: float = 0.2, *, timeout_s: float = 30.0) -> Iterator[str]:
    """Start this server in a subprocess; yield its base URL (``http://127.0.0.1:<port>/v1``); stop it."""
    with tempfile.TemporaryDirectory(prefix="fake_openai_") as d:
        ready = os.path.join(d, "port")
        proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--delay", str(delay_s), "--ready-file", ready],
            stdout=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + timeout_s
            while not os.path.exists(ready):
                if proc.poll() is not None:
                    raise RuntimeError(f"fake OpenAI server exited with {proc.returncode}")
                if time.monotonic() > deadline:
                    raise TimeoutError("fake OpenAI server did not start")
                time.sleep(0.05)
            with open(ready) as f:
                port = int(f.read())
            yield f"http://127.0.0.1:{port}/v1"
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def get_stats(base_url: str) -> dict:
    """``GET /stats`` of a running server (``base_url`` as yielded by :func:`running_server`)."""
    import urllib.request

    with urllib.request.urlopen(base_url.rsplit("/v1", 1)[0] + "/stats", timeout=10) as r:
        return json.loads(r.read())


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--delay", type=float, default=0.2, help="seconds before each chat answer")
    ap.add_argument("--ready-file", default=None)
    args = ap.parse_args(argv)

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    sock.listen(4096)
    port = sock.getsockname()[1]

    config = uvicorn.Config(
        build_app(args.delay),
        log_level="warning",
        access_log=False,
        backlog=4096,
        timeout_keep_alive=30,
        lifespan="off",
    )
    server = uvicorn.Server(config)

    async def serve() -> None:
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started and not task.done():
            await asyncio.sleep(0.01)
        print(f"PORT {port}", flush=True)
        if args.ready_file:
            with open(args.ready_file + ".tmp", "w") as f:
                f.write(str(port))
            os.replace(args.ready_file + ".tmp", args.ready_file)
        await task

    try:
        import uvloop

        uvloop.run(serve())
    except ImportError:
        asyncio.run(serve())
    sys.exit(0)


if __name__ == "__main__":
    main()
