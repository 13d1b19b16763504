import os
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


EXECUTOR_ENV = "RLHN_EXECUTOR"


def executor_from_env() -> dg.ExecutorDefinition | None:
    """The executor of every job: RLHN_EXECUTOR = `celery` (dagster-celery: steps go to Celery workers through a
    broker, deploy/celery.yaml), `k8s` (dagster-k8s: one Kubernetes pod per step, deploy/k8s.yaml) or unset
    (Dagster's default multi-process executor). These are what run a fanned-out judging step's shards on several
    workers (docs/deploy.md); the packages are imported only when chosen."""
    name = os.environ.get(EXECUTOR_ENV, "").strip()
    if not name:
        return None
    if name == "celery":
        from dagster_celery import celery_executor

        return celery_executor
    if name == "k8s":
        from dagster_k8s import k8s_job_executor  # not a dependency of this project: install it in the image

        return k8s_job_executor
    raise ValueError(f"{EXECUTOR_ENV}={name!r}: expected celery, k8s or nothing (Dagster's multi-process executor)")


@dg.definitions
def defs() -> dg.Definitions:
    return dg.Definitions.merge(
        without_paid_automation(dg.load_from_defs_folder(path_within_project=Path(__file__).parent)),
        dg.Definitions(sensors=[automation_sensor], executor=executor_from_env()),
    )
