"""Partitions, defined once. One partition per source dataset in the registry."""

from __future__ import annotations

import dagster as dg

from rlhn_assets.registry import load_registry

DATASETS: tuple[str, ...] = tuple(load_registry().names)
dataset_pd = dg.StaticPartitionsDefinition(list(DATASETS))

# Relabeled variants: default + {stage 1, stage 2} x {remove, hn_remove, rlhn} + the comparison treatments
# s2_rlhn_filter and topk_percpos (lib/relabel.py). Keys avoid | , [ ] (Dagster).
from rlhn_assets.lib.relabel import VARIANTS  # noqa: E402

variant_pd = dg.StaticPartitionsDefinition(list(VARIANTS))
dataset_variant_pd = dg.MultiPartitionsDefinition({"dataset": dataset_pd, "variant": variant_pd})

# Evaluation: every BEIR-layout folder under data/eval/ is an eval set; models = the untrained base + each variant.
from rlhn_assets import settings  # noqa: E402
from rlhn_assets.lib.evaluation import list_eval_sets  # noqa: E402

EVAL_SETS: tuple[str, ...] = tuple(list_eval_sets(settings.data_dir() / "eval"))
BASE_MODEL = "base"
MODELS: tuple[str, ...] = (BASE_MODEL,) + tuple(VARIANTS)
eval_set_pd = dg.StaticPartitionsDefinition(list(EVAL_SETS))
model_pd = dg.StaticPartitionsDefinition(list(MODELS))
# base_retriever has one partition so that only model_pd's `base` maps onto it (every partition of a downstream
# asset depends on an unpartitioned upstream).
base_model_pd = dg.StaticPartitionsDefinition([BASE_MODEL])
eval_pd = dg.MultiPartitionsDefinition({"eval_set": eval_set_pd, "model": model_pd})
