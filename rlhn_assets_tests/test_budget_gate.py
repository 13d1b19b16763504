"""The budget gate in front of paid judging (issue "Safe with money", item 1): a paid tier never sends a request
unless the cost estimate is within the budget, and the automation sensor never starts a paid tier unless opted in.

The paid endpoint is the `paper` preset (gpt-4o-mini -> gpt-4o, priced) replayed by an httpx MockTransport
(ReplayTier): every request that reaches it is counted."""

from pathlib import Path

import dagster as dg
import duckdb
import pytest

from rlhn_assets.definitions import without_paid_automation
from rlhn_assets.defs.resources import PRESETS
from rlhn_assets.lib.judging.budget import TierEstimate, decide
from rlhn_assets.resources import BaseModelsResource, DatasetRegistryResource, JudgingBudgetResource, RLHNDuckDB
from rlhn_assets_tests import test_cascade_assets as cascade
from rlhn_assets_tests.test_cascade_assets import REPLAY_CALLS, ReplayTier, _materialize

ALL = cascade.ALL


def _paid_resources(db_path, tmp_path, budget: float, **tier_overrides) -> dict:
    paper = PRESETS["paper"]
    tiers = {
        k: ReplayTier(
            **{
                **paper[k].model_dump(),
                "cache_path": str(tmp_path / "llm.duckdb"),
                "base_url": "http://replay.invalid/v1",
                **tier_overrides,
            }
        )
        for k in ("tier1_judge", "tier2_judge")
    }
    return {
        "duckdb": RLHNDuckDB(database=str(db_path)),
        "registry": DatasetRegistryResource(),
        "judging_budget": JudgingBudgetResource(max_usd_per_dataset=budget, max_usd_per_run=budget),
        "base_models": BaseModelsResource(),
        **tiers,
    }


def _requests() -> int:
    return sum(len(v) for v in REPLAY_CALLS.values())


def _check(result, name):
    return next(e for e in result.get_asset_check_evaluations() if e.check_name == name)


def test_zero_budget_blocks_paid_judging_before_any_request(db_path, tmp_path, instance):
    REPLAY_CALLS.clear()
    res = _paid_resources(db_path, tmp_path, budget=0.0)
    result = _materialize(ALL, "fiqa", res, instance)
    assert not result.success
    gate = _check(result, "judging_within_budget")
    assert not gate.passed
    assert "exceeds the per-dataset budget $0.00" in gate.description and "RLHN_JUDGING_BUDGET_USD" in gate.description
    assert gate.metadata["estimated_usd"].value > 0
    done = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    assert "tier1_judgments" not in done and "tier2_judgments" not in done
    assert _requests() == 0

    # Materializing the tier on its own (the check is not in that run) is refused by the tier itself.
    alone = _materialize(("tier1_judgments",), "fiqa", res, instance)
    assert not alone.success
    failure = alone.get_step_failure_events()[0].event_specific_data.error.message
    assert "paid judging blocked" in failure and "RLHN_JUDGING_BUDGET_USD" in failure
    assert _requests() == 0


def test_within_budget_it_runs(db_path, tmp_path, instance):
    REPLAY_CALLS.clear()
    result = _materialize(ALL, "fiqa", _paid_resources(db_path, tmp_path, budget=20.0), instance)
    assert result.success
    assert _check(result, "judging_within_budget").passed
    assert _requests() > 0
    with duckdb.connect(str(db_path), read_only=True) as c:
        paid = c.execute(
            "SELECT tier, paid, priced, usd_max > 0 FROM judging_estimates WHERE dataset = 'fiqa' ORDER BY tier"
        ).fetchall()
    assert paid == [(1, True, True, True), (2, True, True, True)]


def test_a_paid_tier_without_a_price_is_blocked(db_path, tmp_path, instance):
    REPLAY_CALLS.clear()
    res = _paid_resources(db_path, tmp_path, budget=1000.0, price_in_per_m=0.0, price_out_per_m=0.0)
    result = _materialize(ALL, "fiqa", res, instance)
    gate = _check(result, "judging_within_budget")
    assert not gate.passed and "no price for the paid tier 1" in gate.description
    assert _requests() == 0


def test_the_tier_refuses_an_estimate_made_for_another_model(db_path, tmp_path, instance):
    REPLAY_CALLS.clear()
    res = _paid_resources(db_path, tmp_path, budget=20.0)
    assert _materialize(ALL[:4], "fiqa", res, instance).success  # estimate for gpt-4o-mini
    other = {**res, "tier1_judge": ReplayTier(**{**res["tier1_judge"].model_dump(), "model": "gpt-4o-2024-11-20"})}
    r = _materialize(("tier1_judgments",), "fiqa", other, instance)
    assert not r.success
    assert (
        "re-materialize judging_cost_estimate[fiqa]" in r.get_step_failure_events()[0].event_specific_data.error.message
    )
    assert _requests() == 0


def test_local_tiers_are_never_blocked(resources, instance):
    """The `local` preset (embedding margin -> local Qwen) costs nothing: a 0 budget lets it through."""
    r = _materialize(ALL[:4], "fiqa", resources, instance)
    assert r.success and _check(r, "judging_within_budget").passed
    assert "no paid tier" in _check(r, "judging_within_budget").description


def _est(tier, usd, paid=True, priced=True, dataset="d"):
    return TierEstimate(dataset, tier, "listwise", "m", "https://api.openai.com/v1", paid, priced, 10, usd / 2, usd)


def test_budget_rules():
    assert decide([_est(1, 0.0, paid=False)], max_usd_per_dataset=0, max_usd_per_run=0).passed
    assert decide([_est(1, 3.0), _est(2, 4.0)], max_usd_per_dataset=7, max_usd_per_run=7).passed
    over = decide([_est(1, 3.0), _est(2, 4.0)], max_usd_per_dataset=6.99, max_usd_per_run=100)
    assert not over.passed and over.dataset_usd == 7.0
    assert decide([_est(1, 3.0), _est(2, 4.0)], max_usd_per_dataset=4, max_usd_per_run=100, basis="typical").passed
    run = decide([_est(1, 3.0)], max_usd_per_dataset=5, max_usd_per_run=5, run_usd_others=2.5)
    assert not run.passed and "per-run budget $5.00" in run.description and run.run_usd == 5.5


# ---------------------------------------------------------------------------------------------- automation
def _defs_with(tiers: dict) -> dg.Definitions:
    loaded = dg.load_from_defs_folder(path_within_project=Path(cascade.__file__).parents[1] / "rlhn_assets")
    return without_paid_automation(
        dg.Definitions(assets=loaded.assets, asset_checks=loaded.asset_checks, resources={**loaded.resources, **tiers})
    )


def _requested_after_upstream_update(defs: dg.Definitions, resources, instance) -> set[str]:
    first = dg.evaluate_automation_conditions(defs=defs, instance=instance)
    upstream = ("hard_negative_mining", "raw_bge", "pruned", "judging_cost_estimate")
    sel = dg.AssetSelection.assets(*upstream) | dg.AssetSelection.checks_for_assets(*upstream)
    assert dg.materialize(
        list(defs.assets) + list(defs.asset_checks),
        selection=sel,
        partition_key="fiqa",
        resources=resources,
        instance=instance,
    ).success
    tick = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=first.cursor)
    return {k.to_user_string() for k in defs.resolve_all_asset_keys() if tick.get_requested_partitions(k)}


@pytest.mark.parametrize(
    "preset,opt_in,expect_tier1", [("local", False, True), ("paper", False, False), ("paper", True, True)]
)
def test_sensor_requests_a_paid_tier_only_when_opted_in(preset, opt_in, expect_tier1, resources, instance, monkeypatch):
    if opt_in:
        monkeypatch.setenv("RLHN_AUTOMATE_PAID_JUDGING", "1")
    # a budget the estimate fits in, so that only the automation setting decides
    tiers = {**PRESETS[preset], "judging_budget": JudgingBudgetResource(max_usd_per_dataset=50, max_usd_per_run=50)}
    defs = _defs_with(tiers)
    requested = _requested_after_upstream_update(defs, {**resources, **tiers}, instance)
    assert ("tier1_judgments" in requested) == expect_tier1, requested
