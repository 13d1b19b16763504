"""`make demo`: materialize every asset of the graph for every bundled partition, in process, into the
persistent Dagster instance (DAGSTER_HOME = the repository root), then print where the results are.

Runs stage by stage so that each partitions definition gets its own runs; asset checks run with their
assets, and a failing blocking check stops the demo with the check's message."""

from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import dagster as dg

from rlhn_assets import settings
from rlhn_assets.definitions import defs
from rlhn_assets.lib.db import connect
from rlhn_assets.defs.resources import preset_name
from rlhn_assets.lib.relabel import VARIANTS
from rlhn_assets.partitions import DATASETS, EVAL_SETS


# Demo sizes (README "Demo sizes"): the first N instances of each dataset, at most 15 negatives each.
# `python -m rlhn_assets.demo --full` runs the whole bundled sample at <= 25 negatives (the paper's per-call maximum).
DEMO_MAX_INSTANCES = int(os.environ.get("RLHN_DEMO_MAX_INSTANCES", "8"))
# ~420 negatives in all, so the 1.5B tier 2 (~1.1 s per flagged negative) fits the demo's time budget
DEMO_MAX_NEGATIVES = 15


# Models trained and evaluated by the demo (all 7 with --full); training steps and eval sizes are capped.
# default vs s2_rlhn is the paper's headline comparison; every variant (stage 1 too) is trained with --full.
DEMO_VARIANTS = tuple(os.environ.get("RLHN_DEMO_VARIANTS", "default,s2_rlhn").split(","))
DEMO_TRAIN = {"max_steps": int(os.environ.get("RLHN_DEMO_TRAIN_STEPS", "8")), "batch_size": 16, "max_seq_length": 96,
              "hard_negatives": 3}
# Encoding the eval corpora is the demo's largest cost (SciFact: 5,183 passages per model): 64 tokens per
# passage and re-ranking the top 10 keep it to minutes; --full evaluates at 256 tokens and re-ranks the top 100.
DEMO_EVAL = {"max_seq_length": 64, "rerank_top_k": 10}
# Leave-one-out pruning at demo sizes (5 models): report only, since 2 training steps decide nothing; tiny steps
# and one small eval set at 64 tokens keep it to a minute or two (4 steps of batch 16 took 10 min under load).
DEMO_PRUNING = {"train": {**DEMO_TRAIN, "max_steps": 2, "batch_size": 8, "max_seq_length": 64},
                "eval_sets": ["cisi"], "eval_max_seq_length": 64, "max_instances_per_dataset": 16, "apply": False}


def run_config(full: bool) -> dict:
    if full:
        return {"ops": {"pruned": {"config": {"max_negatives_per_instance": 25}}}}
    prune = {"max_negatives_per_instance": DEMO_MAX_NEGATIVES}
    prune["max_instances"] = DEMO_MAX_INSTANCES
    return {"ops": {"pruned": {"config": prune}, "dataset_pruning": {"config": DEMO_PRUNING},
                    "trained_retriever": {"config": DEMO_TRAIN},
                    "trained_reranker": {"config": DEMO_TRAIN}, "eval_scores": {"config": DEMO_EVAL}}}


DEMO_PID_TAG = "rlhn/demo_pid"


def release_dead_demo_runs(instance: dg.DagsterInstance, log=print) -> int:
    """Mark runs of an earlier demo process that died (killed, Ctrl-C) as failed and free their pool slots.

    The demo executes in process, without the daemon that would free the slot of a crashed run; a killed demo
    would otherwise keep an `llm_judge` / `training` slot (dagster.yaml: limit 1) and the next demo would wait
    on it forever ("Step blocked by limit for pool ...")."""
    freed = 0
    for run in instance.get_runs(filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED,
                                                                   dg.DagsterRunStatus.STARTING])):
        pid = run.tags.get(DEMO_PID_TAG)
        if pid is None or _alive(int(pid)):
            continue
        instance.report_run_failed(run)
        instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
        freed += 1
    if freed:
        log(f"released {freed} run(s) of an earlier demo process that died, and their pool slots")
    return freed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class StageFailed(RuntimeError):
    """A step or an asset check of the graph failed; the message says which (details went to stderr)."""


def _run(d: dg.Definitions, instance: dg.DagsterInstance, keys: list[str], partition, config: dict
         ) -> tuple[float, int]:
    """Materialize ``keys`` (+ their checks) for one partition; (seconds, checks evaluated)."""
    selection = dg.AssetSelection.assets(*keys) | dg.AssetSelection.checks_for_assets(*keys)
    ops = {k: v for k, v in config["ops"].items() if k in keys}
    t0 = time.perf_counter()
    result = dg.materialize(list(d.assets) + list(d.asset_checks), selection=selection, partition_key=partition,
                            resources=d.resources, instance=instance, raise_on_error=False,
                            run_config={"ops": ops} if ops else None, tags={DEMO_PID_TAG: str(os.getpid())})
    seconds = time.perf_counter() - t0
    failed = [e for e in result.get_asset_check_evaluations() if not e.passed]
    if not result.success or failed:
        for e in failed:
            print(f"  check {e.check_name}[{partition}] FAILED: {e.description}", file=sys.stderr)
        for ev in result.get_step_failure_events():
            print(f"  step {ev.step_key} FAILED: {ev.event_specific_data.error.message.strip()[:2000]}", file=sys.stderr)
        raise StageFailed(f"{', '.join(keys)} [{partition}] failed")
    return seconds, len(result.get_asset_check_evaluations())


# (asset keys materialized together, partition keys) in graph order
def stages(variants=VARIANTS) -> list[tuple[list[str], list]]:
    return [
        (["hard_negative_mining", "raw_bge", "pruned"], list(DATASETS)),
        (["dataset_pruning"], [None]),
        (["tier1_judgments", "judging_cost_estimate", "tier2_judgments"], list(DATASETS)),
        (["relabeled"], [dg.MultiPartitionKey({"dataset": ds, "variant": v}) for ds in DATASETS for v in VARIANTS]),
        (["trained_retriever", "trained_reranker"], list(variants)),
        (["eval_scores"], [dg.MultiPartitionKey({"eval_set": e, "model": m}) for m in ("base",) + tuple(variants)
                           for e in EVAL_SETS]),
        (["comparison_report"], [None]),
    ]


def materialize_graph(d: dg.Definitions, instance: dg.DagsterInstance, config: dict, variants,
                      log=print) -> tuple[dict[str, float], int]:
    """Every stage of ``stages(variants)`` in graph order, checks included; (seconds per stage, checks passed).
    Raises StageFailed at the first failed step or check."""
    timings: dict[str, float] = {}
    checks = 0
    for keys, partitions in stages(variants):
        for p in partitions:
            log(f"materializing {', '.join(keys)} [{p}] ...")
            seconds, n = _run(d, instance, keys, p, config)
            timings[",".join(keys)] = timings.get(",".join(keys), 0.0) + seconds
            checks += n
    return timings, checks


def main() -> None:
    full = "--full" in sys.argv
    config = run_config(full)
    print(f"rlhn_assets demo: {'the whole bundled sample' if full else f'first {DEMO_MAX_INSTANCES} instances per dataset'}, "
          f"<= {25 if full else DEMO_MAX_NEGATIVES} negatives per instance; judge preset {preset_name()!r}; "
          f"models: {'all variants' if full else ', '.join(DEMO_VARIANTS)}")
    d = defs()
    t_all = time.perf_counter()
    with dg.DagsterInstance.get() as instance:
        release_dead_demo_runs(instance, log=lambda m: print(m, flush=True))
        try:
            timings, checks = materialize_graph(d, instance, config, VARIANTS if full else DEMO_VARIANTS,
                                                log=lambda m: print(m, flush=True))
        except StageFailed as e:
            raise SystemExit(f"demo stopped: {e}") from e
    total = time.perf_counter() - t_all
    db = settings.duckdb_path()
    print("\nDone in %.0fs (%d asset checks passed). Wall time per stage:" % (total, checks))
    for k, s in timings.items():
        print(f"  {s:7.1f}s  {k}")
    reports = settings.data_dir() / "reports"
    reports.mkdir(parents=True, exist_ok=True)
    (reports / "demo_timings.json").write_text(json.dumps({
        "full": full, "total_s": round(total, 1), "checks_passed": checks, "stages_s": {k: round(v, 1) for k, v in timings.items()},
        "max_instances": None if full else DEMO_MAX_INSTANCES, "variants": list(VARIANTS if full else DEMO_VARIANTS),
        "load_avg_1m_end": round(os.getloadavg()[0], 2), "finished": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=2))
    with connect(db, read_only=True) as conn:
        print(f"\nResults are in the DuckDB file {db}")
        rows = conn.execute("""
            SELECT r.dataset, count(*) AS raw_instances,
                   (SELECT count(*) FROM raw_passages p WHERE p.dataset = r.dataset) AS passages,
                   (SELECT count(*) FROM raw_quarantine q WHERE q.dataset = r.dataset) AS quarantined,
                   (SELECT count(*) FROM pruned_instances p WHERE p.dataset = r.dataset) AS pruned_instances
            FROM raw_instances r GROUP BY r.dataset ORDER BY r.dataset""").fetchall()
        print(f"  {'dataset':<18}{'raw':>8}{'passages':>10}{'quarantined':>13}{'pruned':>9}")
        for ds, n, p, q, k in rows:
            print(f"  {ds:<18}{n:>8}{p:>10}{q:>13}{k:>9}")
        print("\n  judgments (tier, verdict -> negatives):")
        for tier, verdict, n in conn.execute(
                "SELECT tier, verdict, count(*) FROM judgments GROUP BY ALL ORDER BY 1, 2").fetchall():
            print(f"    tier {tier}  {verdict:<13}{n:>7}")
        print("\n  relabeled instances per variant (all datasets):")
        for v, n, fn in conn.execute(
                "SELECT variant, count(*), sum(false_negatives) FROM relabeled_instances GROUP BY 1 ORDER BY 1").fetchall():
            print(f"    {v:<14}{n:>7} instances  {fn:>5} false negatives")
        print(f"  exports (rlhn schema, Parquet + JSONL): {settings.data_dir() / 'exports'}")
    loo_md = settings.data_dir() / "pruning" / "leave_one_out.md"
    if loo_md.exists():
        print("\nLeave-one-out dataset pruning (report only at demo sizes):\n" + loo_md.read_text())
    report_md = settings.data_dir() / "reports" / "comparison.md"
    if report_md.exists():
        print("\n" + report_md.read_text())
        print(f"(report: {report_md}, .csv and .png beside it)")
    print("\nOpen the Dagster UI (asset graph, partitions, metadata, checks): make ui  ->  http://127.0.0.1:3000")
    print(f"Query the tables: {sys.executable} -c \"import duckdb; print(duckdb.connect('{db}', read_only=True)"
          ".sql('select * from raw_instances limit 5'))\"")


if __name__ == "__main__":
    main()
