import dagster as dg

from rlhn_assets.lib.fingerprint import dataset_fingerprint
from rlhn_assets.partitions import dataset_pd
from rlhn_assets.resources import BaseModelsResource, DatasetRegistryResource


@dg.observable_source_asset(
    partitions_def=dataset_pd,
    group_name="sources",
    description=(
        "The source files of each dataset (registry entry + file bytes + mining inputs). Its data version per "
        "partition is their content hash: editing one dataset's file changes only that partition's version, and "
        "the automation sensor then re-materializes exactly what depends on it. Observed every 10 minutes by the "
        "automation sensor, or with 'Observe sources' in the UI."
    ),
    automation_condition=dg.AutomationCondition.cron_tick_passed("*/10 * * * *"),
)
def raw_dataset_files(
    context: dg.AssetExecutionContext, registry: DatasetRegistryResource
) -> dg.DataVersionsByPartition:
    reg = registry.load()
    keys = context.partition_keys if context.has_partition_key_range or context.has_partition_key else reg.names
    return dg.DataVersionsByPartition({k: dataset_fingerprint(reg, k) for k in keys if k in reg.names})


def _observe_base(context, base, role: str) -> dg.ObserveResult:
    context.log.info(
        f"{role} base {base.name}: {base.path} (weights {base.content_hash[:12]}, prompts query "
        f"{base.query_prompt!r} passage {base.passage_prompt!r}) -> version {base.version}"
    )
    return dg.ObserveResult(
        data_version=dg.DataVersion(base.version),
        metadata={
            "base_model": base.name,
            "path": dg.MetadataValue.path(str(base.path)),
            "content_hash": base.content_hash[:16],
            "query_prompt": base.query_prompt,
            "passage_prompt": base.passage_prompt,
        },
    )


_BASE_SOURCE = dict(
    group_name="sources",
    automation_condition=dg.AutomationCondition.cron_tick_passed("*/10 * * * *"),
)


@dg.observable_source_asset(
    **_BASE_SOURCE,
    description=(
        "The retriever's base model as the `base_models` resource names it (RLHN_RETRIEVER_BASE; default the packaged "
        "all-MiniLM-L6-v2) with its query/passage prompts. Its data version is the identity of the weights (folder "
        "content hash) and the prompts, so switching the base or a prompt makes `base_retriever`, every "
        "`trained_retriever` and the dataset-pruning study stale, and the automation sensor retrains and "
        "re-evaluates them. Observed every 10 minutes by the automation sensor, or with 'Observe sources' in the UI."
    ),
)
def retriever_base_model(context: dg.AssetExecutionContext, base_models: BaseModelsResource) -> dg.ObserveResult:
    return _observe_base(context, base_models.retriever_base(), "retriever")


@dg.observable_source_asset(
    **_BASE_SOURCE,
    description=(
        "The reranker's base model (RLHN_RERANKER_BASE; default the retriever's base): the identity of its weights. "
        "A new one makes every `trained_reranker` stale."
    ),
)
def reranker_base_model(context: dg.AssetExecutionContext, base_models: BaseModelsResource) -> dg.ObserveResult:
    return _observe_base(context, base_models.reranker_base(), "reranker")
