"""Retriever training step cost on this machine, for sizing `make experiment` (a report, not a test).

Usage (from the project root)::

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_train_step.py [--steps 4] [--configs 128x3x32,256x7x16]

Each config is ``<max_seq_length>x<hard_negatives>x<batch_size>``. For each, trains the packaged MiniLM for
``--steps`` steps (plus one warm-up step, not counted) on real SciFact training claims with their mined negatives
(data/raw/scifact/), and prints seconds per step, seconds per training query, and the projected time of the
experiment's training: queries (default 879 = the bundled sample's instances) x variants x seeds / batch.
Writes data/reports/bench_train_step.json. Wall-clock on whatever else the machine is doing.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rlhn_assets.lib.training import TrainingInstance, TrainSettings, train_retriever  # noqa: E402


def scifact_instances(n: int) -> list[TrainingInstance]:
    out = []
    with gzip.open(ROOT / "data/raw/scifact/scifact_train.mined.jsonl.gz", "rt") as fh:
        for line in fh:
            r = json.loads(line)
            text = lambda p: ((p.get("title") or "") + " " + p["text"]).strip()  # noqa: E731
            out.append(
                TrainingInstance(
                    r["query"],
                    tuple(text(p) for p in r["positive_passages"]),
                    tuple(text(p) for p in r["negative_passages"]),
                )
            )
            if len(out) >= n:
                break
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--configs", default="128x3x32,256x3x32,128x7x16,256x7x16")
    ap.add_argument("--queries", type=int, default=879, help="training queries per model (projection)")
    ap.add_argument("--models", type=int, default=15, help="models trained by the experiment (projection)")
    ap.add_argument("--precisions", default="fp32,auto", help="TrainSettings.precision values to compare")
    args = ap.parse_args()
    rows = []
    for spec, precision in [(c, p) for c in args.configs.split(",") for p in args.precisions.split(",")]:
        seq, hn, batch = (int(x) for x in spec.split("x"))
        instances = scifact_instances(batch * (args.steps + 1))
        timings = []
        with tempfile.TemporaryDirectory() as tmp:
            for steps in (1, args.steps + 1):  # the difference removes load/save/setup time
                s = TrainSettings(
                    batch_size=batch, hard_negatives=hn, max_seq_length=seq, max_steps=steps, precision=precision
                )
                t0 = time.perf_counter()
                train_retriever(instances, s, Path(tmp) / f"m{steps}")
                timings.append(time.perf_counter() - t0)
        per_step = (timings[1] - timings[0]) / args.steps
        steps_per_model = math.ceil(args.queries / batch)
        rows.append(
            {
                "config": spec,
                "precision": precision,
                "max_seq_length": seq,
                "hard_negatives": hn,
                "batch_size": batch,
                "s_per_step": round(per_step, 2),
                "s_per_query": round(per_step / batch, 3),
                "setup_s": round(timings[0] - per_step, 1),
                "projected_min_per_model": round((steps_per_model * per_step + timings[0] - per_step) / 60, 2),
                "projected_min_all_models": round(
                    args.models * (steps_per_model * per_step + timings[0] - per_step) / 60, 1
                ),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    out = ROOT / "data/reports/bench_train_step.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "rows": rows,
                "load_avg_1m": os.getloadavg()[0],
                "cores": os.cpu_count(),
                "measured": time.strftime("%Y-%m-%d %H:%M:%S"),
            },
            indent=2,
        )
    )
    print(
        f"\n| config (seq x hard neg x batch) | precision | s/step | s/query "
        f"| min per model ({args.queries} queries) | "
        f"min for {args.models} models |\n|---|---|---:|---:|---:|---:|"
    )
    for r in rows:
        print(
            f"| {r['config']} | {r['precision']} | {r['s_per_step']} | {r['s_per_query']} "
            f"| {r['projected_min_per_model']} | "
            f"{r['projected_min_all_models']} |"
        )


if __name__ == "__main__":
    main()
