"""Every judge setting takes effect or does not exist (issue "Safe with money", item 3): typed, cross-checked
settings that fail when the resource is built or the run is launched, naming the field and the allowed values;
and `response_format_style` really makes the listwise judge ask for (and validate) a structured verdict."""

import json

import dagster as dg
import pytest
from pydantic import ValidationError

from rlhn_assets.lib.judging import prompts
from rlhn_assets.lib.judging.judges import ListwiseLLMJudge
from rlhn_assets.resources import ONE_TOKEN_PROMPTS, JudgeTierResource
from rlhn_assets_tests.test_judges import GOOD, _client, _instance


@pytest.mark.parametrize(
    "field,value,allowed",
    [
        ("kind", "pointwize", "'listwise', 'pointwise', 'graded' or 'embedding_margin'"),
        ("mode", "offline", "'online' or 'batch'"),
        ("scope", "flagged", "'instance' or 'flagged_negatives'"),
        ("response_format_style", "json", "'json_schema', 'json_object_schema' or 'none'"),
        ("prompt_family", "tier3", "'tier1', 'tier2' or 'scidocsrr'"),
        ("pointwise_prompt", "plain-v2", "'pointwise-v1'"),
    ],
)
def test_an_unknown_value_names_the_field_and_the_allowed_values(field, value, allowed):
    with pytest.raises(ValidationError) as e:
        JudgeTierResource(tier=2, **{field: value})
    msg = str(e.value)
    assert field in msg and allowed in msg and repr(value) in msg


@pytest.mark.parametrize(
    "settings,needle",
    [
        ({"kind": "pointwise", "threshold_relevant": 1.5}, "threshold_relevant = 1.5 is outside 0..1"),
        ({"kind": "graded", "threshold_better": 3.5}, "threshold_better = 3.5 is outside 0..3"),
        ({"kind": "graded", "calibration": "c.json", "threshold_better": 1.5}, "outside 0..1"),
        ({"kind": "pointwise", "threshold_relevant": 0.8, "threshold_better": 0.5}, "must be >= threshold_relevant"),
        ({"kind": "pointwise", "pointwise_prompt": "graded-v1"}, "not a pointwise prompt"),
        ({"kind": "listwise", "pointwise_prompt": "plain-v1"}, "would ignore it"),
        ({"kind": "listwise", "calibration": "c.json"}, "calibration applies to"),
        ({"tier": 1, "scope": "flagged_negatives"}, "tier 2 only"),
        ({"margin": 1.5}, "margin"),
        ({"tier": 3}, "tier"),
        ({"concurrency": 0}, "concurrency"),
        ({"max_error_rate": 2.0}, "max_error_rate"),
        ({"local_model": "qwen2.5-coder-0.5b", "mode": "batch"}, "local_model tier runs online"),
    ],
)
def test_inconsistent_or_out_of_range_settings_fail_when_built(settings, needle):
    with pytest.raises(ValidationError, match=None) as e:
        JudgeTierResource(**{"tier": 2, **settings})
    assert needle in str(e.value)


def test_valid_settings_of_every_preset_build():
    from rlhn_assets.defs.resources import PRESETS

    for preset in PRESETS.values():
        for res in preset.values():
            JudgeTierResource(**res.model_dump())  # the validator accepts what we ship


def test_the_prompt_lists_match_the_prompt_module():
    assert ONE_TOKEN_PROMPTS == {"pointwise": prompts.POINTWISE_PROMPTS, "graded": prompts.GRADED_PROMPTS}


def test_a_wrong_value_in_the_launchpad_fails_at_launch_before_any_step(resources, instance):
    """Run config is validated by Dagster when the run is launched: no step (and no llama server) starts."""
    from rlhn_assets.definitions import defs

    d = defs()
    with pytest.raises(dg.DagsterInvalidConfigError) as e:
        dg.materialize(
            list(d.assets),
            selection=dg.AssetSelection.assets("tier2_judgments"),
            partition_key="fiqa",
            resources=resources,
            instance=instance,
            run_config={"resources": {"tier2_judge": {"config": {"scope": "flagged"}}}},
        )
    assert "scope" in str(e.value) and "flagged_negatives" in str(e.value)
    assert instance.get_runs() == []  # refused before a run existed


JSON_GOOD = json.dumps({"thinking": "Doc (1): answers it. Doc (2): no.", "better": [1], "worse": []})


@pytest.mark.parametrize(
    "style,expected",
    [
        (
            "json_schema",
            {
                "type": "json_schema",
                "json_schema": {"name": "verdict", "schema": prompts.LISTWISE_JSON_SCHEMA, "strict": True},
            },
        ),
        ("json_object_schema", {"type": "json_object", "schema": prompts.LISTWISE_JSON_SCHEMA}),
    ],
)
def test_structured_listwise_asks_for_the_schema_and_reads_it(tmp_path, style, expected):
    client, seen = _client(tmp_path, [(JSON_GOOD, "stop")], response_format_style=style)
    judge = ListwiseLLMJudge(client, "tier1")
    out = judge.judge([_instance()])
    assert [(j.docid, j.verdict) for j in out] == [("n0_0", "better"), ("n0_1", "not_relevant")]
    assert seen[0]["response_format"] == expected
    prompt = seen[0]["messages"][0]["content"]
    assert '"better": the numbers i' in prompt and "<verdict>" not in prompt
    assert judge.prompt_version == "tier1-v1+json-v1"


def test_structured_answers_are_still_validated_client_side(tmp_path):
    """An endpoint that ignores the schema (or a tag-style answer) is re-asked, then an error - never 'clean'."""
    bad = json.dumps({"thinking": "x", "better": ["Doc (1)"], "worse": []})
    client, seen = _client(tmp_path, [(GOOD, "stop"), (bad, "stop")], response_format_style="json_schema")
    judge = ListwiseLLMJudge(client, "tier1", max_parse_retries=1)
    out = judge.judge([_instance()])
    assert [j.verdict for j in out] == ["error", "error"]
    assert "must be a list of document numbers" in out[0].detail
    assert len(seen) == 2 and judge.stats.parse_retries == 1


def test_without_a_style_the_paper_contract_and_no_response_format(tmp_path):
    client, seen = _client(tmp_path, [(GOOD, "stop")])
    judge = ListwiseLLMJudge(client, "tier1")
    assert [j.verdict for j in judge.judge([_instance()])] == ["better", "not_relevant"]
    assert "response_format" not in seen[0] and "<verdict>" in seen[0]["messages"][0]["content"]
    assert judge.prompt_version == "tier1-v1"
