"""`make bench`: run every benchmark script under benchmarks/ (each prints ratios measured in one run and
writes data/reports/bench_<name>.json), then collect the JSON files into data/reports/benchmarks.md (+ .json).

    .venv/bin/python benchmarks/run_all.py [--only ingest,eval]
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
    lines = ["# Benchmarks", "", f"Run {time.strftime('%Y-%m-%d %H:%M')} on this machine; ratios are measured within one run.", ""]
    for name, res in results.items():
        lines += [f"## {name}", "", "```json", json.dumps(res, indent=2, default=str)[:6000], "```", ""]
    (REPORTS / "benchmarks.md").write_text("\n".join(lines))
    print(f"\nwrote {REPORTS / 'benchmarks.md'}")
    if any(v["returncode"] for v in summary.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
