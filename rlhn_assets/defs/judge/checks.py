import dagster as dg

from rlhn_assets.defs.judge.assets import judging_cost_estimate, tier1_judgments, tier2_judgments
from rlhn_assets.lib.judging.budget import decision_for
from rlhn_assets.lib.relabel import flagged_negatives_sql, forwarded_sql
from rlhn_assets.partitions import dataset_pd
from rlhn_assets.resources import JudgeTierResource, JudgingBudgetResource, RLHNDuckDB


def _coverage(conn, dataset: str, tier: int, only: str | None, flagged: str | None = None) -> tuple[int, int, int]:
    """(expected negatives, judged negatives with exactly one verdict, problems). ``flagged`` restricts the
    expected negatives to a subquery of (instance_id, neg_index) (tier 2 with scope flagged_negatives)."""
    where = f" AND instance_id IN ({only})" if only else ""
    restrict = f" WHERE (instance_id, neg_index) IN ({flagged})" if flagged else ""
    exp_sql = f"""SELECT * FROM (SELECT instance_id, unnest(negative_ids) AS docid,
                                        generate_subscripts(negative_ids, 1) AS neg_index
                                 FROM pruned_instances WHERE dataset = $1{where}){restrict}"""
    expected = conn.execute(f"SELECT count(*) FROM ({exp_sql})", [dataset]).fetchall()[0][0]
    # Each (instance, position) of the expected negatives must have exactly one verdict for this tier, with
    # the right docid; and no verdict may exist outside them.
    missing_or_dup = conn.execute(
        f"""WITH exp AS ({exp_sql}),
                 got AS (SELECT instance_id, docid, neg_index, count(*) AS n FROM judgments
                         WHERE dataset = $1 AND tier = {tier} GROUP BY ALL)
            SELECT count(*) FROM exp FULL OUTER JOIN got USING (instance_id, docid, neg_index)
            WHERE got.n IS DISTINCT FROM 1 OR exp.docid IS NULL""",
        [dataset],
    ).fetchall()[0][0]
    return int(expected), int(expected) - int(missing_or_dup), int(missing_or_dup)


def _judged(conn, dataset: str) -> bool:
    return conn.execute("SELECT count(*) FROM judgments WHERE dataset = $1", [dataset]).fetchall()[0][0] > 0


@dg.asset_check(
    asset=tier1_judgments,
    partitions_def=dataset_pd,
    blocking=True,
    description="Every negative of every judged instance has exactly one tier-1 verdict (none missing, "
    "none duplicated, none for a negative that is not in `pruned`).",
)
def tier1_every_negative_judged_once(context: dg.AssetCheckExecutionContext, duckdb: RLHNDuckDB) -> dg.AssetCheckResult:
    ds = context.partition_key
    with duckdb.get_connection() as conn:
        if not _judged(conn, ds):
            return dg.AssetCheckResult(passed=True, description="dataset not judged (see the asset's status)")
        expected, ok, problems = _coverage(conn, ds, 1, None)
    return dg.AssetCheckResult(
        passed=problems == 0,
        description=f"{ok}/{expected} negatives judged exactly once; {problems} missing, duplicated or unexpected",
        metadata={"problems": problems},
    )


@dg.asset_check(
    asset=tier2_judgments,
    partitions_def=dataset_pd,
    blocking=True,
    description="Tier 2 covers exactly the instances tier 1 forwarded, every negative of them once.",
)
def tier2_covers_exactly_the_forwarded(
    context: dg.AssetCheckExecutionContext, duckdb: RLHNDuckDB, tier2_judge: JudgeTierResource
) -> dg.AssetCheckResult:
    ds = context.partition_key
    with duckdb.get_connection() as conn:
        fwd_with_errors = conn.execute(f"SELECT count(*) FROM ({forwarded_sql(True)})", [ds]).fetchall()[0][0]
        t2_instances = conn.execute(
            "SELECT count(DISTINCT instance_id) FROM judgments WHERE dataset = $1 AND tier = 2", [ds]
        ).fetchall()[0][0]
        fwd_strict = conn.execute(f"SELECT count(*) FROM ({forwarded_sql(False)})", [ds]).fetchall()[0][0]
        # tier 2 ran with forward_errors on or off: accept whichever forwarded set it matches exactly
        errors_forwarded = t2_instances == fwd_with_errors
        rule = forwarded_sql(errors_forwarded)
        flagged = flagged_negatives_sql(errors_forwarded) if tier2_judge.scope == "flagged_negatives" else None
        expected, ok, problems = _coverage(conn, ds, 2, rule, flagged)
        outside = conn.execute(
            f"SELECT count(DISTINCT instance_id) FROM judgments WHERE dataset = $1 AND tier = 2 "
            f"AND instance_id NOT IN ({rule})",
            [ds],
        ).fetchall()[0][0]
    passed = problems == 0 and outside == 0 and t2_instances in (fwd_with_errors, fwd_strict)
    return dg.AssetCheckResult(
        passed=passed,
        description=f"{t2_instances} instances re-judged; forwarded {fwd_strict} (flagged) / "
        f"{fwd_with_errors} (flagged or error); {problems} coverage problems",
        metadata={
            "tier2_instances": t2_instances,
            "forwarded": fwd_with_errors,
            "coverage_problems": problems,
            "judged_but_not_forwarded": outside,
        },
    )


def _error_rate_check(tier: int, asset, resource_key: str):
    @dg.asset_check(
        asset=asset,
        name=f"tier{tier}_error_rate",
        partitions_def=dataset_pd,
        blocking=True,
        required_resource_keys={resource_key, "duckdb"},
        description=f"The share of tier-{tier} `error` verdicts (unparsable, truncated or failed calls "
        f"after retries) is at most the tier's `max_error_rate`.",
    )
    def check(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
        limit = getattr(context.resources, resource_key).max_error_rate
        with context.resources.duckdb.get_connection() as conn:
            n, err = conn.execute(
                f"SELECT count(*), count(*) FILTER (WHERE verdict = 'error') FROM judgments "
                f"WHERE dataset = $1 AND tier = {tier}",
                [context.partition_key],
            ).fetchall()[0]
        rate = err / n if n else 0.0
        return dg.AssetCheckResult(
            passed=rate <= limit,
            description=f"{err}/{n} error verdicts ({rate:.2%}), limit {limit:.2%}",
            metadata={"error_verdicts": err, "verdicts": n, "rate": round(rate, 5), "limit": limit},
        )

    return check


tier1_error_rate = _error_rate_check(1, tier1_judgments, "tier1_judge")
tier2_error_rate = _error_rate_check(2, tier2_judgments, "tier2_judge")


@dg.asset_check(
    asset=judging_cost_estimate,
    partitions_def=dataset_pd,
    blocking=True,
    description="The budget gate: the paid tiers' estimated USD (on the budget's basis, max by default) "
    "is within `judging_budget` per dataset and per run, and every paid tier has a price. "
    "Blocking: a failure stops both judge tiers of the run (local tiers always pass).",
)
def judging_within_budget(
    context: dg.AssetCheckExecutionContext, duckdb: RLHNDuckDB, judging_budget: JudgingBudgetResource
) -> dg.AssetCheckResult:
    with duckdb.get_connection() as conn:
        est, d = decision_for(
            conn,
            context.partition_key,
            max_usd_per_dataset=judging_budget.max_usd_per_dataset,
            max_usd_per_run=judging_budget.max_usd_per_run,
            basis=judging_budget.basis,
        )
    return dg.AssetCheckResult(
        passed=d.passed,
        description=d.description,
        metadata={
            "estimated_usd": round(d.dataset_usd, 4),
            "run_estimated_usd": round(d.run_usd, 4),
            "budget_usd_per_dataset": judging_budget.max_usd_per_dataset,
            "budget_usd_per_run": judging_budget.max_usd_per_run,
            "basis": judging_budget.basis,
            "paid_tiers": ", ".join(f"tier {e.tier}" for e in est if e.paid) or "none",
        },
    )
