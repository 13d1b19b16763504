"""The comparison report, shaped like the paper's Table 3 (arXiv 2505.16967, §4): rows = eval sets and their
average, columns = base and every variant (stage 1 / stage 2), for the retriever and the reranker; with several
training seeds per variant, mean ± std over seeds, and deltas against ``default`` with a 95% paired-bootstrap
confidence interval over queries. Plus what the judge cascade did to the training data (§2.1, §3) and the
training runs behind the numbers.

Everything here is a pure function of a DuckDB connection or of plain rows; the Dagster asset
(``defs/report/assets.py``) only calls them and writes the files.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import math
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

MODEL_ORDER = (
    "base",
    "default",
    "s1_remove",
    "s1_hn_remove",
    "s1_rlhn",
    "s2_remove",
    "s2_hn_remove",
    "s2_rlhn",
    # the comparison treatments (lib/relabel.py): ARHN's relabel + filter, NV-Retriever's TopK-PercPos
    "s2_rlhn_filter",
    "topk_percpos",
)
STAGES = ("retriever", "reranker")
METRICS = ("ndcg_at_10", "recall_at_100", "mrr_at_10")
METRIC_LABELS = {"ndcg_at_10": "nDCG@10", "recall_at_100": "Recall@100", "mrr_at_10": "MRR@10"}
AVG = "Avg"
REF = "default"
BASE = "base"
TIER2_VERDICTS = ("better", "worse", "not_relevant", "error")
SETTING_KEYS = ("max_seq_length", "hard_negatives", "batch_size", "learning_rate", "epochs", "scale")
CSV_HEADER = ("stage", "model", "eval_set", "metric", "mean", "std", "n_seeds", "delta_vs_default", "ci_low", "ci_high")

# (stage, model, eval_set, seed, ndcg@10, recall@100, mrr@10); seed None = a model without seeds (base)
ScoreRow = tuple[str, str, str, "int | None", "float | None", "float | None", "float | None"]


def model_sort_key(m: str) -> tuple[int, str]:
    """MODEL_ORDER first, any other model name after it, alphabetically."""
    return (MODEL_ORDER.index(m), "") if m in MODEL_ORDER else (len(MODEL_ORDER), m)


# --------------------------------------------------------------------------------------------- DuckDB helpers
def has_table(conn, table: str) -> bool:
    # information_schema: tables and views, of the main and temp schemas
    return (
        conn.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = $1", [table]).fetchall()[0][0]
        > 0
    )


def has_column(conn, table: str, column: str) -> bool:
    return (
        conn.execute(
            "SELECT count(*) FROM information_schema.columns WHERE table_name = $1 AND column_name = $2",
            [table, column],
        ).fetchall()[0][0]
        > 0
    )


# ------------------------------------------------------------------------------------------ 1. mean ± std
@dataclass(frozen=True)
class Stat:
    """A metric over seeds: mean, sample std (ddof=1; None with one seed) and the number of seeds."""

    mean: float
    std: float | None
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Stat:
        a = np.asarray(values, dtype=float)
        return cls(float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else None, len(a))


@dataclass
class StageSummary:
    """One stage's table: ``cells[(model, eval_set | 'Avg', metric)]``. ``eval_sets`` are the sets every shown
    model was evaluated on (the average is over those only); ``dropped_eval_sets`` the others."""

    stage: str
    models: list[str]
    eval_sets: list[str]
    dropped_eval_sets: list[str]
    cells: dict[tuple[str, str, str], Stat]


def load_scores(conn) -> list[ScoreRow]:
    """eval_scores as ScoreRows (duplicate rows of one (stage, model, eval set, seed) are averaged)."""
    if not has_table(conn, "eval_scores"):
        return []
    seed = "seed" if has_column(conn, "eval_scores", "seed") else "NULL::INTEGER"
    return conn.execute(f"""
        SELECT stage, model, eval_set, {seed} AS seed, avg(ndcg_at_10), avg(recall_at_100), avg(mrr_at_10)
        FROM eval_scores GROUP BY ALL ORDER BY ALL""").fetchall()


def summarize_scores(rows: Iterable[ScoreRow]) -> dict[str, StageSummary]:
    """Per stage: mean ± std over seeds per (model, eval set, metric), and the 'Avg' row = the average over the
    common eval sets computed per seed first (a seed's average is one draw of "the model trained with that
    seed"), then mean ± std over the seeds that have every common eval set."""
    by: dict[str, dict[str, dict[str, dict[Any, tuple]]]] = {}
    for stage, model, eval_set, seed, *vals in rows:
        by.setdefault(stage, {}).setdefault(model, {}).setdefault(eval_set, {})[seed] = tuple(vals)
    out: dict[str, StageSummary] = {}
    for stage in sorted(by, key=lambda s: (STAGES.index(s) if s in STAGES else len(STAGES), s)):
        models = sorted(by[stage], key=model_sort_key)
        all_sets = sorted({e for m in models for e in by[stage][m]})
        common = [e for e in all_sets if all(e in by[stage][m] for m in models)]
        cells: dict[tuple[str, str, str], Stat] = {}
        for m in models:
            for i, metric in enumerate(METRICS):
                for e in common:
                    vals = [v[i] for v in by[stage][m][e].values() if v[i] is not None]
                    if vals:
                        cells[(m, e, metric)] = Stat.of(vals)
                if not common:
                    continue
                seeds = set.intersection(*(set(by[stage][m][e]) for e in common))
                per_seed = [
                    sum(by[stage][m][e][s][i] for e in common) / len(common)
                    for s in sorted(seeds, key=lambda s: (s is None, s))
                    if all(by[stage][m][e][s][i] is not None for e in common)
                ]
                if per_seed:
                    cells[(m, AVG, metric)] = Stat.of(per_seed)
        out[stage] = StageSummary(stage, models, common, [e for e in all_sets if e not in common], cells)
    return out


# ------------------------------------------------------------------------------------ 2. paired bootstrap
@dataclass(frozen=True)
class Delta:
    """``model`` − ``ref`` in nDCG@10 points on one eval set (or 'Avg'), with its 95% CI (None without
    per-query data: then ``delta`` is the difference of the seed means)."""

    model: str
    ref: str
    eval_set: str
    delta: float
    ci_low: float | None
    ci_high: float | None
    n_queries: int

    @property
    def has_ci(self) -> bool:
        return self.ci_low is not None and self.ci_high is not None

    @property
    def excludes_zero(self) -> bool:
        return self.has_ci and (self.ci_low > 0 or self.ci_high < 0)


def paired_query_diffs(
    conn, stage: str, ref: str, eval_sets: Sequence[str] | None = None
) -> dict[tuple[str, str], np.ndarray]:
    """{(model, eval_set): per-query nDCG@10 difference model − ref}, over the queries both have, each query's
    value first averaged over the model's seeds (pooling seeds: one paired value per query). The averaging and
    the pairing run in DuckDB; only one float per (model, query) comes back."""
    if not has_table(conn, "eval_per_query"):
        return {}
    # with seeds on both sides, only the per-query rows behind a current eval_scores row count (not a seed
    # whose summary row is gone); files without the per-query seed column average whatever rows there are
    behind = (
        "SEMI JOIN eval_scores s ON s.eval_set = q.eval_set AND s.model = q.model AND s.stage = q.stage "
        "AND s.seed IS NOT DISTINCT FROM q.seed"
        if has_column(conn, "eval_per_query", "seed") and has_column(conn, "eval_scores", "seed")
        else ""
    )
    rows = conn.execute(
        f"""
        WITH pq AS (SELECT q.eval_set, q.model, q.query_id, avg(q.ndcg_at_10) AS v FROM eval_per_query q {behind}
                    WHERE q.stage = $1 AND q.ndcg_at_10 IS NOT NULL GROUP BY ALL)
        SELECT m.model, m.eval_set, list(m.v - r.v ORDER BY m.query_id)
        FROM pq m JOIN pq r ON r.model = $2 AND r.eval_set = m.eval_set AND r.query_id = m.query_id
        WHERE m.model <> $2 GROUP BY ALL""",
        [stage, ref],
    ).fetchall()
    keep = None if eval_sets is None else set(eval_sets)
    return {(m, e): np.asarray(d, dtype=float) for m, e, d in rows if keep is None or e in keep}


def bootstrap_means(diffs: np.ndarray, *, n_boot: int = 2000, seed: int = 0, stream: str = "") -> np.ndarray:
    """``n_boot`` means of ``diffs`` resampled with replacement. The generator is seeded by (seed, stream): the
    report is reproducible, and every model compared on one eval set (stream) gets the same query resamples,
    whatever other eval sets or models exist."""
    rng = np.random.default_rng([seed, zlib.crc32(stream.encode())])
    n = len(diffs)
    out = np.empty(n_boot)
    chunk = max(1, 1_000_000 // max(n, 1))  # bounded memory on large eval sets
    for start in range(0, n_boot, chunk):
        k = min(chunk, n_boot - start)
        out[start : start + k] = diffs[rng.integers(0, n, size=(k, n))].mean(axis=1)
    return out


def bootstrap_deltas(
    diffs: Mapping[str, np.ndarray], *, n_boot: int = 2000, seed: int = 0
) -> dict[str, tuple[float, float, float, int]]:
    """{eval_set | 'Avg': (delta, ci_low, ci_high, n_queries)} in points (×100) from one model's per-query
    differences per eval set. Percentile CI (2.5 / 97.5) of the mean difference; 'Avg' resamples queries
    independently within each eval set per draw and averages the eval-set means (the eval sets are fixed, as in
    the paper's average row; only their queries are a sample)."""
    out: dict[str, tuple[float, float, float, int]] = {}
    draws = []
    for e in sorted(diffs):
        d = diffs[e]
        if len(d) == 0:
            continue
        b = bootstrap_means(d, n_boot=n_boot, seed=seed, stream=e)
        draws.append((float(d.mean()), b, len(d)))
        lo, hi = np.percentile(b, [2.5, 97.5])
        out[e] = (100 * float(d.mean()), 100 * float(lo), 100 * float(hi), len(d))
    if draws:
        avg = np.mean([b for _, b, _ in draws], axis=0)
        lo, hi = np.percentile(avg, [2.5, 97.5])
        out[AVG] = (
            100 * float(np.mean([m for m, _, _ in draws])),
            100 * float(lo),
            100 * float(hi),
            sum(n for _, _, n in draws),
        )
    return out


def compute_deltas(
    summary: StageSummary,
    diffs: Mapping[tuple[str, str], np.ndarray],
    ref: str,
    models: Sequence[str] | None = None,
    *,
    n_boot: int = 2000,
    seed: int = 0,
) -> dict[tuple[str, str], Delta]:
    """{(model, eval_set | 'Avg'): Delta vs ``ref``} over the summary's common eval sets. A model without
    per-query data on some eval set gets the difference of the seed means there and no CI (and no Avg CI)."""
    out: dict[tuple[str, str], Delta] = {}
    for m in models if models is not None else [x for x in summary.models if x != ref]:
        if m == ref or m not in summary.models or ref not in summary.models:
            continue
        per_set = {e: diffs[(m, e)] for e in summary.eval_sets if len(diffs.get((m, e), ())) > 0}
        boot = bootstrap_deltas(per_set, n_boot=n_boot, seed=seed)
        complete = len(per_set) == len(summary.eval_sets)
        for e in summary.eval_sets + [AVG]:
            if e in boot and (e != AVG or complete):
                d, lo, hi, n = boot[e]
                out[(m, e)] = Delta(m, ref, e, d, lo, hi, n)
            else:
                a, r = summary.cells.get((m, e, "ndcg_at_10")), summary.cells.get((ref, e, "ndcg_at_10"))
                if a is not None and r is not None:
                    out[(m, e)] = Delta(m, ref, e, 100 * (a.mean - r.mean), None, None, 0)
    return out


def _pts(x: float) -> str:
    x = round(x, 1) + 0.0  # no "-0.0" for a tiny negative difference
    return f"{x:+.1f}".replace("-", "\u2212")


def delta_sentence(d: Delta) -> str:
    """What the interval allows, in one sentence."""
    head = f"{d.model} vs {d.ref} on {d.eval_set}: {_pts(d.delta)} points"
    if not d.has_ci:
        return f"{head} (no per-query scores, so no interval): nothing is established"
    head += f" [{_pts(d.ci_low)}, {_pts(d.ci_high)}]"
    if not d.excludes_zero:
        return f"{head}: the interval includes 0, so no difference is established"
    return f"{head}: the interval excludes 0: {d.model} is {'better' if d.ci_low > 0 else 'worse'}"


# ------------------------------------------------------------------------------------ 4. what the judge did
@dataclass
class JudgeSummary:
    """One dataset's cascade (paper §2.1): tier-1 verdicts per negative, the negatives tier 1 flagged
    (better / worse: what forwards an instance to tier 2), and tier 2's verdicts on what it re-judged."""

    dataset: str
    tier1_negatives: int = 0
    tier1_verdicts: dict[str, int] = field(default_factory=dict)
    tier1_flagged: int = 0
    tier2_instances: int = 0
    tier2_negatives: int = 0
    tier2_verdicts: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class VariantEffect:
    """What a variant did to one dataset's pruned instances (paper §3): instances kept / dropped, negatives
    removed from the kept instances (gone from the instance: `hn_remove`'s false negatives, the `worse` ones of
    `s2_rlhn_filter`, TopK-PercPos's drops) and passages that were negatives and are now positives (`rlhn`, the
    `better` ones of `s2_rlhn_filter`). A negative counts in one of the two, never both."""

    dataset: str
    variant: str
    pruned: int
    kept: int
    dropped: int
    negatives_removed: int
    relabeled_positives: int


@dataclass(frozen=True)
class RelabelExample:
    dataset: str
    instance_id: str
    query_id: str
    query: str
    docid: str
    passage: str
    tier2_score: float | None


def judge_summary(conn) -> list[JudgeSummary]:
    if not has_table(conn, "judgments"):
        return []
    out: dict[str, JudgeSummary] = {}
    for ds, tier, verdict, n in conn.execute(
        "SELECT dataset, tier, verdict, count(*) FROM judgments GROUP BY ALL ORDER BY ALL"
    ).fetchall():
        s = out.setdefault(ds, JudgeSummary(ds))
        if tier == 1:
            s.tier1_negatives += n
            s.tier1_verdicts[verdict] = n
            s.tier1_flagged += n if verdict in ("better", "worse") else 0
        elif tier == 2:
            s.tier2_negatives += n
            s.tier2_verdicts[verdict] = n
    for ds, n in conn.execute(
        "SELECT dataset, count(DISTINCT instance_id) FROM judgments WHERE tier = 2 GROUP BY 1"
    ).fetchall():
        out[ds].tier2_instances = n
    return [out[d] for d in sorted(out)]


def variant_effects(conn) -> list[VariantEffect]:
    """relabeled_instances compared with pruned_instances, instance by instance, in SQL."""
    if not (has_table(conn, "relabeled_instances") and has_table(conn, "pruned_instances")):
        return []
    rows = conn.execute("""
        WITH p AS (SELECT dataset, count(*) AS n FROM pruned_instances GROUP BY 1),
        e AS (SELECT r.dataset, r.variant, count(*) AS kept,
                     coalesce(sum(len(list_filter(p.negative_ids,
                                                  lambda x: NOT list_contains(r.negative_ids, x)
                                                            AND NOT list_contains(r.positive_ids, x)))), 0)
                       AS removed,
                     coalesce(sum(len(list_filter(r.positive_ids, lambda x: NOT list_contains(p.positive_ids, x)))), 0)
                       AS relabeled
              FROM relabeled_instances r JOIN pruned_instances p USING (dataset, instance_id) GROUP BY ALL)
        SELECT e.dataset, e.variant, p.n, e.kept, p.n - e.kept, e.removed, e.relabeled
        FROM e JOIN p USING (dataset)""").fetchall()
    return sorted(
        (VariantEffect(*(r[:2]), *(int(x) for x in r[2:])) for r in rows),
        key=lambda v: (v.dataset, model_sort_key(v.variant)),
    )


def _clip(s: str | None, n: int) -> str:
    s = " ".join((s or "").split())
    return s if len(s) <= n else s[: n - 1].rstrip() + "…"


def relabel_examples(conn, n: int = 5, variant: str = "s2_rlhn", max_chars: int = 200) -> list[RelabelExample]:
    """Up to ``n`` passages that ``variant`` moved from the negatives to the positives, highest tier-2 score
    first (ties by dataset, instance, docid), so the same data always shows the same examples."""
    need = ("relabeled_instances", "pruned_instances", "judgments", "raw_queries", "raw_passages")
    if n <= 0 or not all(has_table(conn, t) for t in need):
        return []
    rows = conn.execute(
        """
        WITH moved AS (
            SELECT r.dataset, r.instance_id, r.query_id,
                   unnest(list_filter(r.positive_ids, lambda x: NOT list_contains(p.positive_ids, x))) AS docid
            FROM relabeled_instances r JOIN pruned_instances p USING (dataset, instance_id)
            WHERE r.variant = $1),
        t2 AS (SELECT dataset, instance_id, docid, max(score) AS score FROM judgments WHERE tier = 2 GROUP BY ALL),
        passages AS (SELECT dataset, docid, any_value(title) AS title, any_value(text) AS text
                     FROM raw_passages SEMI JOIN moved USING (dataset, docid) GROUP BY ALL),
        queries AS (SELECT dataset, query_id, any_value(query) AS query
                    FROM raw_queries SEMI JOIN moved USING (dataset, query_id) GROUP BY ALL)
        SELECT m.dataset, m.instance_id, m.query_id, q.query, m.docid, ps.title, ps.text, t2.score
        FROM moved m LEFT JOIN t2 USING (dataset, instance_id, docid)
        LEFT JOIN queries q USING (dataset, query_id) LEFT JOIN passages ps USING (dataset, docid)
        ORDER BY t2.score DESC NULLS LAST, m.dataset, m.instance_id, m.docid LIMIT $2""",
        [variant, n],
    ).fetchall()
    out = []
    for ds, iid, qid, query, docid, title, text, score in rows:
        passage = f"{title}: {text}" if title else (text or "")
        out.append(RelabelExample(ds, iid, qid, _clip(query, max_chars), docid, _clip(passage, max_chars), score))
    return out


# ----------------------------------------------------------------------------------------- 5. training runs
@dataclass(frozen=True)
class TrainingRun:
    kind: str
    variant: str
    seed: int | None
    queries: int | None
    train_rows: int | None
    steps: int | None
    final_loss: float | None
    seconds: float | None
    settings: dict
    sizes: dict


def training_runs(conn) -> list[TrainingRun]:
    """The latest trained model per (kind, variant, seed) from trained_models; [] when the table is absent."""
    if not has_table(conn, "trained_models"):
        return []
    rows = conn.execute("""
        SELECT kind, variant, seed, queries, train_rows, steps, final_loss, seconds, settings_json,
               training_set_sizes_json
        FROM trained_models
        QUALIFY row_number() OVER (PARTITION BY kind, variant, seed
                                   ORDER BY trained_at DESC NULLS LAST) = 1""").fetchall()

    def js(s):
        try:
            return json.loads(s) if s else {}
        except (TypeError, ValueError):
            return {}

    runs = [TrainingRun(*r[:8], js(r[8]), js(r[9])) for r in rows]
    return sorted(
        runs,
        key=lambda r: (
            STAGES.index(r.kind) if r.kind in STAGES else 9,
            r.kind,
            model_sort_key(r.variant),
            r.seed is None,
            r.seed or 0,
        ),
    )


# ------------------------------------------------------------------------------------------- the report
@dataclass
class Report:
    summaries: dict[str, StageSummary]
    deltas: dict[str, dict[tuple[str, str], Delta]]  # stage -> vs default (every model, base too)
    deltas_vs_base: dict[str, dict[tuple[str, str], Delta]]  # stage -> default vs base ("does training work")
    judge: list[JudgeSummary] = field(default_factory=list)
    effects: list[VariantEffect] = field(default_factory=list)
    examples: list[RelabelExample] = field(default_factory=list)
    runs: list[TrainingRun] = field(default_factory=list)
    n_boot: int = 2000
    boot_seed: int = 0


def build_report(conn, *, n_boot: int = 2000, boot_seed: int = 0, n_examples: int = 5) -> Report:
    """Everything the report shows, from the tables on ``conn``."""
    summaries = summarize_scores(load_scores(conn))
    deltas, vs_base = {}, {}
    for stage, s in summaries.items():
        deltas[stage] = compute_deltas(
            s, paired_query_diffs(conn, stage, REF, s.eval_sets), REF, n_boot=n_boot, seed=boot_seed
        )
        vs_base[stage] = compute_deltas(
            s, paired_query_diffs(conn, stage, BASE, s.eval_sets), BASE, [REF], n_boot=n_boot, seed=boot_seed
        )
    return Report(
        summaries,
        deltas,
        vs_base,
        judge_summary(conn),
        variant_effects(conn),
        relabel_examples(conn, n_examples),
        training_runs(conn),
        n_boot,
        boot_seed,
    )


def report_metadata(rep: Report) -> dict[str, float | int]:
    """Numeric Dagster metadata: per stage (reranker keys prefixed ``reranker_``) the Avg nDCG@10 mean / std /
    seeds per model, every model's Avg delta vs default with its CI, and default vs base on Avg and per eval set."""
    md: dict[str, float | int] = {}
    for stage, s in rep.summaries.items():
        p = "" if stage == "retriever" else f"{stage}_"
        for m in s.models:
            c = s.cells.get((m, AVG, "ndcg_at_10"))
            if c is not None:
                md[f"{p}avg_ndcg@10_{m}"] = round(c.mean, 4)
                md[f"{p}n_seeds_{m}"] = c.n
                if c.std is not None:
                    md[f"{p}avg_ndcg@10_std_{m}"] = round(c.std, 4)
        for (m, e), d in list(rep.deltas.get(stage, {}).items()) + list(rep.deltas_vs_base.get(stage, {}).items()):
            key = f"{p}delta_{m}_vs_{d.ref}" + ("" if e == AVG else f"_{e}")
            if e != AVG and d.ref != BASE:
                continue  # per eval set only the "does training work" figure; the rest is in the CSV
            md[key] = round(d.delta, 2)
            if d.has_ci:
                md[f"{key}_ci_low"], md[f"{key}_ci_high"] = round(d.ci_low, 2), round(d.ci_high, 2)
    return md


# ----------------------------------------------------------------------------------------------- markdown
def _cell(stat: Stat | None, n_usual: int | None) -> str:
    if stat is None:
        return "–"
    s = f"{stat.mean:.3f}" + (f" ± {stat.std:.3f}" if stat.std is not None else "")
    return s + (f" (n={stat.n})" if n_usual is not None and stat.n != n_usual else "")


def _delta_cell(d: Delta | None) -> str:
    if d is None:
        return "–"
    if not d.has_ci:
        return f"{_pts(d.delta)} (no CI)"
    return f"{_pts(d.delta)} [{_pts(d.ci_low)}, {_pts(d.ci_high)}]" + (" *" if d.excludes_zero else "")


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    """A markdown table; a column whose cells are all numbers (or '–') is right-aligned, the first never."""
    esc = lambda v: str(v).replace("|", "\\|").replace("\n", " ")  # noqa: E731

    def numeric(i):
        return i > 0 and all(
            isinstance(r[i], (int, float)) or str(r[i]) == "–" or str(r[i])[:1] in "+−-0123456789" for r in rows
        )

    return [
        "| " + " | ".join(headers) + " |",
        "|" + "|".join("---:" if numeric(i) else "---" for i in range(len(headers))) + "|",
    ] + ["| " + " | ".join(esc(v) for v in r) + " |" for r in rows]


def _fmt(v: Any, spec: str = "") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return format(v, spec) if spec else str(v)


def to_markdown(rep: Report, header: Mapping[str, Any] | None = None) -> str:
    out: list[str] = ["## Comparison report (paper Table 3 shape)", ""]
    if header:
        out += [f"- **{k}**: {v}" for k, v in header.items()] + [""]
    for stage, s in rep.summaries.items():
        out.append(f"### {stage.capitalize()}\n")
        if s.dropped_eval_sets:
            out.append(
                f"_Eval sets not every model has, left out (and out of Avg): {', '.join(s.dropped_eval_sets)}._\n"
            )
        if not s.eval_sets:
            out.append("_No eval set is shared by every model._\n")
            continue
        for metric in METRICS:
            n_usual = {m: (s.cells[(m, AVG, metric)].n if (m, AVG, metric) in s.cells else None) for m in s.models}
            out.append(f"#### {stage.capitalize()} {METRIC_LABELS[metric]} (mean ± std over seeds)\n")
            rows = [
                [f"**{e}**" if e == AVG else e] + [_cell(s.cells.get((m, e, metric)), n_usual[m]) for m in s.models]
                for e in s.eval_sets + [AVG]
            ]
            rows.append(["seeds"] + [_fmt(n_usual[m]) for m in s.models])
            out += _table(["eval set"] + s.models, rows) + [""]
        deltas = rep.deltas.get(stage, {})
        others = [m for m in s.models if m != REF]
        if REF in s.models and others:
            out.append(f"#### {stage.capitalize()} nDCG@10 vs {REF}, points, 95% CI\n")
            out.append(
                f"Paired bootstrap over queries (B = {rep.n_boot}, seed {rep.boot_seed}): each query's "
                "nDCG@10 is averaged over a model's seeds, the per-query differences are resampled; "
                "Avg resamples within every eval set and averages. The interval covers query sampling; "
                "seed-to-seed spread is the ± std above. * = the interval excludes 0.\n"
            )
            out += _table(
                ["eval set"] + others,
                [
                    [f"**{e}**" if e == AVG else e] + [_delta_cell(deltas.get((m, e))) for m in others]
                    for e in s.eval_sets + [AVG]
                ],
            ) + [""]
        sentences = [delta_sentence(deltas[(m, AVG)]) for m in others if m != BASE and (m, AVG) in deltas]
        vs_base = rep.deltas_vs_base.get(stage, {})
        sentences += [delta_sentence(vs_base[(REF, e)]) for e in s.eval_sets + [AVG] if (REF, e) in vs_base]
        if sentences:
            out.append(f"#### {stage.capitalize()}: what the intervals allow\n")
            out += [f"- {x}." for x in sentences] + [""]
    out += _judge_markdown(rep)
    out += _runs_markdown(rep.runs)
    return "\n".join(out).rstrip() + "\n"


def _judge_markdown(rep: Report) -> list[str]:
    out: list[str] = []
    if not (rep.judge or rep.effects or rep.examples):
        return out
    out.append("### What the judge did\n")
    if rep.judge:
        out.append(
            "Tier 1 judges every negative; an instance with a negative flagged `better`/`worse` (or an "
            "`error`, by default) goes to tier 2, whose verdict is final (paper §2.1).\n"
        )
        out += _table(
            [
                "dataset",
                "tier-1 negatives",
                "tier-1 flagged (better+worse)",
                "tier-1 errors",
                "instances to tier 2",
                "tier-2 negatives",
            ]
            + [f"tier-2 {v}" for v in TIER2_VERDICTS],
            [
                [
                    j.dataset,
                    j.tier1_negatives,
                    j.tier1_flagged,
                    j.tier1_verdicts.get("error", 0),
                    j.tier2_instances,
                    j.tier2_negatives,
                ]
                + [j.tier2_verdicts.get(v, 0) for v in TIER2_VERDICTS]
                for j in rep.judge
            ],
        ) + [""]
    if rep.effects:
        out.append(
            "Per variant, against the pruned instances (paper §3): instances kept and dropped, negatives "
            "removed from the kept instances (gone from the instance), former negatives now positives "
            "(relabeled: no longer negatives, not counted as removed).\n"
        )
        out += _table(
            ["dataset", "variant", "kept", "dropped", "negatives removed", "relabeled as positives"],
            [
                [v.dataset, v.variant, v.kept, v.dropped, v.negatives_removed, v.relabeled_positives]
                for v in rep.effects
            ],
        ) + [""]
    if rep.examples:
        out.append("Relabeled pairs in `s2_rlhn` (former negative now a positive), highest tier-2 score first:\n")
        out += _table(
            ["dataset", "query", "former negative", "tier-2 score"],
            [[x.dataset, x.query, x.passage, _fmt(x.tier2_score, ".3f")] for x in rep.examples],
        )
        out.append("")
    return out


def _runs_markdown(runs: Sequence[TrainingRun]) -> list[str]:
    if not runs:
        return []
    out = ["### Training runs\n"]
    out += _table(
        ["kind", "variant", "seed", "queries", "per dataset", "train rows", "steps", "final loss", "seconds"],
        [
            [
                r.kind,
                r.variant,
                _fmt(r.seed),
                _fmt(r.queries),
                ", ".join(f"{k} {n}" for k, n in sorted(r.sizes.items())) or "–",
                _fmt(r.train_rows),
                _fmt(r.steps),
                _fmt(r.final_loss, ".4f"),
                _fmt(r.seconds, ".0f"),
            ]
            for r in runs
        ],
    ) + [""]
    groups: dict[str, list[str]] = {}
    for r in runs:
        key = ", ".join(f"{k} {r.settings[k]}" for k in SETTING_KEYS if k in r.settings)
        groups.setdefault(key, []).append(f"{r.kind} {r.variant} seed {r.seed}")
    if len(groups) == 1:
        out.append(f"Settings (every run): {next(iter(groups)) or '–'}\n")
    else:  # not one setting for all: say which runs used which
        out.append("Settings differ between runs:\n")
        out += [f"- {k or '–'}: {'; '.join(v)}" for k, v in groups.items()] + [""]
    return out


# --------------------------------------------------------------------------------------------------- CSV
def csv_rows(rep: Report) -> list[tuple]:
    """Long format (CSV_HEADER). delta_vs_default is in points: for nDCG@10 the paired per-query mean difference
    (what the CI brackets), for the other metrics the difference of the seed means (no CI: no per-query data)."""
    out = []
    for stage, s in rep.summaries.items():
        deltas = rep.deltas.get(stage, {})
        for m in s.models:
            for e in s.eval_sets + [AVG]:
                for metric in METRICS:
                    c = s.cells.get((m, e, metric))
                    if c is None:
                        continue
                    delta = lo = hi = None
                    ref = s.cells.get((REF, e, metric))
                    if m != REF and metric == "ndcg_at_10" and (m, e) in deltas:
                        d = deltas[(m, e)]
                        delta, lo, hi = d.delta, d.ci_low, d.ci_high
                    elif m != REF and ref is not None:
                        delta = 100 * (c.mean - ref.mean)
                    out.append((stage, m, e, metric, c.mean, c.std, c.n, delta, lo, hi))
    return out


def write_csv(rep: Report, path: Path) -> None:
    def f(v, spec):
        return "" if v is None else format(v, spec)

    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(CSV_HEADER)
        for stage, m, e, metric, mean, std, n, delta, lo, hi in csv_rows(rep):
            w.writerow(
                [stage, m, e, metric, f(mean, ".6f"), f(std, ".6f"), n, f(delta, ".4f"), f(lo, ".4f"), f(hi, ".4f")]
            )


# ------------------------------------------------------------------------------------------------- charts
def grouped_bar_png(
    panels: list[tuple[str, list[str], dict[str, list[float]]]],
    *,
    ylabel: str = "",
    hlines: tuple[tuple[float, str], ...] = (),
    panel_width: float = 7.0,
) -> bytes:
    """Grouped bars, one panel per (title, group labels, {series label: one value per group})."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(panel_width * len(panels), 4), squeeze=False)
    for ax, (title, groups, series) in zip(axes[0], panels):
        width = 0.8 / max(len(series), 1)
        for i, (label, values) in enumerate(series.items()):
            ax.bar([x + i * width for x in range(len(groups))], values, width, label=label)
        for y, style in hlines:
            ax.axhline(y, ls=style, c="gray")
        ax.set_xticks([x + width * (len(series) - 1) / 2 for x in range(len(groups))], groups)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend(fontsize=7, ncol=2)
    return figure_png(fig)


def figure_png(fig) -> bytes:
    """A matplotlib figure as PNG bytes (tight layout, 100 dpi); the figure is closed."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def chart_png(rep: Report) -> bytes:
    """Per stage two panels: nDCG@10 mean per eval set and model with ± std (over seeds) error bars, and the
    delta vs default in points with its 95% CI as whiskers (the figure the conclusions rest on)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = [s for s in rep.summaries.values() if s.eval_sets] or list(rep.summaries.values())[:1]
    fig, axes = plt.subplots(max(len(stages), 1), 2, figsize=(14, 4 * max(len(stages), 1)), squeeze=False)
    for row, s in zip(axes, stages):
        groups = s.eval_sets + [AVG]
        for ax, models, delta in ((row[0], s.models, False), (row[1], [m for m in s.models if m != REF], True)):
            width = 0.8 / max(len(models), 1)
            for i, m in enumerate(models):
                xs = [g + i * width for g in range(len(groups))]
                if delta:
                    ds = [rep.deltas.get(s.stage, {}).get((m, e)) for e in groups]
                    ys = [d.delta if d else 0.0 for d in ds]
                    err = [
                        [d.delta - d.ci_low if d and d.has_ci else 0 for d in ds],
                        [d.ci_high - d.delta if d and d.has_ci else 0 for d in ds],
                    ]
                else:
                    cs = [s.cells.get((m, e, "ndcg_at_10")) for e in groups]
                    ys = [c.mean if c else 0.0 for c in cs]
                    err = [c.std if c and c.std is not None else 0 for c in cs]
                ax.bar(xs, ys, width, yerr=err, capsize=2, label=m, color=_color(m))
            ax.set_xticks([g + width * (len(models) - 1) / 2 for g in range(len(groups))], groups)
            if delta:
                ax.axhline(0, c="gray", lw=0.8)
                ax.set_ylabel(f"nDCG@10 − {REF} (points)")
                ax.set_title(f"{s.stage}: delta vs {REF}, 95% paired-bootstrap CI")
            else:
                ax.set_ylabel("nDCG@10")
                ax.set_title(f"{s.stage}: nDCG@10, mean ± std over seeds")
            if models:  # below the axes: never over a bar
                ax.legend(fontsize=7, ncol=min(len(models), 4), loc="upper center", bbox_to_anchor=(0.5, -0.1))
    return figure_png(fig)


def _color(model: str):
    """One colour per model in every panel (tab10 by MODEL_ORDER position)."""
    import matplotlib

    return matplotlib.colormaps["tab10"](model_sort_key(model)[0] % 10)


def png_markdown(png: bytes, alt: str = "nDCG@10 by eval set and model") -> str:
    """A PNG inlined as a data URI: Dagster renders it in markdown metadata."""
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})"
