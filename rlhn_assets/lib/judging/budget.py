"""The budget gate in front of paid judging: the cost estimate per dataset and tier (table
``judging_estimates``, written by the ``judging_cost_estimate`` asset) against a budget per dataset and per run.

Only paid tiers count (an API endpoint; local models and the embedding judge cost nothing and are never
blocked). A paid tier without a price cannot be estimated, so it is blocked too: an unknown cost is not zero.
The same decision runs twice: as the blocking asset check ``judging_within_budget`` (so the UI shows it and
automation stops there) and at the start of a paid tier's step (so materializing the tier on its own cannot
skip the gate)."""

from __future__ import annotations

from dataclasses import dataclass

import duckdb

# how to raise the budget, named in every refusal
HOW_TO_RAISE = (
    "raise it with the environment variables RLHN_JUDGING_BUDGET_USD (per dataset) and "
    "RLHN_JUDGING_BUDGET_USD_PER_RUN (per run) before starting Dagster, or in the launchpad: "
    "resources: {judging_budget: {config: {max_usd_per_dataset: ..., max_usd_per_run: ...}}}"
)


@dataclass(frozen=True)
class TierEstimate:
    dataset: str
    tier: int
    kind: str
    model: str
    endpoint: str
    paid: bool
    priced: bool
    calls: int
    usd_typical: float
    usd_max: float
    run_id: str | None = None


@dataclass(frozen=True)
class BudgetDecision:
    passed: bool
    description: str
    dataset_usd: float  # the paid tiers' estimate for this dataset, on the budget's basis
    run_usd: float  # ... summed over every dataset estimated in the same run


def decide(
    estimates: list[TierEstimate],
    *,
    max_usd_per_dataset: float,
    max_usd_per_run: float,
    basis: str = "max",
    run_usd_others: float = 0.0,
) -> BudgetDecision:
    """``estimates``: one dataset's tiers; ``run_usd_others``: the paid estimates of the other datasets
    estimated in the same run. ``basis``: compare the ``max`` (every call uses max_tokens) or ``typical`` USD."""
    paid = [e for e in estimates if e.paid and e.calls]
    if not paid:
        return BudgetDecision(True, "no paid tier: local and embedding judges cost nothing", 0.0, run_usd_others)
    unpriced = [e for e in paid if not e.priced]
    usd = sum(e.usd_max if basis == "max" else e.usd_typical for e in paid)
    run_usd = run_usd_others + usd
    what = ", ".join(
        f"tier {e.tier} {e.model} ({e.calls:,} calls, ${e.usd_typical:.2f} typical / ${e.usd_max:.2f} max)"
        for e in paid
    )
    problems = []
    if unpriced:
        problems.append(
            "no price for the paid "
            + ", ".join(f"tier {e.tier} ({e.model} at {e.endpoint})" for e in unpriced)
            + ": set price_in_per_m / price_out_per_m on the tier (USD per 1M tokens), or paid: false "
            "if the endpoint costs nothing"
        )
    if usd > max_usd_per_dataset + 1e-12:
        problems.append(f"{basis} estimate ${usd:.2f} exceeds the per-dataset budget ${max_usd_per_dataset:.2f}")
    if run_usd > max_usd_per_run + 1e-12:
        problems.append(
            f"the run's {basis} estimate ${run_usd:.2f} (this dataset and the others estimated in "
            f"the same run) exceeds the per-run budget ${max_usd_per_run:.2f}"
        )
    if problems:
        return BudgetDecision(
            False,
            f"{paid[0].dataset}: paid judging blocked: "
            + "; ".join(problems)
            + f". Estimate: {what}. To allow it, {HOW_TO_RAISE}.",
            usd,
            run_usd,
        )
    return BudgetDecision(
        True,
        f"{paid[0].dataset}: {what}; within the budget (${usd:.2f} <= "
        f"${max_usd_per_dataset:.2f} per dataset, ${run_usd:.2f} <= ${max_usd_per_run:.2f} "
        "per run)",
        usd,
        run_usd,
    )


def write_estimates(conn: duckdb.DuckDBPyConnection, dataset: str, rows: list[dict]) -> None:
    conn.execute("BEGIN TRANSACTION")
    conn.execute("DELETE FROM judging_estimates WHERE dataset = $1", [dataset])
    cols = [
        "dataset",
        "tier",
        "kind",
        "model",
        "endpoint",
        "paid",
        "priced",
        "instances",
        "negatives",
        "calls",
        "tokens_in",
        "tokens_out_typical",
        "tokens_out_max",
        "usd_typical",
        "usd_max",
        "run_id",
    ]
    if rows:
        conn.executemany(
            f"INSERT INTO judging_estimates ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
            [[r[c] for c in cols] for r in rows],
        )
    conn.execute("COMMIT")


def load_estimates(conn: duckdb.DuckDBPyConnection, dataset: str) -> list[TierEstimate]:
    """The stored estimate of each tier of one dataset (empty: never estimated)."""
    rows = conn.execute(
        """SELECT dataset, tier, kind, model, endpoint, paid, priced, calls, usd_typical, usd_max, run_id
           FROM judging_estimates WHERE dataset = $1 ORDER BY tier""",
        [dataset],
    ).fetchall()
    return [TierEstimate(*r) for r in rows]


def run_usd_of_others(conn: duckdb.DuckDBPyConnection, dataset: str, run_id: str | None, basis: str) -> float:
    if not run_id:
        return 0.0
    col = "usd_max" if basis == "max" else "usd_typical"
    return float(
        conn.execute(
            f"SELECT coalesce(sum({col}), 0) FROM judging_estimates WHERE run_id = $1 AND dataset <> $2 AND paid",
            [run_id, dataset],
        ).fetchall()[0][0]
    )


def decision_for(
    conn: duckdb.DuckDBPyConnection, dataset: str, *, max_usd_per_dataset: float, max_usd_per_run: float, basis: str
) -> tuple[list[TierEstimate], BudgetDecision]:
    est = load_estimates(conn, dataset)
    others = run_usd_of_others(conn, dataset, est[0].run_id if est else None, basis)
    return est, decide(
        est,
        max_usd_per_dataset=max_usd_per_dataset,
        max_usd_per_run=max_usd_per_run,
        basis=basis,
        run_usd_others=others,
    )
