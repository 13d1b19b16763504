"""`make demo`: materialize every asset of the graph for every bundled partition, in process, into the
persistent Dagster instance (DAGSTER_HOME = the repository root), then print where the results are.

Runs stage by stage so that each partitions definition gets its own runs; asset checks run with their
assets, and a failing blocking check stops the demo with the check's message.

The terminal gets one line per stage and partition (what ran, how many rows/instances, how long, checks passed),
a periodic progress line while a step runs (its latest log message), and a final summary. Dagster's own
DEBUG/INFO event stream and everything libraries print go to a log file whose path is printed first; the
same events are in the Dagster UI (`make ui`)."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
import uuid
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import dagster as dg

from rlhn_assets import settings
from rlhn_assets.dagster_internal import free_pool_slots_of_run
from rlhn_assets.definitions import defs
from rlhn_assets.defs.resources import preset_name
from rlhn_assets.lib.db import connect
from rlhn_assets.lib.relabel import VARIANTS
from rlhn_assets.partitions import BASE_MODEL

# Demo sizes (README "Demo sizes"): the first N instances of each dataset, at most 15 negatives each.
# `python -m rlhn_assets.demo --full` runs the whole bundled sample at <= 25 negatives (the paper's per-call maximum).
DEMO_MAX_INSTANCES = int(os.environ.get("RLHN_DEMO_MAX_INSTANCES", "8"))
# ~420 negatives in all, so the 1.5B tier 2 (~1.1 s per flagged negative) fits the demo's time budget
DEMO_MAX_NEGATIVES = 15


# Models trained and evaluated by the demo (every variant with --full); training steps and eval sizes are capped.
# default vs s2_rlhn is the paper's headline comparison; every variant (stage 1 too) is trained with --full.
DEMO_VARIANTS = tuple(os.environ.get("RLHN_DEMO_VARIANTS", "default,s2_rlhn").split(","))
DEMO_TRAIN = {
    "max_steps": int(os.environ.get("RLHN_DEMO_TRAIN_STEPS", "8")),
    "batch_size": 16,
    "max_seq_length": 96,
    "hard_negatives": 3,
}
# Encoding the eval corpora is the demo's largest cost (SciFact: 5,183 passages per model): 64 tokens per
# passage and re-ranking the top 10 keep it to minutes; --full evaluates at 256 tokens and re-ranks the top 100.
DEMO_EVAL = {"max_seq_length": 64, "rerank_top_k": 10}
# Leave-one-out pruning at demo sizes (5 models): report only, since 2 training steps decide nothing; tiny steps
# and one small eval set at 64 tokens keep it to a minute or two (4 steps of batch 16 took 10 min under load).
DEMO_PRUNING = {
    "train": {**DEMO_TRAIN, "max_steps": 2, "batch_size": 8, "max_seq_length": 64},
    "eval_sets": ["cisi"],
    "eval_max_seq_length": 64,
    "max_instances_per_dataset": 16,
    "apply": False,
}


def run_config(full: bool) -> dict:
    if full:
        return {"ops": {"pruned": {"config": {"max_negatives_per_instance": 25}}}}
    prune = {"max_negatives_per_instance": DEMO_MAX_NEGATIVES}
    prune["max_instances"] = DEMO_MAX_INSTANCES
    return {
        "ops": {
            "pruned": {"config": prune},
            "dataset_pruning": {"config": DEMO_PRUNING},
            "trained_retriever": {"config": DEMO_TRAIN},
            "trained_reranker": {"config": DEMO_TRAIN},
            "eval_scores": {"config": DEMO_EVAL},
        }
    }


DEMO_PID_TAG = "rlhn/demo_pid"


def release_dead_demo_runs(instance: dg.DagsterInstance, log=print) -> int:
    """Mark runs of an earlier demo process that died (killed, Ctrl-C) as failed and free their pool slots.

    The demo executes in process, without the daemon that would free the slot of a crashed run; a killed demo
    would otherwise keep an `llm_judge` / `training` slot (dagster.yaml: limit 1) and the next demo would wait
    on it forever ("Step blocked by limit for pool ...")."""
    freed = 0
    for run in instance.get_runs(
        filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.STARTING])
    ):
        pid = run.tags.get(DEMO_PID_TAG)
        if pid is None or _alive(int(pid)):
            continue
        instance.report_run_failed(run)
        free_pool_slots_of_run(instance, run.run_id)
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
    """A step or an asset check of the graph failed: ``problems`` holds each failed step's innermost error and
    each failed check's description."""

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = problems or []

    def __str__(self) -> str:
        return "\n".join([self.args[0], *("  " + p.replace("\n", "\n    ") for p in self.problems)])


RUN_TOKEN_TAG = "rlhn/demo_step"
# metadata entries that say "how many" in a stage's line, in this order of preference
_COUNT_KEYS = (
    "instances",
    "instances_out",
    "instances_judged",
    "negatives_judged",
    "flagged_negatives",
    "false_negatives",
    "rows",
    "queries",
    "train_queries",
    "training_steps",
    "ndcg@10",
)


def _counts(result) -> str:
    """``asset: key value, ...`` for the count-like metadata of each materialization of ``result``."""
    parts = []
    for ev in result.get_asset_materialization_events():
        md = ev.event_specific_data.materialization.metadata
        shown = []
        for k in _COUNT_KEYS:
            v = md.get(k)
            v = getattr(v, "value", v)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                shown.append(
                    f"{k.replace('_', ' ')} {v:,.4g}" if isinstance(v, float) else f"{k.replace('_', ' ')} {v:,}"
                )
            if len(shown) == 2:
                break
        if shown:
            parts.append(f"{ev.asset_key.to_user_string()}: {', '.join(shown)}")
    return "; ".join(parts)


def _last_message(instance: dg.DagsterInstance, token: str) -> str | None:
    """The latest plain log message (``context.log.info``) of the run tagged ``token``, if it started."""
    runs = instance.get_runs(filters=dg.RunsFilter(tags={RUN_TOKEN_TAG: token}), limit=1)
    if not runs:
        return None
    for entry in reversed(instance.all_logs(runs[0].run_id)):
        if entry.dagster_event is None and entry.user_message:
            return entry.user_message.strip().splitlines()[0][:160]
    return None


class _Ticker:
    """While a stage runs, call ``progress(elapsed_s, latest_log_message)`` every ``every`` seconds."""

    def __init__(self, instance, token: str, progress, every: float):
        self.instance, self.token, self.progress, self.every = instance, token, progress, every
        self.stop = threading.Event()
        self.t0 = time.perf_counter()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self.stop.wait(self.every):
            try:
                msg = _last_message(self.instance, self.token)
            except Exception:  # noqa: BLE001 - progress is best effort, never stops the demo
                msg = None
            self.progress(time.perf_counter() - self.t0, msg)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(timeout=5)


def _first_lines(text: str, n: int = 12) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return "\n".join(lines[:n]) + (f"\n    ... ({len(lines) - n} more lines in the log)" if len(lines) > n else "")


def _run(
    d: dg.Definitions,
    instance: dg.DagsterInstance,
    keys: list[str],
    partition,
    config: dict,
    progress=None,
    progress_every: float = 20.0,
) -> tuple[float, int, str]:
    """Materialize ``keys`` (+ their checks) for one partition; (seconds, checks passed, counts summary).
    ``progress(elapsed, message)`` is called periodically while it runs."""
    selection = dg.AssetSelection.assets(*keys) | dg.AssetSelection.checks_for_assets(*keys)
    ops = {k: v for k, v in config["ops"].items() if k in keys}
    token = uuid.uuid4().hex
    run_config = {"ops": ops} if ops else {}
    t0 = time.perf_counter()
    with _Ticker(instance, token, progress, progress_every) if progress else contextlib.nullcontext():
        result = dg.materialize(
            list(d.assets or []) + list(d.asset_checks or []),
            selection=selection,
            partition_key=partition,
            resources=d.resources or {},
            instance=instance,
            raise_on_error=False,
            run_config=run_config or None,
            tags={DEMO_PID_TAG: str(os.getpid()), RUN_TOKEN_TAG: token},
        )
    seconds = time.perf_counter() - t0
    evaluations = result.get_asset_check_evaluations()
    failed = [e for e in evaluations if not e.passed]
    if not result.success or failed:
        problems = [f"check {e.check_name}[{partition}] FAILED: {e.description}" for e in failed]
        for ev in result.get_step_failure_events():
            err = ev.event_specific_data.error
            # the innermost cause is the real error (Dagster wraps it in "Error occurred while executing op")
            while err.cause is not None:
                err = err.cause
            problems.append(f"step {ev.step_key} FAILED: {err.cls_name}: {_first_lines(err.message)}")
        raise StageFailed(f"{', '.join(keys)} [{partition}] failed", problems)
    return seconds, len(evaluations), _counts(result)


# Assets the demo does not run: the judge-quality measurement on DL19 (its own command, README "Judge quality").
DEMO_EXCLUDED = ("judge_agreement",)


def stages(variants=VARIANTS, exclude=DEMO_EXCLUDED) -> list[tuple[list[str], list]]:
    """(asset keys materialized together, partition keys) in graph order, derived from the asset graph
    (rlhn_assets/stages.py): every dataset, every (dataset, variant) of `relabeled`, and of the training and
    evaluation stages only ``variants`` and the untrained base."""
    from rlhn_assets.stages import graph_stages, only_models

    return graph_stages(
        defs().resolve_asset_graph(), exclude=exclude, keep_partition=only_models((BASE_MODEL, *variants))
    )


def materialize_graph(
    d: dg.Definitions,
    instance: dg.DagsterInstance,
    config: dict,
    variants,
    log=print,
    progress=None,
    plan_stages=None,
    after_step=None,
) -> tuple[dict[str, float], int]:
    """Every stage of ``plan_stages`` (default ``stages(variants)``) in graph order, checks included; (seconds per
    stage, checks passed). ``log`` gets one line per stage and partition; ``progress(line)`` a periodic line while a
    step runs; ``after_step(keys, partition, seconds)`` may return text appended to the step's line (e.g. the time
    left). Raises StageFailed at the first failed step or check."""
    timings: dict[str, float] = {}
    checks = 0
    plan = [(keys, p) for keys, partitions in (plan_stages or stages(variants)) for p in partitions]
    width = len(str(len(plan)))
    for i, (keys, p) in enumerate(plan, start=1):
        what = f"[{i:>{width}}/{len(plan)}] {', '.join(keys)}" + (f" [{p}]" if p is not None else "")
        tick = (
            (lambda elapsed, msg, what=what: progress(f"  ... {what}: {elapsed:.0f}s" + (f" | {msg}" if msg else "")))
            if progress
            else None
        )
        seconds, n, counts = _run(d, instance, keys, p, config, progress=tick)
        timings[",".join(keys)] = timings.get(",".join(keys), 0.0) + seconds
        checks += n
        extra = after_step(keys, p, seconds) if after_step else ""
        log(
            f"{what}  {seconds:6.1f}s  {n} check{'s' if n != 1 else ''} passed"
            + (f"  | {counts}" if counts else "")
            + (f"  | {extra}" if extra else "")
        )
    return timings, checks


class Console:
    """The demo's terminal: while active, file descriptors 1 and 2 (Dagster's console logger, library warnings,
    progress bars, anything a C library prints) go to ``log_path``; :meth:`line` writes to the real terminal
    (and the log). On a terminal, progress lines overwrite each other; elsewhere (CI logs) they are printed
    at most once a minute."""

    def __init__(self, log_path: Path):
        self.log_path = log_path
        self._saved: tuple[int, int] | None = None
        self.term = None
        self._last_progress = 0.0
        self._lock = threading.Lock()
        self._status_shown = False

    def __enter__(self) -> Console:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        sys.stdout.flush()
        sys.stderr.flush()
        self._saved = (os.dup(1), os.dup(2))
        self.term = os.fdopen(os.dup(self._saved[0]), "w", buffering=1)
        self.tty = self.term.isatty()
        fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        # Python-level writers too (a replaced sys.stderr, e.g. under a test runner, would bypass the fds)
        self._saved_sys = (sys.stdout, sys.stderr)
        self._log_text = open(self.log_path, "a", buffering=1, errors="replace")
        sys.stdout = sys.stderr = self._log_text
        return self

    def __exit__(self, *exc) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        self._clear_status()
        sys.stdout, sys.stderr = self._saved_sys
        self._log_text.close()
        if self._saved:
            os.dup2(self._saved[0], 1)
            os.dup2(self._saved[1], 2)
            os.close(self._saved[0])
            os.close(self._saved[1])
            self._saved = None
        if self.term:
            self.term.close()
            self.term = None

    def _clear_status(self) -> None:
        if self._status_shown and self.term:
            self.term.write("\r\x1b[K")
            self._status_shown = False

    def line(self, msg: str) -> None:
        with self._lock:
            self._clear_status()
            (self.term or sys.stdout).write(msg + "\n")
            print(f"[demo] {msg}", file=sys.stderr, flush=True)

    def progress(self, msg: str) -> None:
        with self._lock:
            if self.term and self.tty:
                cols = 160
                try:
                    cols = os.get_terminal_size(self.term.fileno()).columns
                except OSError:
                    pass
                self.term.write("\r\x1b[K" + msg[: cols - 1])
                self.term.flush()
                self._status_shown = True
            elif time.monotonic() - self._last_progress >= 60:
                (self.term or sys.stdout).write(msg + "\n")
                self._last_progress = time.monotonic()


def main() -> None:
    full = "--full" in sys.argv
    config = run_config(full)
    print(
        "rlhn_assets demo: "
        f"{'the whole bundled sample' if full else f'first {DEMO_MAX_INSTANCES} instances per dataset'}, "
        f"<= {25 if full else DEMO_MAX_NEGATIVES} negatives per instance; judge preset {preset_name()!r}; "
        f"models: {'all variants' if full else ', '.join(DEMO_VARIANTS)}"
    )
    log_path = settings.data_dir() / "logs" / time.strftime("demo-%Y%m%d-%H%M%S.log")
    print(f"Dagster's event stream and library output go to {log_path}", flush=True)
    t_all = time.perf_counter()
    with Console(log_path) as console:
        d = defs()
        with dg.DagsterInstance.get() as instance:
            release_dead_demo_runs(instance, log=console.line)
            try:
                timings, checks = materialize_graph(
                    d,
                    instance,
                    config,
                    VARIANTS if full else DEMO_VARIANTS,
                    log=console.line,
                    progress=console.progress,
                )
            except StageFailed as e:
                console.line(
                    f"\ndemo stopped: {e}\nfull log: {log_path}\n"
                    "(the run and its events are also in the Dagster UI: make ui -> Runs)"
                )
                failed = True
            else:
                failed = False
    if failed:
        raise SystemExit(1)
    total = time.perf_counter() - t_all
    db = settings.duckdb_path()
    print(f"\nDone in {total:.0f}s ({checks} asset checks passed). Wall time per stage:")
    for k, s in timings.items():
        print(f"  {s:7.1f}s  {k}")
    reports = settings.data_dir() / "reports"
    reports.mkdir(parents=True, exist_ok=True)
    (reports / "demo_timings.json").write_text(
        json.dumps(
            {
                "full": full,
                "total_s": round(total, 1),
                "checks_passed": checks,
                "stages_s": {k: round(v, 1) for k, v in timings.items()},
                "max_instances": None if full else DEMO_MAX_INSTANCES,
                "variants": list(VARIANTS if full else DEMO_VARIANTS),
                "load_avg_1m_end": round(os.getloadavg()[0], 2),
                "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
            },
            indent=2,
        )
    )
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
            "SELECT tier, verdict, count(*) FROM judgments GROUP BY ALL ORDER BY 1, 2"
        ).fetchall():
            print(f"    tier {tier}  {verdict:<13}{n:>7}")
        print("\n  relabeled instances per variant (all datasets):")
        for v, n, fn in conn.execute(
            "SELECT variant, count(*), sum(false_negatives) FROM relabeled_instances GROUP BY 1 ORDER BY 1"
        ).fetchall():
            print(f"    {v:<14}{n:>7} instances  {fn:>5} false negatives")
        print(f"  exports (rlhn schema, Parquet + JSONL): {settings.data_dir() / 'exports'}")
    loo_md = settings.data_dir() / "pruning" / "leave_one_out.md"
    if loo_md.exists():
        print("\nLeave-one-out dataset pruning (report only at demo sizes):\n" + loo_md.read_text())
    report_md = settings.data_dir() / "reports" / "comparison.md"
    if report_md.exists():
        print("\n" + report_md.read_text())
        print(f"(report: {report_md}, .csv and .png beside it)")
    print(f"\nFull log of this run (Dagster events, library output): {log_path}")
    print("\nOpen the Dagster UI (asset graph, partitions, metadata, checks): make ui  ->  http://127.0.0.1:3000")
    print(
        f"Query the tables: {sys.executable} -c \"import duckdb; print(duckdb.connect('{db}', read_only=True)"
        ".sql('select * from raw_instances limit 5'))\""
    )


if __name__ == "__main__":
    main()
