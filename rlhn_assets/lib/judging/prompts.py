"""Judge prompts, in our own words, with the RLHN output contract (the paper's judge prompt, Fig. 6,
and the authors' released prompts: the same blocks and labels).

Listwise: positives are all rendered as ``P(0)``, negatives as ``Doc (1) .. Doc (n)`` in list order, and
the answer ends with ``<verdict><better>[Doc (i), ...]</better><worse>[...]</worse></verdict>``.
Three listwise families: ``tier1`` (cheap model: is each document relevant at all?), ``tier2`` (strong
model: relevant *compared with* the ground truth), ``scidocsrr`` (relevance = related to the paper title).

Pointwise: one negative per call, a Yes/No answer whose first-token probabilities give a relevance
score; query + positive come first so consecutive calls of one instance share the prompt prefix.

Pointwise prompt families (``POINTWISE_PROMPTS``): ``pointwise-v1`` (the first one: "as well as the known
passage"), ``plain-v1`` (a plain "does the candidate answer the query?" with the known-relevant passage as a
reference; on DL19 it moved the 1.5B's kappa from 0.09 to 0.28, docs/judge_tuning_dl19.md). Graded families
(``GRADED_PROMPTS``, UMBRELA / TREC RAG assessor style): a 0-3 relevance grade as the first answer token, the
judge's score being the expected grade over the grade tokens' probabilities; ``graded-ref-v1`` shows the
known-relevant passage as a reference, ``graded-v1`` does not.

Every template has a version; it is part of each LLM request's cache key, so editing a prompt means
bumping its version (and the asset code_version).

Untrusted text (queries and passages) is escaped so that it cannot close our XML-ish blocks or inject a
verdict: ``<`` and ``>`` become ``‹`` and ``›``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

MAX_DOCS_PER_CALL = 25

LISTWISE_VERSIONS = {"tier1": "tier1-v1", "tier2": "tier2-v1", "scidocsrr": "scidocsrr-v1"}
POINTWISE_VERSION = "pointwise-v1"
POINTWISE_PROMPTS = ("pointwise-v1", "plain-v1")
GRADED_PROMPTS = ("graded-ref-v1", "graded-v1")


def escape(text: str) -> str:
    return text.replace("<", "‹").replace(">", "›")


def passage_text(title: str | None, text: str) -> str:
    title = (title or "").strip()
    body = " ".join(text.split())
    return escape(f"{title}. {body}" if title and not body.startswith(title) else body)


_OUTPUT_CONTRACT = """Answer in exactly this format, with the three blocks in this order:
<thinking>
One line per document, in order: Doc (1): <your reasoning>, Doc (2): <your reasoning>, ...
</thinking>
<preference>
For each relevant document, say whether it is better than, as good as, or worse than the ground truth.
</preference>
<verdict>
<better> Preferred over or equally as good as the ground truth: [Doc (i), ...] </better>,
<worse> Relevant but not preferred over the ground truth: [Doc (j), ...] </worse>
</verdict>
Write [] for an empty list. List every document at most once."""

_TIER1 = (
    """You check training data for a search engine. You get a search question, a ground-truth document \
that a person already confirmed as the best answer, and a list of documents that were recorded as NOT relevant. \
Such lists contain mistakes. Decide, document by document, whether each listed document is in fact relevant \
for answering the question.

The inputs are given in three blocks: `question`, `ground_truth` and `documents`.

Labels:
- Relevant: the document on its own gives enough information to answer the question, covering what the \
ground truth covers.
- Not Relevant: the document does not answer the question and does not contain the information in the ground truth.

Read every document with care, like a proofreader.

"""
    + _OUTPUT_CONTRACT
)

_TIER2 = (
    """You audit relevance labels of a retrieval training set. You get a search question, a ground-truth \
document that was validated as relevant (use it as your reference), and documents that were labelled NOT \
relevant. Some of those labels are wrong. For each document decide whether it is relevant to the question \
when compared with the ground truth, and if so, whether it is at least as good an answer as the ground truth.

The inputs are given in three blocks: `question`, `ground_truth` and `documents`.

Labels:
- Relevant: the document by itself provides sufficient information to answer the question, including every \
necessary part that the ground truth provides.
- Not Relevant: the document does not answer the question and lacks the information the ground truth provides.

Be strict: topical overlap or partial answers are Not Relevant. Read every document with care.

"""
    + _OUTPUT_CONTRACT
)

_SCIDOCSRR = (
    """You check training data for a scientific literature search engine. The question is the title \
of a scientific paper; the ground truth is a paper that a person confirmed as related to it (for example one it \
cites or that cites it). The listed documents were recorded as NOT related. Decide for each document whether \
it is in fact closely related to the paper title in the question.

The inputs are given in three blocks: `question`, `ground_truth` and `documents`.

Labels:
- Relevant: the document is about the same scientific problem or method as the title, as closely as the ground truth is.
- Not Relevant: the document is on a different or only loosely connected topic.

"""
    + _OUTPUT_CONTRACT
)

_FAMILIES = {"tier1": _TIER1, "tier2": _TIER2, "scidocsrr": _SCIDOCSRR}

# Structured output (a tier's response_format_style json_schema / json_object_schema): the same prompt with the
# answer contract as JSON; the endpoint constrains the answer to LISTWISE_JSON_SCHEMA and parsing.parse_listwise_json
# still validates it. Strict-mode rules (OpenAI): every property required, no others.
_JSON_CONTRACT = """Answer with one JSON object with exactly these three keys, in this order:
"thinking": one line per document, in order: "Doc (1): <your reasoning> Doc (2): <your reasoning> ...";
"better": the numbers i of the documents preferred over or equally as good as the ground truth, e.g. [1, 4];
"worse": the numbers j of the documents that are relevant but not preferred over the ground truth.
Write [] for an empty list. List every document at most once."""
LISTWISE_JSON_SCHEMA = {
    "type": "object",
    "properties": {
        "thinking": {"type": "string"},
        "better": {"type": "array", "items": {"type": "integer"}},
        "worse": {"type": "array", "items": {"type": "integer"}},
    },
    "required": ["thinking", "better", "worse"],
    "additionalProperties": False,
}
JSON_SUFFIX = "+json-v1"  # prompt_version of the structured variant: <family version>+json-v1


@dataclass(frozen=True)
class RenderedListwise:
    messages: tuple[dict, ...]
    prompt_version: str
    docids: tuple[str, ...]  # Doc (i) -> docids[i - 1]


def render_listwise(
    family: str,
    query: str,
    positives: Sequence[tuple[str | None, str]],
    negatives: Sequence[tuple[str, str | None, str]],
    *,
    structured: bool = False,
) -> RenderedListwise:
    """One listwise call. ``positives`` = [(title, text)], ``negatives`` = [(docid, title, text)] (<= 25).
    ``structured``: the JSON answer contract instead of the <verdict> tags (see LISTWISE_JSON_SCHEMA)."""
    if family not in _FAMILIES:
        raise ValueError(f"unknown prompt family {family!r}; expected one of {sorted(_FAMILIES)}")
    if not 0 < len(negatives) <= MAX_DOCS_PER_CALL:
        raise ValueError(f"a listwise call takes 1..{MAX_DOCS_PER_CALL} documents, got {len(negatives)}")
    ground_truth = "\n\n".join(f"P(0): {passage_text(t, x)}" for t, x in positives)
    documents = "\n\n".join(f"Doc ({i}): {passage_text(t, x)}" for i, (_, t, x) in enumerate(negatives, 1))
    instructions = _FAMILIES[family].replace(_OUTPUT_CONTRACT, _JSON_CONTRACT) if structured else _FAMILIES[family]
    user = (
        f"{instructions}\n\n<question>\n{escape(query.strip())}\n</question>\n\n"
        f"<ground_truth>\n{ground_truth}\n</ground_truth>\n\n<documents>\n{documents}\n</documents>"
    )
    return RenderedListwise(
        messages=({"role": "user", "content": user},),
        prompt_version=LISTWISE_VERSIONS[family] + (JSON_SUFFIX if structured else ""),
        docids=tuple(d for d, _, _ in negatives),
    )


_POINTWISE_SYSTEM = "You judge search results. Answer with a single word: Yes or No."


def render_pointwise(
    query: str, positive: tuple[str | None, str], candidate: tuple[str | None, str]
) -> tuple[dict, ...]:
    """Query and the known-relevant passage first (shared prefix across an instance's calls), candidate last."""
    prefix = f"Question: {escape(query.strip())}\n\nA passage known to answer it:\n{passage_text(*positive)}\n\n"
    ask = (
        f"Candidate passage:\n{passage_text(*candidate)}\n\n"
        "Does the candidate passage, on its own, answer the question as well as the known passage does? "
        "Answer Yes or No."
    )
    return ({"role": "system", "content": _POINTWISE_SYSTEM}, {"role": "user", "content": prefix + ask})


_PLAIN_SYSTEM = (
    "You are a relevance judge for a search engine. You get a search query, a reference passage that "
    "is known to be relevant to the query, and one candidate passage. Decide whether the candidate "
    "passage is also relevant, i.e. whether it answers the query. Answer with a single word: Yes or No."
)
# passages are cut at this many characters in the plain and graded prompts (long passages add seconds per call
# on a CPU and rarely change a relevance answer)
MAX_PASSAGE_CHARS = 2000


def _cut(title: str | None, text: str) -> str:
    return passage_text(title, text)[:MAX_PASSAGE_CHARS]


def render_plain(query: str, positive: tuple[str | None, str], candidate: tuple[str | None, str]) -> tuple[dict, ...]:
    """``plain-v1``: system + query + reference first (shared prompt prefix across a query's negatives)."""
    user = (
        f"Query: {escape(query.strip())}\n\nReference passage (known relevant):\n{_cut(*positive)}\n\n"
        f"Candidate passage:\n{_cut(*candidate)}\n\nDoes the candidate passage answer the query? "
        "Answer Yes or No."
    )
    return ({"role": "system", "content": _PLAIN_SYSTEM}, {"role": "user", "content": user})


def render_pointwise_family(family: str, query: str, positive, candidate) -> tuple[dict, ...]:
    if family == "pointwise-v1":
        return render_pointwise(query, positive, candidate)
    if family == "plain-v1":
        return render_plain(query, positive, candidate)
    raise ValueError(f"unknown pointwise prompt {family!r}; expected one of {POINTWISE_PROMPTS}")


# The grade scale of the UMBRELA / TREC RAG LLM assessors (0-3), in our words.
_GRADE_SCALE = (
    "3 = the passage is dedicated to the query and contains the exact answer;\n"
    "2 = the passage answers the query, but the answer is partial or mixed with unrelated text;\n"
    "1 = the passage is on the topic of the query but does not answer it;\n"
    "0 = the passage has nothing to do with the query."
)
_GRADED_SYSTEM = (
    "You are a relevance assessor for a search engine. Given a query and a passage, grade how well "
    "the passage answers the query on this scale:\n" + _GRADE_SCALE + "\nAnswer with a single digit: 0, 1, 2 or 3."
)
_GRADED_REF_SYSTEM = (
    "You are a relevance assessor for a search engine. You get a query, a reference passage known "
    "to answer it, and a candidate passage. Grade how well the candidate passage answers the query "
    "on this scale:\n" + _GRADE_SCALE + "\nAnswer with a single digit: 0, 1, 2 or 3."
)


def render_graded(
    family: str, query: str, positive: tuple[str | None, str] | None, candidate: tuple[str | None, str]
) -> tuple[dict, ...]:
    """``graded-ref-v1`` (with the known-relevant passage) or ``graded-v1`` (query and candidate only)."""
    q = escape(query.strip())
    if family == "graded-ref-v1":
        if positive is None:
            raise ValueError("graded-ref-v1 needs the known-relevant passage")
        user = (
            f"Query: {q}\n\nReference passage (known relevant):\n{_cut(*positive)}\n\n"
            f"Candidate passage:\n{_cut(*candidate)}\n\nGrade (0-3):"
        )
        return ({"role": "system", "content": _GRADED_REF_SYSTEM}, {"role": "user", "content": user})
    if family == "graded-v1":
        user = f"Query: {q}\n\nPassage:\n{_cut(*candidate)}\n\nGrade (0-3):"
        return ({"role": "system", "content": _GRADED_SYSTEM}, {"role": "user", "content": user})
    raise ValueError(f"unknown graded prompt {family!r}; expected one of {GRADED_PROMPTS}")
