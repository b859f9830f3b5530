"""Format v2's ``rank_delta`` index coding: golden bytes, round trips, and the v1 store kept readable.

The golden store holds the same two rows as ``test_store_golden.py``; only the index coding
differs, so the two stores must decode to identical rows.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kdstore
from kdstore import Selection, SoftLabelRow
from kdstore.errors import StoreError, StoreFormatError
from kdstore.hashing import file_checksum
from kdstore.merge import MergeError, merge_stores
from kdstore.tools import verify_store
from kdstore.writer import encode_index_order, frequency_order

from _storeutil import vocab
from test_store_golden import golden, golden_rows, write_golden  # noqa: F401  (golden: the sorted_delta twin of this store)

V = 300
DATA = Path(__file__).parent / "data" / "store-v1"
# Counts that make 299, 42 and 17 the most frequent ids, then 3 (ties by id).
COUNTS = np.zeros(V, np.int64)
COUNTS[[299, 42, 17, 3]] = [9, 9, 5, 2]


def _write(path: Path, rows, *, order=None, **kw) -> kdstore.Store:
    return write_golden(path, rows, index_order=order, index_order_source={"counted": "test"} if order is not None else None, **kw)


def _same_rows(a, b) -> None:
    """Equal decoded rows up to the order of entries within a position (storage order)."""
    for name in ("input_ids", "positions", "counts", "entry_offsets"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    # the same codes; only the float32 summation order of the renormalisation differs
    assert np.allclose(a.tail, b.tail, rtol=1e-6, atol=0)
    assert (a.label is None) == (b.label is None) and (a.label is None or np.array_equal(a.label, b.label))
    pos = np.repeat(np.arange(len(a.counts)), a.counts)
    oa, ob = np.lexsort((a.indices, pos)), np.lexsort((b.indices, pos))
    assert np.array_equal(a.indices[oa], b.indices[ob]) and np.allclose(a.probs[oa], b.probs[ob], rtol=1e-6, atol=0)


@pytest.fixture(scope="module")
def ranked(tmp_path_factory):
    return _write(tmp_path_factory.mktemp("rank") / "store", golden_rows(), order=frequency_order(COUNTS, V)).uri


def test_frequency_order_golden():
    order = frequency_order(COUNTS, V)
    assert order[:6].tolist() == [42, 299, 17, 3, 0, 1]  # 9, 9 (tie: lower id first), 5, 2, then unseen ids by id
    assert sorted(order.tolist()) == list(range(V)) and order.dtype == np.uint32
    # counts shorter than V (the tokenizer's size, under the padded embedding): the padded ids rank last
    assert frequency_order(np.array([0, 5, 1]), 5).tolist() == [1, 2, 0, 3, 4]
    with pytest.raises(StoreFormatError, match="length <= vocab size"):
        frequency_order(np.ones(6), 5)


def test_layout_manifest_and_order_file(ranked):
    root = Path(ranked)
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    assert files == ["index_order.parquet", "manifest.json", "shards/part-00000.parquet", "vocab.parquet"]
    m = json.loads((root / "manifest.json").read_text())
    assert m["format_version"] == 2 and m["index_coding"] == "rank_delta"
    data = (root / "index_order.parquet").read_bytes()
    assert m["index_order"] == {"file": "index_order.parquet", "rows": V, "bytes": len(data),
                                "checksum": file_checksum(data), "source": {"counted": "test"}}
    t = pq.read_table(root / "index_order.parquet")
    assert t.schema.names == ["id"] and str(t.schema.field("id").type) == "uint32"
    assert t.column("id").to_numpy().tolist() == frequency_order(COUNTS, V).tolist()
    meta = pq.ParquetFile(root / "shards/part-00000.parquet").schema_arrow.metadata
    assert meta[b"kdstore.format_version"] == b"2" and meta[b"kdstore.index_coding"] == b"rank_delta"


def test_exact_rank_gaps(ranked):
    t = pq.read_table(Path(ranked) / "shards/part-00000.parquet")
    # ranks: 42->0 299->1 17->2 3->3, then 0->4 1->5 2->6 ... id i (unseen, i not in {3,17,42}) -> i + 4 - (#seen ids below i)
    # row 1: ids {17, 3, 299} -> ranks {2, 3, 1} -> sorted 1 2 3 -> gaps 1 1 1; ids {0,1,2} -> ranks 4 5 6 -> 4 1 1
    # row 2: ids {256, 255, 42} -> ranks {256+4-3, 255+4-3, 0} = {257, 256, 0} -> 0 256 257 -> gaps 0 256 1
    assert t.column("indices").to_pylist() == [[1, 1, 1, 4, 1, 1], [0, 256, 1]]
    # probability codes follow the rank order: 299 (.125), 17 (.5), 3 (.25) | .9 .05 .001 | 42 (.99), 255 (1e-5), 256 (1e-3)
    assert t.column("probs").to_pylist() == [[90, 180, 128, 242, 57, 8], [254, 1, 8]]


def test_decodes_to_the_sorted_delta_store(ranked, golden):  # noqa: F811
    a = next(kdstore.open(str(golden)).iter_decoded())
    b = next(kdstore.open(ranked).iter_decoded())
    assert b.indices.tolist() == [299, 17, 3, 0, 1, 2, 42, 255, 256]  # rank order within a position
    _same_rows(a, b)
    assert verify_store(ranked) == []


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), mode=st.sampled_from(["topk", "top_p"]))
def test_round_trip_any_order(tmp_path_factory, seed, mode):
    """Random rows under a random permutation decode exactly like the same rows stored by id."""
    rng = np.random.default_rng(seed)
    h = vocab(V).column("hash").to_numpy()
    rows = []
    for r in range(3):
        n = int(rng.integers(1, 6))
        counts = np.full(n, 4) if mode == "topk" else rng.integers(1, 9, size=n)
        idx = np.concatenate([rng.choice(V, size=c, replace=False) for c in counts])
        p = rng.dirichlet(np.ones(len(idx))) * 0.9
        rows.append(SoftLabelRow(sample_id=f"s{r}", tokens=h[rng.integers(0, V, n)], counts=counts, indices=idx, probs=p,
                                 tail=np.full(n, 0.1)))
    sel = Selection(mode="topk", k=4) if mode == "topk" else Selection(mode="top_p", p=0.9, max_k=8)
    tmp = tmp_path_factory.mktemp("rt")
    a = next(_write(tmp / "a", rows, selection=sel).iter_decoded())
    b = next(_write(tmp / "b", rows, selection=sel, order=rng.permutation(V)).iter_decoded())
    _same_rows(a, b)


def test_order_must_be_a_permutation(tmp_path):
    bad = np.arange(V)
    bad[5] = 6
    with pytest.raises(StoreFormatError, match="permutation"):
        encode_index_order(bad)
    with pytest.raises(StoreFormatError, match="permutation"):
        _write(tmp_path / "s", golden_rows(), order=bad)
    assert not (tmp_path / "s").exists()  # refused before anything was written
    # a worker's encoder checks the order it was handed too (a capture passes it to every worker)
    from kdstore.writer import RowEncoder, new_manifest

    _, entry = encode_index_order(np.arange(V))
    m = new_manifest(teacher=kdstore.TeacherInfo(name_or_path="t", vocab_size=V), selection=Selection(mode="topk", k=3), index_order=entry)
    with pytest.raises(StoreFormatError, match="not a permutation"):
        RowEncoder(m, index_order=bad)
    with pytest.raises(StoreFormatError, match="needs its index order"):
        RowEncoder(m)


def test_corrupt_order_file_is_reported(ranked, tmp_path):
    root = tmp_path / "s"
    shutil.copytree(ranked, root)
    t = pq.read_table(root / "index_order.parquet")
    ids = t.column("id").to_numpy().copy()
    ids[[0, 1]] = ids[[1, 0]]  # a swapped pair: still a permutation, every index of those ids would decode wrong
    pq.write_table(t.set_column(0, "id", [ids]), root / "index_order.parquet")
    problems = verify_store(str(root))
    assert len(problems) == 1 and "index_order.parquet: checksum mismatch" in problems[0]
    with pytest.raises(StoreError, match="index_order.parquet: checksum mismatch"):
        next(kdstore.open(str(root)).iter_decoded())
    (root / "index_order.parquet").unlink()
    with pytest.raises(StoreError, match="cannot read the index order"):
        next(kdstore.open(str(root)).iter_decoded())


def test_manifest_coding_and_order_must_agree(ranked, tmp_path):
    root = tmp_path / "s"
    shutil.copytree(ranked, root)
    m = json.loads((root / "manifest.json").read_text())
    (root / "manifest.json").write_text(json.dumps({**m, "index_order": None}))
    with pytest.raises(StoreFormatError, match="needs an 'index_order' entry"):
        kdstore.open(str(root))
    (root / "manifest.json").write_text(json.dumps({**m, "format_version": 1}))
    with pytest.raises(StoreFormatError, match="unknown index coding 'rank_delta' for format v1"):
        kdstore.open(str(root))


def test_v1_store_still_reads():
    """A store written by the v1 writer (checked in, made before this change) decodes as before."""
    s = kdstore.open(str(DATA))
    assert s.manifest.format_version == 1 and s.manifest.index_coding == "sorted_delta" and s.index_order is None
    d = next(s.iter_decoded())
    assert d.indices.tolist() == [3, 17, 299, 0, 1, 2, 42, 255, 256]
    assert d.input_ids.tolist() == [5, 7, 9]
    assert verify_store(str(DATA)) == []


def test_merge_copies_order_and_refuses_another(ranked, tmp_path):
    other = _write(tmp_path / "other", golden_rows()[:1], order=frequency_order(COUNTS[::-1], V))
    with pytest.raises(MergeError, match="index_order.checksum"):
        merge_stores(str(tmp_path / "bad"), [ranked, other.uri])
    with pytest.raises(MergeError, match="format_version|index_coding"):
        merge_stores(str(tmp_path / "bad2"), [ranked, str(DATA)])
    same = _write(tmp_path / "same", golden_rows()[1:], order=frequency_order(COUNTS, V))
    r = merge_stores(str(tmp_path / "merged"), [ranked, same.uri])
    assert r.duplicates == 1 and r.rows_out == 2
    merged = kdstore.open(str(tmp_path / "merged"))
    assert (tmp_path / "merged" / "index_order.parquet").is_file() and verify_store(merged) == []
    assert next(merged.iter_decoded()).indices.tolist() == [299, 17, 3, 0, 1, 2, 42, 255, 256]
