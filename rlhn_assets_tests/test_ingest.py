"""The ingest library on real sample files and on every class of bad input."""

import gzip
import json
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rlhn_assets.lib.ingest import IngestError, ingest_dataset
from rlhn_assets.lib.schema import apply_schema
from rlhn_assets_tests.conftest import DATA


def _ingest(conn, dataset, *files, **kw):
    return ingest_dataset(conn, dataset, [(Path(p), Path(p).name, fmt) for p, fmt in files], **kw)


def _rows(conn, sql, *params):
    return conn.execute(sql, list(params)).fetchall()


@pytest.fixture
def conn(db_path):
    c = duckdb.connect(str(db_path))
    apply_schema(c)  # what the DuckDB resource does when it opens the file
    yield c
    c.close()


def test_real_tevatron_and_bge_files_in_one_dataset(conn):
    stats = _ingest(
        conn,
        "msmarco_passage",
        (DATA / "raw/msmarco_passage/rlhn_judge_sample.jsonl.gz", "tevatron"),
        (DATA / "raw/msmarco_passage/bge_example.jsonl", "bge"),
    )
    assert stats.lines_read == 35 and stats.instances == 35 and stats.quarantined_rows == 0
    # The authors' first MS MARCO row keeps its ids and the order of its 25 negatives.
    first = json.loads(gzip.open(DATA / "raw/msmarco_passage/rlhn_judge_sample.jsonl.gz", "rt").readline())
    ((qid, pos, neg),) = _rows(
        conn,
        "SELECT query_id, positive_ids, negative_ids FROM raw_instances "
        "WHERE source_file = 'rlhn_judge_sample.jsonl.gz' AND line_no = 1",
    )
    assert qid == first["query_id"]
    assert pos == [p["docid"] for p in first["positive_passages"]]
    assert neg == [p["docid"] for p in first["negative_passages"]]
    # BGE passages get md5 content ids; the same text always gets the same id.
    bge = json.loads((DATA / "raw/msmarco_passage/bge_example.jsonl").read_text().splitlines()[0])
    ((pos_ids, neg_ids),) = _rows(
        conn,
        "SELECT positive_ids, negative_ids FROM raw_instances WHERE source_file = 'bge_example.jsonl' AND line_no = 1",
    )
    import hashlib

    assert pos_ids == [hashlib.md5(bge["pos"][0].encode()).hexdigest()]
    assert len(neg_ids) == 25
    ((text,),) = _rows(conn, "SELECT text FROM raw_passages WHERE docid = ?", neg_ids[3])
    assert text == bge["neg"][3]


def test_real_nq_bge_gz_duplicate_negatives_are_quarantined_not_lost(conn):
    stats = _ingest(conn, "nq", (DATA / "raw/nq/bge_example.jsonl.gz", "auto"))
    assert stats.instances == 10 and stats.quarantined_rows == 0
    # The real NQ example data repeats two negatives inside row 1: dropped from the row, kept in quarantine.
    q = _rows(conn, "SELECT line_no, reason FROM raw_quarantine WHERE dataset = 'nq'")
    assert q == [(1, "duplicate_negative"), (1, "duplicate_negative")]
    ((n,),) = _rows(conn, "SELECT len(negative_ids) FROM raw_instances WHERE line_no = 1")
    raw = json.loads(gzip.open(DATA / "raw/nq/bge_example.jsonl.gz", "rt").readline())
    assert n == len(raw["neg"]) - 2 == len(set(raw["neg"]))


BAD_LINES = [
    # (line text or bytes, expected reason)
    (
        '{"query_id": "q1", "query": "fine", "positive_passages": [{"docid": "p1", "title": "", "text": "pos one"}],'
        ' "negative_passages": [{"docid": "n1", "title": "", "text": "neg one"}]}',
        None,
    ),
    ('{"query_id": "q2", "query": "broken", "positive_passages": [', "malformed_json"),
    ('["not", "an", "object"]', "not_a_json_object"),
    ('"a string"', "not_a_json_object"),
    ("{}", "missing_field:positives"),
    ('{"query_id": "q3", "positive_passages": [{"docid": "p3", "text": "x"}]}', "missing_field:query"),
    ('{"query_id": "q4", "query": "   ", "positive_passages": [{"docid": "p4", "text": "x"}]}', "empty_field:query"),
    ('{"query": "no id", "positive_passages": [{"docid": "p5", "text": "x"}]}', "missing_field:query_id"),
    ('{"query_id": "q6", "query": "no positive", "positive_passages": [], "negative_passages": []}', "no_positive"),
    (
        '{"query_id": "q7", "query": "empty text", "positive_passages": [{"docid": "p7", "text": ""}]}',
        "empty_field:passage_text",
    ),
    (
        '{"query_id": "q8", "query": "long", "positive_passages": [{"docid": "p8", "text": "' + "x" * 60_000 + '"}]}',
        "passage_too_long",
    ),
    (
        '{"query_id": "q1", "query": "fine but different", "positive_passages": [{"docid": "p1", "title": "", '
        '"text": "pos one"}]}',
        "duplicate_query_id_conflict",
    ),
    (
        '{"query_id": "q9", "query": "docid reused", "positive_passages": [{"docid": "p1", "title": "", '
        '"text": "another text for p1"}]}',
        "docid_text_conflict",
    ),
    (
        '{"query_id": "q10", "query": "neg is pos", "positive_passages": [{"docid": "p10", "text": "same"}], '
        '"negative_passages": [{"docid": "n10", "text": "other"}, {"docid": "p10", "text": "same"}]}',
        "negative_equals_positive",
    ),
    (
        b'{"query_id": "q11", "query": "bad \xff\xfe bytes", "positive_passages": [{"docid": "p11", "text": "x"}]}',
        "invalid_utf8",
    ),
    (
        '{"query_id": "q12", "query": "no-op exact duplicate", "positive_passages": [{"docid": "p12", "text": "t"}]}',
        None,
    ),
    (
        '{"query_id": "q12", "query": "no-op exact duplicate", "positive_passages": [{"docid": "p12", "text": "t"}]}',
        None,
    ),
    (
        '{"query": "bge row", "pos": ["bge positive"], "neg": ["bge positive", "bge negative"]}',
        "negative_equals_positive",
    ),
    ('{"query_id": "q13", "query": 13, "positive_passages": [{"docid": "p13", "text": "x"}]}', "wrong_type:query"),
]


def _write_bad_file(path: Path) -> None:
    with open(path, "wb") as f:
        for line, _ in BAD_LINES:
            f.write(line if isinstance(line, bytes) else line.encode())
            f.write(b"\n")
        f.write(b"\n")  # a blank line is skipped, not quarantined


def test_every_bad_input_class_goes_to_quarantine_with_file_line_and_reason(conn, tmp_path):
    bad = tmp_path / "bad.jsonl"
    _write_bad_file(bad)
    stats = _ingest(conn, "toy", (bad, "auto"))
    got = {(line, reason) for line, reason in _rows(conn, "SELECT line_no, reason FROM raw_quarantine")}
    expected = {(i + 1, reason) for i, (_, reason) in enumerate(BAD_LINES) if reason}
    assert got == expected
    assert all(f == "bad.jsonl" for (f,) in _rows(conn, "SELECT DISTINCT source_file FROM raw_quarantine"))
    # Nothing is lost: every line is either an instance or in quarantine (row-level) ...
    row_level = {line for line, reason in got if reason not in ("negative_equals_positive", "duplicate_negative")}
    inst_lines = {line for (line,) in _rows(conn, "SELECT line_no FROM raw_instances")}
    assert row_level | inst_lines == set(range(1, len(BAD_LINES) + 1))
    assert not row_level & inst_lines
    # ... and the raw text of a rejected row is kept (invalid UTF-8 escaped, not dropped).
    ((raw,),) = _rows(conn, "SELECT raw_line FROM raw_quarantine WHERE reason = 'invalid_utf8'")
    assert "\\xff\\xfe" in raw
    # A negative equal to a positive is dropped from its row, which is kept.
    ((negs,),) = _rows(conn, "SELECT negative_ids FROM raw_instances WHERE query_id = 'q10'")
    assert negs == ["n10"]
    assert stats.quarantine_by_reason["malformed_json"] == 1
    assert stats.quarantined_rows == len(row_level)


def test_reingest_replaces_the_partition_and_keeps_others(conn):
    nq = (DATA / "raw/nq/bge_example.jsonl.gz", "bge")
    fiqa = (DATA / "raw/fiqa/rlhn_judge_sample.jsonl.gz", "tevatron")
    _ingest(conn, "nq", nq)
    _ingest(conn, "fiqa", fiqa)
    before = _rows(conn, "SELECT dataset, count(*) FROM raw_instances GROUP BY 1 ORDER BY 1")
    passages_before = _rows(conn, "SELECT dataset, count(*) FROM raw_passages GROUP BY 1 ORDER BY 1")
    _ingest(conn, "nq", nq)
    assert (
        _rows(conn, "SELECT dataset, count(*) FROM raw_instances GROUP BY 1 ORDER BY 1")
        == before
        == [("fiqa", 25), ("nq", 10)]
    )
    assert _rows(conn, "SELECT dataset, count(*) FROM raw_passages GROUP BY 1 ORDER BY 1") == passages_before
    assert _rows(conn, "SELECT count(*) FROM raw_quarantine WHERE dataset = 'nq'") == [(2,)]


def test_parquet_input(conn, tmp_path):
    rows = [json.loads(l) for l in gzip.open(DATA / "raw/fiqa/rlhn_judge_sample.jsonl.gz", "rt")]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "fiqa.parquet")
    stats = _ingest(conn, "fiqa", (tmp_path / "fiqa.parquet", "auto"))
    assert stats.instances == 25 and stats.quarantined_rows == 0
    ((neg,),) = _rows(conn, "SELECT negative_ids FROM raw_instances WHERE line_no = 1")
    assert neg == [p["docid"] for p in rows[0]["negative_passages"]]


@pytest.mark.parametrize(
    "content,name,message",
    [
        (None, "missing.jsonl", "file not found"),
        (b"this is not gzip", "broken.jsonl.gz", "not a readable gzip file"),
        (b"PAR1 garbage", "broken.parquet", "not a readable Parquet file"),
        (b"a,b\n1,2\n", "table.csv", "unsupported file type"),
    ],
)
def test_unreadable_file_fails_naming_the_file(conn, tmp_path, content, name, message):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(IngestError, match=message) as e:
        _ingest(conn, "toy", (path, "auto"))
    assert name in str(e.value)


def test_failed_reingest_keeps_previous_partition(conn, tmp_path):
    _ingest(conn, "fiqa", (DATA / "raw/fiqa/rlhn_judge_sample.jsonl.gz", "tevatron"))
    broken = tmp_path / "x.jsonl.gz"
    broken.write_bytes(b"nope")
    with pytest.raises(IngestError):
        _ingest(conn, "fiqa", (broken, "auto"))
    assert _rows(conn, "SELECT count(*) FROM raw_instances WHERE dataset = 'fiqa'") == [(25,)]


# A wrong JSON type in a field is bad input (a number must not be ingested as its text). Each case:
# (format, the bad row, reason, detail). The file is: good row, bad row, good row.
_P = {"docid": "p", "title": "t", "text": "pos"}
_N = {"docid": "n", "title": "t", "text": "neg"}


def _tev(**kw):
    return {"query_id": "qx", "query": "a query", "positive_passages": [_P], "negative_passages": [_N], **kw}


def _bge(**kw):
    return {"query": "a query", "pos": ["pos"], "neg": ["neg"], **kw}


WRONG_TYPES = [
    (_tev(query=5), "wrong_type:query", "expected string, got number"),
    (_tev(query=1.5e3), "wrong_type:query", "expected string, got number"),
    (_tev(query=True), "wrong_type:query", "expected string, got boolean"),
    (_tev(query={"text": "q"}), "wrong_type:query", "expected string, got object"),
    (_tev(query=["q"]), "wrong_type:query", "expected string, got array"),
    (_tev(query_id=17), "wrong_type:query_id", "expected string, got number"),
    (
        _tev(positive_passages=[{**_P, "docid": 7}]),
        "wrong_type:docid",
        "expected string, got number (positive_passages[1].docid)",
    ),
    (
        _tev(negative_passages=[_N, {**_N, "docid": 8}]),
        "wrong_type:docid",
        "expected string, got number (negative_passages[2].docid)",
    ),
    (
        _tev(positive_passages=[{**_P, "text": 3}]),
        "wrong_type:text",
        "expected string, got number (positive_passages[1].text)",
    ),
    (
        _tev(negative_passages=[{**_N, "text": ["neg"]}]),
        "wrong_type:text",
        "expected string, got array (negative_passages[1].text)",
    ),
    (
        _tev(positive_passages=[{**_P, "title": 1}]),
        "wrong_type:title",
        "expected string, got number (positive_passages[1].title)",
    ),
    (_tev(positive_passages="pos"), "wrong_type:positive_passages", "expected array, got string"),
    (_tev(positive_passages=_P), "wrong_type:positive_passages", "expected array, got object"),
    (
        _tev(positive_passages=[_P, 5]),
        "wrong_type:positive_passages",
        "expected object, got number (positive_passages[2])",
    ),
    (_tev(negative_passages="neg"), "wrong_type:negative_passages", "expected array, got string"),
    (
        _tev(negative_passages=[None]),
        "wrong_type:negative_passages",
        "expected object, got null (negative_passages[1])",
    ),
    (_bge(query=5), "wrong_type:query", "expected string, got number"),
    (_bge(pos="pos"), "wrong_type:pos", "expected array, got string"),
    (_bge(pos=[5]), "wrong_type:pos", "expected string, got number (pos[1])"),
    (_bge(neg=["neg", True]), "wrong_type:neg", "expected string, got boolean (neg[2])"),
    (_bge(neg=["neg", None]), "wrong_type:neg", "expected string, got null (neg[2])"),
    (_bge(neg=3), "wrong_type:neg", "expected array, got number"),
    (_bge(prompt=3), "wrong_type:prompt", "expected string, got number"),
]


@pytest.mark.parametrize("bad,reason,detail", WRONG_TYPES, ids=[f"{r}-{d}" for _, r, d in WRONG_TYPES])
@pytest.mark.parametrize("declared", ["auto", "declared"])
def test_wrong_json_type_is_quarantined_with_line_and_reason(conn, tmp_path, bad, reason, detail, declared):
    fmt = "tevatron" if "query_id" in bad else "bge"
    good = (
        [_tev(query_id="g1", query="good one"), _tev(query_id="g3", query="good three")]
        if fmt == "tevatron"
        else [_bge(query="good one"), _bge(query="good three")]
    )
    lines = [json.dumps(good[0]), json.dumps(bad), json.dumps(good[1])]
    path = tmp_path / "typed.jsonl"
    path.write_text("\n".join(lines) + "\n")
    stats = _ingest(conn, "toy", (path, fmt if declared == "declared" else "auto"))
    assert _rows(conn, "SELECT line_no, reason, detail, raw_line, source_file FROM raw_quarantine") == [
        (2, reason, detail, lines[1], "typed.jsonl")
    ]
    # nothing else is lost: both good rows are instances, with their passages
    assert _rows(conn, "SELECT line_no FROM raw_instances ORDER BY 1") == [(1,), (3,)]
    assert stats.instances == 2 and stats.quarantined_rows == 1 and stats.quarantine_by_reason == {reason: 1}
    assert _rows(conn, "SELECT count(*) FROM raw_passages") == [(2,)]


def test_strings_that_look_like_numbers_are_strings(conn, tmp_path):
    rows = [
        {
            "query_id": "17",
            "query": "42",
            "positive_passages": [{"docid": "7", "title": "1", "text": "3"}],
            "negative_passages": [{"docid": "8", "title": "true", "text": "[1, 2]"}],
        },
        {"query": "1.5e3", "pos": ["12"], "neg": ["false", "{}"], "prompt": "0"},
    ]
    path = tmp_path / "stringy.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    stats = _ingest(conn, "toy", (path, "auto"))
    assert stats.instances == 2 and stats.quarantined_rows == 0, stats.quarantine_by_reason
    assert _rows(conn, "SELECT query_id, positive_ids, negative_ids FROM raw_instances WHERE line_no = 1") == [
        ("17", ["7"], ["8"])
    ]
    assert sorted(_rows(conn, "SELECT query FROM raw_queries")) == [("1.5e3",), ("42",)]
    assert _rows(conn, "SELECT title, text FROM raw_passages WHERE docid IN ('7', '8') ORDER BY docid") == [
        ("1", "3"),
        ("true", "[1, 2]"),
    ]
    assert _rows(conn, "SELECT prompt FROM raw_instances WHERE line_no = 2") == [("0",)]
