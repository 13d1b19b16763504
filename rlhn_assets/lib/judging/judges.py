"""Judges behind one interface: an instance (query, positives, ordered negatives) in, one verdict per
negative out — ``better`` (at least as good as the positive), ``worse`` (relevant but worse),
``not_relevant`` or ``error`` — with an optional score and the cache key of the raw LLM response.

Four kinds:
- ``ListwiseLLMJudge``: the paper's contract, <= 25 negatives per call (more -> several calls);
- ``PointwiseLLMJudge``: one negative per call, P(yes) from the first token's logprobs, two thresholds;
- ``GradedLLMJudge``: one negative per call, a 0-3 grade; score = the expected grade from the logprobs;
- ``EmbeddingMarginJudge``: no LLM; flags a negative whose cosine to the query is >= (1 - margin) x the
  best positive's (NV-Retriever TopK-PercPos / sentence-transformers ``relative_margin``).

An answer that does not parse, or was cut off (finish_reason = length), is asked again with a new cache
key (``attempt`` + 1) up to ``max_parse_retries`` times, then becomes ``error`` for the negatives it
covered: counted, never read as "no false negatives".
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal, Protocol

import numpy as np

from rlhn_assets.lib.judging import prompts
from rlhn_assets.lib.judging.parsing import (
    VerdictParseError,
    expected_grade,
    parse_listwise,
    parse_listwise_json,
    yes_probability,
)

Verdict = Literal["better", "worse", "not_relevant", "error"]
VERDICTS = ("better", "worse", "not_relevant", "error")


@dataclass(frozen=True)
class Passage:
    docid: str
    title: str
    text: str


@dataclass(frozen=True)
class Instance:
    instance_id: str
    query: str
    positives: tuple[Passage, ...]
    negatives: tuple[Passage, ...]


@dataclass(frozen=True)
class NegativeJudgment:
    instance_id: str
    docid: str
    neg_index: int  # 1-based position in the instance's negatives
    verdict: Verdict
    score: float | None = None
    response_key: str | None = None
    detail: str | None = None


@dataclass
class JudgeStats:
    instances: int = 0
    negatives: int = 0
    calls: int = 0  # requests answered by the endpoint now
    cache_hits: int = 0
    errors: int = 0  # negatives that ended as `error`
    parse_retries: int = 0
    truncated: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    wall_s: float = 0.0
    verdicts: dict[str, int] = field(default_factory=lambda: {v: 0 for v in VERDICTS})

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def total(cls, parts: Sequence[dict]) -> JudgeStats:
        """The sum of several judges' ``as_dict()`` (the shards of one fanned-out judging step)."""
        out = cls()
        for p in parts:
            for name, value in p.items():
                if name == "verdicts":
                    for v, n in value.items():
                        out.verdicts[v] = out.verdicts.get(v, 0) + n
                else:
                    setattr(out, name, getattr(out, name) + value)
        return out

    def add(self, other: JudgeStats) -> None:
        """Add another judge's counts (a :meth:`ListwiseLLMJudge.fork` that judged one round) to these."""
        merged = JudgeStats.total([self.as_dict(), other.as_dict()])
        for name, value in merged.as_dict().items():
            setattr(self, name, value)

    def count(self, judgments: Sequence[NegativeJudgment]) -> None:
        for j in judgments:
            self.verdicts[j.verdict] += 1
        self.errors = self.verdicts["error"]


class Judge(Protocol):
    kind: str
    model: str  # the name the requests send (for a local server: its alias)
    model_identity: str  # what the model is (GGUF sha256, endpoint + name, embedding folder hash)
    prompt_version: str
    stats: JudgeStats

    def judge(
        self, instances: Sequence[Instance], progress: Callable[[str], None] | None = None
    ) -> list[NegativeJudgment]: ...


def _account(stats: JudgeStats, responses) -> None:
    for r in responses:
        if r.cached:
            stats.cache_hits += 1
        elif r.error is None:
            stats.calls += 1
        stats.tokens_in += r.tokens_in or 0
        stats.tokens_out += r.tokens_out or 0


def listwise_calls(
    inst: Instance, family: str, docs_per_call: int = prompts.MAX_DOCS_PER_CALL, *, structured: bool = False
) -> list[tuple[int, prompts.RenderedListwise]]:
    """(offset of the first negative, rendered call) for each chunk of <= 25 negatives."""
    pos = [(p.title, p.text) for p in inst.positives]
    out = []
    for off in range(0, len(inst.negatives), docs_per_call):
        chunk = inst.negatives[off : off + docs_per_call]
        out.append(
            (
                off,
                prompts.render_listwise(
                    family, inst.query, pos, [(n.docid, n.title, n.text) for n in chunk], structured=structured
                ),
            )
        )
    return out


class _ForkWithOwnStats:
    """``fork()`` for the LLM judges: a shallow copy (client shared) counting into its own :class:`JudgeStats`,
    so two rounds of a judging step run at once on two threads and the step adds the forks' stats
    (defs/judge/assets.py)."""

    def fork(self):
        twin = copy.copy(self)
        twin.stats = JudgeStats()
        return twin


class ListwiseLLMJudge(_ForkWithOwnStats):
    """The paper's listwise contract. When the client's ``response_format_style`` is not ``none``, every call
    asks for the verdict as structured output (prompts.LISTWISE_JSON_SCHEMA, prompt version ``+json-v1``) and
    the answer is validated by ``parse_listwise_json``; otherwise the paper's <verdict> tags."""

    kind = "listwise"

    def __init__(
        self,
        client,
        family: str = "tier1",
        *,
        max_parse_retries: int = 2,
        docs_per_call: int = prompts.MAX_DOCS_PER_CALL,
        family_by_instance: Callable[[Instance], str] | None = None,
    ):
        self.client = client
        self.family = family
        self.family_by_instance = family_by_instance
        self.max_parse_retries = max_parse_retries
        self.docs_per_call = min(docs_per_call, prompts.MAX_DOCS_PER_CALL)
        self.model = client.settings.model
        self.model_identity = client.settings.identity  # recorded with each verdict
        self.structured = client.settings.response_format_style != "none"
        self.prompt_version = prompts.LISTWISE_VERSIONS[family] + (prompts.JSON_SUFFIX if self.structured else "")
        self.stats = JudgeStats()

    def calls_for(self, inst: Instance) -> list[tuple[int, prompts.RenderedListwise]]:
        family = self.family_by_instance(inst) if self.family_by_instance else self.family
        return listwise_calls(inst, family, self.docs_per_call, structured=self.structured)

    def requests_for(self, instances: Sequence[Instance]) -> list:
        """The first-attempt requests :meth:`judge` sends for ``instances`` (Batch API prefetch)."""
        from rlhn_assets.lib.llm.client import LLMRequest

        schema = prompts.LISTWISE_JSON_SCHEMA if self.structured else None
        return [
            LLMRequest(messages=r.messages, prompt_version=r.prompt_version, json_schema=schema)
            for inst in instances
            for _, r in self.calls_for(inst)
        ]

    def judge(self, instances, progress=None):
        from rlhn_assets.lib.llm.client import LLMRequest

        t0 = time.perf_counter()
        # One work item per call: (instance, offset, rendered)
        items = [(inst, off, r) for inst in instances for off, r in self.calls_for(inst)]
        results: dict[int, list[NegativeJudgment]] = {}
        pending = list(range(len(items)))
        last_problem: dict[int, str] = {}
        for attempt in range(self.max_parse_retries + 1):
            if not pending:
                break
            if attempt:
                self.stats.parse_retries += len(pending)
                if progress:
                    progress(f"re-asking {len(pending)} unparsable/truncated answers (attempt {attempt + 1})")
            schema = prompts.LISTWISE_JSON_SCHEMA if self.structured else None
            reqs = [
                LLMRequest(
                    messages=items[i][2].messages,
                    prompt_version=items[i][2].prompt_version,
                    json_schema=schema,
                    attempt=attempt,
                )
                for i in pending
            ]
            responses = self.client.complete_many(reqs, progress=progress)
            _account(self.stats, responses)
            still = []
            for i, resp in zip(pending, responses):
                inst, off, rendered = items[i]
                if resp.error is not None:
                    last_problem[i] = f"request failed: {resp.error}"
                    still.append(i)
                    continue
                if resp.finish_reason == "length":
                    self.stats.truncated += 1
                    last_problem[i] = "answer truncated (finish_reason=length)"
                    still.append(i)
                    continue
                try:
                    v = (parse_listwise_json if self.structured else parse_listwise)(
                        resp.text or "", len(rendered.docids)
                    )
                except VerdictParseError as e:
                    last_problem[i] = f"unparsable answer: {e}"
                    still.append(i)
                    continue
                better, worse = set(v.better), set(v.worse)
                results[i] = [
                    NegativeJudgment(
                        inst.instance_id,
                        docid,
                        off + k,
                        "better" if k in better else "worse" if k in worse else "not_relevant",
                        None,
                        resp.key,
                        f"out-of-range indices {list(v.out_of_range)}" if v.out_of_range else None,
                    )
                    for k, docid in enumerate(rendered.docids, 1)
                ]
            pending = still
        for i in pending:  # gave up: every negative of the call is an error verdict
            inst, off, rendered = items[i]
            results[i] = [
                NegativeJudgment(inst.instance_id, d, off + k, "error", None, None, last_problem.get(i))
                for k, d in enumerate(rendered.docids, 1)
            ]
        out = [j for i in range(len(items)) for j in results[i]]
        self.stats.instances += len(instances)
        self.stats.negatives += len(out)
        self.stats.count(out)
        self.stats.wall_s += time.perf_counter() - t0
        return out


class PointwiseLLMJudge(_ForkWithOwnStats):
    """One negative per call; score = P(yes) of the first answer token; ``worse`` at score >= threshold_relevant,
    ``better`` at >= threshold_better. ``family`` picks the prompt (``prompts.POINTWISE_PROMPTS``)."""

    kind = "pointwise"
    score_range = (0.0, 1.0)
    families = prompts.POINTWISE_PROMPTS
    default_family = prompts.POINTWISE_VERSION

    def __init__(
        self,
        client,
        *,
        threshold_relevant: float = 0.5,
        threshold_better: float = 0.9,
        top_logprobs: int = 10,
        max_parse_retries: int = 1,
        family: str | None = None,
    ):
        lo, hi = self.score_range
        if not lo <= threshold_relevant <= threshold_better <= hi:
            raise ValueError(f"need {lo:g} <= threshold_relevant <= threshold_better <= {hi:g}")
        self.client = client
        self.threshold_relevant = threshold_relevant
        self.threshold_better = threshold_better
        self.top_logprobs = top_logprobs
        self.max_parse_retries = max_parse_retries
        self.model = client.settings.model
        self.model_identity = client.settings.identity  # recorded with each verdict
        self.family = family or self.default_family
        if self.family not in self.families:
            raise ValueError(f"unknown {self.kind} prompt {self.family!r}; expected one of {self.families}")
        self.prompt_version = self.family
        self.stats = JudgeStats()

    @staticmethod
    def render(family: str, inst: Instance, neg: Passage) -> tuple[dict, ...]:
        pos = inst.positives[0]
        return prompts.render_pointwise_family(family, inst.query, (pos.title, pos.text), (neg.title, neg.text))

    def messages(self, inst: Instance, neg: Passage) -> tuple[dict, ...]:
        return self.render(self.family, inst, neg)

    def requests_for(self, instances: Sequence[Instance]) -> list:
        """The first-attempt requests :meth:`judge` sends for ``instances`` (Batch API prefetch)."""
        from rlhn_assets.lib.llm.client import LLMRequest

        return [
            LLMRequest(
                messages=self.messages(inst, n),
                prompt_version=self.prompt_version,
                max_tokens=1,
                top_logprobs=self.top_logprobs,
            )
            for inst in instances
            for n in inst.negatives
        ]

    def score(self, top_logprobs, text) -> float:
        return yes_probability(top_logprobs, text)

    def verdict_for(self, score: float) -> Verdict:
        if score >= self.threshold_better:
            return "better"
        if score >= self.threshold_relevant:
            return "worse"
        return "not_relevant"

    def judge(self, instances, progress=None):
        from rlhn_assets.lib.llm.client import LLMRequest

        t0 = time.perf_counter()
        items = []
        for inst in instances:
            for k, n in enumerate(inst.negatives, 1):
                items.append((inst, k, n, self.messages(inst, n)))
        results: dict[int, NegativeJudgment] = {}
        pending = list(range(len(items)))
        problem: dict[int, str] = {}
        for attempt in range(self.max_parse_retries + 1):
            if not pending:
                break
            if attempt:
                self.stats.parse_retries += len(pending)
            reqs = [
                LLMRequest(
                    messages=items[i][3],
                    prompt_version=self.prompt_version,
                    max_tokens=1,
                    top_logprobs=self.top_logprobs,
                    attempt=attempt,
                )
                for i in pending
            ]
            responses = self.client.complete_many(reqs, progress=progress)
            _account(self.stats, responses)
            still = []
            for i, resp in zip(pending, responses):
                inst, k, n, _ = items[i]
                if resp.error is not None:
                    problem[i] = f"request failed: {resp.error}"
                    still.append(i)
                    continue
                try:
                    first = resp.top_logprobs[0] if resp.top_logprobs else None
                    p = self.score(first, resp.text)
                except VerdictParseError as e:
                    problem[i] = str(e)
                    still.append(i)
                    continue
                results[i] = NegativeJudgment(inst.instance_id, n.docid, k, self.verdict_for(p), round(p, 6), resp.key)
            pending = still
        for i in pending:
            inst, k, n, _ = items[i]
            results[i] = NegativeJudgment(inst.instance_id, n.docid, k, "error", None, None, problem.get(i))
        out = [results[i] for i in range(len(items))]
        self.stats.instances += len(instances)
        self.stats.negatives += len(out)
        self.stats.count(out)
        self.stats.wall_s += time.perf_counter() - t0
        return out


class GradedLLMJudge(PointwiseLLMJudge):
    """Graded relevance (UMBRELA / TREC RAG assessor style): the model answers a 0-3 grade as its first token and
    the score is the expected grade sum g * P(g) over the grade tokens' probabilities (``parsing.expected_grade``),
    so the cut is on a scale that keeps the model's uncertainty instead of one yes/no token. Thresholds are on
    the 0-3 scale. ``family``: ``graded-ref-v1`` (with the known-relevant passage) or ``graded-v1``."""

    kind = "graded"
    score_range = (0.0, 3.0)
    families = prompts.GRADED_PROMPTS
    default_family = prompts.GRADED_PROMPTS[0]

    def __init__(self, client, *, threshold_relevant: float = 1.5, threshold_better: float = 2.5, **kw):
        super().__init__(client, threshold_relevant=threshold_relevant, threshold_better=threshold_better, **kw)

    @staticmethod
    def render(family: str, inst: Instance, neg: Passage) -> tuple[dict, ...]:
        pos = inst.positives[0] if inst.positives else None
        return prompts.render_graded(family, inst.query, (pos.title, pos.text) if pos else None, (neg.title, neg.text))

    def score(self, top_logprobs, text) -> float:
        return expected_grade(top_logprobs, text)


class EmbeddingMarginJudge:
    kind = "embedding_margin"

    def __init__(self, model, model_version: str, *, margin: float = 0.05, batch_size: int = 64):
        if not 0 <= margin < 1:
            raise ValueError("margin must be in [0, 1)")
        self.encoder = model
        self.model = "all-MiniLM-L6-v2"
        self.model_version = model_version
        self.model_identity = f"sentence-transformers-dir:{model_version}"
        self.margin = margin
        self.batch_size = batch_size
        self.prompt_version = f"embedding-margin-{margin:g}"
        self.stats = JudgeStats()

    def verdict_for(self, neg_score: float, best_pos: float) -> Verdict:
        if neg_score >= best_pos:
            return "better"
        if neg_score >= (1 - self.margin) * best_pos:
            return "worse"
        return "not_relevant"

    def judge(self, instances, progress=None):
        from rlhn_assets.lib.mining import passage_text

        t0 = time.perf_counter()
        texts: dict[str, str] = {}
        for inst in instances:
            for p in inst.positives + inst.negatives:
                texts.setdefault(p.docid, passage_text({"title": p.title, "text": p.text}))
        ids = list(texts)
        if progress:
            progress(f"embedding {len(ids):,} passages and {len(instances):,} queries")
        p_emb = self.encoder.encode(
            [texts[i] for i in ids],
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        q_emb = self.encoder.encode(
            [inst.query for inst in instances],
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        row = {d: i for i, d in enumerate(ids)}
        out = []
        for qi, inst in enumerate(instances):
            q = q_emb[qi]
            best_pos = float(max(np.dot(p_emb[row[p.docid]], q) for p in inst.positives))
            for k, n in enumerate(inst.negatives, 1):
                s = float(np.dot(p_emb[row[n.docid]], q))
                ratio = s / best_pos if best_pos > 0 else 0.0
                out.append(
                    NegativeJudgment(inst.instance_id, n.docid, k, self.verdict_for(s, best_pos), round(ratio, 6))
                )
        self.stats.instances += len(instances)
        self.stats.negatives += len(out)
        self.stats.count(out)
        self.stats.wall_s += time.perf_counter() - t0
        return out
