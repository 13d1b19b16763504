import os

# Nothing may download a model or dataset at run time: make a mistake fail at once.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import shutil
from pathlib import Path

import dagster as dg
import pytest

from rlhn_assets import settings
from rlhn_assets.resources import DatasetRegistryResource, RLHNDuckDB

FIXTURES = Path(__file__).parent / "fixtures"
DATA = settings.PROJECT_ROOT / "data"


@pytest.fixture
def db_path(tmp_path) -> Path:
    return tmp_path / "test.duckdb"


def make_resources(db_path, registry: DatasetRegistryResource | None = None) -> dict:
    """Every resource of the code location (the `local` judge preset: no server starts unless a judge is
    opened), with DuckDB on ``db_path`` and the given (or bundled) registry."""
    from rlhn_assets.defs.resources import PRESETS

    return {**PRESETS["local"], "duckdb": RLHNDuckDB(database=str(db_path)),
            "registry": registry or DatasetRegistryResource()}


@pytest.fixture
def resources(db_path):
    """The real resources, on a temporary DuckDB file and the bundled registry."""
    return make_resources(db_path)


@pytest.fixture
def instance(tmp_path):
    home = tmp_path / "dagster_home"
    home.mkdir()
    with dg.instance_for_test(temp_dir=str(home)) as inst:
        yield inst


@pytest.fixture
def tmp_data(tmp_path) -> Path:
    """A private copy of the bundled data directory (registry + raw files) that a test may edit."""
    dst = tmp_path / "data"
    shutil.copytree(DATA, dst, ignore=shutil.ignore_patterns("*.duckdb*", "cache", "models", "reports", "exports"))
    return dst
