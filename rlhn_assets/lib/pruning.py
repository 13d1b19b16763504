"""The pruning stage: which source datasets are kept, and per-instance cleaning.

Keep/prune decision, strongest first:
1. a manual ``keep: true|false`` in the registry entry;
2. the data-driven leave-one-out recommendation (``pruning/recommendation.json`` under the data
   directory, written by the ``dataset_pruning`` stage, or by hand in the same shape):
   ``{"rule": "...", "datasets": {"<name>": {"keep": false, "reason": "..."}}}``;
3. otherwise kept.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import duckdb

from rlhn_assets.lib.db import replace_partition
from rlhn_assets.registry import SourceDataset

RECOMMENDATION_FILE = "pruning/recommendation.json"


@dataclass(frozen=True)
class Decision:
    kept: bool
    decided_by: str  # "manual" | "recommendation" | "default"
    reason: str


def load_recommendation(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("datasets", {}), dict):
        raise ValueError(f"{path}: expected {{'datasets': {{name: {{'keep': bool, 'reason': str}}}}}}")
    return doc


def decide(ds: SourceDataset, recommendation: dict) -> Decision:
    if ds.keep is not None:
        return Decision(ds.keep, "manual", f"registry entry says keep: {str(ds.keep).lower()}")
    rec = recommendation.get("datasets", {}).get(ds.name)
    if rec is not None and "keep" in rec:
        rule = recommendation.get("rule", "")
        return Decision(
            bool(rec["keep"]),
            "recommendation",
            (rec.get("reason") or "leave-one-out recommendation") + (f" (rule: {rule})" if rule else ""),
        )
    return Decision(True, "default", "no manual choice and no recommendation: kept")


@dataclass
class PruneStats:
    raw_instances: int = 0
    kept_instances: int = 0
    duplicates_removed: int = 0
    overlap_negatives_removed: int = 0
    capped_negatives_removed: int = 0
    sampled_away: int = 0


def prune_dataset(
    conn: duckdb.DuckDBPyConnection,
    dataset: str,
    decision: Decision,
    max_negatives: int | None,
    max_instances: int | None = None,
) -> PruneStats:
    """Replace ``pruned_instances`` for the dataset: exact-duplicate instances removed (first kept),
    negatives that are also positives of the same instance removed, optional cap on negatives, optional
    sample of the first ``max_instances`` instances (by instance id)."""
    stats = PruneStats()
    stats.raw_instances = conn.execute("SELECT count(*) FROM raw_instances WHERE dataset = ?", [dataset]).fetchall()[0][
        0
    ]
    cap = int(max_negatives) if max_negatives else None
    conn.execute("BEGIN TRANSACTION")
    try:
        replace_partition(conn, ["pruned_instances", "pruned_decisions"], dataset)
        if decision.kept:
            conn.execute(
                """CREATE OR REPLACE TEMP TABLE _dedup AS
                   SELECT dataset, instance_id, query_id, positive_ids,
                          list_filter(negative_ids, lambda x: NOT list_contains(positive_ids, x)) AS negs
                   FROM (SELECT *, row_number() OVER (PARTITION BY query_id, positive_ids, negative_ids
                                                      ORDER BY source_file, line_no) AS dup_rank
                         FROM raw_instances WHERE dataset = ?)
                   WHERE dup_rank = 1""",
                [dataset],
            )
            kept, before, after = conn.execute(
                "SELECT count(*), coalesce(sum(len(r.negative_ids)), 0), coalesce(sum(len(negs)), 0) "
                "FROM _dedup d JOIN raw_instances r USING (dataset, instance_id)"
            ).fetchall()[0]
            stats.kept_instances = kept
            stats.duplicates_removed = stats.raw_instances - kept
            stats.overlap_negatives_removed = int(before - after)
            if cap is not None:
                stats.capped_negatives_removed = conn.execute(
                    "SELECT coalesce(sum(greatest(len(negs) - ?, 0)), 0) FROM _dedup", [cap]
                ).fetchall()[0][0]
            limit = f" LIMIT {int(max_instances)}" if max_instances else ""
            conn.execute(
                f"""INSERT INTO pruned_instances (dataset, instance_id, query_id, positive_ids, negative_ids)
                    SELECT dataset, instance_id, query_id, positive_ids,
                           {"negs[1:" + str(cap) + "]" if cap is not None else "negs"}
                    FROM _dedup ORDER BY instance_id{limit}"""
            )
            if max_instances:
                stats.sampled_away = max(kept - int(max_instances), 0)
                stats.kept_instances = kept - stats.sampled_away
            conn.execute("DROP TABLE _dedup")
        conn.execute(
            """INSERT INTO pruned_decisions (dataset, kept, decided_by, reason, raw_instances, kept_instances,
                                             duplicates_removed, overlap_negatives_removed, capped_negatives_removed)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)""",
            [
                dataset,
                decision.kept,
                decision.decided_by,
                decision.reason,
                stats.raw_instances,
                stats.kept_instances,
                stats.duplicates_removed,
                stats.overlap_negatives_removed,
                stats.capped_negatives_removed,
            ],
        )
        conn.execute("COMMIT")
    except Exception:
        conn.execute("ROLLBACK")
        raise
    return stats
