"""Ingest a BGE-style training collection into normalized DuckDB tables, streaming.

Input rows come in two formats (JSONL, JSONL.gz or Parquet):
- Tevatron / rlhn: ``query_id, query, positive_passages[{docid,title,text}], negative_passages[...], subset``
- FlagEmbedding / BGE: ``query, pos[str], neg[str]`` (+ optional ``pos_scores, neg_scores, prompt``);
  passages carry no ids, so they get content-hash ids (md5 of the text, as rlhn's docids are md5s).

How it streams: Python reads each file in fixed-size byte chunks, splits lines and decodes UTF-8
(a line that is not valid UTF-8 is quarantined right there), and appends bounded batches of raw lines
to a DuckDB staging table. All JSON parsing, validation, deduplication and normalization then run as
DuckDB SQL, which spills to disk under its memory limit: a dataset is never held whole in Python.

Bad input never disappears: every rejected row lands in ``raw_quarantine`` with dataset, file, line
number, reason, detail and the raw line.
"""

from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import duckdb
import pyarrow as pa

from rlhn_assets.lib.db import ensure_schema, replace_partition

CHUNK_BYTES = 8 << 20  # bytes read per chunk
BATCH_LINES = 20_000  # lines per staging insert (bounds Python memory)
DEFAULT_MAX_PASSAGE_CHARS = 50_000  # a MS MARCO passage is ~350 chars, a FiQA answer ~1,000

_PASSAGE = '{"docid":"VARCHAR","title":"VARCHAR","text":"VARCHAR"}'
# One transform covers both formats; json_transform leaves absent/mistyped fields NULL.
_ROW_SCHEMA = (
    '{"query_id":"VARCHAR","query":"VARCHAR",'
    f'"positive_passages":[{_PASSAGE}],"negative_passages":[{_PASSAGE}],"subset":"VARCHAR",'
    '"pos":["VARCHAR"],"neg":["VARCHAR"],"prompt":"VARCHAR"}'
)


class IngestError(RuntimeError):
    """A file cannot be read at all; the message names the file and what is wrong."""


@dataclass
class IngestStats:
    dataset: str
    files: list[str] = field(default_factory=list)
    lines_read: int = 0
    instances: int = 0
    queries: int = 0
    passages: int = 0
    quarantined_rows: int = 0  # whole rows rejected
    quarantined_passages: int = 0  # single negatives dropped from otherwise good rows
    quarantine_by_reason: dict[str, int] = field(default_factory=dict)

    @property
    def quarantine_rate(self) -> float:
        return self.quarantined_rows / self.lines_read if self.lines_read else 0.0


# ---------------------------------------------------------------------------------------------
# Reading files into bounded batches of (line_no, text)


def _open_binary(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rb")
    return open(path, "rb")


def iter_jsonl_batches(path: Path, *, batch_lines: int = BATCH_LINES,
                       on_bad_utf8: Callable[[int, bytes], None]) -> Iterator[tuple[list[int], list[str]]]:
    """Yield (line numbers, decoded lines) in batches; blank lines are skipped but counted.

    A line that is not valid UTF-8 is reported through ``on_bad_utf8`` and not yielded."""
    line_no = 0
    nums: list[int] = []
    texts: list[str] = []
    carry = b""
    try:
        with _open_binary(path) as f:
            while True:
                chunk = f.read(CHUNK_BYTES)
                if not chunk:
                    break
                lines = (carry + chunk).split(b"\n")
                carry = lines.pop()
                try:
                    # Fast path: decode the whole block at once, then split (same line count).
                    decoded = b"\n".join(lines).decode("utf-8").split("\n") if lines else []
                except UnicodeDecodeError:
                    decoded = None
                for i, raw in enumerate(lines):
                    line_no += 1
                    if decoded is not None:
                        text = decoded[i]
                    else:
                        try:
                            text = raw.decode("utf-8")
                        except UnicodeDecodeError:
                            on_bad_utf8(line_no, raw)
                            continue
                    if text.endswith("\r"):
                        text = text[:-1]
                    if not text.strip():
                        continue
                    nums.append(line_no)
                    texts.append(text)
                    if len(nums) >= batch_lines:
                        yield nums, texts
                        nums, texts = [], []
            if carry:
                line_no += 1
                try:
                    text = carry.decode("utf-8").rstrip("\r")
                    if text.strip():
                        nums.append(line_no)
                        texts.append(text)
                except UnicodeDecodeError:
                    on_bad_utf8(line_no, carry)
    except FileNotFoundError as e:
        raise IngestError(f"{path}: file not found") from e
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise IngestError(f"{path}: not a readable gzip file ({e})") from e
    except OSError as e:
        raise IngestError(f"{path}: cannot be read ({e})") from e
    if nums:
        yield nums, texts


def _stage_table(conn: duckdb.DuckDBPyConnection) -> None:
    conn.execute("DROP TABLE IF EXISTS _stage")
    conn.execute("CREATE TEMP TABLE _stage (source_file VARCHAR, line_no BIGINT, fmt VARCHAR, line VARCHAR)")
    conn.execute("DROP TABLE IF EXISTS _q_lines")
    conn.execute(
        "CREATE TEMP TABLE _q_lines (source_file VARCHAR, line_no BIGINT, reason VARCHAR, detail VARCHAR, raw_line VARCHAR)"
    )


def stage_file(conn: duckdb.DuckDBPyConnection, path: Path, label: str, fmt: str,
               progress: Callable[[str], None] | None = None) -> int:
    """Append one file's rows to the staging table; returns the number of lines read (incl. rejected)."""
    if not path.exists():
        raise IngestError(f"{path}: file not found")
    name = path.name.lower()
    if name.endswith(".parquet"):
        try:
            conn.execute(
                """INSERT INTO _stage SELECT ?, r.file_row_number + 1, ?, to_json(r)::VARCHAR
                   FROM read_parquet(?, file_row_number = true) r""",
                [label, fmt, str(path)],
            )
        except duckdb.Error as e:
            raise IngestError(f"{path}: not a readable Parquet file ({e})") from e
        return conn.execute("SELECT count(*) FROM _stage WHERE source_file = ?", [label]).fetchall()[0][0]
    if not (name.endswith(".jsonl") or name.endswith(".jsonl.gz") or name.endswith(".json")
            or name.endswith(".json.gz")):
        raise IngestError(f"{path}: unsupported file type (expected .jsonl, .jsonl.gz or .parquet)")

    bad: list[tuple[int, bytes]] = []
    last_line = 0
    for nums, texts in iter_jsonl_batches(path, on_bad_utf8=lambda n, raw: bad.append((n, raw))):
        batch = pa.table({
            "source_file": pa.array([label] * len(nums)),
            "line_no": pa.array(nums, pa.int64()),
            "fmt": pa.array([fmt] * len(nums)),
            "line": pa.array(texts, pa.large_string()),
        })
        conn.register("_batch", batch)
        conn.execute("INSERT INTO _stage SELECT source_file, line_no, fmt, line FROM _batch")
        conn.unregister("_batch")
        last_line = nums[-1]
        if progress:
            progress(f"{label}: staged {last_line:,} lines")
    for n, raw in bad:
        conn.execute(
            "INSERT INTO _q_lines VALUES (?, ?, 'invalid_utf8', ?, ?)",
            [label, n, "line is not valid UTF-8", raw.decode("utf-8", errors="backslashreplace")],
        )
    n_bad = len(bad)
    n_good = conn.execute("SELECT count(*) FROM _stage WHERE source_file = ?", [label]).fetchall()[0][0]
    return n_good + n_bad


# ---------------------------------------------------------------------------------------------
# Validation and normalization, all in SQL

_PARSE_SQL = f"""
CREATE OR REPLACE TEMP TABLE _parsed AS
WITH v AS (
  SELECT source_file, line_no, fmt AS declared_fmt, line,
         json_valid(line) AS ok_json
  FROM _stage
), t AS (
  SELECT *,
    CASE WHEN ok_json THEN json_type(line) END AS jtype
  FROM v
), p AS (
  SELECT *,
    CASE WHEN jtype = 'OBJECT' THEN json_transform(line, '{_ROW_SCHEMA}') END AS j,
    CASE WHEN jtype <> 'OBJECT' OR jtype IS NULL THEN NULL
         WHEN declared_fmt = 'tevatron' THEN 'tevatron'
         WHEN declared_fmt = 'bge' THEN 'bge'
         WHEN json_exists(line, '$.positive_passages') THEN 'tevatron'
         WHEN json_exists(line, '$.pos') THEN 'bge'
    END AS fmt
  FROM t
)
SELECT source_file, line_no, line, ok_json, jtype, fmt,
  CASE fmt WHEN 'tevatron' THEN nullif(trim(j.query_id), '')
           WHEN 'bge' THEN md5(j.query) END AS query_id,
  j.query AS query,
  j.prompt AS prompt,
  CASE fmt WHEN 'tevatron' THEN j.positive_passages
           WHEN 'bge' THEN list_transform(j.pos, lambda t: {{'docid': md5(t), 'title': '', 'text': t}}) END AS pos,
  CASE fmt WHEN 'tevatron' THEN coalesce(j.negative_passages, [])
           WHEN 'bge' THEN coalesce(list_transform(j.neg, lambda t: {{'docid': md5(t), 'title': '', 'text': t}}), []) END AS neg,
  CASE fmt WHEN 'tevatron' THEN json_exists(line, '$.negative_passages') AND j.negative_passages IS NULL
                                AND json_type(line, '$.negative_passages') <> 'NULL'
           WHEN 'bge' THEN json_exists(line, '$.neg') AND j.neg IS NULL AND json_type(line, '$.neg') <> 'NULL'
  END AS neg_invalid
FROM p
"""

# First matching reason wins; NULL = the row is fine so far.
_REASON_SQL = """
CREATE OR REPLACE TEMP TABLE _checked AS
SELECT *,
  CASE
    WHEN NOT ok_json THEN 'malformed_json'
    WHEN jtype <> 'OBJECT' THEN 'not_a_json_object'
    WHEN fmt IS NULL THEN 'missing_field:positives'
    WHEN query IS NULL THEN 'missing_field:query'
    WHEN trim(query) = '' THEN 'empty_field:query'
    WHEN fmt = 'tevatron' AND query_id IS NULL THEN 'missing_field:query_id'
    WHEN pos IS NULL THEN 'invalid_field:positives'
    WHEN len(pos) = 0 THEN 'no_positive'
    WHEN neg_invalid THEN 'invalid_field:negatives'
    WHEN len(list_filter(pos || neg, lambda x: x IS NULL OR x.docid IS NULL OR trim(x.docid) = '')) > 0
      THEN 'missing_field:docid'
    WHEN len(list_filter(pos || neg, lambda x: x.text IS NULL OR trim(x.text) = '')) > 0
      THEN 'empty_field:passage_text'
    WHEN list_max(list_transform(pos || neg, lambda x: length(x.text) + length(coalesce(x.title, '')))) > $max_chars
      THEN 'passage_too_long'
  END AS reason,
  CASE
    WHEN NOT ok_json THEN 'not valid JSON'
    WHEN list_max(list_transform(pos || neg, lambda x: length(x.text) + length(coalesce(x.title, '')))) > $max_chars
      THEN 'longest passage has ' || list_max(list_transform(pos || neg, lambda x: length(x.text) + length(coalesce(x.title, '')))) || ' chars (limit ' || $max_chars || ')'
  END AS detail
FROM _parsed
"""

# Among rows that passed the per-row checks: a query_id seen earlier with different content, and a
# docid whose text differs from its first occurrence, reject the later row.
_CONFLICT_SQL = """
CREATE OR REPLACE TEMP TABLE _good AS
SELECT source_file, line_no, line, fmt, query_id, query, prompt, pos, neg,
       md5(query || chr(1) || array_to_string(list_transform(pos, lambda x: x.docid), chr(2))
           || chr(1) || array_to_string(list_transform(neg, lambda x: x.docid), chr(2))) AS content_hash,
       row_number() OVER (ORDER BY source_file, line_no) AS ord
FROM _checked WHERE reason IS NULL;

CREATE OR REPLACE TEMP TABLE _qid_conflict AS
SELECT g.ord, 'duplicate_query_id_conflict' AS reason,
       'query_id ' || g.query_id || ' first seen at ' || f.source_file || ':' || f.line_no || ' with different content' AS detail
FROM _good g
JOIN (SELECT query_id, arg_min(content_hash, ord) AS first_hash, arg_min(source_file, ord) AS source_file,
             arg_min(line_no, ord) AS line_no
      FROM _good WHERE fmt = 'tevatron' GROUP BY query_id) f USING (query_id)
WHERE g.fmt = 'tevatron' AND g.content_hash <> f.first_hash;

CREATE OR REPLACE TEMP TABLE _refs AS
SELECT ord, unnest(pos || neg, recursive := true) FROM _good;

CREATE OR REPLACE TEMP TABLE _doc_conflict AS
SELECT r.ord, 'docid_text_conflict' AS reason,
       'docid ' || any_value(r.docid) || ' has different text than its first occurrence' AS detail
FROM _refs r
JOIN (SELECT docid, arg_min(md5(coalesce(title, '') || chr(1) || text), ord) AS first_hash FROM _refs GROUP BY docid) f
  USING (docid)
WHERE md5(coalesce(r.title, '') || chr(1) || r.text) <> f.first_hash
GROUP BY r.ord;
"""

_FINAL_SQL = """
CREATE OR REPLACE TEMP TABLE _rejected AS
SELECT ord, arg_min(reason, prio) AS reason, arg_min(detail, prio) AS detail FROM (
  SELECT ord, reason, detail, 1 AS prio FROM _qid_conflict
  UNION ALL SELECT ord, reason, detail, 2 AS prio FROM _doc_conflict
) GROUP BY ord;

-- Accepted rows. A negative equal to a positive (same docid or same text) or repeated within the
-- row is dropped from the negatives and recorded in the quarantine; order is otherwise kept.
CREATE OR REPLACE TEMP TABLE _accepted AS
SELECT g.*,
  list_transform(pos, lambda x: x.docid) AS pos_ids,
  list_transform(pos, lambda x: md5(x.text)) AS pos_text_hashes,
  list_transform(neg, lambda x: x.docid) AS neg_ids_all
FROM _good g ANTI JOIN _rejected r USING (ord);

CREATE OR REPLACE TEMP TABLE _accepted2 AS
SELECT *,
  list_filter(neg, lambda x, i:
      NOT list_contains(pos_ids, x.docid)
      AND NOT list_contains(pos_text_hashes, md5(x.text))
      AND list_position(neg_ids_all, x.docid) = i) AS neg_kept
FROM _accepted;
"""


def _q_insert(conn, dataset: str) -> None:
    conn.execute(
        """INSERT INTO raw_quarantine (dataset, source_file, line_no, reason, detail, raw_line)
           SELECT ?, source_file, line_no, reason, detail, raw_line FROM _q_lines""",
        [dataset],
    )
    conn.execute(
        """INSERT INTO raw_quarantine (dataset, source_file, line_no, reason, detail, raw_line)
           SELECT ?, source_file, line_no, reason, detail, line FROM _checked WHERE reason IS NOT NULL""",
        [dataset],
    )
    conn.execute(
        """INSERT INTO raw_quarantine (dataset, source_file, line_no, reason, detail, raw_line)
           SELECT ?, g.source_file, g.line_no, r.reason, r.detail, g.line
           FROM _good g JOIN _rejected r USING (ord)""",
        [dataset],
    )
    # Passage-level: negatives dropped from accepted rows (the row itself is kept).
    conn.execute(
        """INSERT INTO raw_quarantine (dataset, source_file, line_no, reason, detail, raw_line)
           SELECT ?, source_file, line_no,
                  CASE WHEN list_contains(pos_ids, n.docid) OR list_contains(pos_text_hashes, md5(n.text))
                       THEN 'negative_equals_positive' ELSE 'duplicate_negative' END,
                  'negative #' || i || ' docid ' || n.docid || ' dropped',
                  to_json(n)::VARCHAR
           FROM (SELECT source_file, line_no, pos_ids, pos_text_hashes, neg_ids_all,
                        unnest(neg) AS n, generate_subscripts(neg, 1) AS i FROM _accepted2)
           WHERE list_contains(pos_ids, n.docid) OR list_contains(pos_text_hashes, md5(n.text))
              OR list_position(neg_ids_all, n.docid) <> i""",
        [dataset],
    )


def ingest_dataset(conn: duckdb.DuckDBPyConnection, dataset: str, files: list[tuple[Path, str, str]], *,
                   max_passage_chars: int = DEFAULT_MAX_PASSAGE_CHARS,
                   progress: Callable[[str], None] | None = None) -> IngestStats:
    """Replace the dataset's rows in raw_* with the contents of ``files`` = [(path, label, format)].

    Runs in one transaction: a failure leaves the previous version of the partition in place."""
    ensure_schema(conn)
    stats = IngestStats(dataset=dataset, files=[label for _, label, _ in files])
    _stage_table(conn)
    for path, label, fmt in files:
        stats.lines_read += stage_file(conn, path, label, fmt, progress)

    if progress:
        progress(f"{dataset}: validating and normalizing {stats.lines_read:,} rows in DuckDB")
    conn.execute(_PARSE_SQL)
    conn.execute(_REASON_SQL.replace("$max_chars", str(int(max_passage_chars))))
    conn.execute(_CONFLICT_SQL)
    conn.execute(_FINAL_SQL)

    conn.execute("BEGIN TRANSACTION")
    try:
        replace_partition(conn, ["raw_queries", "raw_passages", "raw_instances", "raw_quarantine"], dataset)
        _q_insert(conn, dataset)
        conn.execute(
            """INSERT INTO raw_instances (dataset, instance_id, query_id, positive_ids, negative_ids,
                                          source_file, line_no, source_format, prompt)
               SELECT ?, source_file || ':' || line_no, query_id, pos_ids,
                      list_transform(neg_kept, lambda x: x.docid), source_file, line_no, fmt, prompt
               FROM _accepted2""",
            [dataset],
        )
        conn.execute(
            """INSERT INTO raw_queries (dataset, query_id, query)
               SELECT ?, query_id, arg_min(query, ord) FROM _accepted2 GROUP BY query_id""",
            [dataset],
        )
        conn.execute(
            """INSERT INTO raw_passages (dataset, docid, title, text)
               SELECT ?, docid, arg_min(title, ord), arg_min(text, ord) FROM (
                 SELECT ord, unnest(pos || neg_kept, recursive := true) FROM _accepted2
               ) GROUP BY docid""",
            [dataset],
        )
        conn.execute("COMMIT")
    except Exception:
        conn.execute("ROLLBACK")
        raise
    finally:
        for t in ("_stage", "_q_lines", "_parsed", "_checked", "_good", "_qid_conflict", "_refs",
                  "_doc_conflict", "_rejected", "_accepted", "_accepted2"):
            conn.execute(f"DROP TABLE IF EXISTS {t}")

    stats.instances, stats.queries = conn.execute(
        "SELECT count(*), count(DISTINCT query_id) FROM raw_instances WHERE dataset = ?", [dataset]).fetchall()[0]
    stats.passages = conn.execute("SELECT count(*) FROM raw_passages WHERE dataset = ?", [dataset]).fetchall()[0][0]
    rows = conn.execute(
        """SELECT reason, count(*) FROM raw_quarantine WHERE dataset = ? GROUP BY reason ORDER BY 2 DESC""",
        [dataset]).fetchall()
    stats.quarantine_by_reason = {r: n for r, n in rows}
    passage_level = {"negative_equals_positive", "duplicate_negative"}
    stats.quarantined_passages = sum(n for r, n in rows if r in passage_level)
    stats.quarantined_rows = sum(n for r, n in rows if r not in passage_level)
    return stats
