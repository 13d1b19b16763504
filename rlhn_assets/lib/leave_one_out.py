"""Leave-one-dataset-out pruning (the paper's Fig. 4 / Table 12): the rule and the report, no training here.

A retriever is trained on ALL source datasets and once more without each dataset; every model is scored on
the eval sets. The rule (stated once, in ``PruningRule.describe``) turns the score deltas into keep/prune:

* prune a dataset when leaving it out changes the average nDCG@10 by at least ``-avg_tolerance`` (equal or
  better: the data did not help), unless
* leaving it out lowers one of its in-domain eval sets by more than ``in_domain_tolerance`` (the paper keeps
  FiQA, NQ and SciDocsRR for their BEIR counterparts although the average barely moves).

With the paper's defaults (0.2 and 1.0 nDCG points) the rule reproduces all 15 keep/prune decisions of the
paper's Table 12 (a test checks this on the paper's numbers). The recommendation is written in the shape
``pruning.load_recommendation`` reads; a manual ``keep:`` in the registry still wins.
"""

from __future__ import annotations

from dataclasses import dataclass, field

EPS = 1e-9  # table values are rounded to 3 decimals: -0.002 must count as ">= -0.002"


@dataclass(frozen=True)
class PruningRule:
    avg_tolerance: float = 0.002  # nDCG@10 (0.2 points)
    in_domain_tolerance: float = 0.010  # nDCG@10 (1.0 point)

    def describe(self) -> str:
        return (
            f"prune when leaving the dataset out changes average nDCG@10 by >= "
            f"{-self.avg_tolerance * 100:+.1f} points and lowers none of its in-domain eval sets by more "
            f"than {self.in_domain_tolerance * 100:.1f} points; keep otherwise"
        )


@dataclass
class LeaveOneOutRow:
    dataset: str
    train_queries: int  # training queries of the model trained without this dataset
    scores: dict[str, float]  # eval set -> nDCG@10 without this dataset
    average: float
    delta_average: float  # vs ALL
    deltas: dict[str, float]  # eval set -> delta vs ALL
    up_1pt: int  # eval sets more than 1 point better than ALL
    down_1pt: int  # eval sets more than 1 point worse than ALL
    in_domain: dict[str, float] = field(default_factory=dict)  # in-domain eval set -> delta vs ALL
    keep: bool = True
    reason: str = ""


def average(scores: dict[str, float], eval_sets: list[str]) -> float:
    missing = [e for e in eval_sets if e not in scores]
    if missing:
        raise ValueError(f"no score for eval sets {missing}")
    return sum(scores[e] for e in eval_sets) / len(eval_sets)


def in_domain_sets(dataset: str, configured: tuple[str, ...], eval_sets: list[str]) -> list[str]:
    """The eval sets a dataset is in-domain for: the configured ones, else the eval set of the same name."""
    wanted = list(configured) or [dataset]
    return [e for e in wanted if e in eval_sets]


def recommend(
    all_scores: dict[str, float],
    without: dict[str, dict[str, float]],
    eval_sets: list[str],
    in_domain: dict[str, list[str]],
    train_queries: dict[str, int],
    rule: PruningRule,
) -> list[LeaveOneOutRow]:
    """One row per left-out dataset (in the order of ``without``), with the rule's decision and reason."""
    avg_all = average(all_scores, eval_sets)
    rows = []
    for ds, scores in without.items():
        avg = average(scores, eval_sets)
        deltas = {e: scores[e] - all_scores[e] for e in eval_sets}
        own = {e: deltas[e] for e in in_domain.get(ds, [])}
        d_avg = avg - avg_all
        hurt_own = {e: d for e, d in own.items() if d < -rule.in_domain_tolerance - EPS}
        if d_avg < -rule.avg_tolerance - EPS:
            keep, reason = True, f"leaving it out lowers the average by {-d_avg * 100:.1f} points"
        elif hurt_own:
            keep = True
            reason = "in-domain: leaving it out lowers " + ", ".join(
                f"{e} by {-d * 100:.1f} points" for e, d in hurt_own.items()
            )
        else:
            keep = False
            reason = f"leaving it out changes the average by {d_avg * 100:+.1f} points" + (
                "; in-domain " + ", ".join(f"{e} {d * 100:+.1f}" for e, d in own.items()) if own else ""
            )
        rows.append(
            LeaveOneOutRow(
                dataset=ds,
                train_queries=train_queries.get(ds, 0),
                scores=dict(scores),
                average=avg,
                delta_average=d_avg,
                deltas=deltas,
                up_1pt=sum(d > 0.01 + EPS for d in deltas.values()),
                down_1pt=sum(d < -0.01 - EPS for d in deltas.values()),
                in_domain=own,
                keep=keep,
                reason=reason,
            )
        )
    return rows


def recommendation_doc(rows: list[LeaveOneOutRow], rule: PruningRule, provenance: dict) -> dict:
    """The JSON document ``pruning.load_recommendation`` reads (``data/pruning/recommendation.json``)."""
    return {
        "rule": rule.describe(),
        "provenance": provenance,
        "datasets": {
            r.dataset: {"keep": r.keep, "reason": r.reason, "delta_average_ndcg@10": round(r.delta_average, 4)}
            for r in rows
        },
    }


def to_markdown(
    eval_sets: list[str],
    base: dict[str, float] | None,
    all_scores: dict[str, float],
    all_queries: int,
    rows: list[LeaveOneOutRow],
    rule: PruningRule,
) -> str:
    """A table shaped like the paper's Table 12: one row per setting, nDCG@10 per eval set, the average,
    its delta vs ALL, how many eval sets moved by more than +-1 point, and the decision."""
    head = ["setting (train queries)"] + eval_sets + ["Avg", "Δ Avg", "+1pt", "−1pt", "keep?", "why"]
    lines = [
        "| " + " | ".join(head) + " |",
        "|---|" + "|".join("---:" for _ in eval_sets) + "|---:|---:|---:|---:|---|---|",
    ]

    def cells(scores: dict[str, float]) -> list[str]:
        return [f"{scores[e]:.3f}" for e in eval_sets] + [f"**{average(scores, eval_sets):.3f}**"]

    if base is not None:
        lines.append("| base model (0) | " + " | ".join(cells(base) + ["", "", "", "", ""]) + " |")
    lines.append(f"| ALL ({all_queries:,}) | " + " | ".join(cells(all_scores) + ["", "", "", "", ""]) + " |")
    for r in rows:
        lines.append(
            f"| w/o {r.dataset} ({r.train_queries:,}) | "
            + " | ".join(
                cells(r.scores)
                + [
                    f"{r.delta_average * 100:+.1f}",
                    str(r.up_1pt),
                    str(r.down_1pt),
                    "yes" if r.keep else "**no**",
                    r.reason,
                ]
            )
            + " |"
        )
    return f"Rule: {rule.describe()}.\n\n" + "\n".join(lines)


def write_csv(rows: list[LeaveOneOutRow], all_scores: dict[str, float], eval_sets: list[str], path) -> None:
    import csv

    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["setting", "train_queries"] + eval_sets + ["avg", "delta_avg", "keep", "reason"])
        w.writerow(
            ["ALL", ""]
            + [f"{all_scores[e]:.4f}" for e in eval_sets]
            + [f"{average(all_scores, eval_sets):.4f}", "", "", ""]
        )
        for r in rows:
            w.writerow(
                [f"w/o {r.dataset}", r.train_queries]
                + [f"{r.scores[e]:.4f}" for e in eval_sets]
                + [f"{r.average:.4f}", f"{r.delta_average:.4f}", r.keep, r.reason]
            )


def delta_chart_png(rows: list[LeaveOneOutRow]) -> bytes:
    """Fig. 4-like bars: change of the average nDCG@10 (points) when each dataset is left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rlhn_assets.lib.report import figure_png

    fig, ax = plt.subplots(figsize=(6, 0.5 * len(rows) + 1.2))
    names = [f"w/o {r.dataset}" for r in rows]
    values = [r.delta_average * 100 for r in rows]
    ax.barh(names, values, color=["tab:green" if not r.keep else "tab:gray" for r in rows])
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlabel("Δ average nDCG@10 vs ALL (points); green = recommended prune")
    ax.invert_yaxis()
    return figure_png(fig)
