"""`make bench`: run every benchmark script under benchmarks/ (each prints ratios measured in one run and
writes data/reports/bench_<name>.json), then collect the JSON files into data/reports/benchmarks.md (+ .json).

    .venv/bin/python benchmarks/run_all.py [--only ingest,eval]

bench_scale runs at its default size (100,000 instances: hours on a 2-core machine); run it alone with
``--instances`` for a smaller size, its JSON is collected here like the others.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REPORTS = ROOT / "data" / "reports"


def _row(metric, value, target="", met=None) -> dict:
    return {"metric": metric, "value": value, "target": target, "met": met}


def summarize(name: str, r: dict) -> list[dict]:
    """Headline rows of one benchmark's JSON (scripts may write their own ``summary`` list)."""
    if "summary" in r:
        return r["summary"]
    if name == "bench_ingest":
        t = r.get("targets", {})
        return [
            _row("ingest throughput / DuckDB read_json throughput", round(r["ratio"], 3), ">= 0.5", t.get("ratio_met")),
            _row("ingest peak RSS (MB)", round(r["ingest"]["peak_rss_mb"]), "<= 2048", t.get("rss_met")),
            _row("instances", r["ingest"]["instances"]),
        ]
    if name == "bench_eval":
        return [
            _row(
                "eval encode throughput / raw SentenceTransformer.encode",
                r["ratio_cold_over_raw"],
                ">= 0.9",
                r["target_met"],
            ),
            _row("raw encode passages/s (SciFact)", r["raw_encode"]["passages_per_s"]),
            _row("warm (cached corpus) dense_search s", r["dense_search_warm"]["seconds"]),
        ]
    if name == "bench_llm_client":
        rows = [
            _row(
                f"client calls/s vs ideal at {lv['inflight']} in flight",
                lv["median_ratio"],
                ">= 0.9" if lv["inflight"] == r["target"]["inflight"] else "",
                r["target"]["met"] if lv["inflight"] == r["target"]["inflight"] else None,
            )
            for lv in r["levels"]
        ]
        w = r.get("warm_rerun", {})
        return rows + [
            _row("warm re-run: calls made", w.get("calls_made"), "0", w.get("calls_target_met")),
            _row("warm re-run: time warm / cold", w.get("time_ratio_warm_over_cold")),
        ]
    if name == "bench_judge_warm":
        return [
            x
            for ds, p in r["partitions"].items()
            for x in (
                _row(
                    f"judge re-materialization {ds}: calls made (cold {p['cold_calls']})",
                    p["warm_calls"],
                    "0",
                    p["warm_calls"] == 0,
                ),
                _row(f"judge re-materialization {ds}: time warm / cold", p["time_ratio_warm_over_cold"]),
            )
        ]
    return []


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="comma-separated script name parts (e.g. ingest,eval)")
    args = ap.parse_args()
    scripts = sorted(p for p in (ROOT / "benchmarks").glob("bench_*.py"))
    if args.only:
        scripts = [s for s in scripts if any(k in s.stem for k in args.only.split(","))]
    summary = {}
    for s in scripts:
        print(f"\n=== {s.name}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call([sys.executable, str(s)], cwd=ROOT)
        summary[s.stem] = {"returncode": rc, "wall_s": round(time.perf_counter() - t0, 1)}
    REPORTS.mkdir(parents=True, exist_ok=True)
    results = {p.stem: json.loads(p.read_text()) for p in sorted(REPORTS.glob("bench_*.json"))}
    (REPORTS / "benchmarks.json").write_text(json.dumps({"runs": summary, "results": results}, indent=2, default=str))
    import os

    lines = [
        "# Benchmarks",
        "",
        f"Run {time.strftime('%Y-%m-%d %H:%M')} on this machine ({os.cpu_count()} cores, "
        f"load avg now {os.getloadavg()[0]:.1f}); ratios are measured within one run of each script.",
        "",
        "| benchmark | measured | metric | value | target | met |",
        "|---|---|---|---:|---|---|",
    ]
    for name, res in results.items():
        # a script not run this time (--only) keeps its last result: the date says which run it comes from
        when = (
            res.get("generated_at")
            or res.get("created")
            or time.strftime("%Y-%m-%dT%H:%M", time.localtime((REPORTS / f"{name}.json").stat().st_mtime))
        )[:16].replace("T", " ")
        for row in summarize(name, res):
            met = {True: "MET", False: "MISSED", None: ""}[row["met"]]
            lines.append(
                f"| {name.removeprefix('bench_')} | {when} | {row['metric']} | {row['value']} | "
                f"{row['target']} | {met} |"
            )
    lines += [
        "",
        "Scripts this run: " + ", ".join(f"{k} ({v['wall_s']} s, exit {v['returncode']})" for k, v in summary.items()),
        "",
    ]
    for name, res in results.items():
        lines += [
            f"## {name}",
            "",
            "<details><summary>JSON</summary>",
            "",
            "```json",
            json.dumps(res, indent=2, default=str)[:6000],
            "```",
            "",
            "</details>",
            "",
        ]
    (REPORTS / "benchmarks.md").write_text("\n".join(lines))
    print(f"\nwrote {REPORTS / 'benchmarks.md'}")
    if any(v["returncode"] for v in summary.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
