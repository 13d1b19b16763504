"""End-to-end scale benchmark: a synthetic BGE dataset through the real Dagster assets, raw_bge -> pruned ->
judging_cost_estimate -> tier1_judgments -> tier2_judgments -> relabeled (+ export), with both tiers on the
`listwise` judge pointed at the fake OpenAI-compatible server (``rlhn_assets_tests/fake_openai_server.py``), in
online mode and in Batch API mode. A report, not a test: it prints what it measured and whether the targets are met.

    .venv/bin/python benchmarks/bench_scale.py                      # 100,000 instances x 25 negatives
    .venv/bin/python benchmarks/bench_scale.py --instances 3000     # smoke run
    .venv/bin/python benchmarks/bench_scale.py --modes online       # one mode

What it does:

1. The dataset is benchmarks/bench_ingest.py's generator (seeded, cached under ``data/cache/bench/``): one BGE line
   per instance with 1 positive and 25 negatives of ~350 characters, drawn from a pool of passages.
   It is registered as the partition ``msmarco_passage`` of a registry in a temporary directory (``keep: true``).
2. The fake server answers each chat completion after ``--delay`` seconds (default 0.3). Listwise prompts of model
   ``fake-tier1`` get a verdict flagging ``--tier1-share`` of the passages (default 10%), ``fake-tier2`` flags
   ``--tier2-share`` (5%: half of tier 1's flags, the same passages, since the flags depend on a hash of the passage
   text). Batch jobs complete ``--batch-delay`` seconds after they were created.
3. Every stage runs in a child process (``dg.materialize`` of the real assets and their checks, the production
   DuckDB settings, an ephemeral Dagster instance), so its peak RSS (the child's own ``ru_maxrss``) is the stage's.
   Per stage: wall time of the materialization (not the interpreter start-up), instances/s, peak RSS, size of the
   DuckDB file and of the LLM cache file afterwards, calls the fake server received, the 1-minute load average.
   For the judging stages, achieved calls/s over the ideal (in flight / delay).
4. Online mode: tier 1 and tier 2 with ``--inflight`` (32) requests in flight; then the relabel + export of every
   variant except ``topk_percpos`` (its ``teacher_scores`` needs a sentence-transformer encoding of every pruned
   pair, 2.6M passages at 100K instances: days on a 2-core CPU, and not part of the LLM cascade this measures); then
   DuckDB's own COPY of the same exported rows (read back from the Parquet files into a table, then COPY to Parquet
   and JSONL.gz as the export does) as the throughput baseline; then a warm re-run of both tiers and the relabel
   (target: 0 calls).
5. Batch mode, on a copy of the database after ``pruned`` and an empty LLM cache: tier 1 is started and killed
   (SIGKILL) as soon as the fake server has its first job, i.e. between submit and completion; then tier 1 is run
   again (it must poll the recorded job, not submit its requests again: resubmitted requests = requests in jobs -
   distinct requests, target 0), then tier 2 and the relabel.

Targets (issue 15): judging >= 0.8 of ideal at 32 in flight, peak RSS <= 2 GB in every stage, relabel + export >=
50% of DuckDB's COPY throughput on the same rows, warm re-run 0 calls, batch resume 0 resubmitted requests.
Writes ``data/reports/bench_scale.json`` (``run_all.py`` collects it).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPORT_PATH = ROOT / "data" / "reports" / "bench_scale.json"
DATASET = "msmarco_passage"  # a partition of the bundled registry (partitions are static); the bench's own file
VARIANTS = ("default", "s1_remove", "s1_hn_remove", "s1_rlhn", "s2_remove", "s2_hn_remove", "s2_rlhn", "s2_rlhn_filter")
DUCKDB_CONFIG = {"memory_limit": "1GB"}  # the production resource's (rlhn_assets/defs/resources.py)
TIER_MODELS = ("fake-tier1", "fake-tier2")

TARGET_RATIO_JUDGING = 0.8
TARGET_RSS_MB = 2048.0
TARGET_RATIO_EXPORT = 0.5


# ---------------------------------------------------------------------------------------------- child side
def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _resources(work: Path, mode: str, base_url: str, args) -> dict:
    from rlhn_assets.resources import (
        BaseModelsResource,
        DatasetRegistryResource,
        JudgeTierResource,
        JudgingBudgetResource,
        RLHNDuckDB,
    )

    common = dict(
        kind="listwise",
        base_url=base_url,
        concurrency=args.inflight,
        max_tokens=512,
        temperature=0.0,
        mode=mode,
        cache_path=str(work / f"llm_{mode}.duckdb"),
        max_error_rate=0.05,
    )
    if mode == "batch":
        common |= dict(batch_poll_s=args.batch_poll, batch_chunk_size=args.batch_chunk)
    return {
        "duckdb": RLHNDuckDB(database=str(work / f"rlhn_{mode}.duckdb"), connection_config=DUCKDB_CONFIG),
        "registry": DatasetRegistryResource(path=str(work / "datasets.yaml")),
        "judging_budget": JudgingBudgetResource(),
        "base_models": BaseModelsResource(),
        "tier1_judge": JudgeTierResource(tier=1, prompt_family="tier1", model=TIER_MODELS[0], **common),
        "tier2_judge": JudgeTierResource(
            tier=2, prompt_family="tier2", model=TIER_MODELS[1], scope=args.tier2_scope, **common
        ),
    }


def _numeric_metadata(result) -> dict:
    out = {}
    for ev in result.get_asset_materialization_events():
        for k, v in ev.materialization.metadata.items():
            val = getattr(v, "value", v)
            if isinstance(val, (int, float)) and not isinstance(val, bool):
                out[k] = val
            elif k == "shard_seconds" and isinstance(val, dict):  # the fanned-out judging's per-shard step times
                out[k] = {str(s): float(t) for s, t in val.items()}
    return out


def child_stage(args) -> dict:
    import dagster as dg

    from rlhn_assets.definitions import defs

    work = Path(args.work)
    d = defs()
    res = {**d.resources, **_resources(work, args.mode, args.base_url, args)}
    assets = list(d.assets)
    runs = []
    t0 = time.perf_counter()
    cpu0 = time.process_time()
    if args.child == "relabeled":
        for v in VARIANTS:
            t = time.perf_counter()
            r = dg.materialize(
                assets,
                selection=dg.AssetSelection.assets("relabeled"),
                partition_key=dg.MultiPartitionKey({"dataset": DATASET, "variant": v}),
                resources=res,
                run_config={"ops": {"relabeled": {"config": {"export_dir": str(work / f"exports_{args.mode}")}}}},
                raise_on_error=False,
            )
            runs.append({"variant": v, "success": r.success, "seconds": round(time.perf_counter() - t, 2)})
            runs[-1] |= {k: v for k, v in _numeric_metadata(r).items() if k in ("instances", "exported_rows")}
    else:
        keys = args.child.split(",")
        judging = {"tier1_judgments", "tier2_judgments"} & set(keys)
        r = dg.materialize(
            assets,
            selection=dg.AssetSelection.assets(*keys),
            partition_key=DATASET,
            resources=res,
            run_config={
                "ops": {
                    # each mode stages its shards (and their own LLM cache files) in its work dir: the default,
                    # <data dir>/staging, is shared, so batch mode would find online mode's answers there
                    k: {
                        "config": {
                            "rounds_in_flight": args.rounds_in_flight,
                            "staging_dir": str(work / f"staging_{args.mode}"),
                        }
                    }
                    for k in judging
                }
            },
            raise_on_error=False,
        )
        runs.append({"assets": keys, "success": r.success, "metadata": _numeric_metadata(r)})
        if not r.success:
            for ev in r.all_events:
                if ev.is_failure:
                    err = getattr(ev.event_specific_data, "error", None)
                    while err is not None and err.cause is not None:  # the root cause, not the retry wrapper
                        err = err.cause
                    runs[-1]["error"] = (
                        f"{ev.step_key}: {err.message.strip()[:1500]}\n{''.join(err.stack[-6:])[-3000:]}"
                        if err is not None
                        else str(ev.event_specific_data)[:2000]
                    )
                    break
    return {
        "seconds": round(time.perf_counter() - t0, 2),
        "cpu_seconds": round(time.process_time() - cpu0, 2),
        "peak_rss_mb": round(_rss_mb(), 1),
        "success": all(x["success"] for x in runs),
        "runs": runs,
    }


def child_copy_baseline(args) -> dict:
    """DuckDB's own COPY of the rows the export wrote: each variant's Parquet file read into a table (not timed),
    then timed: COPY to Parquet and to JSONL.gz, as lib/relabel.export_variant writes them."""
    import duckdb

    from rlhn_assets.lib.relabel import EXPORT_ROW_GROUP

    work = Path(args.work)
    exports = work / f"exports_{args.mode}"
    out_dir = work / "copy_baseline"
    out_dir.mkdir(exist_ok=True)
    # COPY in one statement per file, as a user would write it; it needs more than the pipeline's 1 GB
    # memory_limit at 100,000 instances (the export writes in parts for that reason), so the baseline gets 4 GB
    conn = duckdb.connect(str(work / "copy_baseline.duckdb"), config={**DUCKDB_CONFIG, "memory_limit": "4GB"})
    seconds, rows = 0.0, 0
    for v in VARIANTS:
        src = exports / v / f"{DATASET}.parquet"
        conn.execute(f"CREATE OR REPLACE TABLE t AS SELECT * FROM read_parquet('{src}')")
        t = time.perf_counter()
        conn.execute(f"COPY t TO '{out_dir / (v + '.parquet')}' (FORMAT parquet, ROW_GROUP_SIZE {EXPORT_ROW_GROUP})")
        conn.execute(f"COPY t TO '{out_dir / (v + '.jsonl.gz')}' (FORMAT json, COMPRESSION gzip)")
        seconds += time.perf_counter() - t
        rows += conn.execute("SELECT count(*) FROM t").fetchall()[0][0]
    conn.close()
    return {"seconds": round(seconds, 2), "rows": rows, "peak_rss_mb": round(_rss_mb(), 1), "success": True}


# ---------------------------------------------------------------------------------------------- parent side
def _sizes(work: Path, mode: str) -> dict:
    def size(p: Path) -> int:
        return sum(x.stat().st_size for x in (p, p.with_name(p.name + ".wal")) if x.exists())

    return {
        "duckdb_mb": round(size(work / f"rlhn_{mode}.duckdb") / 1e6, 1),
        "llm_cache_mb": round(size(work / f"llm_{mode}.duckdb") / 1e6, 1),
    }


def _child_cmd(stage: str, work: Path, mode: str, base_url: str, args) -> list[str]:
    return [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        stage,
        "--work",
        str(work),
        "--mode",
        mode,
        "--base-url",
        base_url,
        "--inflight",
        str(args.inflight),
        "--batch-poll",
        str(args.batch_poll),
        "--batch-chunk",
        str(args.batch_chunk),
        "--tier2-scope",
        args.tier2_scope,
        "--rounds-in-flight",
        str(args.rounds_in_flight),
    ]


def run_stage(name: str, stage: str, work: Path, mode: str, base_url: str, args, instances: int) -> dict:
    from rlhn_assets_tests.fake_openai_server import get_stats

    before = get_stats(base_url, by_content=False)
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.run(_child_cmd(stage, work, mode, base_url, args), capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    after = get_stats(base_url, by_content=False)
    try:
        res = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        res = {"success": False, "error": (proc.stderr or proc.stdout)[-3000:]}
    res |= {
        "stage": name,
        "mode": mode,
        "process_wall_s": round(wall, 1),
        **_calls_between(before, after),
        "load_avg_1m": [round(load0, 2), round(os.getloadavg()[0], 2)],
        **_sizes(work, mode),
    }
    if res.get("seconds"):
        res["instances_per_s"] = round(instances / res["seconds"], 1)
    if proc.returncode != 0 and "error" not in res:
        res["error"] = proc.stderr[-3000:]
    _print_stage(res)
    return res


def _print_stage(r: dict) -> None:
    calls = r["online_calls"] or r["batch_requests"]
    extra = ""
    if "judging" in r:
        j = r["judging"]
        extra = f"  {j['calls_per_s']:.1f} calls/s = {j['ratio_to_ideal']:.3f} of ideal {j['ideal_calls_per_s']:.1f}"
    print(
        f"{r['mode']:<7} {r['stage']:<22} {'ok ' if r.get('success') else 'FAIL'} {r.get('seconds', 0):8.1f} s  "
        f"{r.get('instances_per_s', 0):8.1f} inst/s  RSS {r.get('peak_rss_mb', 0):7.0f} MB  "
        f"db {r['duckdb_mb']:7.1f} MB  cache {r['llm_cache_mb']:7.1f} MB  calls {calls:7d}  "
        f"load {r['load_avg_1m'][0]:.1f}->{r['load_avg_1m'][1]:.1f}{extra}",
        flush=True,
    )
    if not r.get("success"):
        print("   error:", (r.get("error") or json.dumps(r.get("runs"))[:3000]), flush=True)


def _calls_between(before: dict, after: dict) -> dict:
    """What the fake server received between two of its /stats snapshots."""
    return {
        "online_calls": after["total"] - before["total"],
        "batch_requests": after["batch_requests"] - before["batch_requests"],
        "batch_jobs": after["batches"] - before["batches"],
    }


def _judging_figures(r: dict, args) -> None:
    """Achieved calls/s of a judging stage over the ideal (in flight / delay), from the step's own judging time
    (metadata wall_seconds: reads, calls, writes) and from the stage's whole materialization time."""
    md = (r.get("runs") or [{}])[0].get("metadata", {})
    calls = r["online_calls"]
    ideal = args.inflight / args.delay
    judge_s = float(md.get("wall_seconds") or r.get("seconds") or 0)
    if calls and judge_s:
        r["judging"] = {
            "calls": calls,
            "judging_seconds": judge_s,
            "calls_per_s": round(calls / judge_s, 2),
            "ideal_calls_per_s": round(ideal, 2),
            "ratio_to_ideal": round(calls / judge_s / ideal, 4),
            "ratio_to_ideal_whole_stage": round(calls / r["seconds"] / ideal, 4),
        }
        # wall_seconds spans the whole graph-backed asset (staging, shard steps, merge); the shard steps alone
        # are the judging loop (with shards: 1, one step).
        shard_s = max((md.get("shard_seconds") or {}).values(), default=0.0)
        if shard_s:
            r["judging"] |= {
                "shard_seconds_max": shard_s,
                "ratio_to_ideal_shard_steps": round(calls / shard_s / ideal, 4),
            }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--instances", type=int, default=100_000)
    ap.add_argument("--pool", type=int, default=0, help="distinct passages (default 1.5 x instances)")
    ap.add_argument("--seed", type=int, default=13)
    ap.add_argument("--delay", type=float, default=0.3, help="seconds before each online answer")
    ap.add_argument("--inflight", type=int, default=32)
    ap.add_argument("--modes", default="online,batch")
    ap.add_argument("--tier1-share", type=float, default=0.10)
    ap.add_argument("--tier2-share", type=float, default=0.05)
    ap.add_argument("--tier2-scope", default="flagged_negatives", choices=["instance", "flagged_negatives"])
    ap.add_argument("--batch-delay", type=float, default=10.0, help="seconds until a fake batch job completes")
    ap.add_argument("--batch-poll", type=float, default=1.0, help="the tiers' batch_poll_s")
    ap.add_argument("--batch-chunk", type=int, default=50_000, help="the tiers' batch_chunk_size")
    ap.add_argument(
        "--rounds-in-flight", type=int, default=2, help="the judging steps' rounds_in_flight (1 = one round at a time)"
    )
    ap.add_argument("--judging-only", action="store_true", help="stop after tier 2 (no relabel, COPY, warm re-run)")
    ap.add_argument("--work-dir", default="", help="keep the databases here (default: a temp dir, removed)")
    ap.add_argument("--report", type=Path, default=REPORT_PATH)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="online", help=argparse.SUPPRESS)
    ap.add_argument("--base-url", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:
        out = child_copy_baseline(args) if args.child == "copy_baseline" else child_stage(args)
        print(json.dumps(out, default=str), flush=True)
        return 0

    import bench_ingest

    from rlhn_assets_tests.fake_openai_server import get_stats, running_server

    gen = argparse.Namespace(
        instances=args.instances, pool=args.pool or max(1000, args.instances * 3 // 2), seed=args.seed
    )
    data_file = bench_ingest.ensure_dataset(gen)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_scale_", dir=ROOT / "data" / "cache" / "bench"))
    work.mkdir(parents=True, exist_ok=True)
    (work / "datasets.yaml").write_text(
        f"datasets:\n  {DATASET}:\n    files:\n      - {{path: {data_file}, format: bge}}\n    keep: true\n"
    )
    modes = [m for m in args.modes.split(",") if m]
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    load_start = os.getloadavg()
    print(
        f"bench_scale: {args.instances:,} instances x {bench_ingest.N_NEG} negatives, delay {args.delay} s, "
        f"{args.inflight} in flight (ideal {args.inflight / args.delay:.1f} calls/s), modes {modes}, "
        f"{os.cpu_count()} CPUs, load {load_start[0]:.2f}; work dir {work}",
        flush=True,
    )
    stages: list[dict] = []
    n = args.instances
    shares = {TIER_MODELS[0]: args.tier1_share, TIER_MODELS[1]: args.tier2_share}
    with running_server(args.delay, flag_shares=shares, batch_delay_s=args.batch_delay) as url:
        first = modes[0]
        for name, stage in (("raw_bge", "raw_bge"), ("pruned", "pruned"), ("cost_estimate", "judging_cost_estimate")):
            stages.append(run_stage(name, stage, work, first, url, args, n))
        for m in modes[1:]:  # every mode starts from the same pruned data
            shutil.copy(work / f"rlhn_{first}.duckdb", work / f"rlhn_{m}.duckdb")
        for mode in modes:
            if mode == "batch":
                # interrupted between submit and completion: kill tier 1 once the fake has its first job
                before = get_stats(url, by_content=False)
                cmd = _child_cmd("tier1_judgments", work, mode, url, args)
                t0 = time.perf_counter()
                proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
                while get_stats(url, by_content=False)["batches"] == before["batches"] and proc.poll() is None:
                    time.sleep(0.2)
                # the client records a job right after the API returns it; a kill inside those milliseconds loses
                # the record (that job would be submitted again): give it a second, well before the job completes
                time.sleep(1.0)
                killed_after = time.perf_counter() - t0
                killed = proc.poll() is None
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                mid = get_stats(url, by_content=False)
                stages.append(
                    {
                        "stage": "tier1 (killed)",
                        "mode": mode,
                        "success": killed,
                        "seconds": round(killed_after, 1),
                        **_calls_between(before, mid),
                        "note": "SIGKILL after the first job was created, before it completed",
                    }
                )
                print(
                    f"batch   tier1 killed after {killed_after:.1f} s with {stages[-1]['batch_jobs']} job(s) "
                    f"({stages[-1]['batch_requests']:,} requests) submitted",
                    flush=True,
                )
            for name in ("tier1_judgments", "tier2_judgments"):
                r = run_stage(name, name, work, mode, url, args, n)
                if mode == "online":
                    _judging_figures(r, args)
                    if "judging" in r:
                        j = r["judging"]
                        print(
                            f"        {name}: {j['calls']:,} calls in {j['judging_seconds']:.1f} s of judging = "
                            f"{j['calls_per_s']:.1f} calls/s, {j['ratio_to_ideal']:.3f} of ideal "
                            f"({j['ratio_to_ideal_whole_stage']:.3f} over the whole stage"
                            + (
                                f", {j['ratio_to_ideal_shard_steps']:.3f} over the shard steps alone)"
                                if "ratio_to_ideal_shard_steps" in j
                                else ")"
                            ),
                            flush=True,
                        )
                if mode == "batch" and name == "tier1_judgments":
                    st = get_stats(url, by_content=False)
                    r["resubmitted_requests"] = st["batch_requests"] - st["batch_requests_distinct"]
                    md = (r.get("runs") or [{}])[0].get("metadata", {})
                    r["jobs_resumed"] = md.get("batch_jobs_resumed")
                    print(
                        f"        resumed run: {r['jobs_resumed']} job(s) resumed, {r['batch_jobs']} new job(s), "
                        f"resubmitted requests so far: {r['resubmitted_requests']} (target 0)",
                        flush=True,
                    )
                stages.append(r)
            if args.judging_only:
                continue
            stages.append(run_stage("relabeled+export", "relabeled", work, mode, url, args, n))
            if mode == "online":
                stages.append(run_stage("copy_baseline", "copy_baseline", work, mode, url, args, n))
                for name in ("tier1_judgments", "tier2_judgments", "relabeled"):
                    stages.append(run_stage(f"warm {name}", name, work, mode, url, args, n))
    load_end = os.getloadavg()

    def get(stage, mode="online"):
        return next((s for s in stages if s["stage"] == stage and s["mode"] == mode), None)

    summary = []

    def row(metric, value, target="", met=None):
        summary.append({"metric": metric, "value": value, "target": target, "met": met})

    for mode in modes:
        for tier in ("tier1_judgments", "tier2_judgments"):
            s = get(tier, mode)
            if s and "judging" in s:
                ratio = s["judging"]["ratio_to_ideal"]
                row(
                    f"{mode} {tier}: calls/s / ideal at {args.inflight} in flight ({s['judging']['calls']} calls)",
                    ratio,
                    f">= {TARGET_RATIO_JUDGING}",
                    ratio >= TARGET_RATIO_JUDGING,
                )
    peak = max((s.get("peak_rss_mb") or 0) for s in stages)
    row("peak RSS over every stage (MB)", peak, f"<= {TARGET_RSS_MB:.0f}", peak <= TARGET_RSS_MB)
    rel, base = get("relabeled+export"), get("copy_baseline")
    if rel and base and rel.get("seconds") and base.get("seconds"):
        ratio = round(base["seconds"] / rel["seconds"], 4)
        row(
            "relabel + export throughput / DuckDB COPY of the same rows (8 variants)",
            ratio,
            f">= {TARGET_RATIO_EXPORT}",
            ratio >= TARGET_RATIO_EXPORT,
        )
    warm = [s for s in stages if s["stage"].startswith("warm ")]
    if warm:
        calls = sum(s["online_calls"] + s["batch_requests"] for s in warm)
        row("warm re-run (tiers + relabel): calls made", calls, "0", calls == 0)
    b1 = get("tier1_judgments", "batch")
    if b1 is not None:
        row(
            "batch: resubmitted requests after a kill between submit and completion",
            b1["resubmitted_requests"],
            "0",
            b1["resubmitted_requests"] == 0,
        )
        row("batch: jobs resumed by the rerun", b1.get("jobs_resumed"))
    row("instances", n)
    row("all stages succeeded", all(s.get("success") for s in stages), "true", all(s.get("success") for s in stages))

    report = {
        "benchmark": "scale",
        "generated_at": started,
        "command": "python benchmarks/bench_scale.py " + " ".join(sys.argv[1:]),
        "settings": {
            k: getattr(args, k)
            for k in (
                "instances",
                "delay",
                "inflight",
                "modes",
                "tier1_share",
                "tier2_share",
                "tier2_scope",
                "batch_delay",
                "batch_poll",
                "batch_chunk",
                "rounds_in_flight",
                "judging_only",
            )
        },
        "dataset": {"file": str(data_file.relative_to(ROOT)), "pool": gen.pool, "negatives": bench_ingest.N_NEG},
        "excluded": "topk_percpos (teacher_scores encodes every pruned pair with a sentence-transformer: far too slow "
        "on this CPU at this size, and no LLM call is involved)",
        "machine": {"cpus": os.cpu_count(), "load_avg_start": load_start, "load_avg_end": load_end},
        "summary": summary,
        "stages": stages,
    }
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(json.dumps(report, indent=2, default=str))
    print()
    for s in summary:
        met = {True: "MET", False: "MISSED", None: ""}[s["met"]]
        print(f"  {s['metric']:<80} {s['value']!s:>10}  {s['target']:<8} {met}")
    print(f"wrote {args.report}")
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
