import dagster as dg

from rlhn_assets import settings
from rlhn_assets.resources import DatasetRegistryResource, RLHNDuckDB


@dg.definitions
def resources() -> dg.Definitions:
    return dg.Definitions(
        resources={
            "duckdb": RLHNDuckDB(database=str(settings.duckdb_path()), connection_config={"memory_limit": "1GB"}),
            "registry": DatasetRegistryResource(),
        }
    )
