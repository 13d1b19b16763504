"""Tune the offline (`local`) judge cascade on a human-labeled set (default: the bundled TREC DL19 file).

    .venv/bin/python scripts/tune_local_judges.py [--judges MODEL:KIND:PROMPT,...] [--models M,...]
        [--listwise-queries 8] [--demo-negatives 900] [--budget-seconds 420] [--max-share 0.7]

What it measures, with the pipeline's own judges (lib/judging) and the LLM response cache (re-runs are free):
* tier 1 = embedding margin, for each margin of a coarse grid;
* each local model as a *pointwise* judge on every labeled negative, once: P(yes) per (query, negative).
  A pointwise verdict depends on nothing but its own pair, so the cascade "tier 1 flags -> tier 2 re-judges
  the flagged negatives" at any (margin, threshold) is computed exactly from these two passes, without
  re-running anything; "tier 2 alone" is the forwarding rule `instance` on this set (every query has a flag);
* each ``--judges`` spec (``model:kind:prompt``; kinds ``pointwise`` / ``graded``, prompts of
  lib/judging/prompts.py) the same way: its score (P(yes), or the expected 0-3 grade) on every labeled negative;
* each of those scores *calibrated*: a logistic model over the score and the MiniLM signals
  (lib/judging/calibration.py) fitted on the tuning half only, then cut at P(relevant) thresholds; the artifact
  is written to data/calibration/dl19-<model>-<prompt>.json (the preset can point at it);
* the *listwise* kind for the 1.5B model on the first N queries only (one call per 25 negatives takes
  ~10-20 s on this machine; it is reported on those queries next to pointwise on the same queries).

Selection rule (stated before looking; few knobs; guards against over-fitting DL19):
* grids: margin {0.05, 0.08, 0.12, 0.16, 0.20}, threshold P(yes) >= {0.1, 0.2, 0.3, 0.4, 0.5}, models as given;
* the queries are split in two halves (alternating by query order): every configuration is *chosen* on the
  tuning half and *reported* on the held-out half and on all queries;
* a configuration is admissible when its projected tier-2 time for the demo (`--demo-negatives` x tier-2
  share x measured seconds per call) fits `--budget-seconds` (the demo's ~20-minute budget, minus the rest)
  and it sends at most `--max-share` of the negatives to the LLM;
* pick the admissible configuration with the highest tuning-half kappa; ties (within 0.005) go to the
  cheaper one (fewer tier-2 seconds).

Every row carries a 95% bootstrap CI of kappa (resampling queries) on each half. Writes
data/reports/judge_tuning.{md,csv,json}; prints the markdown table.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rlhn_assets import settings  # noqa: E402
from rlhn_assets.lib.agreement import binary_scores, bootstrap_ci, load_judge_eval  # noqa: E402
from rlhn_assets.resources import JudgeTierResource  # noqa: E402

MARGINS = (0.05, 0.08, 0.12, 0.16, 0.20)
THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5)
THRESHOLDS_BY_KIND = {
    "pointwise": (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7),
    "graded": (0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.25, 2.5),
    "calibrated": (0.3, 0.4, 0.5, 0.6, 0.7),
}
DEFAULT_JUDGES = (
    "qwen2.5-coder-1.5b:pointwise:plain-v1,qwen2.5-coder-1.5b:graded:graded-ref-v1,qwen2.5-coder-1.5b:graded:graded-v1"
)
FLAG = ("better", "worse")


def median_latency(cache: str, keys: list[str]) -> float:
    """Median recorded latency (s) of these responses: the cost per call, also on a fully cached re-run."""
    import duckdb

    keys = [k for k in keys if k]
    if not keys:
        return float("nan")
    with duckdb.connect(cache, read_only=True) as conn:
        return conn.execute(
            "SELECT median(latency_s) FROM llm_responses WHERE list_contains($1, key)", [keys]
        ).fetchall()[0][0] or float("nan")


def tier1_flags(instances, margin: float) -> tuple[dict, float]:
    t0 = time.perf_counter()
    res = JudgeTierResource(tier=1, kind="embedding_margin", margin=margin)
    with res.open_judge() as j:
        v = {(r.instance_id, r.docid): r.verdict in FLAG for r in j.judge(instances)}
    return v, time.perf_counter() - t0


def judge_scores(instances, model: str, kind: str, prompt: str, cache: str, log) -> tuple[dict, float, int]:
    """The judge's score per (query, negative) (P(yes) or expected grade) and the median seconds per call."""
    res = JudgeTierResource(
        tier=2,
        kind=kind,
        model=model + "-instruct",
        local_model=model,
        temperature=0.0,
        concurrency=1,
        pointwise_prompt=prompt,
        cache_path=cache,
        **({"threshold_relevant": 1.5, "threshold_better": 2.5} if kind == "graded" else {}),
    )
    with res.open_judge(log=log) as j:
        t0 = time.perf_counter()
        rows = j.judge(instances, progress=log)
        secs, calls = time.perf_counter() - t0, j.stats.calls
    scores = {(r.instance_id, r.docid): (r.score if r.score is not None else -1.0) for r in rows}
    errors = sum(1 for r in rows if r.verdict == "error")
    per_call = median_latency(cache, [r.response_key for r in rows])
    log(
        f"{model} {kind} {prompt}: {len(rows)} negatives, {calls} uncached calls in {secs:.0f}s (median "
        f"{per_call:.2f} s/call, load avg {os.getloadavg()[0]:.1f}), {errors} errors"
    )
    return scores, per_call, errors


def calibrated_scores(instances, keys, tune_keys, raw: dict, gold: dict, spec: dict, path: Path, log) -> dict:
    """Fit the calibration on the tuning half only; P(relevant) for every key. Saves the artifact."""
    from rlhn_assets.lib.embeddings import load_model
    from rlhn_assets.lib.judging.calibration import embedding_features, fit

    feats = embedding_features(load_model(), instances)
    x = {k: (raw[k], *feats[k]) for k in keys}
    cal = fit(
        [x[k] for k in tune_keys],
        [gold[k] for k in tune_keys],
        judge={"kind": spec["kind"], "prompt": spec["prompt"], "model": spec["model"]},
        fitted_on={
            "file": "judge_eval/dl19/judge_eval.tasb_top30.jsonl.gz",
            "split": "tuning half (alternating queries, even positions)",
        },
    )
    cal.save(path)
    log(
        f"calibration {path.name}: {cal.version}, "
        f"coefficients {dict(zip(cal.features, (round(c, 3) for c in cal.coef)))}"
    )
    probs = cal.predict_proba([x[k] for k in keys])
    return {k: float(p) for k, p in zip(keys, probs)}


def listwise_verdicts(instances, model: str, cache: str, log) -> tuple[dict, float, int]:
    res = JudgeTierResource(
        tier=2,
        kind="listwise",
        prompt_family="tier2",
        model=model + "-instruct",
        local_model=model,
        temperature=0.0,
        concurrency=1,
        max_tokens=512,
        response_format_style="json_schema",
        local_ctx_size=8192,
        cache_path=cache,
        # an unparsable answer counts as an error (reported) instead of a slow re-ask
        max_parse_retries=0,
        max_retries=1,
        timeout_s=300,
    )
    with res.open_judge(log=log) as j:
        t0 = time.perf_counter()
        rows = j.judge(instances, progress=log)
        secs = time.perf_counter() - t0
        calls = j.stats.calls
    per_call = median_latency(cache, list({r.response_key for r in rows}))
    errors = sum(1 for r in rows if r.verdict == "error")
    log(
        f"{model} listwise: {len(rows)} negatives, {calls} uncached calls in {secs:.0f}s (median {per_call:.1f} "
        f"s/call, load avg {os.getloadavg()[0]:.1f}), {errors} errors"
    )
    return {(r.instance_id, r.docid): r.verdict for r in rows}, per_call, errors


def score(keys, gold, pred) -> dict:
    g, p = [gold[k] for k in keys], [int(pred[k]) for k in keys]
    s = binary_scores(g, p)
    lo, hi = bootstrap_ci(g, p, [k[0] for k in keys], n_boot=500)["kappa"]
    return {
        "kappa": round(s.kappa, 3),
        "kappa_ci": f"[{lo:.2f}, {hi:.2f}]",
        "P": round(s.precision, 3),
        "R": round(s.recall, 3),
        "F1": round(s.f1, 3),
        "flagged": s.predicted,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--path", default=str(settings.data_dir() / "judge_eval/dl19/judge_eval.tasb_top30.jsonl.gz"))
    ap.add_argument("--fn-min-grade", type=int, default=2)
    ap.add_argument(
        "--models",
        default="",
        help="models measured with the original pointwise-v1 prompt "
        "(the README's earlier rows; e.g. qwen2.5-coder-0.5b,qwen2.5-coder-1.5b)",
    )
    ap.add_argument("--judges", default=DEFAULT_JUDGES, help="model:kind:prompt,... (kind pointwise | graded)")
    ap.add_argument("--max-share", type=float, default=0.70, help="largest share of negatives sent to the LLM")
    ap.add_argument("--listwise-model", default="qwen2.5-coder-1.5b")
    ap.add_argument("--listwise-queries", type=int, default=8, help="0 = skip the listwise measurement")
    ap.add_argument("--demo-negatives", type=int, default=900, help="negatives the demo's tier 1 judges")
    ap.add_argument("--budget-seconds", type=float, default=420.0, help="tier-2 time the demo can spend")
    ap.add_argument(
        "--cache",
        default=str(settings.cache_dir() / "llm_tuning.duckdb"),
        help="LLM response cache (its own file: a running pipeline holds the main one)",
    )
    ap.add_argument("--out", default=str(settings.data_dir() / "reports"))
    args = ap.parse_args()
    log = lambda m: print(m, flush=True)  # noqa: E731

    data = load_judge_eval(Path(args.path))
    instances = data.instances
    keys = [(i.instance_id, n.docid) for i in instances for n in i.negatives]
    gold = {k: int(data.grades[k] >= args.fn_min_grade) for k in keys}
    halves = {"tune": [k for k in keys if [i.instance_id for i in instances].index(k[0]) % 2 == 0]}
    halves["held-out"] = [k for k in keys if k not in set(halves["tune"])]
    halves["all"] = keys
    log(
        f"{len(instances)} queries, {len(keys)} judged negatives, {sum(gold.values())} human false negatives "
        f"(grade >= {args.fn_min_grade}); tuning half {len(halves['tune'])}, held-out half {len(halves['held-out'])}"
    )

    rows = []
    t1 = {}
    for m in MARGINS:
        t1[m], secs = tier1_flags(instances, m)
        share = sum(t1[m].values()) / len(keys)
        rows.append(
            {
                "configuration": f"tier 1 margin {m}",
                "kind": "tier1",
                "margin": m,
                "model": "",
                "threshold": "",
                "tier2_share": round(share, 3),
                "s_per_call": 0.0,
                "tier2_demo_s": 0.0,
                "seconds": round(secs, 1),
                **{f"{h}_{k}": v for h in halves for k, v in score(halves[h], gold, t1[m]).items()},
            }
        )
        log(rows[-1]["configuration"] + f": kappa all {rows[-1]['all_kappa']}")

    def threshold_rows(name: str, model: str, sc: dict, thresholds, what: str, per_call: float, errors: int):
        """'tier 2 alone' and every 'cascade: margin m ->' row of one judge's scores at each threshold."""
        for thr in thresholds:
            alone = {k: sc[k] >= thr for k in keys}
            rows.append(
                {
                    "configuration": f"tier 2 alone: {name} {what} >= {thr}",
                    "kind": "tier2_alone",
                    "margin": "",
                    "model": model,
                    "judge": name,
                    "threshold": thr,
                    "tier2_share": 1.0,
                    "s_per_call": round(per_call, 3),
                    "tier2_demo_s": round(args.demo_negatives * per_call),
                    "seconds": round(len(keys) * per_call, 1),
                    "errors": errors,
                    **{f"{h}_{k}": v for h in halves for k, v in score(halves[h], gold, alone).items()},
                }
            )
            for m in MARGINS:
                cascade = {k: t1[m][k] and sc[k] >= thr for k in keys}
                share = sum(t1[m].values()) / len(keys)
                rows.append(
                    {
                        "configuration": f"cascade: margin {m} -> {name} {what} >= {thr}",
                        "kind": "cascade",
                        "margin": m,
                        "model": model,
                        "judge": name,
                        "threshold": thr,
                        "tier2_share": round(share, 3),
                        "s_per_call": round(per_call, 3),
                        "tier2_demo_s": round(args.demo_negatives * share * per_call),
                        "seconds": round(sum(t1[m].values()) * per_call, 1),
                        "errors": errors,
                        **{f"{h}_{k}": v for h in halves for k, v in score(halves[h], gold, cascade).items()},
                    }
                )

    # the original prompt (pointwise-v1), kept for the earlier rows of the README
    pscores = {}
    for model in [m for m in args.models.split(",") if m]:
        p, per_call, errors = judge_scores(instances, model, "pointwise", "pointwise-v1", args.cache, log)
        pscores[model] = p
        threshold_rows(f"{model} pointwise", model, p, THRESHOLDS, "P(yes)", per_call, errors)

    all_scores: dict[str, dict] = {}
    for spec_s in [j for j in args.judges.split(",") if j]:
        model, kind, prompt = spec_s.split(":")
        raw, per_call, errors = judge_scores(instances, model, kind, prompt, args.cache, log)
        all_scores[spec_s] = raw
        spec = {"model": model, "kind": kind, "prompt": prompt}
        cal_path = settings.data_dir() / "calibration" / f"dl19-{model}-{prompt}.json"
        threshold_rows(f"{model} {kind} {prompt}", model, raw, THRESHOLDS_BY_KIND[kind], "score", per_call, errors)
        calibrated = calibrated_scores(instances, keys, halves["tune"], raw, gold, spec, cal_path, log)
        threshold_rows(
            f"{model} {kind} {prompt} calibrated",
            model,
            calibrated,
            THRESHOLDS_BY_KIND["calibrated"],
            "P(relevant)",
            per_call,
            errors,
        )

    admissible = [
        r
        for r in rows
        if r["tier2_demo_s"] <= args.budget_seconds and (r["kind"] == "tier1" or r["tier2_share"] <= args.max_share)
    ]
    best_kappa = max(r["tune_kappa"] for r in admissible)
    chosen = min((r for r in admissible if r["tune_kappa"] >= best_kappa - 0.005), key=lambda r: r["tier2_demo_s"])
    log(
        f"chosen by the rule: {chosen['configuration']} (tuning kappa {chosen['tune_kappa']}, held-out "
        f"{chosen['held-out_kappa']}, all {chosen['all_kappa']})"
    )

    listwise = []
    if args.listwise_queries:
        sub = instances[: args.listwise_queries]
        sub_keys = [(i.instance_id, n.docid) for i in sub for n in i.negatives]
        m = chosen["margin"] if chosen["margin"] != "" else 0.12
        flagged = [
            dataclasses.replace(i, negatives=tuple(n for n in i.negatives if t1[m][(i.instance_id, n.docid)]))
            for i in sub
        ]
        flagged = [i for i in flagged if i.negatives]
        v, per_call, errors = listwise_verdicts(flagged, args.listwise_model, args.cache, log)
        lw = {k: t1[m][k] and v.get(k) in FLAG for k in sub_keys}
        listwise.append(
            {
                "configuration": f"cascade: margin {m} -> {args.listwise_model} listwise (first {len(sub)} queries)",
                "s_per_call": round(per_call, 1),
                "errors": errors,
                **score(sub_keys, gold, lw),
            }
        )
        thr = chosen["threshold"] if chosen["threshold"] != "" else 0.1
        for model, p in pscores.items():
            pw = {k: t1[m][k] and p[k] >= thr for k in sub_keys}
            per = next(r["s_per_call"] for r in rows if r["model"] == model)
            listwise.append(
                {
                    "configuration": f"same queries, cascade: margin {m} -> {model} pointwise P(yes) >= {thr}",
                    "s_per_call": per,
                    "errors": 0,
                    **score(sub_keys, gold, pw),
                }
            )
        listwise.append(
            {
                "configuration": f"same queries, tier 1 margin {m} alone",
                "s_per_call": 0.0,
                "errors": 0,
                **score(sub_keys, gold, {k: t1[m][k] for k in sub_keys}),
            }
        )

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cols = [
        "configuration",
        "tune_kappa",
        "tune_kappa_ci",
        "held-out_kappa",
        "held-out_kappa_ci",
        "all_kappa",
        "all_P",
        "all_R",
        "all_F1",
        "all_flagged",
        "tier2_share",
        "s_per_call",
        "tier2_demo_s",
    ]
    with open(out / "judge_tuning.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=sorted({k for r in rows for k in r}))
        w.writeheader()
        w.writerows(rows)
    md = [
        f"DL19 ({len(instances)} queries, {len(keys)} negatives, {sum(gold.values())} human FN). Rule: highest "
        f"tuning-half kappa among configurations whose projected demo tier-2 time ({args.demo_negatives} negatives x "
        f"share x s/call) <= {args.budget_seconds:.0f} s and tier-2 share <= {args.max_share}; ties within 0.005 -> "
        "cheaper. CIs: 95% bootstrap over the half's queries.",
        "",
        "| " + " | ".join(cols) + " |",
        "|---|" + "---:|" * (len(cols) - 1),
    ]
    for r in sorted(rows, key=lambda r: -r["all_kappa"]):
        mark = " **(chosen)**" if r is chosen else ""
        md.append("| " + " | ".join([r["configuration"] + mark] + [str(r.get(c, "")) for c in cols[1:]]) + " |")
    if listwise:
        md += [
            "",
            "Listwise vs pointwise on the same queries:",
            "",
            "| configuration | kappa | P | R | F1 | flagged | s/call | errors |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in listwise:
            md.append(
                f"| {r['configuration']} | {r['kappa']} | {r['P']} | {r['R']} | {r['F1']} | {r['flagged']} | "
                f"{r['s_per_call']} | {r['errors']} |"
            )
    (out / "judge_tuning.md").write_text("\n".join(md) + "\n")
    # every judge's raw score per labeled negative, so the grid can be re-analysed without an LLM
    import gzip

    with gzip.open(out / "judge_tuning_scores.csv.gz", "wt", newline="") as f:
        w = csv.writer(f)
        w.writerow(["query_id", "docid", "human_grade", "judge", "score"])
        for spec_s, sc in {**{f"{m}:pointwise:pointwise-v1": p for m, p in pscores.items()}, **all_scores}.items():
            w.writerows([k[0], k[1], data.grades[k], spec_s, round(v, 6)] for k, v in sc.items())
    (out / "judge_tuning.json").write_text(json.dumps({"chosen": chosen, "rows": rows, "listwise": listwise}, indent=1))
    print("\n".join(md))


if __name__ == "__main__":
    main()
