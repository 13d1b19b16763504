from pathlib import Path

import dagster as dg

from rlhn_assets import settings

# On by default: a changed dataset file re-materializes exactly what depends on it (see conditions.py).
automation_sensor = dg.AutomationConditionSensorDefinition(
    "rlhn_automation",
    target=dg.AssetSelection.all(),
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=60,
)

# judge tier asset -> the resource that configures it
JUDGE_TIERS = {"tier1_judgments": "tier1_judge", "tier2_judgments": "tier2_judge"}


def without_paid_automation(loaded: dg.Definitions) -> dg.Definitions:
    """Drop the automation condition of every judge tier whose bound endpoint costs money, unless
    RLHN_AUTOMATE_PAID_JUDGING=1: paid judging starts only when someone asks for it (and then still passes
    the budget gate). Local tiers keep their eager automation."""
    if settings.automate_paid_judging():
        return loaded
    paid = [asset for asset, res in JUDGE_TIERS.items() if loaded.resources[res].is_paid]
    if not paid:
        return loaded
    keys = {dg.AssetKey(a) for a in paid}
    mapped: dict[int, object] = {}  # the defs folder lists one asset object once per module that imports it

    def manual(a):
        if isinstance(a, dg.AssetsDefinition) and {s.key for s in a.specs} & keys:
            if id(a) not in mapped:
                mapped[id(a)] = a.map_asset_specs(
                    lambda spec: spec.replace_attributes(automation_condition=None) if spec.key in keys else spec
                )
            return mapped[id(a)]
        return a

    # Definitions.map_resolved_asset_specs (preview) refuses the observable source asset, so map the two
    # assets and rebuild the Definitions with the same parts.
    return dg.Definitions(
        assets=[manual(a) for a in loaded.assets or []],
        asset_checks=loaded.asset_checks,
        schedules=loaded.schedules,
        sensors=loaded.sensors,
        jobs=loaded.jobs,
        resources=loaded.resources,
        executor=loaded.executor,
        loggers=loaded.loggers,
        metadata=loaded.metadata,
    )


@dg.definitions
def defs() -> dg.Definitions:
    return dg.Definitions.merge(
        without_paid_automation(dg.load_from_defs_folder(path_within_project=Path(__file__).parent)),
        dg.Definitions(sensors=[automation_sensor]),
    )
