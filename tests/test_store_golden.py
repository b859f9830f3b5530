"""Golden test of format v2 (a ``sorted_delta`` store, the default coding): a tiny store with fixed content. Any change to the on-disk
schema, encodings, metadata, manifest fields, hashes or quantized codes fails here; such a
change needs a new FORMAT_VERSION (docs/format.md, "Versioning")."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest

import kdstore
from kdstore import Selection, SoftLabelRow, StoreWriter, TeacherInfo
from kdstore.hashing import file_checksum, sample_id, token_hash
from kdstore.quant import LogQuantizer, SqrtQuantizer

from _storeutil import vocab

V = 300


def golden_rows() -> list[SoftLabelRow]:
    """Two rows with fixed content (also stored by ``tests/test_store_rank.py`` in the other coding)."""
    h = vocab(V).column("hash").to_numpy()
    return [
        SoftLabelRow(sample_id=sample_id("ab c", "doc-1"), tokens=h[[5, 7]], counts=np.array([3, 3]),
                     indices=np.array([17, 3, 299, 0, 1, 2]), probs=np.array([0.5, 0.25, 0.125, 0.9, 0.05, 0.001]),
                     tail=np.array([0.125, 0.049]), text="ab c", byte_start=np.array([0, 2]), byte_end=np.array([2, 4]), label=1),
        SoftLabelRow(sample_id=sample_id("d", "doc-2"), tokens=h[[9]], counts=np.array([3]), indices=np.array([256, 255, 42]),
                     probs=np.array([1e-3, 1e-5, 0.99]), tail=np.array([0.00899]), window=1, token_start=512,
                     text="d", byte_start=np.array([0]), byte_end=np.array([1]), label=None),
    ]


def write_golden(path, rows, *, selection=None, **kw) -> kdstore.Store:
    """``rows`` in a store of the golden teacher and columns; ``kw`` go to :class:`StoreWriter`."""
    teacher = TeacherInfo(name_or_path="golden-teacher", vocab_size=V, weights_hash="w", tokenizer_hash="t",
                          tokenizer_vocab_size=298, revision="r1", architecture="LlamaForCausalLM", num_parameters=1000)
    with StoreWriter(str(path), teacher=teacher, selection=selection or Selection(mode="topk", k=3),
                     columns={"text": True, "offsets": True, "label": True}, pipeline={"max_length": 2}, **kw) as w:
        w.write_vocab(vocab(V))
        w.write(rows)
    return kdstore.open(str(path))


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    path = tmp_path_factory.mktemp("golden") / "store"
    write_golden(path, golden_rows())
    return path


def test_layout(golden):
    files = sorted(str(p.relative_to(golden)) for p in golden.rglob("*") if p.is_file())
    assert files == ["manifest.json", "shards/part-00000.parquet", "vocab.parquet"]


def test_manifest(golden):
    m = json.loads((golden / "manifest.json").read_text())
    shard = m["shards"][0]
    data = (golden / shard["file"]).read_bytes()
    assert shard.pop("bytes") == len(data) and shard.pop("checksum") == file_checksum(data)
    assert m["vocab"].pop("checksum") == file_checksum((golden / "vocab.parquet").read_bytes())
    assert m["vocab"].pop("bytes") == (golden / "vocab.parquet").stat().st_size
    assert m.pop("created_at")
    assert m["totals"].pop("bytes") == len(data)
    assert m == {
        "teacher": {"name_or_path": "golden-teacher", "vocab_size": 300, "weights_hash": "w", "tokenizer_hash": "t",
                    "tokenizer_vocab_size": 298, "revision": "r1", "architecture": "LlamaForCausalLM", "num_parameters": 1000},
        "selection": {"mode": "topk", "k": 3, "p": None, "max_k": None, "samples": None, "temperature": 1.0, "seed": None},
        "quantization": {"probs": "sqrt", "bits": 8, "log_range": None, "tail": "sqrt"},
        "level": "token",
        "shards": [{"file": "shards/part-00000.parquet", "rows": 2, "tokens": 3, "entries": 9}],
        "totals": {"rows": 2, "tokens": 3, "entries": 9, "dead_letters": 0},
        "vocab": {"file": "vocab.parquet", "rows": 300},
        "errors": {"files": [], "count": 0},
        "columns": {"text": True, "offsets": True, "label": True},
        "index_dtype": "uint16",
        "index_coding": "sorted_delta",
        "index_order": None,
        "hashes": {"tokens": "xxh3_64", "sample_id": "xxh3_64(source_id + '\\x00' + text, utf-8), 16 hex digits", "checksum": "xxh3_128"},
        "created_by": f"kdstore {kdstore.__version__}",
        "pipeline": {"max_length": 2},
        "format": "kdstore",
        "format_version": 2,
    }


def test_shard_schema_and_encodings(golden):
    pf = pq.ParquetFile(golden / "shards" / "part-00000.parquet")
    arrow = [(f.name, str(f.type.value_type) if hasattr(f.type, "value_type") else str(f.type), "list" if hasattr(f.type, "value_type") else "", f.nullable)
             for f in pf.schema_arrow]
    assert arrow == [
        ("sample_id", "string", "", False), ("window", "uint32", "", False), ("token_start", "uint32", "", False),
        ("context_len", "uint32", "", False), ("tokens", "uint64", "list", False), ("indices", "uint16", "list", False),
        ("probs", "uint8", "list", False), ("tail", "uint8", "list", False), ("text", "string", "", True),
        ("byte_start", "uint32", "list", True), ("byte_end", "uint32", "list", True), ("label", "int64", "", True),
    ]
    assert pf.schema_arrow.metadata == {
        b"kdstore.format_version": b"2", b"kdstore.index_coding": b"sorted_delta", b"kdstore.probs": b"sqrt8",
        b"kdstore.tail": b"sqrt8", b"kdstore.vocab_size": b"300",
    }
    physical = {pf.schema.column(i).path: (pf.schema.column(i).physical_type, str(pf.schema.column(i).logical_type))
                for i in range(len(pf.schema))}
    assert physical["indices.list.element"] == ("INT32", "Int(bitWidth=16, isSigned=false)")
    assert physical["probs.list.element"] == ("INT32", "Int(bitWidth=8, isSigned=false)")
    assert physical["tokens.list.element"] == ("INT64", "Int(bitWidth=64, isSigned=false)")
    rg = pf.metadata.row_group(0)
    enc = {rg.column(i).path_in_schema: (rg.column(i).compression, set(rg.column(i).encodings)) for i in range(rg.num_columns)}
    assert all(c == "ZSTD" for c, _ in enc.values())
    for col in ("indices", "probs", "tail"):
        assert "BYTE_STREAM_SPLIT" in enc[f"{col}.list.element"][1]
    assert "RLE_DICTIONARY" in enc["tokens.list.element"][1]
    assert "DELTA_BINARY_PACKED" in enc["byte_start.list.element"][1]


def test_exact_codes(golden):
    t = pq.read_table(golden / "shards" / "part-00000.parquet")
    assert t.column("sample_id").to_pylist() == ["1f6b6b4900a6bf63", "8e99193eb8931e78"]
    assert t.column("tokens").to_pylist() == [[token_hash(b"tok5"), token_hash(b"tok7")], [token_hash(b"tok9")]]
    assert token_hash(b"tok5") == 10047654073028829058
    # indices sorted per position, stored as gaps: [3, 17, 299] -> [3, 14, 282]; [0, 1, 2] -> [0, 1, 1]
    assert t.column("indices").to_pylist() == [[3, 14, 282, 0, 1, 1], [42, 213, 1]]
    # sqrt8 codes round(255 * sqrt(p)) in index order: p = .25 .5 .125 | .9 .05 .001 | .99 1e-5 1e-3
    assert t.column("probs").to_pylist() == [[128, 180, 90, 242, 57, 8], [254, 1, 8]]
    assert t.column("tail").to_pylist() == [[90, 56], [24]]
    assert t.column("window").to_pylist() == [0, 1] and t.column("token_start").to_pylist() == [0, 512]
    assert t.column("label").to_pylist() == [1, None]
    assert t.column("byte_end").to_pylist() == [[2, 4], [1]]


def test_decode_tables_and_decoded_values(golden):
    sq, lg = SqrtQuantizer(8).table(), LogQuantizer(8).table()
    assert sq[0] == np.float32(1 / (12 * 255**2)) and sq[128] == np.float32((128 / 255) ** 2) and sq[255] == 1.0
    assert lg[0] == 1.0 and lg[1] == np.float32(math.exp(-16 / 254)) and lg[254] == np.float32(math.exp(-16)) and lg[255] == 0.0
    assert SqrtQuantizer(16).table()[1] == np.float32(1 / 65535**2)
    assert LogQuantizer(16).table()[65534] == np.float32(math.exp(-48))
    d = next(kdstore.open(str(golden)).iter_decoded())
    assert d.indices.tolist() == [3, 17, 299, 0, 1, 2, 42, 255, 256]
    assert d.input_ids.tolist() == [5, 7, 9]
    raw = np.array([sq[128], sq[180], sq[90]], dtype=np.float64)
    z = raw.sum() + sq[90]
    assert np.allclose(d.probs[:3], raw / z, rtol=1e-6) and np.isclose(d.tail[0], sq[90] / z, rtol=1e-6)
    assert d.label.tolist() == [1, -100]


def test_sample_mode_schema():
    from kdstore import format as F
    from kdstore.writer import new_manifest

    m = new_manifest(teacher=TeacherInfo(name_or_path="t", vocab_size=70000), selection=Selection(mode="sample", samples=300))
    s = F.arrow_schema(m)
    assert [(f.name, str(f.type.value_type)) for f in s if hasattr(f.type, "value_type")] == [
        ("tokens", "uint64"), ("counts", "uint16"), ("indices", "uint32"), ("probs", "uint16"), ("tail", "uint8"),
    ]
    assert s.metadata[b"kdstore.probs"] == b"count" and s.metadata[b"kdstore.tail"] == b"sqrt8"
    assert m.quantization.probs == "count" and m.index_dtype == "uint32"
