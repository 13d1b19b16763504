"""`dataset_pruning`: the leave-one-dataset-out study (paper Fig. 4 / Table 12) that recommends which source
datasets the `pruned` stage keeps. Training/eval code is the same as the trained_* and eval_scores stages'."""

import functools
import json
import os
import time
from pathlib import Path

import dagster as dg

from rlhn_assets import settings
from rlhn_assets.defs.ingest.assets import raw_bge
from rlhn_assets.defs.sources.assets import retriever_base_model
from rlhn_assets.defs.train.assets import TrainConfig, _settings
from rlhn_assets.lib.pruning import RECOMMENDATION_FILE
from rlhn_assets.resources import BaseModelsResource, DatasetRegistryResource, RLHNDuckDB


class LeaveOneOutConfig(dg.Config):
    train: TrainConfig = TrainConfig()
    eval_sets: list[str] = []  # empty = every eval set under data/eval/
    eval_max_seq_length: int | None = None  # None = the base's own (256 for the packaged MiniLM)
    max_instances_per_dataset: int | None = None  # a sample for quick studies (the first N by instance id)
    avg_tolerance: float = 0.002  # nDCG@10; see lib/leave_one_out.py for the rule
    in_domain_tolerance: float = 0.010
    # Write data/pruning/recommendation.json (the `pruned` stage follows it unless the registry says keep:).
    # False = report only (the demo: 8 training steps are too few to decide anything).
    apply: bool = True


def _train_cached(label: str, instances, train_settings, base, log) -> tuple[str, str]:
    """(model path, data version) of the study's model ``label`` ("all", "without-<dataset>"), through the same
    model store as trained_retriever (lib/model_store.py): its input key covers the texts, the settings, the base
    model (weights + prompts) and the training code, so a re-run with unchanged inputs trains nothing."""
    from rlhn_assets.defs.train.assets import model_store, train_one
    from rlhn_assets.lib.model_store import input_key

    store, variant, seed = model_store(), f"leave-one-out-{label}", train_settings.seed
    key = input_key("retriever", train_settings.identity(), base.identity, instances)
    found = store.find("retriever", variant, seed, key)
    if found:
        log(f"  reusing {found['path']} (same training inputs and settings)")
        return found["path"], found["data_version"]
    staged = store.staging_dir("retriever", variant, seed)
    result = train_one("retriever", instances, train_settings, staged, base, log)
    path = store.publish(
        "retriever", variant, seed, staged, result.data_version, key, {"steps": result.steps, "queries": len(instances)}
    )
    return str(path), result.data_version


def _scores(
    model_path: str, version: str, datasets: dict, max_seq_length: int | None, base, device: str, log
) -> dict[str, float]:
    from rlhn_assets.lib.embeddings import load_model
    from rlhn_assets.lib.evaluation import dense_search, evaluate

    model = load_model(model_path, device=device)
    if max_seq_length:
        model.max_seq_length = max_seq_length
    out = {}
    for name, ds in datasets.items():
        # the same cache key as eval_scores, so the ALL / base models share embeddings with it when identical; the
        # base's prompts, which the trained models were trained with
        results, _ = dense_search(
            model,
            f"{version[:16]}:len{model.max_seq_length}",
            ds,
            cache_dir=settings.cache_dir() / "embeddings",
            progress=None,
            query_prompt=base.query_prompt,
            passage_prompt=base.passage_prompt,
        )
        out[name] = evaluate(ds.qrels, results)["ndcg@10"]
    log("  nDCG@10 " + ", ".join(f"{k} {v:.4f}" for k, v in out.items()))
    return out


@dg.asset(
    group_name="ingest",
    code_version="1",
    deps=[raw_bge, retriever_base_model],
    kinds={"pytorch", "beir"},
    pool="training",
    description=(
        "Leave-one-dataset-out study (the paper's Fig. 4 / Table 12): a retriever trained on ALL source datasets' "
        "raw instances and one trained without each dataset, scored on every eval set. Rule: prune a dataset when "
        "leaving it out changes the average nDCG@10 by >= -0.2 points and lowers none of its in-domain eval sets "
        "(registry `in_domain_eval`, default the eval set of the same name) by more than 1 point. Writes "
        "data/pruning/recommendation.json (read by `pruned`; a manual `keep:` wins) and leave_one_out.{md,csv}. "
        "No automation: it trains N+1 models, so it runs when you ask for it."
    ),
)
def dataset_pruning(
    context: dg.AssetExecutionContext,
    config: LeaveOneOutConfig,
    duckdb: RLHNDuckDB,
    registry: DatasetRegistryResource,
    base_models: BaseModelsResource,
) -> dg.MaterializeResult:
    from rlhn_assets.lib import leave_one_out as loo
    from rlhn_assets.lib.evaluation import list_eval_sets, load_beir_eval
    from rlhn_assets.lib.report import png_markdown
    from rlhn_assets.lib.training_data import load_training_instances

    reg = registry.load()
    eval_root = settings.data_dir() / "eval"
    eval_sets = list(config.eval_sets) or list_eval_sets(eval_root)
    unknown = [e for e in eval_sets if not (eval_root / e).is_dir()]
    if unknown or not eval_sets:
        raise dg.Failure(f"eval sets {unknown or '(none)'} not found under {eval_root}")
    evals = {e: load_beir_eval(eval_root / e, "test") for e in eval_sets}
    rule = loo.PruningRule(config.avg_tolerance, config.in_domain_tolerance)
    base, device = base_models.retriever_base(), base_models.resolved_device()
    # one seed: the study compares datasets, not seeds
    train_settings = _settings(config.train, config.train.seeds[0], base, device)
    max_neg = max(config.train.hard_negatives, 25)
    t0 = time.perf_counter()

    with duckdb.get_connection() as conn:
        all_instances, sizes = load_training_instances(
            conn, None, max_negatives=max_neg, max_per_dataset=config.max_instances_per_dataset
        )
    datasets = [d for d in reg.names if sizes.get(d)]
    if len(datasets) < 2:
        raise dg.Failure(f"leave-one-out needs at least 2 ingested datasets, found {datasets}: materialize raw_bge")
    steps = len(datasets) + 2
    context.log.info(f"[1/{steps}] base model {base.name} ({base.version})")
    score = functools.partial(
        _scores,
        datasets=evals,
        max_seq_length=config.eval_max_seq_length,
        base=base,
        device=device,
        log=context.log.info,
    )
    base_scores = score(str(base.path), base.identity)
    context.log.info(f"[2/{steps}] ALL: {len(all_instances):,} queries from {sizes}")
    path, version = _train_cached("all", all_instances, train_settings, base, context.log.info)
    all_scores = score(path, version)
    without, queries = {}, {}
    for i, ds in enumerate(datasets, 3):
        with duckdb.get_connection() as conn:
            inst, _ = load_training_instances(
                conn,
                None,
                max_negatives=max_neg,
                exclude_datasets=(ds,),
                max_per_dataset=config.max_instances_per_dataset,
            )
        context.log.info(f"[{i}/{steps}] without {ds}: {len(inst):,} queries")
        path, version = _train_cached(f"without-{ds}", inst, train_settings, base, context.log.info)
        without[ds], queries[ds] = score(path, version), len(inst)

    in_domain = {d: loo.in_domain_sets(d, reg.get(d).in_domain_eval, eval_sets) for d in datasets}
    rows = loo.recommend(all_scores, without, eval_sets, in_domain, queries, rule)
    md = loo.to_markdown(eval_sets, base_scores, all_scores, len(all_instances), rows, rule)
    out = (reg.data_dir / RECOMMENDATION_FILE).parent  # where `pruned` reads the recommendation
    out.mkdir(parents=True, exist_ok=True)
    (out / "leave_one_out.md").write_text(md + "\n")
    loo.write_csv(rows, all_scores, eval_sets, out / "leave_one_out.csv")
    png = loo.delta_chart_png(rows)
    (out / "leave_one_out.png").write_bytes(png)
    provenance = {
        "train": train_settings.to_dict(),
        "base_model": base.describe(),
        "eval_sets": eval_sets,
        "training_set_sizes": sizes,
        "max_instances_per_dataset": config.max_instances_per_dataset,
    }
    if config.apply:
        tmp = out / (Path(RECOMMENDATION_FILE).name + ".tmp")
        tmp.write_text(json.dumps(loo.recommendation_doc(rows, rule, provenance), indent=2) + "\n")
        os.replace(tmp, reg.data_dir / RECOMMENDATION_FILE)
        context.log.info(
            f"wrote {reg.data_dir / RECOMMENDATION_FILE}: the `pruned` stage follows it for "
            "datasets without a manual keep:"
        )
    manual = {d: reg.get(d).keep for d in datasets if reg.get(d).keep is not None}
    context.log.info("\n" + md)
    return dg.MaterializeResult(
        metadata={
            "leave_one_out": dg.MetadataValue.md(md),
            "chart": dg.MetadataValue.md(png_markdown(png, "change of average nDCG@10 when a dataset is left out")),
            "rule": rule.describe(),
            "recommended_prune": dg.MetadataValue.json(sorted(r.dataset for r in rows if not r.keep)),
            "manual_overrides": dg.MetadataValue.json(manual),
            "applied": config.apply,
            "avg_ndcg@10_all": round(loo.average(all_scores, eval_sets), 4),
            "models_trained": len(datasets) + 1,
            "seconds": round(time.perf_counter() - t0, 1),
            "report": dg.MetadataValue.path(str(out / "leave_one_out.md")),
        }
    )
