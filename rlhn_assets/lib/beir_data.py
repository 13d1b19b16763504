"""The one reader of BEIR-layout data: ``corpus.jsonl[.gz]``, ``queries.jsonl[.gz]`` and a ``qrels/<split>.tsv``.

Used by hard-negative mining (``lib/mining.py``: the positives of a training split) and by evaluation
(``lib/evaluation.py``: the judgments of a test split), so both read the same files the same way.

The qrels rule, for both: a row ``query-id<TAB>corpus-id<TAB>score`` is a judgment. A grade > 0 is relevant
(the grade is the gain of trec_eval's nDCG); a grade of 0 (or below) means "judged, not relevant" and is never a
positive. So:

* :attr:`BeirData.qrels` keeps every judgment, grade 0 included, and :attr:`BeirData.queries` every judged
  query, also one whose judgments are all 0. This is what BEIR's ``GenericDataLoader`` loads and what evaluation
  scores: pytrec_eval counts grade 0 as not relevant, and a query with no relevant document still enters the
  means (with nDCG 0), as in BEIR.
* :meth:`BeirData.positives` is the grade > 0 part, what mining excludes from a query's negatives and writes as
  its positive passages; a query with no positive is not mined.

Line 1 of a qrels file is a header when its score column is not an integer (BEIR's files start with
``query-id corpus-id score``, and its loader always skips line 1). Any other line that is not three tab-separated
fields with an integer score, a corpus or query row that is not a JSON object with ``_id``, and a judged query
missing from the queries file are errors naming the file and the line.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

CORPUS_FILES = ("corpus.jsonl", "corpus.jsonl.gz")


@dataclass
class BeirData:
    corpus: dict[str, dict]  # docid -> {"title": str, "text": str}
    queries: dict[str, str]  # qid -> text, every judged query, in the order of the queries file
    qrels: dict[str, dict[str, int]]  # qid -> {docid: grade}, every judgment (grade 0 too), in query order

    def positives(self) -> dict[str, dict[str, int]]:
        """qid -> {docid: grade} of the relevant judgments (grade > 0); queries without one are left out."""
        out = {q: {d: g for d, g in rels.items() if g > 0} for q, rels in self.qrels.items()}
        return {q: rels for q, rels in out.items() if rels}


def open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def corpus_file(folder: Path) -> Path | None:
    """The corpus file of a BEIR folder (``corpus.jsonl`` or ``corpus.jsonl.gz``), None if it has neither."""
    for name in CORPUS_FILES:
        if (folder / name).is_file():
            return folder / name
    return None


def _read_jsonl(path: Path, kind: str) -> Iterator[tuple[int, dict]]:
    with open_text(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from e
            if not isinstance(row, dict) or "_id" not in row:
                raise ValueError(f"{path}:{n}: not a BEIR {kind} row (needs an object with '_id')")
            yield n, row


def read_corpus(path: Path) -> dict[str, dict]:
    """docid -> {"title", "text"} (missing or null fields become "")."""
    corpus: dict[str, dict] = {}
    for n, row in _read_jsonl(path, "corpus"):
        title, text = row.get("title") or "", row.get("text") or ""
        if not isinstance(title, str) or not isinstance(text, str):
            raise ValueError(f"{path}:{n}: 'title' and 'text' must be strings")
        corpus[str(row["_id"])] = {"title": title, "text": text}
    return corpus


def read_qrels(path: Path) -> tuple[dict[str, dict[str, int]], dict[str, int]]:
    """qid -> {docid: grade} with every judgment (grade 0 too), and the first line number of each qid (for error
    messages). A pair judged twice keeps its last grade."""
    qrels: dict[str, dict[str, int]] = {}
    first_line: dict[str, int] = {}
    with open_text(path) as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            parts = line.split("\t")
            if n == 1 and not _is_int(parts[-1]):
                continue  # header
            if len(parts) != 3 or not parts[0].strip() or not parts[1].strip():
                raise ValueError(f"{path}:{n}: expected 'query-id<TAB>corpus-id<TAB>score', got {line[:80]!r}")
            qid, did, score = parts[0].strip(), parts[1].strip(), parts[2].strip()
            if not _is_int(score):
                raise ValueError(f"{path}:{n}: score {score!r} is not an integer")
            qrels.setdefault(qid, {})[did] = int(score)
            first_line.setdefault(qid, n)
    return qrels, first_line


def _is_int(s: str) -> bool:
    try:
        int(s.strip())
    except ValueError:
        return False
    return True


def read_queries(path: Path, wanted: set[str] | dict) -> dict[str, str]:
    """qid -> text of the queries in ``wanted``, in file order."""
    queries: dict[str, str] = {}
    for n, row in _read_jsonl(path, "query"):
        qid = str(row["_id"])
        if qid in wanted:
            text = row.get("text")
            if not isinstance(text, str):
                raise ValueError(f"{path}:{n}: query {qid!r} has no string 'text'")
            queries[qid] = text
    return queries


def load(corpus: Path, queries: Path, qrels: Path) -> BeirData:
    """Read a corpus / queries / qrels triple: every judged query and every judgment (the module docstring has
    the rule for grade 0). A judged query without a text in the queries file is an error."""
    corpus, queries, qrels = Path(corpus), Path(queries), Path(qrels)
    judgments, first_line = read_qrels(qrels)
    docs = read_corpus(corpus)
    texts = read_queries(queries, judgments)
    missing = [q for q in judgments if q not in texts]
    if missing:
        q = missing[0]
        raise ValueError(
            f"{qrels}:{first_line[q]}: query {q!r} is not in {queries}"
            + (f" ({len(missing)} such queries)" if len(missing) > 1 else "")
        )
    # judgments in the query order of the queries file, for stable output
    return BeirData(corpus=docs, queries=texts, qrels={q: judgments[q] for q in texts})
