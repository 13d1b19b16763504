"""Calibration of a judge: a small logistic model over the signals available for each (query, negative) pair,
so the cut is a probability of "a human would call this relevant" that means the same across models/datasets.

Signals (``FEATURES``): the LLM judge's own score (P(yes) or expected grade), the packaged MiniLM's cosine of
the query to the negative and to the best positive (and their difference), and the negative's rank in its mined
list as a share of the list. Fitted on a labeled judge-eval file (``fit``), stored as a small JSON artifact
(``Calibrator.save``: coefficients, feature means/stds, what it was fitted on, a version that is part of the
verdict metadata), applied by ``CalibratedJudge`` around any one-call-per-negative judge.

Plain module (no Dagster); scikit-learn fits the model.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

FEATURES = ("llm_score", "cos_query_negative", "cos_query_positive", "cos_margin", "rank_share")


@dataclass
class Calibrator:
    """``P(relevant) = sigmoid(intercept + sum coef_i * (x_i - mean_i) / std_i)``."""

    features: list[str]
    coef: list[float]
    intercept: float
    mean: list[float]
    std: list[float]
    judge: dict = field(default_factory=dict)  # kind, model, prompt family of the LLM score it calibrates
    fitted_on: dict = field(default_factory=dict)  # file, sha256, split, rows, positives
    created: str = ""

    @property
    def version(self) -> str:
        """Content hash of the coefficients: any refit changes it (and with it the verdict metadata)."""
        blob = json.dumps([self.features, self.coef, self.intercept, self.mean, self.std], sort_keys=True)
        return "cal-" + hashlib.sha256(blob.encode()).hexdigest()[:10]

    def predict_proba(self, rows: Sequence[Sequence[float]]) -> np.ndarray:
        x = (np.asarray(rows, dtype=float) - np.asarray(self.mean)) / np.asarray(self.std)
        z = x @ np.asarray(self.coef) + self.intercept
        return 1.0 / (1.0 + np.exp(-z))

    def save(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**asdict(self), "version": self.version}, indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: Path) -> Calibrator:
        try:
            d = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: not a calibration file ({e})") from e
        stored = d.pop("version", None)
        try:
            c = cls(**d)
        except TypeError as e:
            raise ValueError(f"{path}: not a calibration file ({e})") from e
        if stored and stored != c.version:
            raise ValueError(f"{path}: version {stored} does not match its coefficients ({c.version}); refit it")
        return c


def fit(
    rows: Sequence[Sequence[float]],
    labels: Sequence[int],
    *,
    features: Sequence[str] = FEATURES,
    judge: dict | None = None,
    fitted_on: dict | None = None,
    c: float = 1.0,
) -> Calibrator:
    """L2-regularised logistic regression on standardised features (scikit-learn)."""
    from sklearn.linear_model import LogisticRegression

    x = np.asarray(rows, dtype=float)
    y = np.asarray(labels, dtype=int)
    if x.ndim != 2 or x.shape[1] != len(features) or len(y) != len(x):
        raise ValueError(f"need rows of {len(features)} features and one label per row")
    if len(set(y.tolist())) < 2:
        raise ValueError("calibration needs both relevant and non-relevant examples")
    mean = x.mean(axis=0)
    std = np.where(x.std(axis=0) > 0, x.std(axis=0), 1.0)
    model = LogisticRegression(C=c, max_iter=1000).fit((x - mean) / std, y)
    return Calibrator(
        list(features),
        [float(v) for v in model.coef_[0]],
        float(model.intercept_[0]),
        [float(v) for v in mean],
        [float(v) for v in std],
        judge or {},
        {**(fitted_on or {}), "rows": int(len(y)), "positives": int(y.sum())},
        time.strftime("%Y-%m-%dT%H:%M:%S"),
    )


def embedding_features(encoder, instances) -> dict[tuple[str, str], tuple[float, float, float, float]]:
    """(cos(q, negative), cos(q, best positive), their difference, rank share) per (instance_id, docid), with
    the packaged MiniLM (normalized embeddings, so the dot product is the cosine)."""
    from rlhn_assets.lib.mining import passage_text

    texts: dict[str, str] = {}
    for inst in instances:
        for p in inst.positives + inst.negatives:
            texts.setdefault(p.docid, passage_text({"title": p.title, "text": p.text}))
    ids = list(texts)
    p_emb = encoder.encode(
        [texts[i] for i in ids],
        batch_size=64,
        normalize_embeddings=True,
        convert_to_numpy=True,
        show_progress_bar=False,
    )
    q_emb = encoder.encode(
        [inst.query for inst in instances],
        batch_size=64,
        normalize_embeddings=True,
        convert_to_numpy=True,
        show_progress_bar=False,
    )
    row = {d: i for i, d in enumerate(ids)}
    out = {}
    for qi, inst in enumerate(instances):
        q = q_emb[qi]
        best_pos = float(max(np.dot(p_emb[row[p.docid]], q) for p in inst.positives))
        n = len(inst.negatives)
        for k, neg in enumerate(inst.negatives):
            c = float(np.dot(p_emb[row[neg.docid]], q))
            out[(inst.instance_id, neg.docid)] = (c, best_pos, c - best_pos, k / max(1, n - 1))
    return out


class CalibratedJudge:
    """Any one-call-per-negative judge (pointwise / graded) whose score is mapped through a :class:`Calibrator`
    together with the embedding signals; ``worse`` at P(relevant) >= threshold_relevant, ``better`` at >=
    threshold_better. The inner judge's LLM requests (and their cache keys) are unchanged; the calibrator's
    version is part of this judge's ``prompt_version``, which the verdicts record."""

    def __init__(
        self, inner, encoder, calibrator: Calibrator, *, threshold_relevant: float = 0.5, threshold_better: float = 0.8
    ):
        if calibrator.features != list(FEATURES):
            raise ValueError(f"calibrator features {calibrator.features} != {list(FEATURES)}")
        want = calibrator.judge
        if want and (want.get("kind"), want.get("prompt")) != (inner.kind, inner.prompt_version):
            raise ValueError(
                f"the calibration was fitted for {want}, not for a {inner.kind} judge with prompt "
                f"{inner.prompt_version}"
            )
        self.inner, self.encoder, self.calibrator = inner, encoder, calibrator
        self.threshold_relevant, self.threshold_better = threshold_relevant, threshold_better
        self.kind = f"{inner.kind}+calibrated"
        self.model = inner.model
        self.model_identity = inner.model_identity
        self.prompt_version = f"{inner.prompt_version}+{calibrator.version}"
        self.stats = inner.stats
        self.client = getattr(inner, "client", None)  # the endpoint (a started local server or a remote one)

    def requests_for(self, instances):
        return self.inner.requests_for(instances)

    def fork(self):
        """This judge on a fork of the inner one (own stats; client, encoder and calibrator shared)."""
        import copy

        twin = copy.copy(self)
        twin.inner = self.inner.fork()
        twin.stats = twin.inner.stats
        return twin

    def judge(self, instances, progress=None):
        import dataclasses

        raw = self.inner.judge(instances, progress=progress)
        feats = embedding_features(self.encoder, instances)
        ok = [j for j in raw if j.verdict != "error" and j.score is not None]
        probs = self.calibrator.predict_proba([(j.score, *feats[(j.instance_id, j.docid)]) for j in ok]) if ok else []
        by_key = {(j.instance_id, j.docid): float(p) for j, p in zip(ok, probs)}
        out = []
        for j in raw:
            p = by_key.get((j.instance_id, j.docid))
            if p is None:
                out.append(j)
                continue
            v = "better" if p >= self.threshold_better else "worse" if p >= self.threshold_relevant else "not_relevant"
            out.append(
                dataclasses.replace(
                    j, verdict=v, score=round(p, 6), detail=f"raw score {j.score:.4g}; {self.calibrator.version}"
                )
            )
        # the inner judge counted its raw verdicts of this call: replace them by the calibrated ones
        for j in raw:
            self.stats.verdicts[j.verdict] -= 1
        self.stats.count(out)
        return out
