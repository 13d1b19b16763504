"""Warm re-materialization of judged partitions: LLM calls made (target 0) and wall time as a ratio of the
cold run, measured in one run.

The `paper` preset's listwise judges (the real client, cache and assets) talk to a stand-in endpoint that
answers after a fixed delay with the RLHN authors' recorded gpt-4o-mini / gpt-4o answers (fiqa + msmarco_passage).

    .venv/bin/python benchmarks/bench_judge_warm.py [--delay 0.2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dagster as dg
import httpx

from rlhn_assets.definitions import defs
from rlhn_assets.defs.resources import PRESETS
from rlhn_assets.resources import DatasetRegistryResource, RLHNDuckDB
from rlhn_assets_tests.test_cascade_assets import ReplayTier, _answers

DELAY = 0.2


class DelayedReplayTier(ReplayTier):
    def make_client(self, cache, base_url, model_identity=None):
        from rlhn_assets.lib.llm.client import LLMClient

        answers = {**_answers("fiqa", str(self.tier)), **_answers("msmarco_passage", str(self.tier))}
        import re

        async def delayed(request: httpx.Request) -> httpx.Response:
            await asyncio.sleep(DELAY)
            body = json.loads(request.content)
            prompt = body["messages"][0]["content"]
            q = " ".join(re.search(r"<question>\n(.*?)\n</question>", prompt, re.S).group(1).split())
            text = answers.get(
                q.replace("‹", "<").replace("›", ">"), "<verdict><better>[]</better><worse>[]</worse></verdict>"
            )
            COUNTS["calls"] += 1
            return httpx.Response(
                200,
                json={
                    "id": "x",
                    "object": "chat.completion",
                    "created": 0,
                    "model": body["model"],
                    "choices": [
                        {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}
                    ],
                    "usage": {
                        "prompt_tokens": len(prompt) // 4,
                        "completion_tokens": len(text) // 4,
                        "total_tokens": (len(prompt) + len(text)) // 4,
                    },
                },
            )

        return LLMClient(
            self.endpoint_settings(base_url, model_identity),
            cache,
            api_key="bench",
            http_client=httpx.AsyncClient(transport=httpx.MockTransport(delayed)),
        )


COUNTS = {"calls": 0}


def main() -> None:
    global DELAY
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--delay", type=float, default=0.2)
    args = ap.parse_args()
    DELAY = args.delay
    d = defs()
    keys = ("hard_negative_mining", "raw_bge", "pruned", "tier1_judgments", "tier2_judgments")
    judge_keys = ("tier1_judgments", "tier2_judgments")
    with tempfile.TemporaryDirectory() as tmp, dg.instance_for_test(temp_dir=tmp) as instance:
        paper = PRESETS["paper"]
        res = {
            "duckdb": RLHNDuckDB(database=f"{tmp}/b.duckdb"),
            "registry": DatasetRegistryResource(),
            **{
                k: DelayedReplayTier(
                    **{
                        **paper[k].model_dump(),
                        "cache_path": f"{tmp}/llm.duckdb",
                        "base_url": "http://replay.invalid/v1",
                        "paid": False,
                    }
                )  # a replay is free
                for k in ("tier1_judge", "tier2_judge")
            },
        }

        def run(sel_keys, ds):
            sel = dg.AssetSelection.assets(*sel_keys)
            t0 = time.perf_counter()
            r = dg.materialize(
                list(d.assets), selection=sel, partition_key=ds, resources={**d.resources, **res}, instance=instance
            )
            assert r.success
            return time.perf_counter() - t0

        out = {}
        for ds in ("fiqa", "msmarco_passage"):
            run(keys[:3], ds)
            COUNTS["calls"] = 0
            cold = run(judge_keys, ds)
            cold_calls = COUNTS["calls"]
            COUNTS["calls"] = 0
            warm = run(judge_keys, ds)
            out[ds] = {
                "cold_s": round(cold, 2),
                "cold_calls": cold_calls,
                "warm_s": round(warm, 2),
                "warm_calls": COUNTS["calls"],
                "time_ratio_warm_over_cold": round(warm / cold, 3),
            }
            print(
                f"{ds:<16} cold {cold:6.2f}s ({cold_calls} calls)   warm {warm:6.2f}s ({COUNTS['calls']} calls)   "
                f"ratio {warm / cold:.3f}   {'MET' if COUNTS['calls'] == 0 else 'MISSED'} (target: 0 calls)"
            )
    report = Path(__file__).resolve().parents[1] / "data" / "reports"
    report.mkdir(parents=True, exist_ok=True)
    (report / "bench_judge_warm.json").write_text(json.dumps({"delay_s": DELAY, "partitions": out}, indent=2))


if __name__ == "__main__":
    main()
