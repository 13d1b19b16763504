"""Ingest a BGE-style training collection into normalized DuckDB tables, streaming.

Input rows come in two formats (JSONL, JSONL.gz or Parquet):
- Tevatron / rlhn: ``query_id, query, positive_passages[{docid,title,text}], negative_passages[...], subset``
- FlagEmbedding / BGE: ``query, pos[str], neg[str]`` (+ optional ``pos_scores, neg_scores, prompt``);
  passages carry no ids, so they get content-hash ids (md5 of the text, as rlhn's docids are md5s).

How it streams: Python reads each file in fixed-size byte chunks and splits them into lines with Arrow
(no Python object per line; a line that is not valid UTF-8 is quarantined right there). Each bounded
batch of raw lines goes to DuckDB, where one SQL statement parses, validates and normalizes it into a
single row table (``_rows``). The cross-row checks (query_id and docid conflicts) and the final tables
then run as DuckDB SQL over that table, which spills to disk under its memory limit: a dataset is never
held whole in Python, and no intermediate copy of the whole dataset is built.

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
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rlhn_assets.lib.db import ensure_schema, replace_partition

CHUNK_BYTES = 8 << 20  # bytes read per chunk
BATCH_LINES = 20_000  # lines per batch of iter_jsonl_batches
BATCH_BYTES = 64 << 20  # raw bytes per DuckDB insert (bounds Python memory)
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


def _split_block_slow(body: bytes, first: int, on_bad_utf8: Callable[[int, bytes], None]):
    """Per-line path of a block that is not valid UTF-8 as a whole (as in iter_jsonl_batches)."""
    nums: list[int] = []
    texts: list[str] = []
    raws = body.split(b"\n")
    for i, raw in enumerate(raws):
        n = first + i + 1
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            on_bad_utf8(n, raw)
            continue
        if text.endswith("\r"):
            text = text[:-1]
        if not text.strip():
            continue
        nums.append(n)
        texts.append(text)
    return pa.array(nums, pa.int64()), pa.array(texts, pa.large_string()), len(raws)


def _split_block(body: bytes, first: int, on_bad_utf8: Callable[[int, bytes], None]):
    """Split a block of complete lines (without its final newline) numbered from ``first + 1``.

    Returns (line numbers, lines, number of lines in the block): a trailing ``\\r`` is removed, blank
    lines are skipped but counted, exactly as in iter_jsonl_batches."""
    try:
        body.decode("utf-8")  # validation only; every line is valid iff the block is
    except UnicodeDecodeError:
        return _split_block_slow(body, first, on_bad_utf8)
    whole = pa.LargeStringArray.from_buffers(
        1, pa.py_buffer(np.array([0, len(body)], dtype=np.int64)), pa.py_buffer(body))
    lines = pc.split_pattern(whole, "\n").flatten()
    n = len(lines)
    nums = pa.array(np.arange(first + 1, first + n + 1, dtype=np.int64))
    cr = pc.ends_with(lines, "\r")
    if pc.any(cr).as_py():
        lines = pc.if_else(cr, pc.utf8_slice_codeunits(lines, 0, -1), lines)
    # A line that starts with "{" is not blank; any other line is checked like str.strip() would.
    maybe_blank = pc.indices_nonzero(pc.invert(pc.starts_with(lines, "{"))).to_pylist()
    if maybe_blank:
        keep = np.ones(n, dtype=bool)
        for i in maybe_blank:
            if not lines[i].as_py().strip():
                keep[i] = False
        if not keep.all():
            mask = pa.array(keep)
            lines, nums = lines.filter(mask), nums.filter(mask)
    return nums, lines, n


def iter_jsonl_arrow(path: Path, *, batch_bytes: int = BATCH_BYTES,
                     on_bad_utf8: Callable[[int, bytes], None]) -> Iterator[tuple[pa.ChunkedArray, pa.ChunkedArray]]:
    """The lines of iter_jsonl_batches (same numbers, same skipped and rejected lines) as Arrow arrays
    (line numbers, lines), in batches of about ``batch_bytes`` with no Python object per line."""
    line_no = 0
    carry = b""
    parts: list[tuple[pa.Array, pa.Array]] = []
    size = 0
    try:
        with _open_binary(path) as f:
            while True:
                chunk = f.read(CHUNK_BYTES)
                if not chunk:
                    break
                buf = carry + chunk if carry else chunk
                cut = buf.rfind(b"\n")
                if cut < 0:
                    carry = buf
                    continue
                carry = buf[cut + 1:]
                nums, lines, n = _split_block(buf[:cut], line_no, on_bad_utf8)
                line_no += n
                if len(nums):
                    parts.append((nums, lines))
                    size += cut
                if size >= batch_bytes:
                    yield pa.chunked_array([p[0] for p in parts]), pa.chunked_array([p[1] for p in parts])
                    parts, size = [], 0
            if carry:
                line_no += 1
                try:
                    text = carry.decode("utf-8").rstrip("\r")
                    if text.strip():
                        parts.append((pa.array([line_no], pa.int64()), pa.array([text], pa.large_string())))
                except UnicodeDecodeError:
                    on_bad_utf8(line_no, carry)
    except FileNotFoundError as e:
        raise IngestError(f"{path}: file not found") from e
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise IngestError(f"{path}: not a readable gzip file ({e})") from e
    except OSError as e:
        raise IngestError(f"{path}: cannot be read ({e})") from e
    if parts:
        yield pa.chunked_array([p[0] for p in parts]), pa.chunked_array([p[1] for p in parts])


# ---------------------------------------------------------------------------------------------
# Per-row parsing, validation and normalization: one SQL statement per batch of raw lines.
#
# ``ord`` orders rows by (source_file, line_no), as "first occurrence" is defined; it is computed from
# the file's rank among the labels and the line number (see _file_keys), so no sort is needed.

_STRUCT = "STRUCT(docid VARCHAR, title VARCHAR, text VARCHAR)"


def _rows_table(conn: duckdb.DuckDBPyConnection) -> None:
    for t in ("_rows", "_q_lines"):
        conn.execute(f"DROP TABLE IF EXISTS {t}")
    # One row per staged line. Rejected rows keep only what the quarantine needs; accepted-so-far rows
    # (reason IS NULL) also carry the normalized passages and their id lists.
    conn.execute(f"""CREATE TEMP TABLE _rows (
        ord BIGINT, source_file VARCHAR, line_no BIGINT, fmt VARCHAR, line VARCHAR,
        reason VARCHAR, detail VARCHAR, query_id VARCHAR, query VARCHAR, prompt VARCHAR,
        pos {_STRUCT}[], neg {_STRUCT}[], content_hash VARCHAR,
        pos_ids VARCHAR[], neg_ids VARCHAR[], neg_kept_ids VARCHAR[])""")
    conn.execute(
        "CREATE TEMP TABLE _q_lines (source_file VARCHAR, line_no BIGINT, reason VARCHAR, detail VARCHAR, raw_line VARCHAR)"
    )


# {src} yields (ord, source_file, line_no, fmt, line). Each JSON document is parsed once by json_valid,
# json_type and json_transform; json_exists/json_type on a path only run where they can matter.
# First matching reason wins; NULL = the row is fine so far.
_ROWS_SQL = f"""
INSERT INTO _rows
WITH v AS (
  SELECT ord, source_file, line_no, fmt AS declared_fmt, line,
         json_valid(line) AS ok_json
  FROM {{src}}
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
), parsed AS (
  SELECT ord, source_file, line_no, line, ok_json, jtype, fmt,
    CASE fmt WHEN 'tevatron' THEN nullif(trim(j.query_id), '')
             WHEN 'bge' THEN md5(j.query) END AS query_id,
    j.query AS query,
    j.prompt AS prompt,
    CASE fmt WHEN 'tevatron' THEN j.positive_passages
             WHEN 'bge' THEN list_transform(j.pos, lambda t: {{'docid': md5(t), 'title': '', 'text': t}}) END AS pos,
    CASE fmt WHEN 'tevatron' THEN coalesce(j.negative_passages, [])
             WHEN 'bge' THEN coalesce(list_transform(j.neg, lambda t: {{'docid': md5(t), 'title': '', 'text': t}}), []) END AS neg,
    -- "present, not null, but not a list of the expected type"; the path lookups only run when the
    -- transformed field is NULL (same truth value as checking all three conditions everywhere)
    CASE fmt WHEN 'tevatron' THEN CASE WHEN j.negative_passages IS NOT NULL THEN false
                                       ELSE json_exists(line, '$.negative_passages')
                                            AND json_type(line, '$.negative_passages') <> 'NULL' END
             WHEN 'bge' THEN CASE WHEN j.neg IS NOT NULL THEN false
                                  ELSE json_exists(line, '$.neg') AND json_type(line, '$.neg') <> 'NULL' END
    END AS neg_invalid
  FROM p
), measured AS (
  SELECT *,
    list_max(list_transform(pos || neg, lambda x: length(x.text) + length(coalesce(x.title, '')))) AS max_len
  FROM parsed
), checked AS (
  -- ltrim(s) = '' is trim(s) = '' (both strip the same characters) without scanning the whole string
  SELECT *,
    CASE
      WHEN NOT ok_json THEN 'malformed_json'
      WHEN jtype <> 'OBJECT' THEN 'not_a_json_object'
      WHEN fmt IS NULL THEN 'missing_field:positives'
      WHEN query IS NULL THEN 'missing_field:query'
      WHEN ltrim(query) = '' THEN 'empty_field:query'
      WHEN fmt = 'tevatron' AND query_id IS NULL THEN 'missing_field:query_id'
      WHEN pos IS NULL THEN 'invalid_field:positives'
      WHEN len(pos) = 0 THEN 'no_positive'
      WHEN neg_invalid THEN 'invalid_field:negatives'
      WHEN len(list_filter(pos || neg, lambda x: x IS NULL OR x.docid IS NULL OR ltrim(x.docid) = '')) > 0
        THEN 'missing_field:docid'
      WHEN len(list_filter(pos || neg, lambda x: x.text IS NULL OR ltrim(x.text) = '')) > 0
        THEN 'empty_field:passage_text'
      WHEN max_len > $max_chars THEN 'passage_too_long'
    END AS reason,
    CASE
      WHEN NOT ok_json THEN 'not valid JSON'
      WHEN max_len > $max_chars
        THEN 'longest passage has ' || max_len || ' chars (limit ' || $max_chars || ')'
    END AS detail
  FROM measured
), ids AS (
  SELECT *,
    CASE WHEN reason IS NULL THEN list_transform(pos, lambda x: x.docid) END AS pos_ids,
    CASE WHEN reason IS NULL THEN list_transform(neg, lambda x: x.docid) END AS neg_ids
  FROM checked
), hashes AS (
  -- md5 of each passage text; a BGE passage's docid already is md5(text)
  SELECT *,
    CASE WHEN reason IS NULL THEN CASE WHEN fmt = 'bge' THEN pos_ids
                                       ELSE list_transform(pos, lambda x: md5(x.text)) END END AS pos_text_hashes,
    CASE WHEN reason IS NULL THEN CASE WHEN fmt = 'bge' THEN neg_ids
                                       ELSE list_transform(neg, lambda x: md5(x.text)) END END AS neg_text_hashes
  FROM ids
)
SELECT ord, source_file, line_no, fmt, line, reason, detail,
  CASE WHEN reason IS NULL THEN query_id END,
  CASE WHEN reason IS NULL THEN query END,
  CASE WHEN reason IS NULL THEN prompt END,
  CASE WHEN reason IS NULL THEN pos END,
  CASE WHEN reason IS NULL THEN neg END,
  CASE WHEN reason IS NULL THEN md5(query || chr(1) || array_to_string(pos_ids, chr(2))
                                   || chr(1) || array_to_string(neg_ids, chr(2))) END,
  pos_ids,
  neg_ids,
  -- A negative equal to a positive (same docid or same text) or repeated within the row is dropped
  -- from the negatives (and recorded in the quarantine); order is otherwise kept.
  CASE WHEN reason IS NULL THEN list_filter(neg_ids, lambda d, i:
      NOT list_contains(pos_ids, d)
      AND NOT list_contains(pos_text_hashes, neg_text_hashes[i])
      AND list_position(neg_ids, d) = i) END
FROM hashes
"""

_BATCH_SRC = "(SELECT ord, $label::VARCHAR AS source_file, line_no, $fmt::VARCHAR AS fmt, line FROM _batch)"
_PARQUET_SRC = """(SELECT ($file_key + r.file_row_number + 1) * $dups + $dup AS ord, $label::VARCHAR AS source_file,
                          r.file_row_number + 1 AS line_no, $fmt::VARCHAR AS fmt, to_json(r)::VARCHAR AS line
                   FROM read_parquet($path, file_row_number = true) r)"""
_LINE_BITS = 40  # line numbers below 2**40 per file


def _file_keys(conn: duckdb.DuckDBPyConnection, labels: list[str]) -> tuple[list[tuple[int, int]], int]:
    """Per file (file_key, dup), and dups, such that ord = (file_key + line_no) * dups + dup orders rows
    like ORDER BY source_file, line_no (with the connection's collation) and is unique. Files whose
    labels sort equal share a key, their lines interleave by line number."""
    rank = dict(conn.execute(
        "SELECT l, dense_rank() OVER (ORDER BY l) - 1 FROM (SELECT unnest($labels::VARCHAR[]) AS l)",
        {"labels": labels}).fetchall())
    seen: dict[int, int] = {}
    keys = []
    for label in labels:
        r = rank[label]
        keys.append((r << _LINE_BITS, seen.get(r, 0)))
        seen[r] = seen.get(r, 0) + 1
    return keys, max(seen.values(), default=1)


def stage_file(conn: duckdb.DuckDBPyConnection, path: Path, label: str, fmt: str, *, max_chars: int,
               file_key: int = 0, dup: int = 0, dups: int = 1,
               progress: Callable[[str], None] | None = None) -> int:
    """Parse and check one file's rows into ``_rows``; returns the number of lines read (incl. rejected)."""
    if not path.exists():
        raise IngestError(f"{path}: file not found")
    rows_sql = _ROWS_SQL.replace("$max_chars", str(int(max_chars)))
    name = path.name.lower()
    if name.endswith(".parquet"):
        try:
            conn.execute(rows_sql.replace("{src}", _PARQUET_SRC),
                         {"label": label, "fmt": fmt, "path": str(path), "file_key": file_key,
                          "dup": dup, "dups": dups})
        except duckdb.Error as e:
            raise IngestError(f"{path}: not a readable Parquet file ({e})") from e
        return conn.execute("SELECT count(*) FROM _rows WHERE source_file = ?", [label]).fetchall()[0][0]
    if not (name.endswith(".jsonl") or name.endswith(".jsonl.gz") or name.endswith(".json")
            or name.endswith(".json.gz")):
        raise IngestError(f"{path}: unsupported file type (expected .jsonl, .jsonl.gz or .parquet)")

    bad: list[tuple[int, bytes]] = []
    batch_sql = rows_sql.replace("{src}", _BATCH_SRC)
    for nums, lines in iter_jsonl_arrow(path, on_bad_utf8=lambda n, raw: bad.append((n, raw))):
        ords = pc.add(pc.multiply(pc.add(nums, file_key), dups), dup)
        conn.register("_batch", pa.table({"ord": ords, "line_no": nums, "line": lines}))
        try:
            conn.execute(batch_sql, {"label": label, "fmt": fmt})
        finally:
            conn.unregister("_batch")
        if progress:
            progress(f"{label}: staged {nums[-1].as_py():,} lines")
    for n, raw in bad:
        conn.execute(
            "INSERT INTO _q_lines VALUES (?, ?, 'invalid_utf8', ?, ?)",
            [label, n, "line is not valid UTF-8", raw.decode("utf-8", errors="backslashreplace")],
        )
    n_bad = len(bad)
    n_good = conn.execute("SELECT count(*) FROM _rows WHERE source_file = ?", [label]).fetchall()[0][0]
    return n_good + n_bad


# ---------------------------------------------------------------------------------------------
# Cross-row checks, all in SQL, over the rows that passed the per-row checks: a query_id seen earlier
# with different content, and a docid whose text differs from its first occurrence, reject the later row.

_QID_CONFLICT_SQL = """
CREATE OR REPLACE TEMP TABLE _qid_conflict AS
WITH g AS (SELECT ord, source_file, line_no, query_id, content_hash FROM _rows
           WHERE reason IS NULL AND fmt = 'tevatron')
SELECT g.ord, 'duplicate_query_id_conflict' AS reason,
       'query_id ' || g.query_id || ' first seen at ' || f.source_file || ':' || f.line_no || ' with different content' AS detail
FROM g
JOIN (SELECT query_id, arg_min(content_hash, ord) AS first_hash, arg_min(source_file, ord) AS source_file,
             arg_min(line_no, ord) AS line_no
      FROM g GROUP BY query_id) f USING (query_id)
WHERE g.content_hash <> f.first_hash
"""

# A docid can only have a text conflict if its occurrences differ in title or text: find those docids
# first (usually none), then apply the md5 comparison with the first occurrence to their references only.
_DOC_CANDIDATES_SQL = """
CREATE OR REPLACE TEMP TABLE _doc_candidates AS
SELECT docid FROM (SELECT unnest(pos || neg, recursive := true) FROM _rows WHERE reason IS NULL)
GROUP BY docid
HAVING min(coalesce(title, '')) <> max(coalesce(title, '')) OR min(text) <> max(text)
"""

_DOC_CONFLICT_SQL = """
CREATE OR REPLACE TEMP TABLE _doc_conflict AS
WITH r AS MATERIALIZED (
  SELECT * FROM (SELECT ord, unnest(pos || neg, recursive := true) FROM _rows WHERE reason IS NULL)
  WHERE docid IN (SELECT docid FROM _doc_candidates)
)
SELECT r.ord, 'docid_text_conflict' AS reason,
       'docid ' || any_value(r.docid) || ' has different text than its first occurrence' AS detail
FROM r
JOIN (SELECT docid, arg_min(md5(coalesce(title, '') || chr(1) || text), ord) AS first_hash FROM r GROUP BY docid) f
  USING (docid)
WHERE md5(coalesce(r.title, '') || chr(1) || r.text) <> f.first_hash
GROUP BY r.ord
"""

_REJECTED_SQL = """
CREATE OR REPLACE TEMP TABLE _rejected AS
SELECT ord, arg_min(reason, prio) AS reason, arg_min(detail, prio) AS detail FROM (
  SELECT ord, reason, detail, 1 AS prio FROM _qid_conflict
  UNION ALL SELECT ord, reason, detail, 2 AS prio FROM _doc_conflict
) GROUP BY ord
"""

# Accepted rows: passed the per-row checks and not rejected by a conflict.
_ACCEPTED = "(SELECT * FROM _rows g WHERE g.reason IS NULL AND NOT EXISTS (SELECT 1 FROM _rejected r WHERE r.ord = g.ord))"


def _q_insert(conn, dataset: str) -> None:
    conn.execute(
        """INSERT INTO raw_quarantine (dataset, source_file, line_no, reason, detail, raw_line)
           SELECT ?, source_file, line_no, reason, detail, raw_line FROM _q_lines""",
        [dataset],
    )
    conn.execute(
        """INSERT INTO raw_quarantine (dataset, source_file, line_no, reason, detail, raw_line)
           SELECT ?, source_file, line_no, reason, detail, line FROM _rows WHERE reason IS NOT NULL""",
        [dataset],
    )
    conn.execute(
        """INSERT INTO raw_quarantine (dataset, source_file, line_no, reason, detail, raw_line)
           SELECT ?, g.source_file, g.line_no, r.reason, r.detail, g.line
           FROM _rows g JOIN _rejected r USING (ord)""",
        [dataset],
    )
    # Passage-level: negatives dropped from accepted rows (the row itself is kept). Only rows that
    # dropped a negative are unnested.
    conn.execute(
        f"""INSERT INTO raw_quarantine (dataset, source_file, line_no, reason, detail, raw_line)
           SELECT ?, source_file, line_no,
                  CASE WHEN list_contains(pos_ids, n.docid) OR list_contains(pos_text_hashes, md5(n.text))
                       THEN 'negative_equals_positive' ELSE 'duplicate_negative' END,
                  'negative #' || i || ' docid ' || n.docid || ' dropped',
                  to_json(n)::VARCHAR
           FROM (SELECT source_file, line_no, pos_ids, list_transform(pos, lambda x: md5(x.text)) AS pos_text_hashes,
                        neg_ids AS neg_ids_all, unnest(neg) AS n, generate_subscripts(neg, 1) AS i
                 FROM {_ACCEPTED} WHERE len(neg_kept_ids) < len(neg_ids))
           WHERE list_contains(pos_ids, n.docid) OR list_contains(pos_text_hashes, md5(n.text))
              OR list_position(neg_ids_all, n.docid) <> i""",
        [dataset],
    )


_TEMP_TABLES = ("_rows", "_q_lines", "_qid_conflict", "_doc_candidates", "_doc_conflict", "_rejected")


def ingest_dataset(conn: duckdb.DuckDBPyConnection, dataset: str, files: list[tuple[Path, str, str]], *,
                   max_passage_chars: int = DEFAULT_MAX_PASSAGE_CHARS,
                   progress: Callable[[str], None] | None = None) -> IngestStats:
    """Replace the dataset's rows in raw_* with the contents of ``files`` = [(path, label, format)].

    Runs in one transaction: a failure leaves the previous version of the partition in place."""
    ensure_schema(conn)
    stats = IngestStats(dataset=dataset, files=[label for _, label, _ in files])
    try:
        _rows_table(conn)
        keys, dups = _file_keys(conn, [label for _, label, _ in files])
        for (path, label, fmt), (file_key, dup) in zip(files, keys):
            stats.lines_read += stage_file(conn, path, label, fmt, max_chars=max_passage_chars,
                                           file_key=file_key, dup=dup, dups=dups, progress=progress)

        if progress:
            progress(f"{dataset}: validating and normalizing {stats.lines_read:,} rows in DuckDB")
        conn.execute(_QID_CONFLICT_SQL)
        conn.execute(_DOC_CANDIDATES_SQL)
        if conn.execute("SELECT count(*) FROM _doc_candidates").fetchall()[0][0]:
            conn.execute(_DOC_CONFLICT_SQL)
        else:
            conn.execute("CREATE OR REPLACE TEMP TABLE _doc_conflict (ord BIGINT, reason VARCHAR, detail VARCHAR)")
        conn.execute(_REJECTED_SQL)

        conn.execute("BEGIN TRANSACTION")
        try:
            replace_partition(conn, ["raw_queries", "raw_passages", "raw_instances", "raw_quarantine"], dataset)
            _q_insert(conn, dataset)
            conn.execute(
                f"""INSERT INTO raw_instances (dataset, instance_id, query_id, positive_ids, negative_ids,
                                              source_file, line_no, source_format, prompt)
                   SELECT ?, source_file || ':' || line_no, query_id, pos_ids, neg_kept_ids,
                          source_file, line_no, fmt, prompt
                   FROM {_ACCEPTED}""",
                [dataset],
            )
            conn.execute(
                f"""INSERT INTO raw_queries (dataset, query_id, query)
                   SELECT ?, query_id, arg_min(query, ord) FROM {_ACCEPTED} GROUP BY query_id""",
                [dataset],
            )
            # The kept negatives: all of them unless the row dropped one (then the same filter as
            # neg_kept_ids, on the passages).
            conn.execute(
                f"""INSERT INTO raw_passages (dataset, docid, title, text)
                   SELECT ?, docid, arg_min(title, ord), arg_min(text, ord) FROM (
                     SELECT ord, unnest(pos || neg_kept, recursive := true) FROM (
                       SELECT ord, pos,
                         CASE WHEN len(neg_kept_ids) = len(neg_ids) THEN neg
                              ELSE list_filter(neg, lambda x, i:
                                     NOT list_contains(pos_ids, x.docid)
                                     AND NOT list_contains(list_transform(pos, lambda y: md5(y.text)), md5(x.text))
                                     AND list_position(neg_ids, x.docid) = i) END AS neg_kept
                       FROM {_ACCEPTED})
                   ) GROUP BY docid""",
                [dataset],
            )
            conn.execute("COMMIT")
        except Exception:
            conn.execute("ROLLBACK")
            raise
    finally:
        for t in _TEMP_TABLES:
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
