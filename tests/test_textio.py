"""Corpus readers: every input unit becomes a record or a dead letter naming ``file:N``."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from trainer.data.corpora import peoples_daily, sentiment
from kdstore.textio import (
    CorpusError, DeadLetter, ReaderSpec, Record, expand_inputs, iter_records, read_records,
)
from kdstore.hashing import sample_id


@pytest.fixture(scope="module")
def lines() -> list[str]:
    return [s.text for s in peoples_daily("validation")[:20]]


def test_text_lines_with_planted_faults(tmp_path, lines):
    p = tmp_path / "a.txt"
    raw = "\n".join(lines[:5]).encode() + b"\n\n   \n\xff\xfeabc\n" + lines[5].encode() + b"\r\n" + lines[6].encode()
    p.write_bytes(raw)
    good, bad = read_records(str(p))
    assert [r.text for r in good] == lines[:7]  # CRLF stripped, no trailing newline needed
    assert [r.sample_id for r in good] == [sample_id(t) for t in lines[:7]]
    assert [r.source for r in good][:5] == [f"{p}:{i}" for i in range(1, 6)]
    assert good[5].source == f"{p}:9" and good[6].source == f"{p}:10"
    assert [(d.source, d.reason.split(":")[0]) for d in bad] == [
        (f"{p}:6", "empty line"), (f"{p}:7", "empty line"), (f"{p}:8", "undecodable"),
    ]
    assert "byte 0" in bad[2].reason
    # units in == records + dead letters
    assert len(good) + len(bad) == raw.count(b"\n") + 1


def test_jsonl_fields_ids_labels_and_faults(tmp_path):
    reviews = sentiment("validation")[:4]
    rows = [json.dumps({"text": r.text, "id": f"r{i}", "y": r.label}, ensure_ascii=False) for i, r in enumerate(reviews)]
    rows += [
        "{not json", "[1, 2]", json.dumps({"body": "x", "id": "a"}), json.dumps({"text": 5, "id": "b"}),
        json.dumps({"text": "ok", "y": 1}), json.dumps({"text": "fine", "id": "c", "y": "positive"}),
        json.dumps({"text": "  ", "id": "d"}), json.dumps({"text": "好", "id": 7, "y": "1"}),
        json.dumps({"text": "真", "id": 8, "y": True}), json.dumps({"text": "假", "id": 9, "y": 1.0}),
    ]
    p = tmp_path / "data.jsonl"
    p.write_text("\n".join(rows) + "\n", encoding="utf-8")
    spec = ReaderSpec(text_field="text", id_field="id", label_field="y")
    items = list(iter_records(str(p), spec))
    assert len(items) == len(rows)
    recs = [x for x in items if isinstance(x, Record)]
    assert [r.text for r in recs] == [r.text for r in reviews] + ["好"]
    assert [r.label for r in recs] == [r.label for r in reviews] + [1]
    assert recs[0].sample_id == sample_id(reviews[0].text, "r0") != sample_id(reviews[0].text)
    assert recs[-1].source_id == "7"
    reasons = {x.source.rsplit(":", 1)[1]: x.reason for x in items if isinstance(x, DeadLetter)}
    assert reasons["5"].startswith("malformed JSON")
    assert "expected an object" in reasons["6"]
    assert reasons["7"] == "missing field 'text'"
    assert "not a string" in reasons["8"]
    assert reasons["9"] == "missing id field 'id'"
    assert "not an integer class id" in reasons["10"] and items[9].sample_id == sample_id("fine", "c")
    assert reasons["11"] == "empty text"
    # One label rule for every reader: a string of digits is its id; booleans and floats are rejected.
    assert reasons["13"] == "label field 'y' is not an integer class id: True"
    assert reasons["14"] == "label field 'y' is not an integer class id: 1.0"
    named = list(iter_records(str(p), ReaderSpec(text_field="text", id_field="id", label_field="y", label_names=True)))
    assert named[9].label == "positive" and named[11].label == "1"


def test_parquet_column_nulls_and_missing_column(tmp_path, lines):
    p = tmp_path / "c.parquet"
    texts = lines[:6] + [None, ""]
    pq.write_table(pa.table({"content": texts, "doc": [f"d{i}" for i in range(8)]}), p, row_group_size=3)
    good, bad = read_records(str(p), ReaderSpec(text_field="content", id_field="doc"))
    assert [r.text for r in good] == lines[:6]
    assert [r.source for r in good] == [f"{p}:{i}" for i in range(1, 7)]
    assert [(d.source, d.reason) for d in bad] == [(f"{p}:7", "field 'content' is missing or null"), (f"{p}:8", "empty text")]
    with pytest.raises(CorpusError, match="no column"):
        read_records(str(p), ReaderSpec(text_field="text"))


def test_globs_compression_and_format_detection(tmp_path, lines):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "x.txt").write_text("\n".join(lines[:3]), encoding="utf-8")
    with gzip.open(tmp_path / "sub" / "y.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(json.dumps({"text": t}, ensure_ascii=False) for t in lines[3:5]))
    files = expand_inputs(str(tmp_path / "**" / "*"))
    assert [f.rsplit("/", 1)[1] for f in files] == ["x.txt", "y.jsonl.gz"]
    good, bad = read_records([str(tmp_path / "sub" / "*.txt"), str(tmp_path / "sub" / "*.gz")])
    assert [r.text for r in good] == lines[:5] and not bad
    assert ReaderSpec().format_of("a/b.ndjson.zst") == "jsonl"
    assert ReaderSpec().format_of("a/b.pq") == "parquet"
    assert ReaderSpec(format="text").format_of("b.jsonl") == "text"
    with pytest.raises(CorpusError, match="no input file matches"):
        expand_inputs(str(tmp_path / "nothing*.txt"))
    with pytest.raises(ValueError, match="input format"):
        ReaderSpec(format="csv")


def test_remote_uri_through_fsspec(lines):
    fsspec = pytest.importorskip("fsspec")
    mem = fsspec.filesystem("memory")
    mem.pipe("/kd-textio/corpus/part-0.txt", "\n".join(lines[:2]).encode())
    mem.pipe("/kd-textio/corpus/part-1.txt", ("\n" + lines[2]).encode())
    files = expand_inputs("memory://kd-textio/corpus/part-*.txt")
    assert files == ["memory://kd-textio/corpus/part-0.txt", "memory://kd-textio/corpus/part-1.txt"]
    good, bad = read_records(files)
    assert [r.text for r in good] == lines[:3]
    assert [d.source for d in bad] == ["memory://kd-textio/corpus/part-1.txt:1"]
