"""`make experiment`: the RLHN experiment on the whole bundled sample, through the asset graph.

Every dataset's full instances (negatives capped at the paper's 25 per judge call) go through the `local` judge
cascade; the variants are built; a retriever is trained for each of EXPERIMENT_VARIANTS with every seed of SEEDS
(one full epoch, no step cap); the untrained base and every trained model are evaluated on every eval set in
data/eval/ at 256 tokens; `comparison_report` aggregates over seeds (mean +- std, paired-bootstrap CIs of the
deltas against `default`). The report is copied to docs/experiment.{md,csv,png} with the run's date, code
version and machine load.

It runs in its own Dagster instance and DuckDB file (data/experiment/), so the demo's small sizes and the
experiment's full ones never mix in one table; `make experiment-ui` opens that instance in the UI.

Resumable: the LLM answers are cached (data/llm_cache.duckdb), trained models are reused from the model store when
their inputs are unchanged (lib/model_store.py), corpus embeddings are cached by model version. A cold run on a
machine without the LLM cache first loads the **recorded judge responses** (RECORDED_RESPONSES, Parquet, made by
`--record-judge-responses` from a real run of the same judges): the tier-2 judge then finds its answers in the
cache and computes its verdicts (calibration included) with the current code; any request the recording does not
hold (a changed prompt, model or dataset) goes to the real local LLM. The reranker is not part of the
experiment (its training and top-100 re-ranking do not fit the 2-hour budget on 2 cores).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

from rlhn_assets import settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import dagster as dg  # noqa: E402

from rlhn_assets.definitions import defs  # noqa: E402
from rlhn_assets.defs.resources import preset_name  # noqa: E402
from rlhn_assets.demo import Console, StageFailed, materialize_graph, release_dead_demo_runs  # noqa: E402
from rlhn_assets.lib import provenance  # noqa: E402
from rlhn_assets.lib.db import connect  # noqa: E402
from rlhn_assets.partitions import EVAL_SETS  # noqa: E402

# the paper's variants (RLHN Table 3) and the two comparison treatments (NV-Retriever's TopK-PercPos, ARHN's relabel
# + filter; README "Dataset variants")
EXPERIMENT_VARIANTS = ("default", "s1_rlhn", "s2_rlhn", "s2_hn_remove", "s2_remove", "s2_rlhn_filter", "topk_percpos")
SEEDS = (13, 14, 15)
BUDGET_S = 2 * 3600  # the whole cold run on the 2-core machine, judging included

# Training sizes, chosen from measured costs on the 2-core machines (README "The experiment"): one full epoch over
# every training query (879), no step cap, 1 hard negative (+ 31 in-batch) at 128 tokens, batch 32.
# Measured 2026-12-02 on an EPYC with AVX512_BF16 (bf16 autocast): 2.3 s/step at 128x1x32, 5.6 s/step at 128x3x32
# (benchmarks/bench_train_step.py, first 128 SciFact claims); evaluation ~1.8 min per model.
# Measured 2026-12-07 in the pipeline on an EPYC without AVX-512 (fp32): 223 s per model at 128x1x32 (7.9 s/step;
# 21 models ~78 min); evaluation per model at 256 tokens ~70 s CISI, ~70 s Cranfield, ~280 s SciFact (22 models
# ~155 min). So with 7 variants x 3 seeds the 2-hour budget is not met on 2 cores without native bf16 (~4 h).
# Measured 2026-12-07 in the pipeline on a 2-core Xeon with AVX512_BF16 + AMX (bf16 autocast), fresh clone: 61.2 min
# for the whole experiment (training ~77 s per model, 2.7 s/step; evaluation ~75 s per model over the three sets),
# 69 min with the install: within the budget (docs/experiment.md). 3 hard negatives (~1.6x the training cost)
# would not fit without bf16.
TRAIN = {
    "epochs": 1,
    "batch_size": 32,
    "learning_rate": 2e-5,
    "hard_negatives": 1,
    "max_seq_length": 128,
    "scale": 20.0,
    "max_steps": -1,
    "seeds": list(SEEDS),
    "precision": "auto",
}
EVAL = {"max_seq_length": 256, "rerank": False, "batch_size": 64, "precision": "auto"}
PRUNE = {"max_negatives_per_instance": 25}

# The local cascade's tier-2 answers from one real run, versioned with the judge configuration and code version.
RECORDED_RESPONSES = settings.data_dir() / "judgments" / "experiment_local_responses.parquet"


def experiment_home() -> Path:
    return Path(os.environ.get("RLHN_EXPERIMENT_HOME", settings.data_dir() / "experiment")).resolve()


def use_experiment_instance() -> Path:
    """Point Dagster and the DuckDB resource at the experiment's own instance and file (read when the
    definitions and the instance are built, so call this first)."""
    home = experiment_home()
    (home / "dagster_home").mkdir(parents=True, exist_ok=True)
    os.environ["DAGSTER_HOME"] = str(home / "dagster_home")
    os.environ["RLHN_DUCKDB"] = str(home / "rlhn.duckdb")
    return home


def run_config() -> dict:
    return {
        "ops": {"pruned": {"config": PRUNE}, "trained_retriever": {"config": TRAIN}, "eval_scores": {"config": EVAL}}
    }


# Not in the experiment: the leave-one-out dataset pruning (its own study), the reranker (budget, module docstring)
# and the DL19 judge-quality measurement.
EXPERIMENT_EXCLUDED = ("dataset_pruning", "trained_reranker", "judge_agreement")


def plan(variants=EXPERIMENT_VARIANTS) -> list[tuple[list[str], list]]:
    """The experiment's stages, in graph order, derived from the asset graph (rlhn_assets/stages.py)."""
    from rlhn_assets.demo import stages

    return stages(variants, exclude=EXPERIMENT_EXCLUDED)


def _llm_cache_path() -> Path:
    tier2 = defs().resources["tier2_judge"]
    return Path(tier2.cache_path or settings.data_dir() / "llm_cache.duckdb")


def load_recorded_responses(log=print) -> int:
    """Copy the recorded judge responses into the LLM cache (only keys it does not hold); returns rows added."""
    if not RECORDED_RESPONSES.exists():
        log(f"no recorded judge responses at {RECORDED_RESPONSES}: every tier-2 call goes to the local LLM")
        return 0
    from rlhn_assets.lib.llm.cache import apply_cache_schema

    cache = _llm_cache_path()
    cache.parent.mkdir(parents=True, exist_ok=True)
    with connect(cache) as conn:
        apply_cache_schema(conn)
        before = conn.execute("SELECT count(*) FROM llm_responses").fetchone()[0]
        conn.execute(
            """INSERT INTO llm_responses BY NAME
                        SELECT r.* FROM read_parquet($p) r ANTI JOIN llm_responses c ON c.key = r.key""",
            {"p": str(RECORDED_RESPONSES)},
        )
        added = conn.execute("SELECT count(*) FROM llm_responses").fetchone()[0] - before
    meta = (
        json.loads(RECORDED_RESPONSES.with_suffix(".json").read_text())
        if RECORDED_RESPONSES.with_suffix(".json").exists()
        else {}
    )
    log(
        f"recorded judge responses: {added:,} added to the LLM cache {cache} (file {RECORDED_RESPONSES.name}: "
        f"{meta.get('responses', '?')} responses, judge {meta.get('tier2_judge', {}).get('model', '?')}, "
        f"recorded {meta.get('recorded_at', '?')} at code {meta.get('code_version', '?')})"
    )
    return added


def record_judge_responses(log=print, *, all_cached: bool = False) -> Path:
    """Write the LLM responses behind the experiment's current tier-2 verdicts to RECORDED_RESPONSES (Parquet,
    zstd) with a JSON sidecar: the judge configuration, code version and counts. The request bodies (passage
    texts, re-derivable from the data) are left out to keep the file small. ``all_cached`` also takes every cached
    answer of the tier-2 judge's model (e.g. of a judging run stopped before its verdicts were written): they are
    real answers to the same requests, and a request the experiment does not make is never looked up."""
    d = defs()
    tier2 = d.resources["tier2_judge"]
    code_version = provenance.code_version()  # before the recording itself makes the tree dirty
    RECORDED_RESPONSES.parent.mkdir(parents=True, exist_ok=True)
    tmp = RECORDED_RESPONSES.with_suffix(".parquet.tmp")
    with connect(settings.duckdb_path(), read_only=True) as conn:
        has = conn.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = 'judgments'").fetchone()[
            0
        ]
        keys = (
            [
                r[0]
                for r in conn.execute(
                    "SELECT DISTINCT response_key FROM judgments WHERE tier = 2 AND response_key IS NOT NULL"
                ).fetchall()
            ]
            if has
            else []
        )
        per_dataset = (
            dict(conn.execute("SELECT dataset, count(*) FROM judgments WHERE tier = 2 GROUP BY 1").fetchall())
            if has
            else {}
        )
    if not keys and not all_cached:
        raise SystemExit(
            "no tier-2 judgments with a response key in the experiment's DuckDB: run the experiment first "
            "(or pass --all-cached to record every cached answer of the tier-2 model)"
        )
    with connect(_llm_cache_path(), read_only=True) as cache:
        cache.execute("CREATE TEMP TABLE wanted (key VARCHAR)")
        cache.executemany("INSERT INTO wanted VALUES (?)", [[k] for k in keys])
        if all_cached:
            cache.execute("INSERT INTO wanted SELECT key FROM llm_responses WHERE model = $m", {"m": tier2.model})
        cache.execute(f"""COPY (SELECT c.key, c.model, c.prompt_version, NULL::VARCHAR AS request_json, c.text,
                                       c.finish_reason, c.tokens_in, c.tokens_out, c.latency_s, c.top_logprobs_json,
                                       c.created_at
                                FROM llm_responses c SEMI JOIN wanted w ON w.key = c.key ORDER BY c.key)
                          TO '{tmp}' (FORMAT parquet, COMPRESSION zstd)""")
        n = cache.execute(f"SELECT count(*) FROM read_parquet('{tmp}')").fetchone()[0]
    tmp.replace(RECORDED_RESPONSES)
    meta = {
        "responses": n,
        "verdict_keys": len(keys),
        "tier2_verdicts_per_dataset": per_dataset,
        "all_cached": all_cached,
        "preset": preset_name(),
        "tier2_judge": tier2.describe(),
        "code_version": code_version,
        "recorded_at": time.strftime("%Y-%m-%d %H:%M:%S"),
        "prune": PRUNE,
        "note": "LLM responses (first-token logprobs) of the local tier-2 judge on the experiment's instances; "
        "request bodies omitted. Loaded into the LLM cache by `make experiment` when it lacks them.",
    }
    RECORDED_RESPONSES.with_suffix(".json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
    log(
        f"recorded {n:,} tier-2 responses ({len(keys):,} verdict keys) to {RECORDED_RESPONSES} "
        f"({RECORDED_RESPONSES.stat().st_size / 1e6:.1f} MB)"
    )
    return RECORDED_RESPONSES


class StageLedger:
    """Wall time of every step the experiment ran, kept in the experiment's home across invocations (a step is a
    stage's assets for one partition). A resumed run (after an interruption, or with ``--from``) adds its steps to
    the ones an earlier invocation finished, so the report can give the whole run's stage times; a cold run starts
    with an empty home and so an empty ledger."""

    def __init__(self, path: Path):
        self.path = path
        self.steps: dict[str, dict[str, dict]] = json.loads(path.read_text()) if path.exists() else {}

    def record(self, keys, partition, seconds: float) -> None:
        self.steps.setdefault(",".join(keys), {})[str(partition)] = {
            "seconds": round(float(seconds), 1),
            "code_version": provenance.code_version(),
            "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.steps, indent=1) + "\n")
        tmp.replace(self.path)

    def per_stage(self) -> dict[str, float]:
        return {stage: sum(s["seconds"] for s in steps.values()) for stage, steps in self.steps.items()}

    def code_versions(self) -> list[str]:
        return sorted({s["code_version"] for steps in self.steps.values() for s in steps.values()})


class Budget:
    """Time left of BUDGET_S, printed after every step; a per-stage line when a stage ends."""

    def __init__(self, budget_s: float = BUDGET_S):
        self.t0, self.budget_s = time.perf_counter(), budget_s
        self.stage_t0: dict[str, float] = {}

    def after_step(self, keys, partition, seconds) -> str:
        elapsed = time.perf_counter() - self.t0
        left = self.budget_s - elapsed
        return (
            f"elapsed {elapsed / 60:.1f} min, {left / 60:.1f} min left of {self.budget_s / 60:.0f}"
            if left >= 0
            else f"elapsed {elapsed / 60:.1f} min, {-left / 60:.1f} min OVER the {self.budget_s / 60:.0f}-min budget"
        )


def write_docs(
    timings: dict, total_s: float, load_start: float, out_dir: Path | None = None, ledger: StageLedger | None = None
) -> Path:
    """docs/experiment.{md,csv,png}: the comparison report with the run's header (date, code version, load,
    sizes, stage times: this invocation's, and the whole run's from the ledger when it was resumed)."""
    out_dir = out_dir or settings.PROJECT_ROOT / "docs"
    reports = settings.data_dir() / "reports"
    md = (reports / "comparison.md").read_text()
    machine = provenance.machine()
    header = [
        "# The RLHN experiment on the bundled sample (`make experiment`)",
        "",
        f"- run finished {time.strftime('%Y-%m-%d %H:%M:%S %Z')}, code version `{provenance.code_version()}`, "
        "judge preset "
        f"`{preset_name()}`",
        f"- machine: {machine['cores']} cores ({machine['cpu']}), load average {load_start:.2f} at the start, "
        f"{machine['load_avg_1m']:.2f} at the end; Python {machine['python']}",
        f"- this invocation {total_s / 60:.1f} min (budget {BUDGET_S / 60:.0f} min); per stage: "
        + ", ".join(f"{k} {v / 60:.1f} min" for k, v in timings.items()),
        f"- sizes: every instance of every dataset, at most {PRUNE['max_negatives_per_instance']} negatives each; "
        f"retriever training {json.dumps(TRAIN)}; evaluation {json.dumps(EVAL)}",
        f"- variants {', '.join(EXPERIMENT_VARIANTS)}; seeds {', '.join(map(str, SEEDS))}; eval sets "
        f"{', '.join(EVAL_SETS)}; the reranker is not trained (budget)",
    ]
    if ledger is not None and set(ledger.per_stage()) - set(timings):
        whole = ledger.per_stage()
        header.append(
            f"- the run was resumed: every stage's steps (the ledger {ledger.path.name}, code versions "
            f"{', '.join(ledger.code_versions())}) took {sum(whole.values()) / 60:.1f} min in all; per stage: "
            + ", ".join(f"{k} {v / 60:.1f} min" for k, v in whole.items())
        )
    header += [
        "",
        "![nDCG@10 per eval set and model, and each variant's delta vs default with its 95% CI](experiment.png)",
        "",
    ]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "experiment.md").write_text("\n".join(header) + md + "\n")
    for ext in ("csv", "png"):
        if (reports / f"comparison.{ext}").exists():
            shutil.copyfile(reports / f"comparison.{ext}", out_dir / f"experiment.{ext}")
    return out_dir / "experiment.md"


def select_stages(stages: list, argv: list[str]) -> list:
    """``--from <asset>``: resume at that asset's stage (the earlier stages stay as an earlier invocation left
    them); ``--until <asset>``: stop after that asset's stage."""

    def index_of(flag: str) -> int:
        asset = argv[argv.index(flag) + 1]
        cut = next((i for i, (keys, _) in enumerate(stages) if asset in keys), None)
        if cut is None:
            names = ", ".join(k for keys, _ in stages for k in keys)
            raise SystemExit(f"{flag} {asset}: not an asset of the experiment ({names})")
        return cut

    first = index_of("--from") if "--from" in argv else 0
    last = index_of("--until") if "--until" in argv else len(stages) - 1
    return stages[first : last + 1]


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    home = use_experiment_instance()
    if "--record-judge-responses" in argv:
        record_judge_responses(all_cached="--all-cached" in argv)
        return
    variants = EXPERIMENT_VARIANTS
    if "--variants" in argv:  # e.g. --variants default: a partial run (a quick check of training vs the base)
        variants = tuple(argv[argv.index("--variants") + 1].split(","))
        unknown = set(variants) - set(EXPERIMENT_VARIANTS)
        if unknown:
            raise SystemExit(f"--variants: {sorted(unknown)} not in the experiment's {EXPERIMENT_VARIANTS}")
    stages = select_stages(plan(variants), argv)
    print(
        f"rlhn_assets experiment: every instance, <= {PRUNE['max_negatives_per_instance']} negatives; judge preset "
        f"{preset_name()!r}; variants {', '.join(variants)} x seeds {', '.join(map(str, SEEDS))}; "
        f"eval sets {', '.join(EVAL_SETS)}; budget {BUDGET_S / 60:.0f} min"
    )
    print(f"instance + DuckDB: {home}  (open it with: make experiment-ui)")
    log_path = settings.data_dir() / "logs" / time.strftime("experiment-%Y%m%d-%H%M%S.log")
    print(f"Dagster's event stream and library output go to {log_path}", flush=True)
    load_start = os.getloadavg()[0]
    budget = Budget()
    ledger = StageLedger(home / "stage_times.json")

    def after_step(keys, partition, seconds) -> str:
        ledger.record(keys, partition, seconds)
        return budget.after_step(keys, partition, seconds)

    with Console(log_path) as console:
        load_recorded_responses(log=console.line)
        d = defs()
        with dg.DagsterInstance.get() as instance:
            release_dead_demo_runs(instance, log=console.line)
            try:
                timings, checks = materialize_graph(
                    d,
                    instance,
                    run_config(),
                    variants,
                    log=console.line,
                    progress=console.progress,
                    plan_stages=stages,
                    after_step=after_step,
                )
            except StageFailed as e:
                console.line(
                    f"\nexperiment stopped: {e}\nfull log: {log_path}\n"
                    "(re-run `make experiment` to continue: finished work is reused)"
                )
                raise SystemExit(1) from None
    total = time.perf_counter() - budget.t0
    if stages[-1][0] != ["comparison_report"]:
        print(f"\nStopped after {stages[-1][0]} as asked, in {total / 60:.1f} min ({checks} asset checks passed).")
        return
    if variants != EXPERIMENT_VARIANTS:
        report = settings.data_dir() / "reports" / "comparison.md"
        print(
            f"\nPartial run ({', '.join(variants)}) done in {total / 60:.1f} min ({checks} asset checks passed). "
            f"Report: {report}; docs/experiment.md is written only by a run of every variant.\n"
        )
        print(report.read_text())
        return
    doc = write_docs(timings, total, load_start, ledger=ledger)
    print(f"\nDone in {total / 60:.1f} min ({checks} asset checks passed). Report: {doc} (+ .csv, .png)\n")
    print(doc.read_text())


if __name__ == "__main__":
    main()
