import collections
import concurrent.futures
import contextlib
import dataclasses
import os
import time

import dagster as dg
from pydantic import Field

from rlhn_assets.conditions import PIPELINE
from rlhn_assets.defs.prune.assets import pruned
from rlhn_assets.lib.judging.budget import decision_for, write_estimates
from rlhn_assets.lib.judging.judges import listwise_calls
from rlhn_assets.lib.judging.store import count_instances, iter_batches
from rlhn_assets.lib.markdown import md_table
from rlhn_assets.lib.relabel import flagged_negatives_sql, forwarded_sql
from rlhn_assets.partitions import dataset_pd
from rlhn_assets.resources import (
    ONE_TOKEN_KINDS,
    DatasetRegistryResource,
    JudgeTierResource,
    JudgingBudgetResource,
    RLHNDuckDB,
)

# A retry reruns the whole step; the response cache makes that cheap and deterministic.
JUDGE_RETRY = dg.RetryPolicy(max_retries=2, delay=10, backoff=dg.Backoff.EXPONENTIAL, jitter=dg.Jitter.PLUS_MINUS)


class JudgeRunConfig(dg.Config):
    batch_size: int = 256  # instances read, judged and written per round
    # Rounds judged at once (online mode): with 2, one round's prompt rendering, cache lookup and parsing overlap
    # the other's calls instead of idling the endpoint between rounds (docs/benchmarks.md). 1 = one at a time.
    rounds_in_flight: int = Field(default=2, ge=1, le=8)
    # Forward instances whose tier-1 answer ended in `error` to tier 2 (an unreadable answer is no evidence
    # that an instance is clean).
    forward_errors: bool = True
    # Judge the dataset in this many parallel steps (shards of the instance list, docs/deploy.md "Fan-out"); 1 =
    # one judging step. Shards run at once under a multi-process executor when the `llm_judge` pool allows it.
    shards: int = Field(default=1, ge=1)
    # Where the plan step stages the shards' instances and the shards their verdicts (Parquet): "" = a local
    # folder, <data dir>/staging; an s3://... (or gs://, az://) URL when shards run on other machines.
    staging_dir: str = ""


def _skip_reason(registry: DatasetRegistryResource, duckdb: RLHNDuckDB, dataset: str) -> str | None:
    ds = registry.load().get(dataset)
    if not ds.judge:
        return "never judged (registry: judge: false); every variant keeps its data unchanged"
    with duckdb.get_connection() as conn:
        kept = conn.execute("SELECT kept FROM pruned_decisions WHERE dataset = $1", [dataset]).fetchall()
    if kept and not kept[0][0]:
        return "dataset pruned away: nothing to judge"
    return None


def _budget_gate(tier: int, judge_res: JudgeTierResource, budget: JudgingBudgetResource, conn, dataset: str) -> None:
    """A paid tier runs only on a stored estimate of its own configuration that is within the budget (the
    blocking check `judging_within_budget` says the same in the UI; this repeats it so that materializing the
    tier alone cannot skip it)."""
    if not judge_res.is_paid:
        return
    est, decision = decision_for(
        conn,
        dataset,
        max_usd_per_dataset=budget.max_usd_per_dataset,
        max_usd_per_run=budget.max_usd_per_run,
        basis=budget.basis,
    )
    mine = [e for e in est if e.tier == tier]
    if not mine:
        raise dg.Failure(
            f"{dataset} tier {tier} calls a paid endpoint ({judge_res.model} at {judge_res.endpoint}) "
            f"and has no cost estimate: materialize judging_cost_estimate[{dataset}] first",
            allow_retries=False,
        )
    if (mine[0].model, mine[0].kind) != (judge_res.model, judge_res.kind):
        raise dg.Failure(
            f"{dataset} tier {tier}: the stored cost estimate is for {mine[0].kind} {mine[0].model}, "
            f"this run judges with {judge_res.kind} {judge_res.model}: re-materialize "
            f"judging_cost_estimate[{dataset}] with this run's tier settings",
            allow_retries=False,
        )
    if not decision.passed:
        raise dg.Failure(decision.description, allow_retries=False)  # a retry cannot change the budget


# One dataset's judging of one tier is three kinds of steps (docs/deploy.md, "Fan-out of one dataset's judging"):
# `plan` (skip reasons, the budget gate, stage the instances as Parquet shards), `judge_shard` once per shard
# (a Dagster dynamic fan-out: the shards run as parallel steps under a multi-process executor - the default
# one, Celery or Kubernetes), and `merge` (the shards' verdicts into `judgments` in one transaction, their new
# LLM answers into the shared cache, the asset's metadata). Shards never open the pipeline DuckDB file.


def _staging_root(config: JudgeRunConfig) -> str:
    from rlhn_assets import settings

    return config.staging_dir or str(settings.data_dir() / "staging")


def _plan(context, tier: int, judge_res: JudgeTierResource, duckdb: RLHNDuckDB, registry, config, budget):
    """Yields the shards (DynamicOutput) and the plan's summary (for the merge step)."""
    from rlhn_assets.lib.judging.shards import join, stage_shards

    dataset = context.partition_key
    t0 = time.time()
    only_sql = forwarded_sql(config.forward_errors) if tier == 2 else None
    positions_sql = (
        flagged_negatives_sql(config.forward_errors) if tier == 2 and judge_res.scope == "flagged_negatives" else None
    )
    reason = _skip_reason(registry, duckdb, dataset)
    # One folder per dataset and tier, not per run: a shard's own LLM cache file lives there, and with it the
    # Batch API jobs it submitted (llm_batches), so a run killed between submit and completion is resumed by the
    # next run instead of resubmitted (bench_scale measures it). Runs of one partition never overlap (the
    # `llm_judge` pool and one run per dataset in backfills); the merge step removes the folder.
    staging = join(_staging_root(config), f"{dataset}-tier{tier}")
    staged = []
    with duckdb.get_connection() as conn:
        if not reason:
            _budget_gate(tier, judge_res, budget, conn, dataset)
        total = count_instances(conn, dataset, only_sql)
        if not reason and total:
            staged = stage_shards(conn, dataset, config.shards, staging, only=only_sql, positions=positions_sql)
    if reason or total == 0:
        reason = reason or ("no instance forwarded by tier 1" if tier == 2 else "no instances")
        context.log.info(f"{dataset} tier {tier}: {reason}")
    else:
        context.log.info(
            f"{dataset} tier {tier}: {total:,} instances in {len(staged)} shard(s) staged under {staging}: "
            + ", ".join(f"shard {s.index}: {s.instances:,} ({s.first_instance}..{s.last_instance})" for s in staged)
        )
    yield dg.Output({"reason": reason, "total": total, "started": t0, "staging": staging}, "summary")
    for s in staged:
        yield dg.DynamicOutput(
            {
                "index": s.index,
                "instances_paths": list(s.instances_paths),
                "instances": s.instances,
                "dir": join(staging, f"shard-{s.index}"),
                "batch_size": config.batch_size,
                "rounds_in_flight": config.rounds_in_flight,
                "flagged_only": positions_sql is not None,
            },
            output_name="shards",
            mapping_key=f"shard_{s.index}",
        )


def _judge_shard(context, tier: int, judge_res: JudgeTierResource, registry, shard: dict) -> dict:
    """Judge one staged shard; its verdicts and new LLM answers go to Parquet files next to its instances."""
    import tempfile

    from rlhn_assets.lib.judging.shards import is_remote, iter_shard, join, only_positions, write_verdicts
    from rlhn_assets.lib.llm.cache import ResponseCache

    dataset, k = context.partition_key, shard["index"]
    family_by_instance = None
    if registry.load().get(dataset).prompt == "scidocsrr":
        family_by_instance = lambda inst: "scidocsrr"  # noqa: E731
    t0 = time.perf_counter()
    done, files, responses = 0, [], None
    with contextlib.ExitStack() as stack:
        cache = None
        if judge_res.kind != "embedding_margin":
            # This shard's own cache file (DuckDB allows one writer process per file; lib/llm/cache.py), reading
            # the shared one for earlier answers. Next to the staged files when they are local, so a retried
            # shard finds its answers; in a temporary directory when they are on object storage.
            local = tempfile.mkdtemp(prefix="rlhn-shard-") if is_remote(shard["dir"]) else shard["dir"]
            cache = stack.enter_context(
                ResponseCache(join(local, "llm_cache.duckdb"), read_through=[judge_res.shared_cache_path])
            )
        judge = stack.enter_context(
            judge_res.open_judge(family_by_instance=family_by_instance, log=context.log.info, cache=cache)
        )

        def rounds():
            """(staged instances, instances to judge, original positions or None) per round of ``batch_size``."""
            for batch, positions in iter_shard(shard["instances_paths"], shard["batch_size"]):
                yield (
                    (len(batch), *only_positions(batch, positions))
                    if shard["flagged_only"]
                    else (len(batch), batch, None)
                )

        client = getattr(judge, "client", None)
        if judge_res.mode == "batch" and client is not None:
            # Batch API: submit every request of the shard first (jobs of up to batch_chunk_size requests /
            # batch_chunk_bytes bytes), wait for all jobs, then judge from the cache below. Submitting per round
            # would wait for one job per `batch_size` instances in turn (hours each on the real API).
            counts = client.batch_prefetch(
                (judge.requests_for(judged) for _, judged, _ in rounds()), progress=context.log.info
            )
            context.log.info(f"{dataset} tier {tier} shard {k}: batch prefetch {counts}")

        def write(b: int, rows) -> None:
            if rows:
                path = join(shard["dir"], f"verdicts-{b:05d}.parquet")
                write_verdicts(path, dataset, tier, judge, rows)
                files.append(path)

        # The next round is read and the previous round's verdicts written on a helper thread while this round's
        # calls are in flight: done in turn, the endpoint sat idle for both on every round (docs/benchmarks.md,
        # bench_scale). Online, `rounds_in_flight` rounds are judged at once (each on a fork of the judge, sharing
        # its client and so its `concurrency` limit): the work between two rounds' calls - rendering the prompts,
        # the cache lookup, parsing, the last cache write - then overlaps another round's calls, where it left the
        # endpoint idle for a growing part of each round (bench_scale at 100K instances, docs/benchmarks.md).
        overlap = shard.get("rounds_in_flight", 2)
        if client is None or judge_res.mode == "batch" or not hasattr(judge, "fork"):
            overlap = 1  # the embedding judge is CPU-bound; batch mode judges from the prefetched cache

        def judge_round(item):
            staged, judged, kept = item
            worker = judge.fork() if overlap > 1 else judge
            rows = worker.judge(judged, progress=context.log.info)
            if kept is not None:
                rows = [dataclasses.replace(j, neg_index=kept[j.instance_id][j.neg_index - 1]) for j in rows]
            return staged, rows, (worker.stats if worker is not judge else None)

        with (
            concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="judge-io") as io,
            concurrent.futures.ThreadPoolExecutor(overlap, thread_name_prefix="judge-round") as runner,
        ):
            it = rounds()
            upcoming = io.submit(next, it, None)
            started: collections.deque[concurrent.futures.Future] = collections.deque()

            def start_rounds() -> None:
                nonlocal upcoming
                while len(started) < overlap and (item := upcoming.result()) is not None:
                    upcoming = io.submit(next, it, None)
                    started.append(runner.submit(judge_round, item))

            start_rounds()
            written, b = None, 0
            while started:
                staged, rows, fork_stats = started.popleft().result()  # rounds end in order
                start_rounds()
                if fork_stats is not None:
                    judge.stats.add(fork_stats)
                if written is not None:
                    written.result()
                written = io.submit(write, b, rows)
                b += 1
                done += staged
                s = judge.stats
                context.log.info(
                    f"{dataset} tier {tier} ({judge.kind}) shard {k}: {done:,}/{shard['instances']:,} "
                    f"instances, {s.negatives:,} negatives, {s.calls:,} calls, {s.cache_hits:,} cache hits, "
                    f"{s.errors:,} errors, {time.perf_counter() - t0:.0f}s"
                )
            if written is not None:
                written.result()
        batch_jobs = [dataclasses.asdict(j) for j in client.batch_jobs.values()] if client is not None else []
        if cache is not None and cache.count():
            responses = join(shard["dir"], "llm_responses.parquet")
            cache.export_responses(responses)
        stats = judge.stats.as_dict()
        kind, model = judge.kind, judge.model
    return {
        "index": k,
        "verdict_files": files,
        "responses": responses,
        "stats": stats,
        "seconds": round(time.perf_counter() - t0, 2),
        "judge": [kind, model],
        "batch_jobs": batch_jobs,
    }


def _merge(context, tier: int, judge_res: JudgeTierResource, duckdb: RLHNDuckDB, summary: dict, shards: list):
    """The shards' verdicts into `judgments` (one transaction, deterministic order) and their new answers into
    the shared LLM cache; returns the asset's output with the same metadata as a single-step run."""
    import shutil

    from rlhn_assets.lib.judging.judges import JudgeStats
    from rlhn_assets.lib.judging.shards import is_remote, merge_verdicts
    from rlhn_assets.lib.llm.cache import ResponseCache

    dataset = context.partition_key
    shards = sorted(shards, key=lambda s: s["index"])
    responses = [s["responses"] for s in shards if s["responses"]]
    if responses:  # first, so that a failure below never loses paid answers
        with ResponseCache(judge_res.shared_cache_path) as cache:
            added = cache.import_responses(responses)
        context.log.info(f"{added:,} new LLM answers of {len(responses)} shard(s) added to the shared cache")
    with duckdb.get_connection() as conn:
        merged = merge_verdicts(conn, dataset, tier, [f for s in shards for f in s["verdict_files"]])
    if not is_remote(summary["staging"]):
        shutil.rmtree(summary["staging"], ignore_errors=True)
        with contextlib.suppress(OSError):  # the staging root, once no dataset's staging is left in it
            os.rmdir(os.path.dirname(summary["staging"]))
    base = {"judge": dg.MetadataValue.json(judge_res.describe())}
    if summary["reason"]:
        return dg.Output(
            None, metadata=base | {"status": summary["reason"], "instances_judged": 0, "negatives_judged": 0}
        )
    stats = JudgeStats.total([s["stats"] for s in shards])
    seconds = time.time() - summary["started"]
    flagged = stats.verdicts["better"] + stats.verdicts["worse"]
    with duckdb.get_connection() as conn:
        inst_flagged = conn.execute(
            "SELECT count(DISTINCT instance_id) FROM judgments WHERE dataset = $1 AND tier = $2 "
            "AND verdict IN ('better', 'worse')",
            [dataset, tier],
        ).fetchall()[0][0]
        preview = conn.execute(
            """SELECT j.instance_id, q.query, j.neg_index, j.verdict, j.score, p.text
               FROM judgments j JOIN pruned_instances i USING (dataset, instance_id)
               JOIN raw_queries q ON q.dataset = j.dataset AND q.query_id = i.query_id
               JOIN raw_passages p ON p.dataset = j.dataset AND p.docid = j.docid
               WHERE j.dataset = $1 AND j.tier = $2 AND j.verdict IN ('better', 'worse')
               ORDER BY j.instance_id, j.neg_index LIMIT 8""",
            [dataset, tier],
        ).fetchall()
    context.log.info(f"{dataset} tier {tier}: {merged:,} verdicts of {len(shards)} shard(s) merged")
    return dg.Output(
        None,
        metadata=base
        | {
            "instances_judged": stats.instances,
            "negatives_judged": stats.negatives,
            "verdicts": dg.MetadataValue.md(md_table(["verdict", "negatives"], list(stats.verdicts.items()))),
            "flagged_negatives": flagged,
            "flagged_negative_rate": round(flagged / stats.negatives, 4) if stats.negatives else 0.0,
            "flagged_instances": inst_flagged,
            "flagged_instance_rate": round(inst_flagged / stats.instances, 4) if stats.instances else 0.0,
            "error_verdicts": stats.errors,
            "error_rate": round(stats.errors / stats.negatives, 4) if stats.negatives else 0.0,
            "llm_calls": stats.calls,
            "cache_hits": stats.cache_hits,
            "parse_retries": stats.parse_retries,
            "truncated_answers": stats.truncated,
            "tokens_in": stats.tokens_in,
            "tokens_out": stats.tokens_out,
            "cost_usd": round(judge_res.cost_usd(stats.tokens_in, stats.tokens_out), 4),
            "wall_seconds": round(seconds, 1),
            "judgments_per_second": round(stats.negatives / seconds, 2) if seconds else 0.0,
            "shards": len(shards),
            "shard_seconds": dg.MetadataValue.json({str(s["index"]): s["seconds"] for s in shards}),
            "flagged_preview": dg.MetadataValue.md(
                md_table(["instance", "query", "neg #", "verdict", "score", "passage"], preview, max_chars=60)
            ),
        }
        | _batch_metadata([j for s in shards for j in s.get("batch_jobs", [])]),
    )


def _batch_metadata(jobs: list[dict]) -> dict:
    """Batch mode: one row per Batch API job the shards submitted or resumed (the per-chunk progress in the UI)."""
    if not jobs:
        return {}
    rows = [
        [
            j["batch_id"],
            j["requests"],
            "" if j["input_bytes"] is None else round(j["input_bytes"] / 1e6, 1),
            j["status"],
            "submitted" if j["submitted"] else "resumed",
            j["answers"],
            round(j["seconds"], 1),
        ]
        for j in jobs
    ]
    return {
        "batch_jobs": dg.MetadataValue.md(
            md_table(["batch id", "requests", "input MB", "status", "how", "answers saved", "seconds"], rows)
        ),
        "batch_jobs_submitted": sum(j["submitted"] for j in jobs),
        "batch_jobs_resumed": sum(not j["submitted"] for j in jobs),
    }


def _chars_per_token() -> float:
    return 4.0  # rough English average; the estimate says so


@dg.asset(
    partitions_def=dataset_pd,
    group_name="judge",
    code_version="2",
    automation_condition=PIPELINE,
    deps=[pruned],
    kinds={"duckdb"},
    description=(
        "The gate in front of the judges (both tiers depend on it): LLM calls, input tokens (prompt characters "
        "/ 4), output tokens and USD cost of tier 1 (every instance) and tier 2 (the instances tier 1 forwarded if "
        "tier 1 ran, else every instance as an upper bound), from the tiers' prices. Makes no LLM call. Table "
        "`judging_estimates`; its blocking check `judging_within_budget` stops paid tiers whose estimate exceeds "
        "the budget (`judging_budget`: RLHN_JUDGING_BUDGET_USD, default 0 USD)."
    ),
)
def judging_cost_estimate(
    context: dg.AssetExecutionContext,
    duckdb: RLHNDuckDB,
    registry: DatasetRegistryResource,
    tier1_judge: JudgeTierResource,
    tier2_judge: JudgeTierResource,
) -> dg.MaterializeResult:
    dataset = context.partition_key
    reason = _skip_reason(registry, duckdb, dataset)
    if reason:
        with duckdb.get_connection() as conn:
            write_estimates(conn, dataset, [])
        return dg.MaterializeResult(metadata={"status": reason})
    with duckdb.get_connection() as conn:
        has_t1 = conn.execute("SELECT count(*) FROM judgments WHERE dataset = $1 AND tier = 1", [dataset]).fetchall()[
            0
        ][0]
    rows, stored = [], []
    for res, only in ((tier1_judge, None), (tier2_judge, forwarded_sql(True) if has_t1 else None)):
        calls = chars = negatives = instances = 0
        for batch in iter_batches(duckdb.get_connection, dataset, 512, only):
            instances += len(batch)
            for inst in batch:
                negatives += len(inst.negatives)
                if res.kind == "listwise":
                    for _, r in listwise_calls(inst, res.prompt_family, structured=res.response_format_style != "none"):
                        calls += 1
                        chars += sum(len(m["content"]) for m in r.messages)
                elif res.kind in ONE_TOKEN_KINDS:
                    for n in inst.negatives:
                        calls += 1
                        chars += sum(len(m["content"]) for m in res.render_one(inst, n))
        tokens_in = int(chars / _chars_per_token())
        out_max = calls * (1 if res.kind in ONE_TOKEN_KINDS else res.max_tokens)
        out_typical = calls * (1 if res.kind in ONE_TOKEN_KINDS else 500)
        model = res.model if res.kind != "embedding_margin" else "MiniLM"
        rows.append(
            [
                f"tier {res.tier}",
                res.kind,
                model,
                "yes" if res.is_paid else "no",
                instances,
                negatives,
                calls,
                tokens_in,
                out_typical,
                out_max,
                round(res.cost_usd(tokens_in, out_typical), 4),
                round(res.cost_usd(tokens_in, out_max), 4),
            ]
        )
        stored.append(
            {
                "dataset": dataset,
                "tier": res.tier,
                "kind": res.kind,
                "model": res.model,
                "endpoint": res.endpoint if res.kind != "embedding_margin" else "",
                "paid": res.is_paid,
                "priced": bool(res.price_in_per_m or res.price_out_per_m),
                "instances": instances,
                "negatives": negatives,
                "calls": calls,
                "tokens_in": tokens_in,
                "tokens_out_typical": out_typical,
                "tokens_out_max": out_max,
                "usd_typical": res.cost_usd(tokens_in, out_typical),
                "usd_max": res.cost_usd(tokens_in, out_max),
                "run_id": context.run_id,
            }
        )
    with duckdb.get_connection() as conn:
        write_estimates(conn, dataset, stored)
    headers = [
        "tier",
        "kind",
        "model",
        "paid",
        "instances",
        "negatives",
        "calls",
        "tokens_in",
        "tokens_out_typical",
        "tokens_out_max",
        "usd_typical",
        "usd_max",
    ]
    # The judges depend on the estimate: its data version is its content, so re-estimating unchanged numbers
    # does not make them stale.
    import hashlib
    import json

    version = hashlib.sha256(
        json.dumps(
            [{k: v for k, v in r.items() if k != "run_id"} for r in stored], sort_keys=True, default=str
        ).encode()
    ).hexdigest()[:16]
    return dg.MaterializeResult(
        data_version=dg.DataVersion(version),
        metadata={
            "estimate": dg.MetadataValue.md(md_table(headers, rows)),
            "tier2_basis": "instances forwarded by the stored tier-1 verdicts"
            if has_t1
            else "upper bound: every instance",
            "usd_typical_total": sum(r[10] for r in rows),
            "usd_max_total": sum(r[11] for r in rows),
            "calls_total": sum(r[6] for r in rows),
        },
    )


def _tier_ops(tier: int, judge_key: str, upstream: tuple[str, ...]):
    """The three ops of one tier's judging graph. The shard op takes the `llm_judge` pool (so two judging steps
    never share one local LLM server unless the pool's limit allows it: raise it to run shards in parallel) and
    Dagster's retry policy for transient endpoint failures (a retry reruns one shard; the cache makes it cheap).
    """
    common = {"duckdb", "registry", judge_key}

    @dg.op(
        name=f"tier{tier}_plan",
        ins={name: dg.In(dg.Nothing) for name in upstream},
        out={"summary": dg.Out(dict), "shards": dg.DynamicOut(dict)},
        required_resource_keys=common | {"judging_budget"},
        retry_policy=JUDGE_RETRY,
    )
    def plan(context: dg.OpExecutionContext, config: JudgeRunConfig):
        r = context.resources
        yield from _plan(context, tier, getattr(r, judge_key), r.duckdb, r.registry, config, r.judging_budget)

    @dg.op(
        name=f"tier{tier}_judge_shard",
        required_resource_keys={"registry", judge_key},
        pool="llm_judge",
        retry_policy=JUDGE_RETRY,
    )
    def judge_shard(context: dg.OpExecutionContext, shard: dict) -> dict:
        return _judge_shard(context, tier, getattr(context.resources, judge_key), context.resources.registry, shard)

    @dg.op(
        name=f"tier{tier}_merge",
        required_resource_keys={"duckdb", judge_key},
        out=dg.Out(dg.Nothing),
        retry_policy=JUDGE_RETRY,
    )
    def merge(context: dg.OpExecutionContext, summary: dict, shards: list[dict]):
        r = context.resources
        return _merge(context, tier, getattr(r, judge_key), r.duckdb, summary, shards)

    @dg.config_mapping
    def run_config(config: JudgeRunConfig) -> dict:
        # the asset keeps its one config block (ops: {tierN_judgments: {config: ...}}); the plan op reads it
        return {f"tier{tier}_plan": {"config": config.model_dump()}}

    def compose(**after):
        summary, shards = plan(**after)
        return merge(summary, shards.map(judge_shard).collect())

    return run_config, compose


def _judge_tier_asset(deps: list, description: str, config):
    """The decorator both tiers share: a graph of plan -> shards -> merge steps (above) per dataset partition;
    one run per dataset in backfills."""
    return dg.graph_asset(
        partitions_def=dataset_pd,
        group_name="judge",
        code_version="1",  # the verdicts are the same as the single-step asset's (test_judge_fanout.py)
        automation_condition=PIPELINE,
        ins={d.key.path[-1]: dg.AssetIn(key=d.key, dagster_type=dg.Nothing) for d in deps},
        kinds={"openai", "duckdb"},
        backfill_policy=dg.BackfillPolicy.multi_run(1),  # backfills: one run per dataset
        config=config,
        description=description,
    )


_tier1_config, _tier1_compose = _tier_ops(1, "tier1_judge", ("pruned", "judging_cost_estimate"))
_tier2_config, _tier2_compose = _tier_ops(2, "tier2_judge", ("tier1_judgments", "judging_cost_estimate"))


@_judge_tier_asset(
    deps=[pruned, judging_cost_estimate],
    config=_tier1_config,
    description=(
        "Tier 1 of the judge cascade: every negative of every `pruned` instance gets a verdict (better / worse / "
        "not_relevant / error) from the configured tier-1 judge (`local` preset: embedding margin with the packaged "
        "MiniLM; `paper` preset: gpt-4o-mini listwise). Table `judgments` (tier = 1). LLM answers are cached in "
        "`data/llm_cache.duckdb`, so a rerun never pays twice. `shards: N` (run config) judges the dataset in N "
        "parallel steps whose verdicts are merged in one transaction (docs/deploy.md)."
    ),
)
def tier1_judgments(pruned, judging_cost_estimate):
    return _tier1_compose(pruned=pruned, judging_cost_estimate=judging_cost_estimate)


@_judge_tier_asset(
    deps=[tier1_judgments, judging_cost_estimate],
    config=_tier2_config,
    description=(
        "Tier 2 of the cascade: re-judges only the instances in which tier 1 listed any negative as better or "
        "worse (and, by default, those with a tier-1 error) - all their negatives, or with `scope: flagged_negatives` "
        "only the flagged ones; its verdict is final (`local` preset: Qwen2.5-Coder "
        "on a llama.cpp server the step starts itself; `paper` preset: gpt-4o listwise). Table `judgments` (tier = 2). "
        "`shards: N` as for tier 1."
    ),
)
def tier2_judgments(tier1_judgments, judging_cost_estimate):
    return _tier2_compose(tier1_judgments=tier1_judgments, judging_cost_estimate=judging_cost_estimate)
