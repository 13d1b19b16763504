"""Local judge speed: judgments/s of the packaged Qwen2.5-Coder models on a llama.cpp server (a report).

    .venv/bin/python benchmarks/bench_local_judge.py [--pairs 40] [--listwise-calls 2]

Through the pipeline's own path (JudgeTierResource.open_judge -> llama.cpp server started by the step ->
openai client -> response cache in a fresh temporary file): the first FiQA instances of the bundled sample,
pointwise (one call per negative, first-token logprobs) for 0.5B and 1.5B, and listwise (up to 25 negatives
per call) for 1.5B. Reports judgments/s and seconds per call (server start-up excluded and reported
separately), then re-runs the same work on the warm cache (calls made: target 0). Writes
data/reports/bench_local_judge.json. The load average is recorded: other jobs on the 2-core box slow it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rlhn_assets.resources import JudgeTierResource  # noqa: E402

REPORT_PATH = ROOT / "data" / "reports" / "bench_local_judge.json"


def fiqa_instances(n_pairs: int):
    """Instances of the bundled FiQA sample, trimmed to ``n_pairs`` (query, negative) pairs in total."""
    import gzip

    from rlhn_assets.lib.judging.judges import Instance, Passage

    out, left = [], n_pairs
    with gzip.open(ROOT / "data/raw/fiqa/rlhn_judge_sample.jsonl.gz", "rt") as f:
        for line in f:
            r = json.loads(line)
            pos = tuple(Passage(p["docid"], p.get("title") or "", p["text"]) for p in r["positive_passages"])
            negs = tuple(Passage(p["docid"], p.get("title") or "", p["text"]) for p in r["negative_passages"])[:left]
            out.append(Instance(r["query_id"], r["query"], pos, negs))
            left -= len(negs)
            if left <= 0:
                break
    return out


def run(res: JudgeTierResource, instances) -> dict:
    t0 = time.perf_counter()
    with res.open_judge() as j:
        started = time.perf_counter()
        rows = j.judge(instances)
        cold_s = time.perf_counter() - started
        cold_calls = j.stats.calls
        t1 = time.perf_counter()
        j.judge(instances)
        warm_s = time.perf_counter() - t1
        warm_calls = j.stats.calls - cold_calls
    total = time.perf_counter() - t0
    n = len(rows)
    return {
        "judgments": n,
        "calls": cold_calls,
        "seconds": round(cold_s, 1),
        "judgments_per_s": round(n / cold_s, 3),
        "s_per_call": round(cold_s / max(cold_calls, 1), 2),
        "server_start_and_stop_s": round(total - cold_s - warm_s, 1),
        "errors": sum(r.verdict == "error" for r in rows),
        "warm_calls": warm_calls,
        "warm_s": round(warm_s, 2),
        "load_avg": round(os.getloadavg()[0], 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=40)
    ap.add_argument("--listwise-calls", type=int, default=2)
    ap.add_argument("--report", type=Path, default=REPORT_PATH)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="rlhn-bench-judge-"))
    point = fiqa_instances(args.pairs)
    results = {}
    for model in ("qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"):
        res = JudgeTierResource(
            tier=2,
            kind="pointwise",
            model=model + "-instruct",
            local_model=model,
            temperature=0.0,
            concurrency=1,
            cache_path=str(tmp / f"{model}.duckdb"),
        )
        results[f"{model} pointwise"] = run(res, point)
    if args.listwise_calls:
        # one call each: the first instances, at most 25 negatives (the paper's per-call maximum)
        lw = [dataclasses.replace(i, negatives=i.negatives[:25]) for i in fiqa_instances(10**6)[: args.listwise_calls]]
        res = JudgeTierResource(
            tier=2,
            kind="listwise",
            prompt_family="tier2",
            model="qwen2.5-coder-1.5b-instruct",
            local_model="qwen2.5-coder-1.5b",
            temperature=0.0,
            concurrency=1,
            max_tokens=512,
            response_format_style="json_schema",
            local_ctx_size=8192,
            cache_path=str(tmp / "listwise.duckdb"),
        )
        results["qwen2.5-coder-1.5b listwise"] = run(res, lw)
    print(f"{'judge':<32}{'judgments':>10}{'calls':>7}{'s/call':>8}{'judg/s':>8}{'warm calls':>11}{'load':>6}")
    for k, r in results.items():
        print(
            f"{k:<32}{r['judgments']:>10}{r['calls']:>7}{r['s_per_call']:>8}{r['judgments_per_s']:>8}"
            f"{r['warm_calls']:>11}{r['load_avg']:>6}"
        )
    summary = [
        {"metric": f"{k}: judgments/s", "value": r["judgments_per_s"], "target": "", "met": None}
        for k, r in results.items()
    ]
    summary += [
        {"metric": f"{k}: warm re-run calls", "value": r["warm_calls"], "target": "0", "met": r["warm_calls"] == 0}
        for k, r in results.items()
    ]
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(json.dumps({"summary": summary, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
