"""Dagster resources of the project, in one place. They are bound in ``defs/resources.py``."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import dagster as dg
import duckdb
from dagster_duckdb import DuckDBResource

from rlhn_assets import settings
from rlhn_assets.lib.db import connect, ensure_schema
from rlhn_assets.registry import Registry, load_registry


class RLHNDuckDB(DuckDBResource):
    """dagster-duckdb's resource, with a connection that is always closed (upstream leaks it on an
    exception) and a longer lock back-off, so a run waiting on another run's short write never fails."""

    @contextmanager
    def get_connection(self) -> Iterator[duckdb.DuckDBPyConnection]:
        with connect(self.database, config={"custom_user_agent": "dagster", **self.connection_config}) as conn:
            ensure_schema(conn)
            yield conn


class DatasetRegistryResource(dg.ConfigurableResource):
    """The source-dataset registry (``data/datasets.yaml``). Partitions come from the default registry at
    load time; this resource resolves the files of a partition at run time (tests point it elsewhere)."""

    path: str = ""

    def load(self) -> Registry:
        return load_registry(Path(self.path) if self.path else settings.registry_path())

    @property
    def data_dir(self) -> Path:
        return self.load().data_dir
