import dataclasses
import time

import dagster as dg

from rlhn_assets import settings
from rlhn_assets.lib.markdown import md_table
from rlhn_assets.resources import JudgeTierResource


class AgreementConfig(dg.Config):
    # Any human-labeled file in the judge-eval format (Tevatron rows whose negatives carry a `qrel` grade).
    path: str = "judge_eval/dl19/judge_eval.tasb_top30.jsonl.gz"  # relative to the data directory
    fn_min_grade: int = 2  # human grade >= this = a false negative (TREC: 2 highly, 3 perfectly relevant)
    # Which final verdicts count as a detected false negative (tier 1 always counts better + worse as a flag).
    fn_lists: str = "better+worse"
    forward_errors: bool = True
    tier2_standalone: bool = False  # also run tier 2 on every negative (costly), to measure it alone
    max_instances: int | None = None


def _ci(pair) -> str:
    return f"[{pair[0]:.3f}, {pair[1]:.3f}]"


def _scores_row(name, gold, pred, groups, stats, forwarded_share, seconds, cost, scores=None):
    """One table row: point estimates, 95% bootstrap CIs over queries (lib.agreement.bootstrap_ci) and, for a
    judge with a continuous score, ROC-AUC / PR-AUC."""
    from rlhn_assets.lib.agreement import binary_scores, bootstrap_ci, score_aucs

    sc = binary_scores(gold, pred)
    ci = bootstrap_ci(gold, pred, groups)
    auc = score_aucs(gold, scores) if scores is not None else {"roc_auc": None, "pr_auc": None}
    return [
        name,
        round(sc.kappa, 3),
        round(sc.precision, 3),
        round(sc.recall, 3),
        round(sc.f1, 3),
        _ci(ci["kappa"]),
        _ci(ci["precision"]),
        _ci(ci["recall"]),
        _ci(ci["f1"]),
        "-" if auc["roc_auc"] is None else round(auc["roc_auc"], 3),
        "-" if auc["pr_auc"] is None else round(auc["pr_auc"], 3),
        sc.predicted,
        sc.positives,
        sc.n,
        forwarded_share,
        stats.calls,
        stats.tokens_in,
        stats.tokens_out,
        round(cost, 4),
        round(seconds, 1),
    ]


HEADERS = [
    "judge",
    "kappa",
    "P",
    "R",
    "F1",
    "kappa 95% CI",
    "P 95% CI",
    "R 95% CI",
    "F1 95% CI",
    "ROC-AUC",
    "PR-AUC",
    "flagged",
    "human FN",
    "negatives",
    "tier-2 share",
    "calls",
    "tokens in",
    "tokens out",
    "USD",
    "seconds",
]


@dg.asset(
    group_name="judge",
    code_version="2",
    kinds={"openai", "markdown"},
    description=(
        "How well the configured judges agree with human assessors on a labeled file (default: TREC DL19, 43 "
        "queries x 30 dense-retriever negatives with NIST grades; grade >= 2 = false negative): precision, recall, "
        "F1 and Cohen's kappa (each with a 95% bootstrap CI over queries; ROC-AUC / PR-AUC for scored judges) of "
        "tier 1, of the cascade exactly as the pipeline runs it (and optionally tier 2 alone), the share of negatives "
        "forwarded to tier 2, and the cost. Paper: kappa vs humans GPT-4o-mini "
        "0.320, GPT-4o 0.390. Written to data/reports/judge_agreement.{md,csv,png}."
    ),
)
def judge_agreement(
    context: dg.AssetExecutionContext,
    config: AgreementConfig,
    tier1_judge: JudgeTierResource,
    tier2_judge: JudgeTierResource,
) -> dg.MaterializeResult:
    from rlhn_assets.lib.agreement import load_judge_eval

    path = settings.data_dir() / config.path
    try:
        data = load_judge_eval(path)
    except (FileNotFoundError, ValueError) as e:
        raise dg.Failure(f"{path}: {e}") from e
    instances = data.instances[: config.max_instances] if config.max_instances else data.instances
    keys = [(i.instance_id, n.docid) for i in instances for n in i.negatives]
    gold = [int(data.grades[k] >= config.fn_min_grade) for k in keys]
    groups = [iid for iid, _ in keys]  # the bootstrap resamples queries
    context.log.info(
        f"{len(instances)} queries, {len(keys)} judged negatives ({sum(gold)} human false negatives); "
        f"{data.unjudged_excluded} unjudged negatives excluded"
    )
    fn_set = {"better"} if config.fn_lists == "better" else {"better", "worse"}
    flag_set = {"better", "worse"} | ({"error"} if config.forward_errors else set())
    rows = []

    t0 = time.perf_counter()
    with tier1_judge.open_judge(log=context.log.info) as j1:
        r1 = j1.judge(instances, progress=context.log.info)
        v1 = {(r.instance_id, r.docid): r.verdict for r in r1}
        score1 = {(r.instance_id, r.docid): r.score for r in r1}
        s1 = j1.stats
    t1_secs = time.perf_counter() - t0
    rows.append(
        _scores_row(
            f"tier 1 ({tier1_judge.kind})",
            gold,
            [int(v1[k] in ("better", "worse")) for k in keys],
            groups,
            s1,
            "-",
            t1_secs,
            tier1_judge.cost_usd(s1.tokens_in, s1.tokens_out),
            scores=[score1.get(k) for k in keys],
        )
    )

    forwarded = {iid for (iid, _), v in v1.items() if v in flag_set}
    if tier2_judge.scope == "flagged_negatives":
        to_judge = [
            dataclasses.replace(i, negatives=tuple(n for n in i.negatives if v1[(i.instance_id, n.docid)] in flag_set))
            for i in instances
            if i.instance_id in forwarded
        ]
    else:
        to_judge = [i for i in instances if i.instance_id in forwarded]
    n_forwarded = sum(len(i.negatives) for i in to_judge)
    t0 = time.perf_counter()
    with tier2_judge.open_judge(log=context.log.info) as j2:
        v2 = (
            {(r.instance_id, r.docid): r.verdict for r in j2.judge(to_judge, progress=context.log.info)}
            if to_judge
            else {}
        )
        s2 = j2.stats
        final = [v2.get(k, v1[k]) for k in keys]
        share = round(n_forwarded / len(keys), 3)
        rows.append(
            _scores_row(
                f"cascade (tier 2: {tier2_judge.kind})",
                gold,
                [int(v in fn_set) for v in final],
                groups,
                s2,
                share,
                t1_secs + time.perf_counter() - t0,
                tier1_judge.cost_usd(s1.tokens_in, s1.tokens_out) + tier2_judge.cost_usd(s2.tokens_in, s2.tokens_out),
            )
        )
        if config.tier2_standalone:
            before = dataclasses.replace(j2.stats)
            t0 = time.perf_counter()
            ra = j2.judge(instances, progress=context.log.info)
            va = {(r.instance_id, r.docid): r.verdict for r in ra}
            score_a = {(r.instance_id, r.docid): r.score for r in ra}
            sa = j2.stats
            delta = dataclasses.replace(
                sa,
                calls=sa.calls - before.calls,
                tokens_in=sa.tokens_in - before.tokens_in,
                tokens_out=sa.tokens_out - before.tokens_out,
            )
            rows.append(
                _scores_row(
                    f"tier 2 alone ({tier2_judge.kind})",
                    gold,
                    [int(va[k] in fn_set) for k in keys],
                    groups,
                    delta,
                    1.0,
                    time.perf_counter() - t0,
                    tier2_judge.cost_usd(delta.tokens_in, delta.tokens_out),
                    scores=[score_a.get(k) for k in keys],
                )
            )

    table = md_table(HEADERS, rows)
    out = settings.data_dir() / "reports"
    out.mkdir(parents=True, exist_ok=True)
    (out / "judge_agreement.md").write_text(
        f"Judge agreement with human labels ({config.path}; FN = grade >= {config.fn_min_grade}; "
        f"final verdicts counted: {config.fn_lists}; 95% CIs: percentile bootstrap over the {len(instances)} queries, "
        f"1,000 resamples)\n\n{table}\n\nPaper (RLHN §7, 670 pairs): kappa GPT-4o-mini 0.320, GPT-4o 0.390.\n"
    )
    import csv

    with open(out / "judge_agreement.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(HEADERS)
        w.writerows(rows)
    from rlhn_assets.lib.report import grouped_bar_png, png_markdown

    # dotted / dashed: the paper's kappa of GPT-4o-mini / GPT-4o against humans
    png = grouped_bar_png(
        [
            (
                "agreement with human labels (dotted/dashed: paper kappa 4o-mini / 4o)",
                ["kappa", "P", "R", "F1"],
                {r[0]: list(r[1:5]) for r in rows},
            )
        ],
        hlines=((0.320, ":"), (0.390, "--")),
    )
    (out / "judge_agreement.png").write_bytes(png)

    context.log.info("\n" + table)
    return dg.MaterializeResult(
        metadata={
            "agreement": dg.MetadataValue.md(table),
            "chart": dg.MetadataValue.md(png_markdown(png)),
            "negatives": len(keys),
            "human_false_negatives": sum(gold),
            "unjudged_excluded": data.unjudged_excluded,
            "tier1": dg.MetadataValue.json(tier1_judge.describe()),
            "tier2": dg.MetadataValue.json(tier2_judge.describe()),
            "report_csv": dg.MetadataValue.path(str(out / "judge_agreement.csv")),
            **{f"kappa_{r[0].split(' ')[0]}": r[1] for r in rows},
        }
    )
