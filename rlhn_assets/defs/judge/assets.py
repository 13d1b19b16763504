import concurrent.futures
import dataclasses
import time

import dagster as dg

from rlhn_assets.conditions import PIPELINE
from rlhn_assets.defs.prune.assets import pruned
from rlhn_assets.lib.judging.budget import decision_for, write_estimates
from rlhn_assets.lib.judging.judges import listwise_calls
from rlhn_assets.lib.judging.store import count_instances, iter_batches, write_judgments
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
    # Forward instances whose tier-1 answer ended in `error` to tier 2 (an unreadable answer is no evidence
    # that an instance is clean).
    forward_errors: bool = True


def _skip_reason(registry: DatasetRegistryResource, duckdb: RLHNDuckDB, dataset: str) -> str | None:
    ds = registry.load().get(dataset)
    if not ds.judge:
        return "never judged (registry: judge: false); every variant keeps its data unchanged"
    with duckdb.get_connection() as conn:
        kept = conn.execute("SELECT kept FROM pruned_decisions WHERE dataset = $1", [dataset]).fetchall()
    if kept and not kept[0][0]:
        return "dataset pruned away: nothing to judge"
    return None


def _only_flagged(batch, flagged: set[tuple[str, int]]):
    """Keep each instance's tier-1-flagged negatives; map judged positions back to the original ones."""
    out, positions = [], {}
    for inst in batch:
        keep = [k for k in range(1, len(inst.negatives) + 1) if (inst.instance_id, k) in flagged]
        if keep:
            out.append(dataclasses.replace(inst, negatives=tuple(inst.negatives[k - 1] for k in keep)))
            positions[inst.instance_id] = keep
    return out, positions


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


def _run_tier(
    context,
    tier: int,
    judge_res: JudgeTierResource,
    duckdb: RLHNDuckDB,
    registry: DatasetRegistryResource,
    config: JudgeRunConfig,
    only_sql: str | None,
    budget: JudgingBudgetResource,
) -> dg.MaterializeResult:
    dataset = context.partition_key
    reason = _skip_reason(registry, duckdb, dataset)
    with duckdb.get_connection() as conn:
        if not reason:
            _budget_gate(tier, judge_res, budget, conn, dataset)
        conn.execute("DELETE FROM judgments WHERE dataset = $1 AND tier = $2", [dataset, tier])
        total = count_instances(conn, dataset, only_sql)
    base = {"judge": dg.MetadataValue.json(judge_res.describe())}
    if reason or total == 0:
        reason = reason or ("no instance forwarded by tier 1" if tier == 2 else "no instances")
        context.log.info(f"{dataset} tier {tier}: {reason}")
        return dg.MaterializeResult(metadata=base | {"status": reason, "instances_judged": 0, "negatives_judged": 0})

    reg = registry.load()
    family_by_instance = None
    if reg.get(dataset).prompt == "scidocsrr":
        family_by_instance = lambda inst: "scidocsrr"  # noqa: E731
    t0 = time.perf_counter()
    done = 0
    flagged_only = tier == 2 and judge_res.scope == "flagged_negatives"

    def rounds():
        """(batch, instances to judge, positions) per round of ``batch_size`` instances; with scope
        `flagged_negatives`, the instances keep only their tier-1-flagged negatives and ``positions`` maps the
        judged positions back (the flags are read for the round's instances only, not the whole dataset's)."""
        for batch in iter_batches(duckdb.get_connection, dataset, config.batch_size, only_sql):
            if not flagged_only:
                yield batch, batch, None
                continue
            with duckdb.get_connection() as conn:
                flagged = {
                    (i, k)
                    for i, k in conn.execute(
                        flagged_negatives_sql(config.forward_errors)
                        + " AND instance_id IN (SELECT unnest($2::VARCHAR[]))",
                        [dataset, [inst.instance_id for inst in batch]],
                    ).fetchall()
                }
            judged, positions = _only_flagged(batch, flagged)
            yield batch, judged, positions

    with judge_res.open_judge(family_by_instance=family_by_instance, log=context.log.info) as judge:
        client = getattr(judge, "client", None)
        if judge_res.mode == "batch" and client is not None:
            # Batch API: submit every request of the dataset first (jobs of up to batch_chunk_size requests /
            # batch_chunk_bytes bytes), wait for all jobs, then judge from the cache below. Submitting per round
            # would wait for one job per `batch_size` instances in turn (hours each on the real API).
            counts = client.batch_prefetch(
                (judge.requests_for(judged) for _, judged, _ in rounds()), progress=context.log.info
            )
            context.log.info(f"{dataset} tier {tier}: batch prefetch {counts}")

        def write(rows) -> None:
            with duckdb.get_connection() as conn:
                write_judgments(conn, dataset, tier, judge, rows)

        # The next round is read and the previous round's verdicts written on a helper thread while this round's
        # calls are in flight (DuckDB releases the GIL; each thread has its own connection): done in turn, the
        # endpoint sat idle for both on every round (docs/benchmarks.md, bench_scale).
        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="judge-io") as io:
            it = rounds()
            upcoming = io.submit(next, it, None)
            written = None
            while (item := upcoming.result()) is not None:
                upcoming = io.submit(next, it, None)
                batch, judged, positions = item
                if positions is not None:
                    rows = [
                        dataclasses.replace(j, neg_index=positions[j.instance_id][j.neg_index - 1])
                        for j in judge.judge(judged, progress=context.log.info)
                    ]
                else:
                    rows = judge.judge(batch, progress=context.log.info)
                if written is not None:
                    written.result()
                written = io.submit(write, rows)
                done += len(batch)
                s = judge.stats
                context.log.info(
                    f"{dataset} tier {tier} ({judge.kind}): {done:,}/{total:,} instances, "
                    f"{s.negatives:,} negatives, {s.calls:,} calls, {s.cache_hits:,} cache hits, "
                    f"{s.errors:,} errors, {time.perf_counter() - t0:.0f}s"
                )
            if written is not None:
                written.result()
        stats = judge.stats
        batch_jobs = list(client.batch_jobs.values()) if client is not None and hasattr(client, "batch_jobs") else []
    seconds = time.perf_counter() - t0
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
    return dg.MaterializeResult(
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
            "flagged_preview": dg.MetadataValue.md(
                md_table(["instance", "query", "neg #", "verdict", "score", "passage"], preview, max_chars=60)
            ),
        }
        | _batch_metadata(batch_jobs)
    )


def _batch_metadata(jobs) -> dict:
    """Batch mode: one row per Batch API job this step submitted or resumed (the per-chunk progress in the UI)."""
    if not jobs:
        return {}
    rows = [
        [
            j.batch_id,
            j.requests,
            "" if j.input_bytes is None else round(j.input_bytes / 1e6, 1),
            j.status,
            "submitted" if j.submitted else "resumed",
            j.answers,
            round(j.seconds, 1),
        ]
        for j in jobs
    ]
    return {
        "batch_jobs": dg.MetadataValue.md(
            md_table(["batch id", "requests", "input MB", "status", "how", "answers saved", "seconds"], rows)
        ),
        "batch_jobs_submitted": sum(j.submitted for j in jobs),
        "batch_jobs_resumed": sum(not j.submitted for j in jobs),
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


def _judge_tier_asset(deps: list, description: str):
    """The decorator both tiers share: one run per dataset in backfills, the `llm_judge` pool (so two judging
    steps never share one local LLM server), Dagster's retry policy for transient endpoint failures."""
    return dg.asset(
        partitions_def=dataset_pd,
        group_name="judge",
        code_version="1",
        automation_condition=PIPELINE,
        deps=deps,
        kinds={"openai", "duckdb"},
        pool="llm_judge",
        backfill_policy=dg.BackfillPolicy.multi_run(1),  # backfills: one run per dataset
        retry_policy=JUDGE_RETRY,
        description=description,
    )


@_judge_tier_asset(
    deps=[pruned, judging_cost_estimate],
    description=(
        "Tier 1 of the judge cascade: every negative of every `pruned` instance gets a verdict (better / worse / "
        "not_relevant / error) from the configured tier-1 judge (`local` preset: embedding margin with the packaged "
        "MiniLM; `paper` preset: gpt-4o-mini listwise). Table `judgments` (tier = 1). LLM answers are cached in "
        "`data/llm_cache.duckdb` as they arrive, so a rerun never pays twice."
    ),
)
def tier1_judgments(
    context: dg.AssetExecutionContext,
    config: JudgeRunConfig,
    duckdb: RLHNDuckDB,
    registry: DatasetRegistryResource,
    tier1_judge: JudgeTierResource,
    judging_budget: JudgingBudgetResource,
) -> dg.MaterializeResult:
    return _run_tier(context, 1, tier1_judge, duckdb, registry, config, None, judging_budget)


@_judge_tier_asset(
    deps=[tier1_judgments, judging_cost_estimate],
    description=(
        "Tier 2 of the cascade: re-judges only the instances in which tier 1 listed any negative as better or "
        "worse (and, by default, those with a tier-1 error) - all their negatives, or with `scope: flagged_negatives` "
        "only the flagged ones; its verdict is final (`local` preset: Qwen2.5-Coder "
        "on a llama.cpp server the step starts itself; `paper` preset: gpt-4o listwise). Table `judgments` (tier = 2)."
    ),
)
def tier2_judgments(
    context: dg.AssetExecutionContext,
    config: JudgeRunConfig,
    duckdb: RLHNDuckDB,
    registry: DatasetRegistryResource,
    tier2_judge: JudgeTierResource,
    judging_budget: JudgingBudgetResource,
) -> dg.MaterializeResult:
    return _run_tier(
        context, 2, tier2_judge, duckdb, registry, config, forwarded_sql(config.forward_errors), judging_budget
    )
