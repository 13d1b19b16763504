"""Judges through the real openai client, with an httpx.MockTransport standing in for the endpoint:
garbage and truncated answers, retries, pointwise logprobs, and the embedding-margin judge."""

import json
import math

import httpx
import pytest

from rlhn_assets.lib.judging.judges import EmbeddingMarginJudge, Instance, ListwiseLLMJudge, Passage, PointwiseLLMJudge
from rlhn_assets.lib.llm.cache import ResponseCache
from rlhn_assets.lib.llm.client import EndpointSettings, LLMClient

GOOD = (
    "<thinking>Doc (1): answers it. Doc (2): no.</thinking><preference>Doc (1) as good</preference>"
    "<verdict><better>[Doc (1)]</better><worse>[]</worse></verdict>"
)


def _instance(i=0, n=2):
    return Instance(
        f"i{i}",
        f"what is thing {i}?",
        (Passage("p", "", "thing is a widget"),),
        tuple(Passage(f"n{i}_{k}", "", f"negative passage {k}") for k in range(n)),
    )


def _client(tmp_path, answers, **settings):
    """answers: list of (content, finish_reason) or an int HTTP status, consumed in order, last one repeats."""
    seen = []

    def handler(request):
        seen.append(json.loads(request.content))
        a = answers[min(len(seen) - 1, len(answers) - 1)]
        if isinstance(a, int):
            return httpx.Response(a, json={"error": {"message": "boom"}})
        content, finish, *logprobs = a
        choice = {"index": 0, "finish_reason": finish, "message": {"role": "assistant", "content": content}}
        if logprobs:
            choice["logprobs"] = {
                "content": [
                    {
                        "token": content,
                        "logprob": -0.1,
                        "bytes": None,
                        "top_logprobs": [{"token": t, "logprob": lp, "bytes": None} for t, lp in logprobs[0]],
                    }
                ]
            }
        return httpx.Response(
            200,
            json={
                "id": "x",
                "object": "chat.completion",
                "created": 0,
                "model": "m",
                "choices": [choice],
                "usage": {"prompt_tokens": 100, "completion_tokens": 10, "total_tokens": 110},
            },
        )

    cache = ResponseCache(str(tmp_path / "cache.duckdb"))
    s = EndpointSettings(
        model="m",
        base_url="http://stub.invalid/v1",
        backoff_base_s=0.001,
        backoff_max_s=0.01,
        max_retries=2,
        **settings,
    )
    return LLMClient(s, cache, api_key="k", http_client=httpx.AsyncClient(transport=httpx.MockTransport(handler))), seen


def test_good_answer(tmp_path):
    client, seen = _client(tmp_path, [(GOOD, "stop")])
    out = ListwiseLLMJudge(client, "tier1").judge([_instance()])
    assert [(j.docid, j.verdict) for j in out] == [("n0_0", "better"), ("n0_1", "not_relevant")]
    assert all(j.response_key for j in out)


@pytest.mark.parametrize("first", [("I cannot decide.", "stop"), ("<thinking>Doc (1): rele", "length"), 500])
def test_garbage_truncated_or_failing_answer_is_reasked_then_parsed(tmp_path, first):
    client, seen = _client(tmp_path, [first, (GOOD, "stop")])
    judge = ListwiseLLMJudge(client, "tier1", max_parse_retries=2)
    out = judge.judge([_instance()])
    assert [j.verdict for j in out] == ["better", "not_relevant"]
    if first != 500:  # a 500 is retried by the client; a bad answer is re-asked by the judge with a new key
        assert judge.stats.parse_retries == 1
        assert seen[0]["messages"] == seen[1]["messages"]
    assert judge.stats.truncated == (1 if first != 500 and first[1] == "length" else 0)


@pytest.mark.parametrize("answer", [("garbage", "stop"), ("<thinking>Doc (1): rel", "length"), 429])
def test_persistently_bad_answers_become_error_verdicts_not_clean_negatives(tmp_path, answer):
    client, seen = _client(tmp_path, [answer])
    judge = ListwiseLLMJudge(client, "tier1", max_parse_retries=2)
    out = judge.judge([_instance()])
    assert [j.verdict for j in out] == ["error", "error"]
    assert judge.stats.errors == 2 and out[0].detail
    assert judge.stats.verdicts["not_relevant"] == 0


def test_cached_answers_are_not_paid_twice(tmp_path):
    client, seen = _client(tmp_path, [(GOOD, "stop")])
    ListwiseLLMJudge(client, "tier1").judge([_instance(0), _instance(1)])
    n = len(seen)
    judge = ListwiseLLMJudge(client, "tier1")
    judge.judge([_instance(0), _instance(1)])
    assert len(seen) == n and judge.stats.calls == 0 and judge.stats.cache_hits == 2


def test_pointwise_reads_logprobs_with_two_thresholds(tmp_path):
    lp = [("Yes", math.log(0.95)), ("No", math.log(0.05))]
    client, seen = _client(tmp_path, [("Yes", "length", lp)])
    judge = PointwiseLLMJudge(client, threshold_relevant=0.5, threshold_better=0.9)
    out = judge.judge([_instance(n=1)])
    assert out[0].verdict == "better" and out[0].score == pytest.approx(0.95)
    assert seen[0]["max_tokens"] == 1 and seen[0]["logprobs"] is True
    # query and positive come first: the prefix is shared by an instance's calls
    assert seen[0]["messages"][1]["content"].startswith("Question: what is thing 0?")
    assert judge.verdict_for(0.7) == "worse" and judge.verdict_for(0.2) == "not_relevant"


@pytest.mark.slow
def test_embedding_margin_flags_near_duplicates_of_the_positive():
    from rlhn_assets.lib.embeddings import load_model

    inst = Instance(
        "i",
        "What is the capital of France?",
        (Passage("p", "", "Paris is the capital of France."),),
        (
            Passage("n1", "", "The capital city of France is Paris."),
            Passage("n2", "", "Bananas are rich in potassium."),
        ),
    )
    judge = EmbeddingMarginJudge(load_model(), "v", margin=0.10)
    out = judge.judge([inst])
    assert out[0].verdict in ("better", "worse") and out[1].verdict == "not_relevant"
    assert out[0].score > out[1].score


def test_tier2_flagged_scope_judges_only_flagged_negatives_at_their_original_positions():
    from rlhn_assets.lib.judging.shards import only_positions

    a, b = _instance(0, n=4), _instance(1, n=3)
    judged, positions = only_positions([a, b], {"i0": [2, 4]})
    assert [i.instance_id for i in judged] == ["i0"]  # i1 had nothing flagged
    assert [n.docid for n in judged[0].negatives] == ["n0_1", "n0_3"] and positions == {"i0": [2, 4]}


def test_expected_grade_parsing():
    from rlhn_assets.lib.judging.parsing import VerdictParseError, expected_grade

    # P(3)=0.5, P(2)=0.25, P(0)=0.25 (a non-grade token is ignored) -> 0.5*3 + 0.25*2 = 2.0
    assert expected_grade(
        [("3", math.log(0.5)), ("2", math.log(0.25)), (" 0", math.log(0.25)), ("The", math.log(0.3))], "3"
    ) == pytest.approx(2.0)
    assert expected_grade(None, "2 - partially answers") == 2.0  # no logprobs: the answer's digit
    with pytest.raises(VerdictParseError):
        expected_grade([("Yes", -0.1)], "Yes")
    with pytest.raises(VerdictParseError):
        expected_grade(None, "7")


def test_graded_judge_scores_expected_grade_and_versions_its_prompts(tmp_path):
    from rlhn_assets.lib.judging.judges import GradedLLMJudge

    client, seen = _client(
        tmp_path,
        [
            ("3", "length", [("3", math.log(0.9)), ("2", math.log(0.1))]),
            ("1", "length", [("1", math.log(0.6)), ("0", math.log(0.4))]),
        ],
    )
    judge = GradedLLMJudge(client)  # graded-ref-v1, thresholds 1.5 / 2.5 on the 0-3 scale
    out = judge.judge([_instance(n=2)])
    assert [j.verdict for j in out] == ["better", "not_relevant"]
    assert out[0].score == pytest.approx(2.9) and out[1].score == pytest.approx(0.6)
    assert seen[0]["max_tokens"] == 1 and seen[0]["logprobs"] is True
    user = seen[0]["messages"][-1]["content"]
    assert "Reference passage (known relevant):\nthing is a widget" in user and "Grade (0-3):" in user
    assert judge.prompt_version == "graded-ref-v1"

    (tmp_path / "noref").mkdir()
    client2, seen2 = _client(tmp_path / "noref", [("2", "length", [("2", 0.0)])])
    noref = GradedLLMJudge(client2, family="graded-v1")
    assert noref.judge([_instance(n=1)])[0].verdict == "worse"
    assert "thing is a widget" not in seen2[0]["messages"][-1]["content"]
    with pytest.raises(ValueError, match="unknown graded prompt"):
        GradedLLMJudge(client2, family="plain-v1")
    with pytest.raises(ValueError, match="threshold"):
        GradedLLMJudge(client2, threshold_relevant=2.8, threshold_better=2.0)


def test_plain_pointwise_prompt_family(tmp_path):
    client, seen = _client(tmp_path, [("Yes", "length", [("Yes", math.log(0.7)), ("No", math.log(0.3))])])
    judge = PointwiseLLMJudge(client, family="plain-v1", threshold_relevant=0.3, threshold_better=0.8)
    out = judge.judge([_instance(n=1)])
    assert out[0].verdict == "worse" and out[0].score == pytest.approx(0.7)
    assert seen[0]["messages"][0]["content"].startswith("You are a relevance judge for a search engine.")
    assert "Does the candidate passage answer the query? Answer Yes or No." in seen[0]["messages"][1]["content"]
    assert judge.prompt_version == "plain-v1"
    assert PointwiseLLMJudge(client).prompt_version == "pointwise-v1"  # the default keeps its cache keys
