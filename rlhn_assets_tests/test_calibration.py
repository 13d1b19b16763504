"""Judge calibration (lib/judging/calibration.py): fit, versioned artifact, and the calibrated judge wrapper."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from rlhn_assets.lib.judging.calibration import FEATURES, CalibratedJudge, Calibrator, fit
from rlhn_assets.lib.judging.judges import Instance, JudgeStats, NegativeJudgment, Passage


def _data(n=400, seed=0):
    rnd = random.Random(seed)
    rows, y = [], []
    for _ in range(n):
        rel = rnd.random() < 0.4
        llm = min(1.0, max(0.0, rnd.gauss(0.65 if rel else 0.45, 0.2)))
        cos_n = rnd.gauss(0.6 if rel else 0.45, 0.1)
        cos_p = rnd.gauss(0.65, 0.05)
        rows.append((llm, cos_n, cos_p, cos_n - cos_p, rnd.random()))
        y.append(int(rel))
    return rows, y


def test_fit_predicts_better_than_chance_and_round_trips(tmp_path):
    rows, y = _data()
    cal = fit(rows, y, judge={"kind": "graded", "prompt": "graded-ref-v1"}, fitted_on={"file": "dl19", "split": "tune"})
    p = cal.predict_proba(rows)
    assert p.shape == (len(rows),) and ((0 < p) & (p < 1)).all()
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(y, p) > 0.75
    path = cal.save(tmp_path / "cal.json")
    back = Calibrator.load(path)
    assert back.version == cal.version and np.allclose(back.predict_proba(rows), p)
    assert json.loads(path.read_text())["fitted_on"]["rows"] == len(rows)
    # refit on other data -> another version; a hand-edited coefficient is refused
    assert fit(*_data(seed=1)).version != cal.version
    d = json.loads(path.read_text())
    d["coef"][0] += 1
    path.write_text(json.dumps(d))
    with pytest.raises(ValueError, match="does not match its coefficients"):
        Calibrator.load(path)


def test_fit_needs_both_classes():
    rows, _ = _data(20)
    with pytest.raises(ValueError, match="both"):
        fit(rows, [0] * 20)


class _Inner:
    kind = "graded"
    model = "m"
    model_identity = "gguf-sha256:test"
    prompt_version = "graded-ref-v1"

    def __init__(self, scores):
        self.scores = scores
        self.stats = JudgeStats()

    def judge(self, instances, progress=None):
        out = [
            NegativeJudgment(
                i.instance_id,
                n.docid,
                k,
                "not_relevant" if self.scores[n.docid] is not None else "error",
                self.scores[n.docid],
                "key",
            )
            for i in instances
            for k, n in enumerate(i.negatives, 1)
        ]
        self.stats.count(out)
        return out


class _Encoder:
    """Unit vectors: the query and 'near' passages share a direction, 'far' ones do not."""

    def encode(self, texts, **kw):
        vecs = [np.array([1.0, 0.0]) if ("near" in t or "query" in t) else np.array([0.0, 1.0]) for t in texts]
        return np.stack(vecs)


def test_calibrated_judge_uses_llm_score_and_embeddings():
    # a calibrator that puts all its weight on the LLM score: P = sigmoid(4 * (score - 1.5))
    cal = Calibrator(
        list(FEATURES),
        [4.0, 0, 0, 0, 0],
        0.0,
        [1.5, 0, 0, 0, 0],
        [1, 1, 1, 1, 1],
        judge={"kind": "graded", "prompt": "graded-ref-v1"},
    )
    inst = Instance(
        "q1",
        "query",
        (Passage("p", "", "near positive"),),
        (Passage("a", "", "near a"), Passage("b", "", "far b"), Passage("c", "", "far c")),
    )
    inner = _Inner({"a": 2.8, "b": 0.2, "c": None})
    j = CalibratedJudge(inner, _Encoder(), cal, threshold_relevant=0.5, threshold_better=0.999)
    out = j.judge([inst])
    assert [o.verdict for o in out] == ["worse", "not_relevant", "error"]
    assert out[0].score == pytest.approx(1 / (1 + np.exp(-4 * 1.3)), rel=1e-4)
    assert j.prompt_version == f"graded-ref-v1+{cal.version}" and cal.version in out[0].detail
    assert j.stats.verdicts["worse"] == 1 and j.stats.verdicts["not_relevant"] == 1 and j.stats.verdicts["error"] == 1
    # fitted for another judge: refused
    with pytest.raises(ValueError, match="fitted for"):
        CalibratedJudge(
            _Inner({}),
            _Encoder(),
            Calibrator(list(FEATURES), [0] * 5, 0, [0] * 5, [1] * 5, judge={"kind": "pointwise", "prompt": "plain-v1"}),
        )


def test_local_preset_points_at_a_matching_calibration():
    """The default preset's artifact loads, was fitted on DL19 only, and fits the judge the preset builds."""
    from types import SimpleNamespace

    from rlhn_assets.defs.resources import PRESETS
    from rlhn_assets.lib.judging.judges import GradedLLMJudge

    res = PRESETS["local"]["tier2_judge"]
    cal = res.load_calibrator()
    assert cal.fitted_on["file"].startswith("judge_eval/dl19/") and "tuning half" in cal.fitted_on["split"]
    inner = res.one_token_judge_class()(
        SimpleNamespace(settings=SimpleNamespace(model=res.model, identity="gguf-sha256:x")),
        family=res.pointwise_prompt,
    )
    assert isinstance(inner, GradedLLMJudge)
    judge = CalibratedJudge(
        inner, None, cal, threshold_relevant=res.threshold_relevant, threshold_better=res.threshold_better
    )
    assert judge.prompt_version == f"graded-ref-v1+{cal.version}"
    assert res.describe()["calibration"] == res.calibration
