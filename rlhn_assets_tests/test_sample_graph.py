"""The whole asset graph on the bundled sample, in process, as `make demo` runs it (at test sizes): every
stage materializes and every asset check passes. Uses the `local` preset's real judges
(embedding margin, then llama.cpp + Qwen2.5-Coder-1.5B graded and calibrated)."""

import shutil

import dagster as dg
import pytest
import yaml

from rlhn_assets_tests.conftest import tiny_beir_copy

TEST_TRAIN = {"max_steps": 1, "batch_size": 4, "hard_negatives": 2, "max_seq_length": 32}
TEST_CONFIG = {
    "ops": {
        "pruned": {"config": {"max_instances": 2, "max_negatives_per_instance": 4}},
        "dataset_pruning": {
            "config": {"train": TEST_TRAIN, "eval_max_seq_length": 64, "max_instances_per_dataset": 4, "apply": False}
        },
        "trained_retriever": {"config": TEST_TRAIN},
        "trained_reranker": {"config": TEST_TRAIN},
        "eval_scores": {"config": {"max_seq_length": 64, "rerank_top_k": 10}},
    }
}


@pytest.mark.llm
@pytest.mark.slow
def test_whole_sample_graph_materializes_with_every_asset_check_passing(tmp_data, tmp_path, instance, monkeypatch):
    from rlhn_assets import demo
    from rlhn_assets.definitions import defs

    # Small eval sets under the same names (the partitions), and SciFact's already-mined file used as is (its
    # mining inputs include the SciFact corpus that is cut here).
    for name in ("scifact", "cranfield", "cisi"):
        shutil.rmtree(tmp_data / "eval" / name)
        tiny_beir_copy(demo.settings.PROJECT_ROOT / "data" / "eval" / name, tmp_data / "eval" / name)
    reg = yaml.safe_load((tmp_data / "datasets.yaml").read_text())
    reg["datasets"]["scifact"].pop("mine")
    (tmp_data / "datasets.yaml").write_text(yaml.safe_dump(reg))
    monkeypatch.setenv("RLHN_DATA_DIR", str(tmp_data))
    monkeypatch.setenv("RLHN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("RLHN_DUCKDB", raising=False)
    monkeypatch.delenv("RLHN_REGISTRY", raising=False)

    d = defs()  # resources resolve the data directory now: everything lands in tmp_data
    variants = ("default", "s2_rlhn")
    timings, checks = demo.materialize_graph(d, instance, TEST_CONFIG, variants, log=lambda m: None)

    assert set(timings) == {",".join(k) for k, _ in demo.stages(variants)}
    assert checks >= 40  # every materialization ran its checks, and _run raised on any failure
    for asset in (
        "hard_negative_mining",
        "raw_bge",
        "pruned",
        "tier1_judgments",
        "tier2_judgments",
        "judging_cost_estimate",
        "relabeled",
        "trained_retriever",
        "trained_reranker",
        "base_retriever",
        "eval_model",
        "eval_scores",
        "comparison_report",
        "dataset_pruning",
    ):
        assert instance.get_latest_materialization_event(dg.AssetKey(asset)) is not None, asset
    report = (tmp_data / "reports" / "comparison.md").read_text()
    assert "| eval set | base | default | s2_rlhn |" in report and "**Avg**" in report
    assert (tmp_data / "pruning" / "leave_one_out.md").exists()
    assert not (tmp_data / "pruning" / "recommendation.json").exists()  # apply: false
