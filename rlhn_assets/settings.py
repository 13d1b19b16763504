"""Where the project keeps its data. Everything is relative to one data directory.

`RLHN_DATA_DIR` overrides the data directory (default: `data/` next to the package), `RLHN_DUCKDB`
the DuckDB file (default: `<data dir>/rlhn.duckdb`).
"""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def data_dir() -> Path:
    return Path(os.environ.get("RLHN_DATA_DIR", PROJECT_ROOT / "data")).resolve()


def duckdb_path() -> Path:
    return Path(os.environ.get("RLHN_DUCKDB", data_dir() / "rlhn.duckdb")).resolve()


def registry_path() -> Path:
    return Path(os.environ.get("RLHN_REGISTRY", data_dir() / "datasets.yaml")).resolve()


def cache_dir() -> Path:
    """Embedding and other derived caches; CI points this outside the clone so it survives between runs."""
    return Path(os.environ.get("RLHN_CACHE_DIR", data_dir() / "cache")).resolve()


def automate_paid_judging() -> bool:
    """RLHN_AUTOMATE_PAID_JUDGING=1: let the automation sensor (and its eager conditions) re-materialize a judge
    tier whose endpoint costs money. Off by default: a changed file must not start paid calls by itself."""
    return os.environ.get("RLHN_AUTOMATE_PAID_JUDGING", "").strip().lower() in ("1", "true", "yes")
