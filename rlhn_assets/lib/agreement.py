"""Agreement of a judge with human relevance labels: precision / recall / F1 of false-negative detection
and Cohen's kappa, on binary labels (1 = a false negative, i.e. a relevant passage recorded as negative)."""

from __future__ import annotations

import gzip
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from rlhn_assets.lib.judging.judges import Instance, Passage


@dataclass(frozen=True)
class BinaryScores:
    n: int
    positives: int  # gold false negatives
    predicted: int
    tp: int
    precision: float
    recall: float
    f1: float
    kappa: float
    accuracy: float


def binary_scores(gold: Sequence[int], pred: Sequence[int]) -> BinaryScores:
    """Conventions for degenerate inputs: precision = 0 when nothing is predicted positive, recall = 0 when
    there is no gold positive, F1 = 0 when both are 0; kappa = 1 when both raters agree on every item and
    chance agreement is 1 (both constant, same class), the 0/0 case where sklearn returns NaN."""
    if len(gold) != len(pred):
        raise ValueError(f"{len(gold)} gold labels but {len(pred)} predictions")
    n = len(gold)
    if n == 0:
        raise ValueError("no labels to compare")
    tp = sum(1 for g, p in zip(gold, pred) if g and p)
    pos, predicted = sum(1 for g in gold if g), sum(1 for p in pred if p)
    agree = sum(1 for g, p in zip(gold, pred) if bool(g) == bool(p))
    precision = tp / predicted if predicted else 0.0
    recall = tp / pos if pos else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    po = agree / n
    pe = (pos / n) * (predicted / n) + (1 - pos / n) * (1 - predicted / n)
    kappa = 1.0 if pe == 1.0 else (po - pe) / (1 - pe)
    return BinaryScores(n, pos, predicted, tp, precision, recall, f1, kappa, po)


@dataclass(frozen=True)
class LabeledSet:
    instances: list[Instance]
    grades: dict[tuple[str, str], int]  # (instance_id, docid) -> human grade
    unjudged_excluded: int


def load_judge_eval(path: Path) -> LabeledSet:
    """A Tevatron file whose negatives carry a human ``qrel`` grade (null = unjudged, excluded)."""
    instances, grades, skipped = [], {}, 0
    with gzip.open(path, "rt", encoding="utf-8") if str(path).endswith(".gz") else open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                qid = str(r["query_id"])
                pos = tuple(Passage(str(p["docid"]), p.get("title") or "", p["text"]) for p in r["positive_passages"])
                negs = []
                for p in r["negative_passages"]:
                    if p.get("qrel") is None:
                        skipped += 1
                        continue
                    negs.append(Passage(str(p["docid"]), p.get("title") or "", p["text"]))
                    grades[(qid, str(p["docid"]))] = int(p["qrel"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{path}:{n}: not a judge-eval row ({e})") from e
            if pos and negs:
                instances.append(Instance(qid, r["query"], pos, tuple(negs)))
    return LabeledSet(instances, grades, skipped)


def bootstrap_ci(
    gold: Sequence[int],
    pred: Sequence[int],
    groups: Sequence[str],
    *,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap confidence intervals of kappa, precision, recall and F1, resampling *queries*
    (``groups``: the query of each judged negative) with replacement, since a query's negatives are not
    independent. Deterministic for a given seed. ``{"kappa": (lo, hi), "precision": ..., "recall": ..., "f1": ...}``."""
    import numpy as np

    if not (len(gold) == len(pred) == len(groups)):
        raise ValueError("gold, pred and groups must have the same length")
    g = np.asarray(gold, dtype=bool)
    p = np.asarray(pred, dtype=bool)
    keys, inverse = np.unique(np.asarray(groups, dtype=object).astype(str), return_inverse=True)
    # per-query counts: tp, gold positives, predicted positives, items, agreements
    per_q = np.zeros((len(keys), 5))
    np.add.at(per_q, inverse, np.stack([g & p, g, p, np.ones_like(g), g == p], axis=1).astype(float))
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(keys), size=(n_boot, len(keys)))
    # multiplicity of each query in each bootstrap sample, times the per-query counts
    counts = np.zeros((n_boot, len(keys)))
    np.add.at(counts, (np.repeat(np.arange(n_boot), len(keys)), draws.ravel()), 1.0)
    tot = counts @ per_q
    tp, pos, prd, n, agree = tot.T
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(prd > 0, tp / prd, 0.0)
        recall = np.where(pos > 0, tp / pos, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
        po = agree / n
        pe = (pos / n) * (prd / n) + (1 - pos / n) * (1 - prd / n)
        kappa = np.where(pe == 1.0, 1.0, (po - pe) / (1 - pe))
    lo_q, hi_q = (1 - level) / 2 * 100, (1 + level) / 2 * 100
    return {
        name: (float(np.percentile(v, lo_q)), float(np.percentile(v, hi_q)))
        for name, v in (("kappa", kappa), ("precision", precision), ("recall", recall), ("f1", f1))
    }


def score_aucs(gold: Sequence[int], scores: Sequence[float | None]) -> dict[str, float | None]:
    """ROC-AUC and PR-AUC (average precision) of a judge's continuous score against the gold labels
    (scikit-learn); None when the judge gave no score for some item or only one class is present."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    if not scores or any(s is None for s in scores) or len(set(int(bool(x)) for x in gold)) < 2:
        return {"roc_auc": None, "pr_auc": None}
    return {"roc_auc": float(roc_auc_score(gold, scores)), "pr_auc": float(average_precision_score(gold, scores))}
