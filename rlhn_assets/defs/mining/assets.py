import json
import time

import dagster as dg

from rlhn_assets import settings
from rlhn_assets.conditions import PIPELINE
from rlhn_assets.defs.sources.assets import raw_dataset_files
from rlhn_assets.partitions import dataset_pd
from rlhn_assets.resources import DatasetRegistryResource


@dg.asset(
    partitions_def=dataset_pd,
    group_name="ingest",
    code_version="1",
    automation_condition=PIPELINE,
    deps=[raw_dataset_files],
    kinds={"python", "sentence_transformers"},
    description=(
        "Hard-negative mining for datasets whose registry entry has a `mine:` section (queries + positives + "
        "a BEIR-layout corpus, no negatives): dense retrieval with the packaged all-MiniLM-L6-v2 or BM25, "
        "labelled positives skipped, a rank window and N negatives. Writes a Tevatron JSONL.gz that "
        "`raw_bge` ingests. Skips the work when settings, inputs and model are unchanged. A no-op for "
        "datasets that come with negatives."
    ),
)
def hard_negative_mining(context: dg.AssetExecutionContext, registry: DatasetRegistryResource) -> dg.MaterializeResult:
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

    model_version = ""
    if spec.method == "dense":
        from rlhn_assets.lib.embeddings import base_model_path, dir_hash

        model_version = dir_hash(base_model_path())
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
    context.log.info(f"mining {len(split.queries):,} queries against {len(split.corpus):,} passages ({spec.method})")
    stats = mining.mine(
        spec,
        split,
        ds.name,
        output,
        model_version=model_version,
        cache_dir=settings.cache_dir() / "embeddings",
        progress=context.log.info,
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
            **stats_doc,
        }
    )
