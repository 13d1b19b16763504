"""Speed of llama-server builds and settings on this machine (a report, not a test).

    .venv/bin/python benchmarks/bench_llama_builds.py [--server PATH[=LABEL] ...] [--model qwen2.5-coder-1.5b]

For each server binary (default: the cached build for this CPU) and each setting (default settings, and
``--no-repack``), starts the server on the model, sends the same judge-like prompts (a ~350-token pointwise
prompt with a new candidate passage each time, ``max_tokens=1`` + logprobs, as the `local` judge does) and one
64-token generation, and prints prompt tokens/s, generated tokens/s (llama-server's own ``timings``) and
seconds per judgment. All runs happen in one process, one after another, so their ratios are comparable.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import openai

from rlhn_assets.lib.llama_build import FALLBACK_ARGS
from rlhn_assets.lib.local_llm import LlamaServer, assemble_gguf, find_llama_server

REFERENCE = (
    "The Manhattan Project was a research and development undertaking during World War II that produced "
    "the first nuclear weapons. It was led by the United States with the support of the United Kingdom "
    "and Canada. From 1942 to 1946, the project was under the direction of Major General Leslie Groves "
    "of the U.S. Army Corps of Engineers. Nuclear physicist Robert Oppenheimer was the director of the "
    "Los Alamos Laboratory that designed the actual bombs. "
) * 2
CANDIDATES = [
    f"Candidate {i}: " + w * 6
    for i, w in enumerate(
        [
            "The project employed more than 130,000 people at its peak and cost nearly US$2 billion. ",
            "Photosynthesis converts light energy into chemical energy stored in glucose molecules. ",
            "Los Alamos was chosen for its isolation; the laboratory opened in 1943 on a mesa in New Mexico. ",
            "The stock market crash of 1929 led to the Great Depression across the industrial world. ",
            "Enrico Fermi achieved the first self-sustaining nuclear chain reaction in Chicago in December 1942. ",
            "Basketball was invented by James Naismith in Springfield, Massachusetts, in 1891. ",
            "Uranium enrichment at Oak Ridge used electromagnetic and gaseous diffusion methods. ",
            "The Great Barrier Reef is the world's largest coral reef system, off Queensland. ",
        ]
    )
]


def run(binary: Path, gguf: Path, args: tuple[str, ...]) -> dict:
    srv = LlamaServer(gguf, server_binary=binary, extra_args=args, retry_with_fallback=False, ctx_size=4096)
    t0 = time.perf_counter()
    with srv:
        load = time.perf_counter() - t0
        c = openai.OpenAI(base_url=srv.base_url, api_key="local", timeout=300, max_retries=0)
        per_call, prompt_tps = [], []
        for cand in CANDIDATES:
            msg = [
                {"role": "system", "content": "You are a relevance judge. Answer Yes or No."},
                {
                    "role": "user",
                    "content": f"Query: who led the manhattan project\n\nReference passage (known "
                    f"relevant):\n{REFERENCE}\n\nCandidate passage:\n{cand}\n\nDoes the "
                    "candidate passage answer the query? Answer Yes or No.",
                },
            ]
            t = time.perf_counter()
            r = c.chat.completions.create(
                model=srv.alias, messages=msg, max_tokens=1, temperature=0, logprobs=True, top_logprobs=10
            )
            per_call.append(time.perf_counter() - t)
            timings = (r.model_extra or {}).get("timings") or {}
            if timings.get("prompt_per_second"):
                prompt_tps.append(timings["prompt_per_second"])
        t = time.perf_counter()
        r = c.chat.completions.create(
            model=srv.alias,
            max_tokens=64,
            temperature=0,
            messages=[{"role": "user", "content": "Write a long paragraph about rivers."}],
        )
        timings = (r.model_extra or {}).get("timings") or {}
    return {
        "load_s": round(load, 1),
        "s_per_judgment": round(statistics.median(per_call[1:]), 3),
        "prompt_tok_s": round(statistics.median(prompt_tps), 1) if prompt_tps else None,
        "gen_tok_s": round(timings.get("predicted_per_second") or 0, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--server", action="append", default=[], help="PATH or PATH=LABEL (repeatable)")
    ap.add_argument("--model", default="qwen2.5-coder-1.5b")
    ap.add_argument(
        "--json",
        type=Path,
        default=Path(__file__).resolve().parents[1] / "data" / "reports" / "bench_llama_builds.json",
    )
    a = ap.parse_args()
    servers = [(Path(s.split("=", 1)[0]), s.split("=", 1)[1] if "=" in s else s) for s in a.server] or [
        (find_llama_server(), "cached build")
    ]
    gguf = assemble_gguf(a.model)
    rows = []
    for binary, label in servers:
        for args in ((), FALLBACK_ARGS):
            try:
                r = run(binary, gguf, args)
            except Exception as e:  # noqa: BLE001 - a crashing build is a result too
                r = {"error": str(e).splitlines()[0]}
            rows.append({"build": label, "settings": " ".join(args) or "default", **r})
            print(json.dumps(rows[-1]), flush=True)
    print(f"\n{a.model}: median over {len(CANDIDATES) - 1} judgments (first one warms the prompt cache)")
    print("| build | settings | load s | s/judgment | prompt tok/s | gen tok/s |\n|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['build']} | {r['settings']} | "
            + (
                " | ".join(str(r.get(k, "")) for k in ("load_s", "s_per_judgment", "prompt_tok_s", "gen_tok_s"))
                if "error" not in r
                else f"crashed: {r['error']} | | |"
            )
            + " |"
        )
    summary = [
        {
            "metric": f"{r['build']} {r['settings']}: s/judgment ({a.model})",
            "value": r.get("s_per_judgment", "crashed"),
            "target": "",
            "met": None,
        }
        for r in rows
    ]
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(
        json.dumps(
            {"summary": summary, "rows": rows, "model": a.model, "generated_at": time.strftime("%Y-%m-%dT%H:%M:%S")},
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    sys.exit(main())
