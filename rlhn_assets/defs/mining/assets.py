import json
import time

import dagster as dg

from rlhn_assets import settings
from rlhn_assets.conditions import PIPELINE
from rlhn_assets.defs.sources.assets import raw_dataset_files
from rlhn_assets.partitions import dataset_pd
from rlhn_assets.resources import BaseModelsResource, DatasetRegistryResource


@dg.asset(
    partitions_def=dataset_pd,
    group_name="ingest",
    code_version="1",
    automation_condition=PIPELINE,
    deps=[raw_dataset_files],
    kinds={"python", "sentence_transformers"},
    description=(
        "Hard-negative mining for datasets whose registry entry has a `mine:` section (queries + positives + "
        "a BEIR-layout corpus, no negatives): dense retrieval with the retriever base of resource `base_models` "
        "(default the packaged all-MiniLM-L6-v2; queries and passages with its prompts) or BM25, "
        "labelled positives skipped, a rank window and N negatives. Writes a Tevatron JSONL.gz that "
        "`raw_bge` ingests. Skips the work when settings, inputs and model (weights + prompts) are unchanged. "
        "A no-op for datasets that come with negatives."
    ),
)
def hard_negative_mining(
    context: dg.AssetExecutionContext, registry: DatasetRegistryResource, base_models: BaseModelsResource
) -> dg.MaterializeResult:
    from rlhn_assets.lib import mining

    reg = registry.load()
    ds = reg.get(context.partition_key)
    if ds.mine is None:
        return dg.MaterializeResult(metadata={"status": "not configured: negatives come with the source file"})
    spec = ds.mine
    inputs = [reg.resolve(spec.corpus), reg.resolve(spec.queries), reg.resolve(spec.qrels)]
    for p in inputs:
        if not p.exists():
            raise dg.Failure(f"{p}: mining input of dataset {ds.name!r} not found")
    output = reg.resolve(spec.output)
    sidecar = output.with_name(output.name + ".mining.json")

    model_version, base = "", None
    if spec.method == "dense":
        base = base_models.retriever_base()
        model_version = base.identity  # = dir_hash of the folder without prompts: the bundled sidecar stays valid
    fingerprint = mining.spec_fingerprint(spec, inputs, model_version)
    if output.exists() and sidecar.exists():
        previous = json.loads(sidecar.read_text())
        if previous.get("fingerprint") == fingerprint:
            context.log.info(f"{output.name} is up to date (settings, inputs and model unchanged)")
            return dg.MaterializeResult(
                metadata={
                    "status": "up to date",
                    "output": str(output),
                    **{k: v for k, v in previous.get("stats", {}).items()},
                }
            )

    t0 = time.perf_counter()
    split = mining.load_beir(*inputs)
    context.log.info(
        f"mining {len(split.queries):,} queries against {len(split.corpus):,} passages ({spec.method}"
        + (f", base {base.name}, prompts query {base.query_prompt!r} passage {base.passage_prompt!r})" if base else ")")
    )
    model = None
    if base is not None:
        from rlhn_assets.lib.embeddings import load_model

        model = load_model(base.path, device=base_models.resolved_device())
    stats = mining.mine(
        spec,
        split,
        ds.name,
        output,
        model=model,
        model_version=model_version,
        cache_dir=settings.cache_dir() / "embeddings",
        progress=context.log.info,
        query_prompt=base.query_prompt if base else None,
        passage_prompt=base.passage_prompt if base else None,
    )
    seconds = time.perf_counter() - t0
    stats_doc = {
        "queries": stats.queries,
        "negatives": stats.negatives,
        "negatives_per_query": round(stats.negatives / max(stats.queries, 1), 2),
        "queries_short_of_negatives": stats.queries_short_of_negatives,
        "queries_skipped_no_positive_in_corpus": stats.queries_skipped_no_positive_in_corpus,
        "positives_skipped": stats.positives_skipped_in_window,
        "margin_skipped": stats.margin_skipped,
    }
    sidecar.write_text(
        json.dumps(
            {
                "fingerprint": fingerprint,
                "method": spec.method,
                "window": [spec.range_min, spec.range_max],
                "num_negatives": spec.num_negatives,
                "base_model": base.describe() if base else None,
                "stats": stats_doc,
            },
            indent=2,
        )
        + "\n"
    )
    return dg.MaterializeResult(
        metadata={
            "status": "mined",
            "output": str(output),
            "seconds": round(seconds, 1),
            "embedding_cache_hit": stats.cache_hit,
            **(
                {"base_model": base.name, "query_prompt": base.query_prompt, "passage_prompt": base.passage_prompt}
                if base
                else {}
            ),
            **stats_doc,
        }
    )
