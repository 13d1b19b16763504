import time
from pathlib import Path

import dagster as dg

from rlhn_assets.conditions import PIPELINE
from rlhn_assets.defs.mining.assets import hard_negative_mining
from rlhn_assets.lib.ingest import DEFAULT_MAX_PASSAGE_CHARS, IngestError, ingest_dataset
from rlhn_assets.lib.markdown import md_table
from rlhn_assets.partitions import dataset_pd
from rlhn_assets.resources import DatasetRegistryResource, RLHNDuckDB


class IngestConfig(dg.Config):
    max_passage_chars: int = DEFAULT_MAX_PASSAGE_CHARS


def instance_summary_metadata(conn, instances_table: str, dataset: str) -> dict:
    """Counts, per-query means, passage length stats and a preview of an instance table's partition."""
    n, nq, pos_mean, neg_mean, pos_total, neg_total = conn.execute(
        f"""SELECT count(*), count(DISTINCT query_id), avg(len(positive_ids)), avg(len(negative_ids)),
                   coalesce(sum(len(positive_ids)), 0), coalesce(sum(len(negative_ids)), 0)
            FROM {instances_table} WHERE dataset = ?""",
        [dataset],
    ).fetchall()[0]
    lengths = conn.execute(
        """SELECT count(*), min(length(text)), avg(length(text)), quantile_cont(length(text), 0.5),
                  quantile_cont(length(text), 0.95), max(length(text))
           FROM raw_passages WHERE dataset = ? AND docid IN (
             SELECT unnest(positive_ids || negative_ids) FROM """
        + instances_table
        + " WHERE dataset = ?)",
        [dataset, dataset],
    ).fetchall()[0]
    preview = conn.execute(
        f"""SELECT i.instance_id, q.query, len(i.positive_ids), len(i.negative_ids), p.text
            FROM {instances_table} i JOIN raw_queries q USING (dataset, query_id)
            LEFT JOIN raw_passages p ON p.dataset = i.dataset AND p.docid = i.positive_ids[1]
            WHERE i.dataset = ? ORDER BY i.instance_id LIMIT 5""",
        [dataset],
    ).fetchall()
    return {
        "dagster/row_count": dg.MetadataValue.int(int(n)),
        "instances": dg.MetadataValue.int(int(n)),
        "queries": dg.MetadataValue.int(int(nq)),
        "passages": dg.MetadataValue.int(int(lengths[0])),
        "positives_total": dg.MetadataValue.int(int(pos_total)),
        "negatives_total": dg.MetadataValue.int(int(neg_total)),
        "positives_per_query_mean": dg.MetadataValue.float(round(float(pos_mean or 0), 3)),
        "negatives_per_query_mean": dg.MetadataValue.float(round(float(neg_mean or 0), 3)),
        "passage_length_chars": dg.MetadataValue.md(
            md_table(
                ["min", "mean", "p50", "p95", "max"],
                [[lengths[1] or 0, round(lengths[2] or 0, 1), lengths[3] or 0, lengths[4] or 0, lengths[5] or 0]],
            )
        ),
        "preview": dg.MetadataValue.md(
            md_table(["instance_id", "query", "#pos", "#neg", "first positive"], preview, max_chars=60)
        ),
    }


@dg.asset(
    partitions_def=dataset_pd,
    group_name="ingest",
    code_version="1",
    automation_condition=PIPELINE,
    deps=[hard_negative_mining],
    kinds={"duckdb"},
    description=(
        "The source dataset's training instances, normalized in DuckDB: `raw_queries`, `raw_passages` "
        "(deduplicated per dataset; BGE passages get md5 content ids), `raw_instances` (query -> ordered "
        "positive and negative ids). Reads Tevatron/rlhn and FlagEmbedding/BGE rows from JSONL, JSONL.gz or "
        "Parquet, streaming. Bad rows go to `raw_quarantine` with file, line and reason."
    ),
)
def raw_bge(
    context: dg.AssetExecutionContext, config: IngestConfig, duckdb: RLHNDuckDB, registry: DatasetRegistryResource
) -> dg.MaterializeResult:
    reg = registry.load()
    ds = reg.get(context.partition_key)
    files = []
    for f in ds.files:
        path = reg.resolve(f.path)
        label = Path(f.path).name
        if any(label == other for _, other, _ in files):
            raise dg.Failure(f"{reg.path}: dataset {ds.name!r} lists two files named {label!r}; rename one")
        files.append((path, label, f.format))
    t0 = time.perf_counter()
    with duckdb.get_connection() as conn:
        try:
            stats = ingest_dataset(
                conn, ds.name, files, max_passage_chars=config.max_passage_chars, progress=context.log.info
            )
        except IngestError as e:
            raise dg.Failure(description=f"dataset {ds.name!r}: {e}") from e
        metadata = instance_summary_metadata(conn, "raw_instances", ds.name)
        quarantine_preview = conn.execute(
            """SELECT source_file, line_no, reason, detail FROM raw_quarantine WHERE dataset = ?
               ORDER BY source_file, line_no LIMIT 10""",
            [ds.name],
        ).fetchall()
    seconds = time.perf_counter() - t0
    context.log.info(
        f"{ds.name}: {stats.instances:,} instances, {stats.quarantined_rows:,} rows and "
        f"{stats.quarantined_passages:,} passages quarantined in {seconds:.1f}s"
    )
    metadata.update(
        {
            "files": dg.MetadataValue.md("\n".join(f"- `{p}` ({fmt})" for p, _, fmt in files)),
            "rows_read": dg.MetadataValue.int(stats.lines_read),
            "quarantined_rows": dg.MetadataValue.int(stats.quarantined_rows),
            "quarantined_passages": dg.MetadataValue.int(stats.quarantined_passages),
            "quarantine_rate": dg.MetadataValue.float(round(stats.quarantine_rate, 5)),
            "quarantine_by_reason": dg.MetadataValue.md(
                md_table(["reason", "count"], sorted(stats.quarantine_by_reason.items(), key=lambda kv: -kv[1]))
            ),
            "quarantine_preview": dg.MetadataValue.md(
                md_table(["file", "line", "reason", "detail"], quarantine_preview)
            ),
            "seconds": dg.MetadataValue.float(round(seconds, 2)),
            "instances_per_second": dg.MetadataValue.float(round(stats.lines_read / seconds, 1) if seconds else 0.0),
        }
    )
    return dg.MaterializeResult(metadata=metadata)
