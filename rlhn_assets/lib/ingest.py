"""Ingest a BGE-style training collection into normalized DuckDB tables, streaming.

Input rows come in two formats (JSONL, JSONL.gz or Parquet):
- Tevatron / rlhn: ``query_id, query, positive_passages[{docid,title,text}], negative_passages[...], subset``
- FlagEmbedding / BGE: ``query, pos[str], neg[str]`` (+ optional ``pos_scores, neg_scores, prompt``);
  passages carry no ids, so they get content-hash ids (md5 of the text, as rlhn's docids are md5s).

How it streams: Python reads each file in fixed-size byte chunks and splits them into lines as Arrow
arrays (no Python object per line; a line that is not valid UTF-8 is quarantined right there), which
DuckDB pulls as one stream per file. All JSON parsing, validation, deduplication and normalization run
as DuckDB SQL, in two passes over each file so that no copy of the passage texts is ever stored:
pass 1 parses and checks every row and keeps only narrow per-row data (passage ids, md5s, reasons);
the cross-row conflicts and the first occurrence of every passage are found on that; pass 2 reads the
file again and takes the texts of those first occurrences (failing if the file changed in between).
A dataset is never held whole in Python, and DuckDB spills to disk under its memory limit.

Bad input never disappears: every rejected row lands in ``raw_quarantine`` with dataset, file, line
number, reason, detail and the raw line.
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rlhn_assets.lib.db import replace_partition

CHUNK_BYTES = 8 << 20  # bytes read per chunk
BATCH_BYTES = 64 << 20  # bytes read between two progress messages
DEFAULT_MAX_PASSAGE_CHARS = 50_000  # a MS MARCO passage is ~350 chars, a FiQA answer ~1,000

_PASSAGE = '{"docid":"VARCHAR","title":"VARCHAR","text":"VARCHAR"}'
# One transform covers both formats; json_transform leaves absent fields NULL, but it also turns a value
# of the wrong type into text (5 -> '5', {"a":1} -> '{"a":1}') where a VARCHAR is asked for.
_ROW_SCHEMA = (
    '{"query_id":"VARCHAR","query":"VARCHAR",'
    f'"positive_passages":[{_PASSAGE}],"negative_passages":[{_PASSAGE}],"subset":"VARCHAR",'
    '"pos":["VARCHAR"],"neg":["VARCHAR"],"prompt":"VARCHAR"}'
)
# So the same fields once more as JSON text, whose first character is the value's JSON type ('"' = string).
_TYPES_SCHEMA = _ROW_SCHEMA.replace('"VARCHAR"', '"JSON"').replace(',"subset":"JSON"', "")


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


# ---------------------------------------------------------------------------------------------
# The line reader. Line rules: lines are numbered from 1 over the whole file (blank and rejected lines
# included); a line that is not valid UTF-8 goes to ``on_bad_utf8`` and is skipped; one trailing "\r" is
# dropped; blank lines are skipped; the last line may lack its "\n". ``_single_line`` states them in code.
#
# Each chunk is copied once (newlines removed) and the lines become an Arrow string array over that
# copy; Python only looks at the rare line that is blank, has a "\r" or does not start with "{".


def _single_line(raw: bytes, line_no: int, on_bad_utf8: Callable[[int, bytes], None], *, last: bool = False):
    """One line through the line rules (above); returns the text to keep or None."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        on_bad_utf8(line_no, raw)
        return None
    if last:
        text = text.rstrip("\r")
    elif text.endswith("\r"):
        text = text[:-1]
    return text if text.strip() else None


def _piece(nums: list[int], texts: list[str]) -> tuple[pa.Array, pa.Array]:
    return pa.array(nums, pa.int64()), pa.array(texts, pa.large_string())


def _chunk_lines(
    chunk: bytes, start: int, end: int, first_no: int, on_bad_utf8: Callable[[int, bytes], None]
) -> tuple[pa.Array, pa.Array, int]:
    """The complete lines chunk[start:end] ("\\n"-separated, end at a newline) numbered from first_no + 1.

    Returns (line numbers, lines, number of lines); blank lines are skipped but counted."""
    valid = chunk.isascii()
    if not valid:
        try:
            chunk[start:end].decode("utf-8")
            valid = True
        except UnicodeDecodeError:
            pass
    if not valid:  # per-line path: reject the lines that are not UTF-8
        nums: list[int] = []
        texts: list[str] = []
        raws = chunk[start:end].split(b"\n")
        for i, raw in enumerate(raws):
            text = _single_line(raw, first_no + i + 1, on_bad_utf8)
            if text is not None:
                nums.append(first_no + i + 1)
                texts.append(text)
        return *_piece(nums, texts), len(raws)

    # Newline positions, and the lines Python must look at (not starting with "{" or ending in "\r").
    ends: list[int] = []
    odd: list[int] = []
    find = chunk.find
    s = start
    while s <= end:
        p = find(b"\n", s, end + 1)
        if p < 0:
            p = end + 1  # not reached: end is at a newline
        if chunk[s] != 0x7B or chunk[p - 1] == 0x0D or p == s:
            odd.append(len(ends))
        ends.append(p)
        s = p + 1
    n = len(ends)
    # The chunk without its newlines; a position x moves left by the newlines before it.
    before = chunk.count(b"\n", 0, start)
    data = chunk.replace(b"\n", b"")
    offsets = np.empty(n + 1, dtype=np.int64)
    offsets[0] = start - before
    offsets[1:] = np.asarray(ends, dtype=np.int64) - before - np.arange(n, dtype=np.int64)
    lines = pa.LargeStringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(data))
    nums = pa.array(np.arange(first_no + 1, first_no + n + 1, dtype=np.int64))
    if odd:
        keep = np.ones(n, dtype=bool)
        cr = np.zeros(n, dtype=bool)
        for i in odd:
            raw = chunk[(ends[i - 1] + 1 if i else start) : ends[i]]
            if raw.endswith(b"\r"):
                cr[i] = True
                raw = raw[:-1]
            if raw[:1] != b"{" and not raw.decode("utf-8").strip():
                keep[i] = False
        if cr.any():
            lines = pc.if_else(pa.array(cr), pc.utf8_slice_codeunits(lines, 0, -1), lines)
        if not keep.all():
            mask = pa.array(keep)
            lines, nums = lines.filter(mask), nums.filter(mask)
    return nums, lines, n


class _LineCount:
    lines = 0  # lines in the file (blank and rejected ones included), once read to the end


def iter_jsonl_arrow(
    path: Path, *, on_bad_utf8: Callable[[int, bytes], None], count: _LineCount | None = None
) -> Iterator[tuple[pa.Array, pa.Array]]:
    """The kept lines of ``path`` under the line rules (above) as Arrow arrays (line numbers, lines), one
    piece per chunk read, with no Python object per line."""
    line_no = 0
    carry = b""
    try:
        with _open_binary(path) as f:
            while True:
                chunk = f.read(CHUNK_BYTES)
                if not chunk:
                    break
                start = 0
                if carry:  # the line that started in an earlier chunk
                    p = chunk.find(b"\n")
                    if p < 0:
                        carry += chunk
                        continue
                    line_no += 1
                    text = _single_line(carry + chunk[:p], line_no, on_bad_utf8)
                    if text is not None:
                        yield _piece([line_no], [text])
                    carry = b""
                    start = p + 1
                q = chunk.rfind(b"\n")
                if q < start:
                    carry = chunk[start:]
                    continue
                carry = chunk[q + 1 :]
                nums, lines, n = _chunk_lines(chunk, start, q, line_no, on_bad_utf8)
                line_no += n
                if len(nums):
                    yield nums, lines
            if carry:
                line_no += 1
                text = _single_line(carry, line_no, on_bad_utf8, last=True)
                if text is not None:
                    yield _piece([line_no], [text])
    except FileNotFoundError as e:
        raise IngestError(f"{path}: file not found") from e
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise IngestError(f"{path}: not a readable gzip file ({e})") from e
    except OSError as e:
        raise IngestError(f"{path}: cannot be read ({e})") from e
    if count is not None:
        count.lines = line_no


_SRC_SCHEMA = pa.schema([("ord", pa.int64()), ("line_no", pa.int64()), ("line", pa.large_string())])


class _Stream:
    """A file's lines as one Arrow stream for one DuckDB statement. DuckDB pulls the batches from its own
    threads, so an exception in the reader (e.g. IngestError) is kept and re-raised by ``execute``."""

    def __init__(self, pieces: Iterator[tuple[pa.Array, pa.Array]], file_key: int, dup: int, dups: int):
        self.error: BaseException | None = None
        self._pieces, self._key, self._dup, self._dups = pieces, file_key, dup, dups

    def _batches(self) -> Iterator[pa.RecordBatch]:
        try:
            for nums, lines in self._pieces:
                ords = pc.add(pc.multiply(pc.add(nums, self._key), self._dups), self._dup)
                yield pa.RecordBatch.from_arrays([ords, nums, lines], schema=_SRC_SCHEMA)
        except BaseException as e:
            self.error = e
            raise

    def execute(self, conn: duckdb.DuckDBPyConnection, sql: str, params: dict) -> None:
        conn.register("_src", pa.RecordBatchReader.from_batches(_SRC_SCHEMA, self._batches()))
        try:
            conn.execute(sql, params)
        except duckdb.Error:
            if self.error is not None:
                raise self.error from None
            raise
        finally:
            conn.unregister("_src")


# ---------------------------------------------------------------------------------------------
# Pass 1: parse, validate and normalize every row, all in SQL. Only what later steps need is kept per
# row: the passage ids and the md5 of each passage's (title, text) for the conflict checks, the raw line
# of a rejected row, a hash of an accepted row's line. Passage texts are not stored (see pass 2).
#
# ``ord`` orders rows by (source_file, line_no), as "first occurrence" is defined; it is computed from
# the file's rank among the labels and the line number (see _file_keys), so no sort is needed.

_DROPPED = "STRUCT(reason VARCHAR, detail VARCHAR, raw VARCHAR)"


def _rows_table(conn: duckdb.DuckDBPyConnection) -> None:
    for t in _TEMP_TABLES:
        conn.execute(f"DROP TABLE IF EXISTS {t}")
    conn.execute(f"""CREATE TEMP TABLE _rows (
        ord BIGINT, file_idx INTEGER, source_file VARCHAR, line_no BIGINT, fmt VARCHAR, reason VARCHAR, detail VARCHAR,
        line VARCHAR, line_hash UBIGINT, query_id VARCHAR, query VARCHAR, prompt VARCHAR,
        content_hash VARCHAR, pos_ids VARCHAR[], neg_ids VARCHAR[], neg_drop BIGINT[],
        dropped {_DROPPED}[], ref_hashes UHUGEINT[], null_titles BIGINT[])""")
    conn.execute(
        "CREATE TEMP TABLE _q_lines (source_file VARCHAR, line_no BIGINT, reason VARCHAR, detail VARCHAR, "
        "raw_line VARCHAR)"
    )


# The normalized positives/negatives of a row (format already known).
_POS = """CASE {fmt} WHEN 'tevatron' THEN j.positive_passages
           WHEN 'bge' THEN list_transform(j.pos, lambda t: {{'docid': md5(t), 'title': '', 'text': t}}) END"""
_NEG = """CASE {fmt} WHEN 'tevatron' THEN coalesce(j.negative_passages, [])
           WHEN 'bge' THEN coalesce(list_transform(j.neg,
                                                   lambda t: {{'docid': md5(t), 'title': '', 'text': t}}), []) END"""

# Wrong JSON types, in two steps so that good rows pay (almost) nothing more.
# Every row: its json_structure (the type of every field, merged over a list's elements: a list mixing
# strings and numbers is "JSON"; it replaces json_type(line), so no extra parse) at a few paths, plus
# "no null element" on the transformed lists; _TYPES_OK.
# Rows failing that: ``jt``, the row through _TYPES_SCHEMA, where a JSON-text leaf is NULL (absent or null)
# or starts with '"' when it is a string; _WRONG_TYPE names the first wrong field and where it is.
_STRUCT_PATHS = ("query_id", "query", "prompt", "pos", "neg") + tuple(
    f"{k}{sub}"
    for k in ("positive_passages", "negative_passages")
    for sub in ("", "[0].docid", "[0].text", "[0].title")
)
_STRUCT = "json_extract_string(shape, [" + ", ".join(f"'$.{path}'" for path in _STRUCT_PATHS) + "])"


def _st(path: str) -> str:
    return f"st[{_STRUCT_PATHS.index(path) + 1}]"


def _st_str(path: str) -> str:
    """SQL: a string, null or absent (absent and null fields are the missing-field checks' business)."""
    return f"coalesce({_st(path)} IN ('VARCHAR', 'NULL'), true)"


def _st_passages(key: str) -> str:
    # empty (or all-null, see the null-element test) or objects with string docids; anything else, e.g. an
    # element that is not an object or no docid at all, is looked at closely
    return (
        f"({_st(key)} = '[\"NULL\"]' OR ({_st(key + '[0].docid')} = 'VARCHAR' "
        f"AND {_st_str(key + '[0].text')} AND {_st_str(key + '[0].title')}))"
    )


_TYPES_OK = f"""CASE fmt
  WHEN 'tevatron' THEN {_st_str("query_id")} AND {_st_str("query")} AND {_st_str("prompt")}
    AND list_position(j.positive_passages, NULL) IS NULL AND list_position(j.negative_passages, NULL) IS NULL
    AND {_st_passages("positive_passages")} AND {_st_passages("negative_passages")}
  WHEN 'bge' THEN {_st_str("query")} AND {_st_str("prompt")}
    AND {_st("pos")} IN ('["VARCHAR"]', '["NULL"]') AND {_st("neg")} IN ('["VARCHAR"]', '["NULL"]')
    AND list_position(j.pos, NULL) IS NULL AND list_position(j.neg, NULL) IS NULL
END"""


def _is_str(leaf: str) -> str:
    """SQL: the JSON-text leaf is a string or absent/null."""
    return f"coalesce(left({leaf}, 1) = '\"', true)"


def _leaf_type(leaf: str) -> str:
    return (
        f"CASE WHEN {leaf} IS NULL THEN 'null' WHEN left({leaf}, 1) = '\"' THEN 'string' "
        f"WHEN left({leaf}, 1) = '{{' THEN 'object' WHEN left({leaf}, 1) = '[' THEN 'array' "
        f"WHEN {leaf} IN ('true', 'false') THEN 'boolean' ELSE 'number' END"
    )


def _type_name(duckdb_type: str) -> str:
    """SQL: the JSON type name of a json_type() result (which names DuckDB types)."""
    return (
        f"CASE {duckdb_type} WHEN 'VARCHAR' THEN 'string' WHEN 'BOOLEAN' THEN 'boolean' "
        f"WHEN 'OBJECT' THEN 'object' WHEN 'ARRAY' THEN 'array' WHEN 'NULL' THEN 'null' ELSE 'number' END"
    )


def _path_type(path: str) -> str:
    """SQL: the JSON type name of ``line`` at a path."""
    return _type_name(f"json_type(line, '{path}')")


def _wrong_scalar(field: str) -> str:
    return (
        f"CASE WHEN NOT {_is_str('jt.' + field)} THEN {{'field': '{field}', "
        f"'detail': 'expected string, got ' || {_leaf_type('jt.' + field)}}} END"
    )


def _wrong_list(key: str) -> str:
    """The list itself: present and not null, but not an array (it did not transform)."""
    return (
        f"CASE WHEN j.{key} IS NULL AND json_type(line, '$.{key}') <> 'NULL' THEN {{'field': '{key}', "
        f"'detail': 'expected array, got ' || {_path_type('$.' + key)}}} END"
    )


def _wrong_passages(key: str) -> str:
    """The first element that is not an object, else the first docid / text / title that is not a string."""
    where = f"' ({key}[' || i || ']"
    fields = " ".join(
        f"WHEN NOT {_is_str('x.' + f)} THEN {{'field': '{f}', "
        f"'detail': 'expected string, got ' || {_leaf_type('x.' + f)} || {where}.{f})'}}"
        for f in ("docid", "text", "title")
    )
    return f"""coalesce(
      list_filter(list_transform(json_type(line, '$.{key}[*]'), lambda t, i: CASE WHEN t <> 'OBJECT' THEN
        {{'field': '{key}', 'detail': 'expected object, got ' || {_type_name("t")} || {where})'}} END),
        lambda w: w IS NOT NULL)[1],
      list_filter(list_transform(jt.{key}, lambda x, i: CASE {fields} END), lambda w: w IS NOT NULL)[1])"""


def _wrong_strings(key: str) -> str:
    return (
        f"list_filter(list_transform(jt.{key}, lambda x, i: CASE WHEN x IS NULL OR left(x, 1) <> '\"' THEN "
        f"{{'field': '{key}', 'detail': 'expected string, got ' || {_leaf_type('x')} || ' ({key}[' || i || '])'}} "
        f"END), lambda w: w IS NOT NULL)[1]"
    )


# First wrong field in this order, as STRUCT(field, detail); NULL when the types are right.
_WRONG_TYPE = f"""CASE WHEN jt IS NOT NULL THEN CASE fmt
  WHEN 'tevatron' THEN coalesce({_wrong_scalar("query_id")}, {_wrong_scalar("query")}, {_wrong_scalar("prompt")},
    {_wrong_list("positive_passages")}, {_wrong_passages("positive_passages")},
    {_wrong_list("negative_passages")}, {_wrong_passages("negative_passages")})
  WHEN 'bge' THEN coalesce({_wrong_scalar("query")}, {_wrong_scalar("prompt")},
    {_wrong_list("pos")}, {_wrong_strings("pos")}, {_wrong_list("neg")}, {_wrong_strings("neg")})
END END"""

# {src} yields (ord, source_file, line_no, fmt, line). First matching reason wins; NULL = the row is fine.
_ROWS_SQL = f"""
INSERT INTO _rows
WITH v AS (
  SELECT ord, file_idx, source_file, line_no, fmt AS declared_fmt, line,
         json_valid(line) AS ok_json
  FROM {{src}}
), s AS (
  SELECT *, CASE WHEN ok_json THEN json_structure(line) END AS shape
  FROM v
), t AS (
  -- an object with keys has the shape {{...}}; '{{}}' has the shape "JSON", which nothing else at the top has,
  -- but json_type decides there rather than relying on that
  SELECT *,
    CASE WHEN NOT ok_json THEN NULL WHEN starts_with(shape, '{{') THEN 'OBJECT'
         WHEN shape = '"JSON"' THEN json_type(line) ELSE 'NOT_OBJECT' END AS jtype
  FROM s
), p AS (
  SELECT *,
    CASE WHEN jtype = 'OBJECT' THEN json_transform(line, '{_ROW_SCHEMA}') END AS j,
    CASE WHEN jtype = 'OBJECT' THEN {_STRUCT} END AS st,
    CASE WHEN jtype <> 'OBJECT' OR jtype IS NULL THEN NULL
         WHEN declared_fmt = 'tevatron' THEN 'tevatron'
         WHEN declared_fmt = 'bge' THEN 'bge'
         WHEN json_exists(line, '$.positive_passages') THEN 'tevatron'
         WHEN json_exists(line, '$.pos') THEN 'bge'
    END AS fmt
  FROM t
), typed AS (
  SELECT *,
    CASE WHEN fmt IS NOT NULL AND NOT coalesce({_TYPES_OK}, false)
         THEN json_transform(line, '{_TYPES_SCHEMA}') END AS jt
  FROM p
), parsed AS (
  SELECT ord, file_idx, source_file, line_no, line, ok_json, jtype, fmt,
    CASE fmt WHEN 'tevatron' THEN nullif(trim(j.query_id), '')
             WHEN 'bge' THEN md5(j.query) END AS query_id,
    j.query AS query,
    j.prompt AS prompt,
    {_POS.format(fmt="fmt")} AS pos,
    {_NEG.format(fmt="fmt")} AS neg,
    {_WRONG_TYPE} AS wrong
  FROM typed
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
      WHEN wrong IS NOT NULL THEN 'wrong_type:' || wrong.field
      WHEN query IS NULL THEN 'missing_field:query'
      WHEN ltrim(query) = '' THEN 'empty_field:query'
      WHEN fmt = 'tevatron' AND query_id IS NULL THEN 'missing_field:query_id'
      WHEN pos IS NULL THEN 'missing_field:positives'
      WHEN len(pos) = 0 THEN 'no_positive'
      WHEN len(list_filter(pos || neg, lambda x: x IS NULL OR x.docid IS NULL OR ltrim(x.docid) = '')) > 0
        THEN 'missing_field:docid'
      WHEN len(list_filter(pos || neg, lambda x: x.text IS NULL OR ltrim(x.text) = '')) > 0
        THEN 'empty_field:passage_text'
      WHEN max_len > $max_chars THEN 'passage_too_long'
    END AS reason,
    CASE
      WHEN NOT ok_json THEN 'not valid JSON'
      WHEN wrong IS NOT NULL THEN wrong.detail
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
  -- md5 of each passage text (a BGE passage's docid already is md5(text))
  SELECT *,
    CASE WHEN reason IS NULL THEN CASE WHEN fmt = 'bge' THEN pos_ids
                                       ELSE list_transform(pos, lambda x: md5(x.text)) END END AS pos_text_hashes,
    CASE WHEN reason IS NULL THEN CASE WHEN fmt = 'bge' THEN neg_ids
                                       ELSE list_transform(neg, lambda x: md5(x.text)) END END AS neg_text_hashes
  FROM ids
), dropped AS (
  -- A negative equal to a positive (same docid or same text) or repeated within the row is dropped
  -- from the negatives and recorded in the quarantine; order is otherwise kept. NULL: none dropped.
  SELECT *,
    CASE WHEN reason IS NULL THEN nullif(list_filter(range(1, len(neg_ids) + 1), lambda i:
        list_contains(pos_ids, neg_ids[i]) OR list_contains(pos_text_hashes, neg_text_hashes[i])
        OR list_position(neg_ids, neg_ids[i]) <> i), []) END AS neg_drop
  FROM hashes
)
SELECT ord, file_idx, source_file, line_no, fmt, reason, detail,
  CASE WHEN reason IS NOT NULL THEN line END,
  CASE WHEN reason IS NULL THEN hash(line) END,
  CASE WHEN reason IS NULL THEN query_id END,
  CASE WHEN reason IS NULL THEN query END,
  CASE WHEN reason IS NULL THEN prompt END,
  CASE WHEN reason IS NULL THEN md5(query || chr(1) || array_to_string(pos_ids, chr(2))
                                   || chr(1) || array_to_string(neg_ids, chr(2))) END,
  pos_ids,
  neg_ids,
  neg_drop,
  CASE WHEN neg_drop IS NOT NULL THEN list_transform(neg_drop, lambda i: {{
      'reason': CASE WHEN list_contains(pos_ids, neg_ids[i]) OR list_contains(pos_text_hashes, neg_text_hashes[i])
                     THEN 'negative_equals_positive' ELSE 'duplicate_negative' END,
      'detail': 'negative #' || i || ' docid ' || neg_ids[i] || ' dropped',
      'raw': to_json(neg[i])::VARCHAR}}) END,
  CASE WHEN reason IS NULL
       THEN list_transform(pos || neg, lambda x: md5_number(coalesce(x.title, '') || chr(1) || x.text)) END,
  -- positions in pos || neg of passages without a title (a BGE passage's title is '')
  CASE WHEN reason IS NULL AND fmt = 'tevatron'
       THEN nullif(list_filter(list_transform(pos || neg, lambda x, i: CASE WHEN x.title IS NULL THEN i END),
                               lambda i: i IS NOT NULL), []) END
FROM dropped
"""

# Pass 2: the texts of the passages. raw_passages holds, per docid, the title and the text of its first
# occurrence among the accepted rows (the first non-NULL title). Which reference that is, is known from
# pass 1 (_need_rows: row, position in pos || neg, docid); pass 2 parses only the rows holding one and
# takes just those elements. A row whose line differs from the first read fails the ingest.
_PASS2_SQL = f"""
INSERT INTO _pass_part
SELECT docid,
  CASE WHEN fmt = 'bge' THEN '' ELSE e.title END,
  CASE WHEN fmt = 'bge' THEN t ELSE e.text END,
  for_text, for_title
FROM (
  SELECT fmt, n.docid AS docid, n.for_text AS for_text, n.for_title AS for_title,
    CASE WHEN fmt = 'tevatron' THEN CASE WHEN n.k <= len(j.positive_passages) THEN j.positive_passages[n.k]
                                         ELSE j.negative_passages[n.k - len(j.positive_passages)] END END AS e,
    CASE WHEN fmt = 'bge' THEN CASE WHEN n.k <= len(j.pos) THEN j.pos[n.k] ELSE j.neg[n.k - len(j.pos)] END END AS t
  FROM (
    SELECT a.fmt, unnest(a.needs) AS n, json_transform(s.line, '{_ROW_SCHEMA}') AS j
    FROM {{src}} s JOIN _need_rows a USING (ord)
    WHERE CASE WHEN hash(s.line) <> a.line_hash
               THEN error('line ' || s.line_no || ' changed while being ingested') ELSE true END
  )
)
"""

_BATCH_SRC = """(SELECT ord, $file_idx::INTEGER AS file_idx, $label::VARCHAR AS source_file, line_no,
                        $fmt::VARCHAR AS fmt, line FROM _src)"""
_PARQUET_SRC = """(SELECT ($file_key + r.file_row_number + 1) * $dups + $dup AS ord, $file_idx::INTEGER AS file_idx,
                          $label::VARCHAR AS source_file,
                          r.file_row_number + 1 AS line_no, $fmt::VARCHAR AS fmt, to_json(r)::VARCHAR AS line
                   FROM read_parquet($path, file_row_number = true) r)"""
_LINE_BITS = 40  # line numbers below 2**40 per file


def _file_keys(conn: duckdb.DuckDBPyConnection, labels: list[str]) -> tuple[list[tuple[int, int]], int]:
    """Per file (file_key, dup), and dups, such that ord = (file_key + line_no) * dups + dup orders rows
    like ORDER BY source_file, line_no (with the connection's collation) and is unique. Files whose
    labels sort equal share a key, their lines interleave by line number."""
    rank = dict(
        conn.execute(
            "SELECT l, dense_rank() OVER (ORDER BY l) - 1 FROM (SELECT unnest($labels::VARCHAR[]) AS l)",
            {"labels": labels},
        ).fetchall()
    )
    seen: dict[int, int] = {}
    keys = []
    for label in labels:
        r = rank[label]
        keys.append((r << _LINE_BITS, seen.get(r, 0)))
        seen[r] = seen.get(r, 0) + 1
    return keys, max(seen.values(), default=1)


@dataclass
class _File:
    idx: int
    path: Path
    label: str
    fmt: str
    file_key: int
    dup: int
    dups: int
    parquet: bool = False
    lines: int = 0  # lines read in pass 1 (JSONL), to check the second read

    def params(self, **extra) -> dict:
        p = {"file_idx": self.idx, "label": self.label, "fmt": self.fmt, **extra}
        if self.parquet:
            p.update(path=str(self.path), file_key=self.file_key, dup=self.dup, dups=self.dups)
        return p

    def stream(self, on_bad_utf8, count: _LineCount | None = None, progress=None) -> _Stream:
        pieces = iter_jsonl_arrow(self.path, on_bad_utf8=on_bad_utf8, count=count)
        if progress:
            pieces = _with_progress(pieces, self.label, progress)
        return _Stream(pieces, self.file_key, self.dup, self.dups)


def _with_progress(pieces, label: str, progress: Callable[[str], None]):
    size = 0
    for nums, lines in pieces:
        yield nums, lines
        size += lines.nbytes
        if size >= BATCH_BYTES:
            progress(f"{label}: staged {nums[-1].as_py():,} lines")
            size = 0


def stage_file(
    conn: duckdb.DuckDBPyConnection, f: _File, *, max_chars: int, progress: Callable[[str], None] | None = None
) -> int:
    """Pass 1 over one file into ``_rows``; returns the number of lines read (incl. rejected)."""
    if not f.path.exists():
        raise IngestError(f"{f.path}: file not found")
    rows_sql = _ROWS_SQL.replace("$max_chars", str(int(max_chars)))
    name = f.path.name.lower()
    if name.endswith(".parquet"):
        f.parquet = True
        try:
            conn.execute(rows_sql.replace("{src}", _PARQUET_SRC), f.params())
        except duckdb.Error as e:
            raise IngestError(f"{f.path}: not a readable Parquet file ({e})") from e
        return conn.execute("SELECT count(*) FROM _rows WHERE source_file = ?", [f.label]).fetchall()[0][0]
    if not (
        name.endswith(".jsonl") or name.endswith(".jsonl.gz") or name.endswith(".json") or name.endswith(".json.gz")
    ):
        raise IngestError(f"{f.path}: unsupported file type (expected .jsonl, .jsonl.gz or .parquet)")

    bad: list[tuple[int, bytes]] = []
    count = _LineCount()
    f.stream(lambda n, raw: bad.append((n, raw)), count, progress).execute(
        conn, rows_sql.replace("{src}", _BATCH_SRC), f.params()
    )
    f.lines = count.lines
    for n, raw in bad:
        conn.execute(
            "INSERT INTO _q_lines VALUES (?, ?, 'invalid_utf8', ?, ?)",
            [f.label, n, "line is not valid UTF-8", raw.decode("utf-8", errors="backslashreplace")],
        )
    n_bad = len(bad)
    n_good = conn.execute("SELECT count(*) FROM _rows WHERE source_file = ?", [f.label]).fetchall()[0][0]
    return n_good + n_bad


def collect_passages(conn: duckdb.DuckDBPyConnection, f: _File) -> None:
    """Pass 2 over one file: the passage texts its rows provide into ``_pass_part``, and the raw lines of
    its rows rejected by a conflict into ``_conflict_lines``."""
    ords = [
        o
        for (o,) in conn.execute(
            "SELECT ord FROM _rejected JOIN _rows USING (ord) WHERE file_idx = ?", [f.idx]
        ).fetchall()
    ]
    n_needed = conn.execute("SELECT count(*) FROM _need_rows WHERE file_idx = ?", [f.idx]).fetchall()[0][0]
    if not ords and not n_needed:
        return
    if f.parquet:
        src = _PARQUET_SRC
        if ords:
            conn.execute(
                f"INSERT INTO _conflict_lines SELECT s.ord, s.line FROM {src} s JOIN _rejected USING (ord)", f.params()
            )
        if n_needed:
            conn.execute(_PASS2_SQL.replace("{src}", src), f.params())
        return
    wanted = pa.array(sorted(ords), pa.int64())
    found: list[tuple[pa.Array, pa.Array]] = []

    def pieces():
        for nums, lines in iter_jsonl_arrow(f.path, on_bad_utf8=lambda n, raw: None, count=count):
            if len(wanted):
                ords_ = pc.add(pc.multiply(pc.add(nums, f.file_key), f.dups), f.dup)
                hit = pc.is_in(ords_, value_set=wanted)
                if pc.any(hit).as_py():
                    found.append((ords_.filter(hit), lines.filter(hit)))
            yield nums, lines

    count = _LineCount()
    try:
        _Stream(pieces(), f.file_key, f.dup, f.dups).execute(conn, _PASS2_SQL.replace("{src}", _BATCH_SRC), f.params())
    except duckdb.Error as e:
        if "changed while being ingested" in str(e):
            raise IngestError(f"{f.path}: {str(e).splitlines()[0].split(': ', 1)[-1]}") from e
        raise
    if count.lines != f.lines:
        raise IngestError(f"{f.path}: changed while being ingested ({f.lines} lines, then {count.lines})")
    for o, lines in found:
        conn.register("_found", pa.table({"ord": o, "line": lines}))
        conn.execute("INSERT INTO _conflict_lines SELECT ord, line FROM _found")
        conn.unregister("_found")


# ---------------------------------------------------------------------------------------------
# Cross-row checks, all in SQL, over the rows that passed the per-row checks: a query_id seen earlier
# with different content, and a docid whose text differs from its first occurrence, reject the later row.

_QID_CONFLICT_SQL = """
CREATE OR REPLACE TEMP TABLE _qid_conflict AS
WITH g AS (SELECT ord, source_file, line_no, query_id, content_hash FROM _rows
           WHERE reason IS NULL AND fmt = 'tevatron')
SELECT g.ord, 'duplicate_query_id_conflict' AS reason,
       'query_id ' || g.query_id || ' first seen at ' || f.source_file || ':' || f.line_no
           || ' with different content' AS detail
FROM g
JOIN (SELECT query_id, arg_min(content_hash, ord) AS first_hash, arg_min(source_file, ord) AS source_file,
             arg_min(line_no, ord) AS line_no
      FROM g GROUP BY query_id) f USING (query_id)
WHERE g.content_hash <> f.first_hash
"""

# (ord, docid, md5 of coalesce(title, '') || chr(1) || text) of every passage of the good rows.
_REFS = "(SELECT ord, unnest(pos_ids || neg_ids) AS docid, unnest(ref_hashes) AS h FROM _rows WHERE reason IS NULL)"

# A docid can only have a text conflict if its passages do not all have the same hash: find those
# docids first (usually none), then compare with the first occurrence for their passages only.
_DOC_CANDIDATES_SQL = f"""
CREATE OR REPLACE TEMP TABLE _doc_candidates AS
SELECT docid FROM {_REFS} GROUP BY docid HAVING min(h) <> max(h)
"""

_DOC_CONFLICT_SQL = f"""
CREATE OR REPLACE TEMP TABLE _doc_conflict AS
WITH r AS MATERIALIZED (
  SELECT * FROM {_REFS} WHERE docid IN (SELECT docid FROM _doc_candidates)
)
SELECT r.ord, 'docid_text_conflict' AS reason,
       'docid ' || any_value(r.docid) || ' has different text than its first occurrence' AS detail
FROM r
JOIN (SELECT docid, arg_min(h, ord) AS first_hash FROM r GROUP BY docid) f USING (docid)
WHERE r.h <> f.first_hash
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
_ACCEPTED_SQL = """
CREATE OR REPLACE TEMP TABLE _accepted AS
SELECT ord, file_idx, fmt, line_hash FROM _rows g
WHERE g.reason IS NULL AND NOT EXISTS (SELECT 1 FROM _rejected r WHERE r.ord = g.ord)
"""

_ACCEPTED_ROWS = "(SELECT * FROM _rows g WHERE g.reason IS NULL AND g.ord IN (SELECT ord FROM _accepted))"

# The passages of the accepted rows are pos || (negatives not dropped). Per docid, the first of them
# (lowest ord, then position) gives the text, the first with a non-NULL title gives the title: as
# arg_min(text, ord) and arg_min(title, ord) (which skips NULL titles) over all of them would.
_NEED_SQL = f"""
CREATE OR REPLACE TEMP TABLE _need_rows AS
WITH refs AS (
  SELECT ord, k, docid, null_titles FROM (
    SELECT ord, unnest(pos_ids || neg_ids) AS docid, generate_subscripts(pos_ids || neg_ids, 1) AS k,
           len(pos_ids) AS n_pos, neg_drop, null_titles
    FROM {_ACCEPTED_ROWS})
  WHERE neg_drop IS NULL OR k <= n_pos OR NOT list_contains(neg_drop, k - n_pos)
), firsts AS (
  SELECT docid, min({{'o': ord, 'k': k}}) AS tf,
         min({{'o': ord, 'k': k}}) FILTER (WHERE null_titles IS NULL OR NOT list_contains(null_titles, k)) AS hf
  FROM refs GROUP BY docid
), picks AS (
  SELECT tf.o AS ord, tf.k AS k, docid, true AS for_text, coalesce(hf = tf, false) AS for_title FROM firsts
  UNION ALL
  SELECT hf.o, hf.k, docid, false, true FROM firsts WHERE hf <> tf
)
SELECT ord, any_value(a.file_idx) AS file_idx, any_value(a.fmt) AS fmt, any_value(a.line_hash) AS line_hash,
       list({{'k': k, 'docid': docid, 'for_text': for_text, 'for_title': for_title}}) AS needs
FROM picks JOIN _accepted a USING (ord)
GROUP BY ord
"""

_PASSAGES_SQL = """
INSERT INTO raw_passages (dataset, docid, title, text)
SELECT ?, docid, any_value(title) FILTER (WHERE for_title), any_value(text) FILTER (WHERE for_text)
FROM _pass_part GROUP BY docid
"""


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
           SELECT ?, g.source_file, g.line_no, r.reason, r.detail, l.line
           FROM _rows g JOIN _rejected r USING (ord) JOIN _conflict_lines l USING (ord)""",
        [dataset],
    )
    # Passage-level: negatives dropped from accepted rows (the row itself is kept).
    conn.execute(
        f"""INSERT INTO raw_quarantine (dataset, source_file, line_no, reason, detail, raw_line)
           SELECT ?, source_file, line_no, d.reason, d.detail, d.raw
           FROM (SELECT source_file, line_no, unnest(dropped) AS d FROM {_ACCEPTED_ROWS} WHERE dropped IS NOT NULL)""",
        [dataset],
    )


_TEMP_TABLES = (
    "_rows",
    "_q_lines",
    "_qid_conflict",
    "_doc_candidates",
    "_doc_conflict",
    "_rejected",
    "_accepted",
    "_need_rows",
    "_pass_part",
    "_conflict_lines",
)


def ingest_dataset(
    conn: duckdb.DuckDBPyConnection,
    dataset: str,
    files: list[tuple[Path, str, str]],
    *,
    max_passage_chars: int = DEFAULT_MAX_PASSAGE_CHARS,
    progress: Callable[[str], None] | None = None,
) -> IngestStats:
    """Replace the dataset's rows in raw_* with the contents of ``files`` = [(path, label, format)].

    Runs in one transaction: a failure leaves the previous version of the partition in place."""
    stats = IngestStats(dataset=dataset, files=[label for _, label, _ in files])
    try:
        _rows_table(conn)
        keys, dups = _file_keys(conn, [label for _, label, _ in files])
        plan = [
            _File(i, Path(path), label, fmt, key, dup, dups)
            for i, ((path, label, fmt), (key, dup)) in enumerate(zip(files, keys))
        ]
        for f in plan:
            stats.lines_read += stage_file(conn, f, max_chars=max_passage_chars, progress=progress)

        if progress:
            progress(f"{dataset}: validating and normalizing {stats.lines_read:,} rows in DuckDB")
        conn.execute(_QID_CONFLICT_SQL)
        conn.execute(_DOC_CANDIDATES_SQL)
        if conn.execute("SELECT count(*) FROM _doc_candidates").fetchall()[0][0]:
            conn.execute(_DOC_CONFLICT_SQL)
        else:
            conn.execute("CREATE OR REPLACE TEMP TABLE _doc_conflict (ord BIGINT, reason VARCHAR, detail VARCHAR)")
        conn.execute(_REJECTED_SQL)
        conn.execute(_ACCEPTED_SQL)
        conn.execute(_NEED_SQL)

        conn.execute("""CREATE OR REPLACE TEMP TABLE _pass_part (
            docid VARCHAR, title VARCHAR, text VARCHAR, for_text BOOLEAN, for_title BOOLEAN)""")
        conn.execute("CREATE OR REPLACE TEMP TABLE _conflict_lines (ord BIGINT, line VARCHAR)")
        for f in plan:
            collect_passages(conn, f)
        changed = conn.execute(
            """SELECT count(*) FROM _rejected r JOIN _rows g USING (ord) LEFT JOIN _conflict_lines l USING (ord)
               WHERE l.line IS NULL OR hash(l.line) <> g.line_hash"""
        ).fetchall()[0][0]
        if changed:
            raise IngestError(f"{dataset}: {changed} rejected rows changed while being ingested")

        conn.execute("BEGIN TRANSACTION")
        try:
            replace_partition(conn, ["raw_queries", "raw_passages", "raw_instances", "raw_quarantine"], dataset)
            _q_insert(conn, dataset)
            conn.execute(
                f"""INSERT INTO raw_instances (dataset, instance_id, query_id, positive_ids, negative_ids,
                                              source_file, line_no, source_format, prompt)
                   SELECT ?, source_file || ':' || line_no, query_id, pos_ids,
                          CASE WHEN neg_drop IS NULL THEN neg_ids
                               ELSE list_filter(neg_ids, lambda d, i: NOT list_contains(neg_drop, i)) END,
                          source_file, line_no, fmt, prompt
                   FROM {_ACCEPTED_ROWS}""",
                [dataset],
            )
            conn.execute(
                f"""INSERT INTO raw_queries (dataset, query_id, query)
                   SELECT ?, query_id, arg_min(query, ord) FROM {_ACCEPTED_ROWS} GROUP BY query_id""",
                [dataset],
            )
            conn.execute(_PASSAGES_SQL, [dataset])
            conn.execute("COMMIT")
        except Exception:
            conn.execute("ROLLBACK")
            raise
    finally:
        for t in _TEMP_TABLES:
            conn.execute(f"DROP TABLE IF EXISTS {t}")

    stats.instances, stats.queries = conn.execute(
        "SELECT count(*), count(DISTINCT query_id) FROM raw_instances WHERE dataset = ?", [dataset]
    ).fetchall()[0]
    stats.passages = conn.execute("SELECT count(*) FROM raw_passages WHERE dataset = ?", [dataset]).fetchall()[0][0]
    rows = conn.execute(
        """SELECT reason, count(*) FROM raw_quarantine WHERE dataset = ? GROUP BY reason ORDER BY 2 DESC""", [dataset]
    ).fetchall()
    stats.quarantine_by_reason = {r: n for r, n in rows}
    passage_level = {"negative_equals_positive", "duplicate_negative"}
    stats.quarantined_passages = sum(n for r, n in rows if r in passage_level)
    stats.quarantined_rows = sum(n for r, n in rows if r not in passage_level)
    return stats
