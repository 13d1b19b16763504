"""Partitions, defined once. One partition per source dataset in the registry."""

from __future__ import annotations

import dagster as dg

from rlhn_assets.registry import load_registry

DATASETS: tuple[str, ...] = tuple(load_registry().names)
dataset_pd = dg.StaticPartitionsDefinition(list(DATASETS))

# Relabeled variants: default + {stage 1, stage 2} x {remove, hn_remove, rlhn}. Keys avoid | , [ ] (Dagster).
from rlhn_assets.lib.relabel import VARIANTS  # noqa: E402

variant_pd = dg.StaticPartitionsDefinition(list(VARIANTS))
dataset_variant_pd = dg.MultiPartitionsDefinition({"dataset": dataset_pd, "variant": variant_pd})
