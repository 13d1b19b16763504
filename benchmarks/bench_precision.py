"""Encoding cost and fidelity of bf16 autocast vs fp32 on this machine (a report, not a test).

Usage (from the project root)::

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_precision.py [--docs 768]

Encodes the first ``--docs`` SciFact abstracts (data/eval/scifact) at 256 tokens with the packaged MiniLM in fp32,
bf16 autocast and fp32 again (the two fp32 runs bracket the load), and prints seconds, the fp32/bf16 time ratio
and the mean cosine between the bf16 and fp32 embeddings. "auto" precision (lib/embeddings.py) picks bf16 only
where the CPU has native bf16 (AVX512_BF16 / AMX); elsewhere bf16 is emulated and slower.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from rlhn_assets.lib.embeddings import cpu_has_native_bf16, inference_precision, load_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=768)
    args = ap.parse_args()
    docs = []
    with gzip.open(ROOT / "data/eval/scifact/corpus.jsonl.gz", "rt") as fh:
        for line in fh:
            d = json.loads(line)
            docs.append(f"{d.get('title') or ''} {d.get('text') or ''}".strip())
            if len(docs) >= args.docs:
                break
    model = load_model()
    model.max_seq_length = 256
    times, embs = {}, {}
    for precision in ("fp32", "bf16", "fp32"):
        t0 = time.perf_counter()
        with inference_precision(precision):
            embs[precision] = model.encode(docs, batch_size=64, normalize_embeddings=True, convert_to_numpy=True)
        times.setdefault(precision, []).append(time.perf_counter() - t0)
    fp32 = float(np.mean(times["fp32"]))
    bf16 = times["bf16"][0]
    cos = float((embs["fp32"] * embs["bf16"]).sum(axis=1).mean())
    print(
        json.dumps(
            {
                "docs": len(docs),
                "native_bf16": cpu_has_native_bf16(),
                "fp32_s": round(fp32, 1),
                "bf16_s": round(bf16, 1),
                "fp32_over_bf16": round(fp32 / bf16, 2),
                "mean_cosine_bf16_fp32": round(cos, 6),
                "load_avg_1m": os.getloadavg()[0],
            }
        )
    )


if __name__ == "__main__":
    main()
