"""A fake OpenAI-compatible server (chat completions, Files and Batches) for the LLM client's kill/resume test
and the benchmarks.

Run as a subprocess::

    python rlhn_assets_tests/fake_openai_server.py --delay 0.2 [--port 0] [--ready-file PATH]
        [--flag-share MODEL=SHARE ...] [--batch-delay SECONDS] [--files-dir DIR]

It binds 127.0.0.1 (port 0 = a free port), then prints ``PORT <n>`` on stdout (and writes the port to
``--ready-file`` if given). Endpoints:

* ``POST /v1/chat/completions`` - waits ``delay`` seconds (``asyncio.sleep``, so the server itself is never
  the bottleneck) and answers with a deterministic text derived from the message contents
  (``"answer:" + sha1(contents)[:12]``) plus ``usage``; a request with ``logprobs`` (a pointwise judge) gets
  ``yes``/``no`` with first-token top logprobs whose P(yes) is derived from the same hash.
  For a model given with ``--flag-share MODEL=SHARE``
  and a listwise prompt (``lib/judging/prompts.render_listwise``: ``Doc (i): <passage>`` lines in a
  ``<documents>`` block), the answer is instead a verdict in the format ``lib/judging/parsing.parse_listwise``
  reads: passage i is flagged when ``u = sha1(passage text)`` read as a number in [0, 1) is below SHARE,
  ``better`` in the lower half of that range and ``worse`` in the upper one. The flags depend on the passage
  only, so a smaller share for a second model (tier 2) confirms exactly that share of the first model's flags;
* ``POST /v1/files`` (multipart ``file`` + ``purpose``; stored under ``--files-dir``), ``GET /v1/files/{id}``,
  ``GET /v1/files/{id}/content``;
* ``POST /v1/batches`` and ``GET /v1/batches/{id}`` - a job is ``in_progress`` until ``--batch-delay`` seconds
  after it was created, then (on the next retrieve) ``completed`` with an output file holding the answer to
  every input line (the same answers as the online endpoint, without its delay);
* ``GET /stats`` - ``{"total": n, "in_flight": n, "max_in_flight": n, "by_content": {content: count}, ...}``
  where ``content`` is the message contents joined by newlines (``by_content`` is left out with
  ``?by_content=0``), plus the Batch API counters ``files``, ``batches``, ``batch_requests`` (input lines
  over all jobs) and ``batch_requests_distinct`` (distinct ``custom_id``: the difference is resubmissions);
* ``POST /reset`` - zero the counters.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import re
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


_DOC_LINE = re.compile(r"^Doc \((\d+)\): (.*)$", re.M)


def passage_share(text: str) -> float:
    """A passage's place in [0, 1): the first 8 hex digits of its sha1, as a fraction."""
    return int(hashlib.sha1(text.encode("utf-8")).hexdigest()[:8], 16) / 16**8


def listwise_verdict(content: str, share: float) -> str | None:
    """The verdict answer for a listwise prompt (None when ``content`` is not one): passage i is flagged when
    ``passage_share`` < share, ``better`` below share / 2, ``worse`` from there to share."""
    if "<documents>" not in content:
        return None
    docs = content.split("<documents>", 1)[1].rsplit("</documents>", 1)[0]
    better, worse = [], []
    for m in _DOC_LINE.finditer(docs):
        u = passage_share(m.group(2))
        if u < share / 2:
            better.append(f"Doc ({m.group(1)})")
        elif u < share:
            worse.append(f"Doc ({m.group(1)})")
    return (
        "<thinking>\nfake judge\n</thinking>\n<preference>\n</preference>\n"
        f"<verdict><better>[{', '.join(better)}]</better><worse>[{', '.join(worse)}]</worse></verdict>"
    )


def completion(body: dict, flag_shares: dict[str, float]) -> dict:
    """The chat.completion object the fake answers ``body`` with (online and in batch output files alike)."""
    content = message_content(body.get("messages") or [])
    text, logprobs = None, None
    if body.get("model") in flag_shares:
        text = listwise_verdict(content, flag_shares[body["model"]])
    tokens_out = 5 if text is None else max(1, len(text) // 4)
    if text is None and body.get("logprobs"):  # a one-token (pointwise) judge: yes/no with first-token logprobs
        text, logprobs = yes_no_logprobs(content)
    if text is None:
        text = answer_text(content)
    return {
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
            "completion_tokens": tokens_out,
            "total_tokens": max(1, len(content) // 4) + tokens_out,
        },
    }


def _multipart_file(body: bytes, content_type: str) -> tuple[bytes, dict[str, str]]:
    """(the ``file`` part's bytes, the other form fields) of a multipart/form-data body (the SDK's upload)."""
    boundary = content_type.split("boundary=", 1)[1].split(";")[0].strip().strip('"').encode()
    data, fields = b"", {}
    for part in body.split(b"--" + boundary):
        if b"\r\n\r\n" not in part:
            continue
        head, value = part.split(b"\r\n\r\n", 1)
        value = value[:-2] if value.endswith(b"\r\n") else value
        name = re.search(rb'name="([^"]+)"', head)
        if name is None:
            continue
        if name.group(1) == b"file":
            data = value
        else:
            fields[name.group(1).decode()] = value.decode()
    return data, fields


def build_app(
    delay_s: float,
    *,
    flag_shares: dict[str, float] | None = None,
    batch_delay_s: float = 1.0,
    files_dir: str | None = None,
) -> Starlette:
    flag_shares = dict(flag_shares or {})
    files_dir = files_dir or tempfile.mkdtemp(prefix="fake_openai_files_")
    state = {"total": 0, "in_flight": 0, "max_in_flight": 0, "by_content": Counter()}
    files: dict[str, dict] = {}  # id -> file object (content on disk)
    batches: dict[str, dict] = {}  # id -> batch object + "_created_mono"
    batch_ids: Counter = Counter()  # custom_id -> times submitted in a job

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
        return Response(json.dumps(completion(body, flag_shares)), media_type="application/json")

    def _json(obj: dict, status: int = 200) -> Response:
        return Response(json.dumps(obj), status_code=status, media_type="application/json")

    def _store_file(data: bytes, purpose: str, filename: str) -> dict:
        fid = f"file-{len(files) + 1:06d}"
        with open(os.path.join(files_dir, fid), "wb") as f:
            f.write(data)
        obj = {
            "id": fid,
            "object": "file",
            "bytes": len(data),
            "created_at": int(time.time()),
            "filename": filename,
            "purpose": purpose,
            "status": "processed",
        }
        files[fid] = obj
        return obj

    async def upload(request: Request) -> Response:
        data, fields = _multipart_file(await request.body(), request.headers.get("content-type", ""))
        return _json(_store_file(data, fields.get("purpose", "batch"), "batch_input.jsonl"))

    async def get_file(request: Request) -> Response:
        fid = request.path_params["fid"]
        if fid not in files:
            return _json({"error": {"message": f"no file {fid}"}}, 404)
        return _json(files[fid])

    async def file_content(request: Request) -> Response:
        fid = request.path_params["fid"]
        if fid not in files:
            return _json({"error": {"message": f"no file {fid}"}}, 404)
        with open(os.path.join(files_dir, fid), "rb") as f:
            return Response(f.read(), media_type="application/octet-stream")

    def _public(b: dict) -> dict:
        return {k: v for k, v in b.items() if not k.startswith("_")}

    async def create_batch(request: Request) -> Response:
        body = json.loads(await request.body())
        fid = body.get("input_file_id")
        if fid not in files:
            return _json({"error": {"message": f"no file {fid}"}}, 400)
        n = 0
        with open(os.path.join(files_dir, fid), encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    batch_ids[json.loads(line)["custom_id"]] += 1
                    n += 1
        bid = f"batch_{len(batches) + 1:06d}"
        batches[bid] = {
            "id": bid,
            "object": "batch",
            "endpoint": body.get("endpoint"),
            "input_file_id": fid,
            "completion_window": body.get("completion_window", "24h"),
            "status": "in_progress",
            "created_at": int(time.time()),
            "output_file_id": None,
            "error_file_id": None,
            "request_counts": {"total": n, "completed": 0, "failed": 0},
            "_created_mono": time.monotonic(),
        }
        return _json(_public(batches[bid]))

    async def get_batch(request: Request) -> Response:
        bid = request.path_params["bid"]
        b = batches.get(bid)
        if b is None:
            return _json({"error": {"message": f"no batch {bid}"}}, 404)
        if b["status"] == "in_progress" and time.monotonic() - b["_created_mono"] >= batch_delay_s:
            out = []
            with open(os.path.join(files_dir, b["input_file_id"]), encoding="utf-8") as f:
                for line in f:
                    if not line.strip():
                        continue
                    req = json.loads(line)
                    answer = completion(req["body"], flag_shares)
                    out.append(
                        json.dumps(
                            {
                                "id": "batch_req_" + req["custom_id"][:16],
                                "custom_id": req["custom_id"],
                                "response": {"status_code": 200, "request_id": "r", "body": answer},
                                "error": None,
                            }
                        )
                    )
            fobj = _store_file(("\n".join(out) + "\n").encode("utf-8"), "batch_output", "batch_output.jsonl")
            b.update(
                status="completed",
                output_file_id=fobj["id"],
                completed_at=int(time.time()),
                request_counts={"total": len(out), "completed": len(out), "failed": 0},
            )
        return _json(_public(b))

    async def stats(request: Request) -> Response:
        out = {
            "total": state["total"],
            "in_flight": state["in_flight"],
            "max_in_flight": state["max_in_flight"],
            "files": len(files),
            "batches": len(batches),
            "batch_requests": sum(batch_ids.values()),
            "batch_requests_distinct": len(batch_ids),
        }
        if request.query_params.get("by_content", "1") != "0":
            out["by_content"] = dict(state["by_content"])
        return Response(json.dumps(out), media_type="application/json")

    async def reset(request: Request) -> Response:
        state.update(total=0, in_flight=0, max_in_flight=0, by_content=Counter())
        batch_ids.clear()
        return Response("{}", media_type="application/json")

    return Starlette(
        routes=[
            Route("/v1/chat/completions", chat, methods=["POST"]),
            Route("/v1/files", upload, methods=["POST"]),
            Route("/v1/files/{fid}", get_file, methods=["GET"]),
            Route("/v1/files/{fid}/content", file_content, methods=["GET"]),
            Route("/v1/batches", create_batch, methods=["POST"]),
            Route("/v1/batches/{bid}", get_batch, methods=["GET"]),
            Route("/stats", stats, methods=["GET"]),
            Route("/reset", reset, methods=["POST"]),
        ]
    )


@contextlib.contextmanager
def running_server(
    delay_s: float = 0.2,
    *,
    timeout_s: float = 30.0,
    flag_shares: dict[str, float] | None = None,
    batch_delay_s: float | None = None,
) -> Iterator[str]:
    """Start this server in a subprocess; yield its base URL (``http://127.0.0.1:<port>/v1``); stop it.
    ``flag_shares`` / ``batch_delay_s``: the ``--flag-share`` / ``--batch-delay`` options."""
    with tempfile.TemporaryDirectory(prefix="fake_openai_") as d:
        ready = os.path.join(d, "port")
        cmd = [sys.executable, os.path.abspath(__file__), "--delay", str(delay_s), "--ready-file", ready]
        cmd += ["--files-dir", os.path.join(d, "files")]
        for model, share in (flag_shares or {}).items():
            cmd += ["--flag-share", f"{model}={share}"]
        if batch_delay_s is not None:
            cmd += ["--batch-delay", str(batch_delay_s)]
        os.makedirs(os.path.join(d, "files"))
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
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


def get_stats(base_url: str, *, by_content: bool = True) -> dict:
    """``GET /stats`` of a running server (``base_url`` as yielded by :func:`running_server`)."""
    import urllib.request

    url = base_url.rsplit("/v1", 1)[0] + "/stats" + ("" if by_content else "?by_content=0")
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--delay", type=float, default=0.2, help="seconds before each chat answer")
    ap.add_argument("--ready-file", default=None)
    ap.add_argument(
        "--flag-share",
        action="append",
        default=[],
        metavar="MODEL=SHARE",
        help="answer listwise prompts to MODEL with a verdict flagging this share of passages (repeatable)",
    )
    ap.add_argument("--batch-delay", type=float, default=1.0, help="seconds until a batch job completes")
    ap.add_argument("--files-dir", default=None, help="where uploaded and output files are kept (default: a temp dir)")
    args = ap.parse_args(argv)
    shares = {}
    for spec in args.flag_share:
        model, _, share = spec.rpartition("=")
        shares[model] = float(share)

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    sock.listen(4096)
    port = sock.getsockname()[1]

    config = uvicorn.Config(
        build_app(args.delay, flag_shares=shares, batch_delay_s=args.batch_delay, files_dir=args.files_dir),
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
