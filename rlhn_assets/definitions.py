from pathlib import Path

import dagster as dg

# On by default: a changed dataset file re-materializes exactly what depends on it (see conditions.py).
automation_sensor = dg.AutomationConditionSensorDefinition(
    "rlhn_automation",
    target=dg.AssetSelection.all(),
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=60,
)


@dg.definitions
def defs() -> dg.Definitions:
    return dg.Definitions.merge(
        dg.load_from_defs_folder(path_within_project=Path(__file__).parent),
        dg.Definitions(sensors=[automation_sensor]),
    )
