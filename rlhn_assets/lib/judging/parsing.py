"""Parse a listwise judge's answer into the Doc indices of its ``<better>`` and ``<worse>`` lists.

Same reading as the authors' code (text inside ``<verdict>``, then inside ``<better>`` / ``<worse>``,
indices by the regex ``Doc \\((\\d+)\\)``) with three differences that matter:
- an answer without a verdict block, or with a block we cannot read, raises ``VerdictParseError``
  (the authors' code reads it as "no false negatives");
- the *last* verdict block counts, so a verdict quoted inside ``<thinking>`` (e.g. copied from an
  injected passage) cannot override the model's final one;
- an index outside 1..n is reported, and a document listed in both lists counts as ``better``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_VERDICT = re.compile(r"<verdict>(.*?)</verdict>", re.S | re.I)
_BETTER = re.compile(r"<better>(.*?)</better>", re.S | re.I)
_WORSE = re.compile(r"<worse>(.*?)</worse>", re.S | re.I)
_DOC = re.compile(r"Doc\s*\((\d+)\)")


class VerdictParseError(ValueError):
    pass


@dataclass(frozen=True)
class ListwiseVerdict:
    better: tuple[int, ...]
    worse: tuple[int, ...]
    out_of_range: tuple[int, ...] = field(default=())


def _indices(block: str) -> list[int]:
    seen: list[int] = []
    for m in _DOC.finditer(block):
        i = int(m.group(1))
        if i not in seen:
            seen.append(i)
    return seen


def parse_listwise(response: str, n_docs: int) -> ListwiseVerdict:
    if not response:
        raise VerdictParseError("empty response")
    blocks = _VERDICT.findall(response)
    if not blocks:
        raise VerdictParseError("no <verdict>...</verdict> block")
    block = blocks[-1]
    better_m, worse_m = _BETTER.search(block), _WORSE.search(block)
    if better_m is None and worse_m is None:
        raise VerdictParseError("verdict block has neither <better> nor <worse>")
    better = _indices(better_m.group(1)) if better_m else []
    worse = [i for i in (_indices(worse_m.group(1)) if worse_m else []) if i not in better]
    out = tuple(i for i in better + worse if not 1 <= i <= n_docs)
    return ListwiseVerdict(
        better=tuple(i for i in better if 1 <= i <= n_docs),
        worse=tuple(i for i in worse if 1 <= i <= n_docs),
        out_of_range=out,
    )


def parse_listwise_json(response: str, n_docs: int) -> ListwiseVerdict:
    """The structured answer (prompts.LISTWISE_JSON_SCHEMA): a JSON object whose ``better`` and ``worse`` are
    lists of Doc numbers. Validated here whatever the endpoint promised: anything else raises
    ``VerdictParseError`` (and is asked again). Same rules as the tag form: both lists -> better, out of range
    reported."""
    import json

    if not response:
        raise VerdictParseError("empty response")
    try:
        obj = json.loads(response)
    except json.JSONDecodeError as e:
        raise VerdictParseError(f"not JSON: {e.msg} at char {e.pos}") from None
    if not isinstance(obj, dict):
        raise VerdictParseError(f"expected a JSON object, got {type(obj).__name__}")
    lists = {}
    for name in ("better", "worse"):
        v = obj.get(name)
        if not isinstance(v, list) or any(isinstance(i, bool) or not isinstance(i, int) for i in v):
            raise VerdictParseError(f"{name!r} must be a list of document numbers, got {v!r}")
        lists[name] = list(dict.fromkeys(v))
    better = lists["better"]
    worse = [i for i in lists["worse"] if i not in better]
    out = tuple(i for i in better + worse if not 1 <= i <= n_docs)
    return ListwiseVerdict(
        better=tuple(i for i in better if 1 <= i <= n_docs),
        worse=tuple(i for i in worse if 1 <= i <= n_docs),
        out_of_range=out,
    )


_YES = {"yes", "y", "true", "relevant"}
_NO = {"no", "n", "false", "not"}


def yes_probability(top_logprobs: list[tuple[str, float]] | None, text: str | None) -> float:
    """P(yes) from the first answer token's top alternatives, renormalized over yes/no tokens.

    Falls back to the answer text (1.0 / 0.0) when the endpoint returns no logprobs; raises
    ``VerdictParseError`` when neither gives a yes/no."""
    import math

    if top_logprobs:
        p_yes = sum(math.exp(lp) for tok, lp in top_logprobs if tok.strip().lower().strip(".,!:") in _YES)
        p_no = sum(math.exp(lp) for tok, lp in top_logprobs if tok.strip().lower().strip(".,!:") in _NO)
        if p_yes + p_no > 0:
            return p_yes / (p_yes + p_no)
    word = (text or "").strip().lower().strip(".,!:")
    word = word.split()[0] if word else ""
    if word in _YES:
        return 1.0
    if word in _NO:
        return 0.0
    raise VerdictParseError(f"not a yes/no answer: {text!r}")


GRADES = (0, 1, 2, 3)


def expected_grade(top_logprobs: list[tuple[str, float]] | None, text: str | None) -> float:
    """E[grade] = sum g * P(g) over the first answer token's alternatives that are a grade digit 0-3,
    renormalized over those (the UMBRELA-style expected relevance). Falls back to the answer's first digit
    when the endpoint returns no logprobs; raises ``VerdictParseError`` when neither gives a grade."""
    import math

    if top_logprobs:
        mass = {g: 0.0 for g in GRADES}
        for tok, lp in top_logprobs:
            t = tok.strip()
            if len(t) == 1 and t.isdigit() and int(t) in mass:
                mass[int(t)] += math.exp(lp)
        total = sum(mass.values())
        if total > 0:
            return sum(g * m for g, m in mass.items()) / total
    for ch in (text or "").strip():
        if ch.isdigit():
            if int(ch) in GRADES:
                return float(ch)
            break
    raise VerdictParseError(f"not a 0-3 grade: {text!r}")
