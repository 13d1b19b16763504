"""A test double of llama.cpp's ``llama-server`` that crashes like the native build did on AVX-512/AMX VMs.

Run through a wrapper script (``make_fake_server`` in test_llama_fallback.py) as::

    fake_llama_server.py --model M --host H --port P ... [--no-repack]

Behaviour is chosen by environment variables, so one file covers every case:

* ``FAKE_LLAMA_CRASH`` = ``SIGILL`` | ``SIGSEGV``: unless ``--no-repack`` (or ``LLAMA_ARG_REPACK=0``) is given,
  print the lines the real server printed before it died, then kill itself with that signal;
* ``FAKE_LLAMA_CRASH_ALWAYS=1``: crash even with ``--no-repack`` (no setting works);
* ``FAKE_LLAMA_HANG=1``: never become healthy (``/health`` answers 503 "loading model");
* ``FAKE_LLAMA_ARGV_LOG``: append each invocation's argv (JSON) to this file.

Otherwise it serves ``GET /health`` -> ``{"status": "ok"}`` and ``POST /v1/chat/completions`` -> one "Yes"
token with logprobs, the shape the smoke test and the pointwise judge read.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def _arg(argv: list[str], name: str, default: str = "") -> str:
    return argv[argv.index(name) + 1] if name in argv else default


class Handler(BaseHTTPRequestHandler):
    hang = False

    def log_message(self, *a) -> None:  # quiet
        pass

    def _json(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path.startswith("/health"):
            if self.hang:
                self._json(503, {"error": {"code": 503, "message": "Loading model"}})
            else:
                self._json(200, {"status": "ok"})
        else:
            self._json(404, {"error": "not found"})

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length) or b"{}")
        top = [
            {"token": "Yes", "logprob": -0.1, "bytes": list(b"Yes")},
            {"token": "No", "logprob": -2.4, "bytes": list(b"No")},
        ]
        self._json(
            200,
            {
                "id": "fake",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.get("model", "m"),
                "choices": [
                    {
                        "index": 0,
                        "finish_reason": "length",
                        "message": {"role": "assistant", "content": "Yes"},
                        "logprobs": {
                            "content": [{"token": "Yes", "logprob": -0.1, "bytes": list(b"Yes"), "top_logprobs": top}]
                        },
                    }
                ],
                "usage": {"prompt_tokens": 20, "completion_tokens": 1, "total_tokens": 21},
            },
        )


def main(argv: list[str]) -> None:
    log = os.environ.get("FAKE_LLAMA_ARGV_LOG")
    if log:
        with open(log, "a") as fh:
            fh.write(json.dumps(argv) + "\n")
    print("build: 0 (fake) with fake compiler", flush=True)
    print(f"main: loading model {_arg(argv, '--model')}", flush=True)
    crash = os.environ.get("FAKE_LLAMA_CRASH")
    no_repack = "--no-repack" in argv or "-nr" in argv or os.environ.get("LLAMA_ARG_REPACK") == "0"
    if crash and (not no_repack or os.environ.get("FAKE_LLAMA_CRASH_ALWAYS") == "1"):
        print("load_tensors: CPU_REPACK model buffer size = 100.00 MiB", flush=True)
        print(f"llama threadpool init, n_threads = {_arg(argv, '--threads', '2')}", flush=True)
        signal.signal(getattr(signal, crash), signal.SIG_DFL)
        os.kill(os.getpid(), getattr(signal, crash))
        time.sleep(5)  # the signal is delivered before this returns
    Handler.hang = os.environ.get("FAKE_LLAMA_HANG") == "1"
    server = ThreadingHTTPServer((_arg(argv, "--host", "127.0.0.1"), int(_arg(argv, "--port", "0"))), Handler)
    print("main: server is listening", flush=True)
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
    server.serve_forever()


if __name__ == "__main__":
    main(sys.argv[1:])
