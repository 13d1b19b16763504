"""Benchmark of the evaluation path (``rlhn_assets.lib.evaluation.dense_search``) against plain
sentence-transformers encoding (a report, not a test).

Usage (from the project root)::

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_eval.py

On SciFact's 5,183 passages, in one process, with the packaged all-MiniLM-L6-v2 (loaded and warmed up once):

a. ``raw``: ``SentenceTransformer.encode(passages, batch_size=64, normalize_embeddings=True)`` of the same
   passage texts (BEIR title + " " + text) -> passages/s;
b. ``cold``: ``dense_search`` with a fresh temporary embedding cache -> passages/s over the whole call
   (corpus encode + cache write + 300 query encodes + exact top-100 search);
c. ``warm``: the same ``dense_search`` call again (corpus cache hit) -> seconds.

``--repeats N`` measures (a) and (b) N times each in alternating order (a b, b a, ...) and uses the medians,
which makes the ratio less sensitive to other jobs on the machine.

Prints the ratio (b)/(a) against the target (>= 0.9, MET/MISSED), the base model's nDCG@10 / Recall@100 /
MRR@10 on SciFact, Cranfield and CISI (Cranfield and CISI use the project's embedding cache under
``<cache dir>/embeddings``, so repeated runs are quick), and writes ``data/reports/bench_eval.json``.
Timings are wall-clock on whatever else the machine is doing; the exit code is 0 even if the target is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rlhn_assets import settings  # noqa: E402
from rlhn_assets.lib.embeddings import base_model_path, dir_hash, load_model  # noqa: E402
from rlhn_assets.lib.evaluation import dense_search, doc_text, evaluate, load_beir_eval  # noqa: E402

REPORT_PATH = ROOT / "data" / "reports" / "bench_eval.json"
EVAL_ROOT = ROOT / "data" / "eval"
TARGET_RATIO = 0.9
BATCH = 64


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--report", type=Path, default=REPORT_PATH)
    ap.add_argument("--skip-other-sets", action="store_true", help="only SciFact (no Cranfield / CISI metrics)")
    ap.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="measure (a) and (b) this many times, alternating the order (a b, b a, ...) so load drift "
        "hits both; the ratio uses the medians (default 1)",
    )
    args = ap.parse_args()

    import torch

    t = time.perf_counter()
    model = load_model()
    version = dir_hash(base_model_path())
    load_seconds = time.perf_counter() - t
    model.encode(["warm-up sentence"] * 8, batch_size=BATCH, normalize_embeddings=True)  # first-call overhead

    sci = load_beir_eval(EVAL_ROOT / "scifact")
    texts = [doc_text(sci.corpus[d]) for d in sci.corpus]
    n = len(texts)
    print(
        f"SciFact: {n:,} passages, {len(sci.queries)} test queries; torch threads {torch.get_num_threads()}; "
        f"os load avg {os.getloadavg()[0]:.2f}"
    )

    def measure_raw() -> float:
        t = time.perf_counter()
        model.encode(texts, batch_size=BATCH, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
        s = time.perf_counter() - t
        print(f"(a) raw SentenceTransformer.encode: {s:7.1f} s  {n / s:6.1f} passages/s")
        return s

    def measure_cold(cache: Path):
        assert not cache.exists()  # fresh cache dir
        t = time.perf_counter()
        res, info = dense_search(model, version, sci, top_k=100, cache_dir=cache, batch_size=BATCH)
        s = time.perf_counter() - t
        assert not info["corpus_cache_hit"]
        print(f"(b) dense_search, cold cache:       {s:7.1f} s  {n / s:6.1f} passages/s  {info}")
        return s, res, info

    raw_runs: list[float] = []
    cold_runs: list[float] = []
    with tempfile.TemporaryDirectory(prefix="bench_eval_") as tmp:
        cache = None
        for rep in range(max(1, args.repeats)):
            for step in ("a", "b") if rep % 2 == 0 else ("b", "a"):
                if step == "a":
                    raw_runs.append(measure_raw())
                else:
                    cache = Path(tmp) / f"emb{rep}"
                    s, results, cold_info = measure_cold(cache)
                    cold_runs.append(s)
        # (c) warm: the same call again on the last cold run's cache
        t = time.perf_counter()
        results_warm, warm_info = dense_search(model, version, sci, top_k=100, cache_dir=cache, batch_size=BATCH)
        warm_s = time.perf_counter() - t
        assert warm_info["corpus_cache_hit"]
        print(f"(c) dense_search, warm cache:       {warm_s:7.2f} s  {warm_info}")
    raw_s, cold_s = statistics.median(raw_runs), statistics.median(cold_runs)
    raw_pps, cold_pps = n / raw_s, n / cold_s

    ratio = cold_pps / raw_pps
    met = ratio >= TARGET_RATIO
    print(f"ratio (b)/(a) = {ratio:.3f}  target >= {TARGET_RATIO}: {'MET' if met else 'MISSED'}")

    metrics = {}
    m = evaluate(sci.qrels, results)
    metrics["scifact"] = {k: m[k] for k in ("ndcg@10", "recall@100", "mrr@10", "queries_scored")}
    metrics["scifact"]["passages"] = n
    if not args.skip_other_sets:
        for name in ("cranfield", "cisi"):
            ds = load_beir_eval(EVAL_ROOT / name)
            res, info = dense_search(
                model, version, ds, top_k=100, cache_dir=settings.cache_dir() / "embeddings", batch_size=BATCH
            )
            m = evaluate(ds.qrels, res)
            metrics[name] = {k: m[k] for k in ("ndcg@10", "recall@100", "mrr@10", "queries_scored")}
            metrics[name].update(
                passages=info["passages"],
                corpus_cache_hit=info["corpus_cache_hit"],
                seconds=round(info["encode_seconds"] + info["search_seconds"], 2),
            )
    print("\nbase all-MiniLM-L6-v2, test split:")
    print(f"  {'set':<10} {'nDCG@10':>8} {'R@100':>8} {'MRR@10':>8} {'queries':>8}")
    for name, m in metrics.items():
        print(f"  {name:<10} {m['ndcg@10']:8.4f} {m['recall@100']:8.4f} {m['mrr@10']:8.4f} {m['queries_scored']:8d}")

    report = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_avg_1m_at_end": round(os.getloadavg()[0], 2),
        },
        "model": {"path": str(base_model_path()), "version": version, "load_seconds": round(load_seconds, 2)},
        "dataset": "scifact",
        "passages": n,
        "queries": len(sci.queries),
        "batch_size": BATCH,
        "repeats": len(raw_runs),
        "raw_encode": {
            "seconds": round(raw_s, 2),
            "passages_per_s": round(raw_pps, 2),
            "runs_seconds": [round(x, 2) for x in raw_runs],
        },
        "dense_search_cold": {
            "seconds": round(cold_s, 2),
            "passages_per_s": round(cold_pps, 2),
            "runs_seconds": [round(x, 2) for x in cold_runs],
            "last_info": cold_info,
        },
        "dense_search_warm": {"seconds": round(warm_s, 3), "info": warm_info},
        "ratio_cold_over_raw": round(ratio, 4),
        "target_ratio": TARGET_RATIO,
        "target_met": met,
        "warm_results_identical": results_warm == results,
        "metrics": metrics,
    }
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.report}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
