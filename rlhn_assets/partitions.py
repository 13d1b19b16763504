"""Partitions, defined once. One partition per source dataset in the registry."""

from __future__ import annotations

import dagster as dg

from rlhn_assets.registry import load_registry

DATASETS: tuple[str, ...] = tuple(load_registry().names)
dataset_pd = dg.StaticPartitionsDefinition(list(DATASETS))
