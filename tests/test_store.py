"""Writer and reader: round trips in every mode and code, URIs, shard rolling, manifest-last,
overwrite, bad rows rejected with the sample named, vocabulary reverse lookup."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

import kdstore
from kdstore import IncompleteStoreError, Selection, SoftLabelRow, StoreFormatError, StoreWriter, TeacherInfo
from kdstore import format as F
from kdstore.fs import Location
from kdstore.quant import quantizer
from kdstore.store import read_dead_letters

from _storeutil import MODES, entry_sets, make_rows, vocab, write_store

V = 300


def _decoded_sets(store):
    out, ids, rows = [], [], []
    for d in store.iter_decoded(batch_rows=4):
        for q in range(len(d.counts)):
            sl = slice(d.entry_offsets[q], d.entry_offsets[q + 1])
            assert np.all(np.diff(d.indices[sl]) > 0), "entries come back in ascending index order"
            out.append((dict(zip(d.indices[sl].tolist(), d.probs[sl].tolist())), float(d.tail[q])))
        ids.append(d.input_ids)
        rows += list(zip(d.sample_id, d.window.tolist(), d.token_start.tolist(), d.context_len.tolist()))
    return out, np.concatenate(ids), rows


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("scheme,bits", [("sqrt", 8), ("log", 8), ("sqrt", 16)])
def test_round_trip(tmp_path, mode, scheme, bits):
    rows, exact = make_rows(9, V, mode, seed=bits)
    store = kdstore.open(str(write_store(tmp_path / "s", rows, v=V, mode=mode, bits=bits, scheme=scheme, row_group_rows=4)))
    m = store.manifest
    assert m.totals["rows"] == 9
    assert m.totals["tokens"] == sum(len(e.ids) for e in exact)
    assert m.totals["entries"] == sum(len(e.indices) for e in exact)
    assert m.quantization.probs == ("count" if mode == "sample" else scheme)
    got, ids, meta = _decoded_sets(store)
    assert np.array_equal(ids, np.concatenate([e.ids for e in exact]))
    assert meta == [(r.sample_id, r.window, r.token_start, r.context_len) for r in rows]
    want = entry_sets(exact)
    tails = np.concatenate([e.tail for e in exact])
    q = quantizer(scheme, bits)
    for (g, tail), w, t in zip(got, want, tails):
        assert g.keys() == w.keys()
        gp = np.array([g[i] for i in w])
        wp = np.array(list(w.values()))
        assert abs(gp.sum() + tail - 1) < 1e-5, "decoded kept + tail sums to 1"
        if mode == "sample":
            assert np.array_equal(gp, wp) and tail == 0.0  # exact frequencies
        else:
            # decode renormalises: compare against the exact values renormalised the same way
            tol = 2 * (np.sqrt(wp) / q.max_code + 1 / q.max_code**2) if scheme == "sqrt" else 2 * wp * q.max_log_error + 1e-6
            assert np.all(np.abs(gp - wp) <= tol + 0.03 * wp)


def test_optional_columns_and_sequence_level(tmp_path):
    rows, exact = make_rows(6, V, "topk", text=True, label=True)
    store = kdstore.open(str(write_store(tmp_path / "t", rows, v=V, mode="topk", columns={"text": True, "offsets": True, "label": True})))
    t = store.read_shard(0)
    assert t.column("text").to_pylist() == [r.text for r in rows]
    assert t.column("byte_start").to_pylist()[2] == rows[2].byte_start.tolist()
    d = store.decode(t)
    assert d.label.tolist() == [r.label if r.label is not None else -100 for r in rows]

    # sequence level: one position per row, indices are class ids, no tokens needed
    sel = Selection(mode="topk", k=3)
    with StoreWriter(str(tmp_path / "seq"), teacher=TeacherInfo(name_or_path="clf", vocab_size=5), selection=sel,
                     level="sequence", columns={"label": True}) as w:
        w.write([SoftLabelRow(sample_id=f"s{i}", tokens=np.zeros(0, np.uint64), counts=np.array([3]),
                              indices=np.array([4, 0, 2]), probs=np.array([0.6, 0.3, 0.05]), tail=np.array([0.05]), label=i % 2)
                 for i in range(4)])
    s = kdstore.open(str(tmp_path / "seq"))
    d = next(s.iter_decoded(with_inputs=False))
    assert d.indices.tolist() == [0, 2, 4] * 4 and d.label.tolist() == [0, 1, 0, 1]
    assert np.allclose(d.probs[:3], [0.3, 0.05, 0.6], atol=0.01)


def test_shards_roll_by_size_and_manifest_is_written_last(tmp_path, monkeypatch):
    rows, exact = make_rows(40, V, "top_p", seed=3)
    seen = {}
    original = Location.write_bytes_atomic

    def spy(self, rel, data):
        if rel == F.MANIFEST:
            man = json.loads(data)
            # at the moment the manifest is written, every shard it lists is complete on disk
            seen["shards"] = [(s["file"], self.size(s["file"]) == s["bytes"]) for s in man["shards"]]
        return original(self, rel, data)

    monkeypatch.setattr(Location, "write_bytes_atomic", spy)
    write_store(tmp_path / "r", rows, v=V, mode="top_p", shard_bytes=6000, row_group_rows=5)
    store = kdstore.open(str(tmp_path / "r"))
    assert len(store.shards) >= 3 and all(ok for _, ok in seen["shards"])
    assert [s.file for s in store.shards] == sorted(f"shards/{p.name}" for p in (tmp_path / "r" / "shards").iterdir())
    assert sum(s.rows for s in store.shards) == 40 == store.num_rows
    assert sum(s.entries for s in store.shards) == store.manifest.totals["entries"] == sum(len(e.indices) for e in exact)
    got, ids, _ = _decoded_sets(store)
    assert [set(g) for g, _ in got] == [set(w) for w in entry_sets(exact)]


def test_failed_write_leaves_no_manifest(tmp_path):
    rows, _ = make_rows(5, V, "topk")
    with pytest.raises(RuntimeError, match="boom"):
        with StoreWriter(str(tmp_path / "x"), teacher=TeacherInfo(name_or_path="t", vocab_size=V), selection=Selection(mode="topk", k=8),
                         row_group_rows=2) as w:
            w.write(rows)
            raise RuntimeError("boom")
    assert list((tmp_path / "x" / "shards").iterdir())  # shards were written ...
    with pytest.raises(IncompleteStoreError, match="incomplete"):  # ... but the store is incomplete
        kdstore.open(str(tmp_path / "x"))
    with pytest.raises(IncompleteStoreError, match="no such store"):
        kdstore.open(str(tmp_path / "nothing-here"))


def test_overwrite(tmp_path):
    rows, _ = make_rows(30, V, "topk", seed=1)
    write_store(tmp_path / "o", rows, v=V, mode="topk", shard_bytes=3000, row_group_rows=3)
    n_old = len(list((tmp_path / "o" / "shards").iterdir()))
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_store(tmp_path / "o", rows[:2], v=V, mode="topk")
    write_store(tmp_path / "o", rows[:2], v=V, mode="topk", overwrite=True)
    store = kdstore.open(str(tmp_path / "o"))
    assert n_old > 1 and store.num_rows == 2
    assert len(list((tmp_path / "o" / "shards").iterdir())) == 1  # old shards removed


def test_uris_file_and_fsspec_memory(tmp_path):
    rows, exact = make_rows(4, V, "sample")
    uri = (tmp_path / "u").as_uri()
    assert uri.startswith("file://")
    write_store(uri, rows, v=V, mode="sample")
    assert kdstore.open(uri).num_rows == 4
    mem = "memory://kdstore-test/store"
    write_store(mem, rows, v=V, mode="sample")
    store = kdstore.open(mem)
    got, ids, _ = _decoded_sets(store)
    assert np.array_equal(ids, np.concatenate([e.ids for e in exact]))
    assert [set(g) for g, _ in got] == [set(w) for w in entry_sets(exact)]


def test_dead_letters_counted(tmp_path):
    rows, _ = make_rows(3, V, "topk")
    with StoreWriter(str(tmp_path / "d"), teacher=TeacherInfo(name_or_path="t", vocab_size=V), selection=Selection(mode="topk", k=8)) as w:
        w.write_vocab(vocab(V))
        w.write(rows)
        w.dead_letter(reason="empty text", sample_id="abc", source="corpus.jsonl:3")
        w.dead_letter(reason="too long", sample_id="def", source="corpus.jsonl:9")
    store = kdstore.open(str(tmp_path / "d"))
    assert store.manifest.errors["count"] == 2 == store.manifest.totals["dead_letters"]
    recs = read_dead_letters(store)
    assert [r["reason"] for r in recs] == ["empty text", "too long"] and recs[0]["source"] == "corpus.jsonl:3"


@pytest.mark.parametrize("mutate,match", [
    (lambda r: setattr(r, "indices", np.where(np.arange(len(r.indices)) == 0, V, r.indices)), "outside the teacher vocabulary"),
    (lambda r: setattr(r, "indices", np.concatenate([r.indices[:1], r.indices[:1], r.indices[2:]])), "kept twice"),
    (lambda r: setattr(r, "probs", np.where(np.arange(len(r.probs)) == 1, np.nan, r.probs)), "finite probabilities"),
    (lambda r: setattr(r, "tail", r.tail[:-1]), "tail values"),
    (lambda r: setattr(r, "tokens", r.tokens[:-1]), "tokens but"),
    (lambda r: setattr(r, "counts", r.counts + 1), "counts sum"),
    (lambda r: setattr(r, "sample_id", ""), "non-empty"),
])
def test_bad_rows_name_the_sample(tmp_path, mutate, match):
    rows, _ = make_rows(3, V, "topk", seed=5, max_len=4)
    mutate(rows[1])
    with pytest.raises(StoreFormatError, match=match) as err:
        write_store(tmp_path / "b", rows, v=V, mode="topk")
    if match != "non-empty":
        assert repr(rows[1].sample_id) in str(err.value)


def test_sample_mode_rows_must_be_draw_frequencies(tmp_path):
    rows, _ = make_rows(2, V, "sample", max_len=3)
    rows[0].probs = rows[0].probs + np.where(np.arange(len(rows[0].probs)) == 0, 1 / 16, 0)  # 17 draws
    with pytest.raises(StoreFormatError, match="sum to 17"):
        write_store(tmp_path / "f", rows, v=V, mode="sample")
    rows, _ = make_rows(2, V, "sample", max_len=3)
    rows[1].probs = rows[1].probs + 0.01
    with pytest.raises(StoreFormatError, match="draw frequencies"):
        write_store(tmp_path / "g", rows, v=V, mode="sample")


def test_vocab_reverse_lookup(tmp_path):
    rows, exact = make_rows(2, V, "topk")
    store = kdstore.open(str(write_store(tmp_path / "v", rows, v=V, mode="topk")))
    h = store.vocab.column("hash").to_numpy()
    assert store.token_ids(h[[5, 0, 299]]).tolist() == [5, 0, 299]
    assert store.vocab.column("token").to_pylist()[7] == "tok7"
    with pytest.raises(StoreFormatError, match="not in the vocabulary table"):
        store.token_ids(np.array([12345], dtype=np.uint64))


def test_column_projection_and_batches(tmp_path):
    rows, _ = make_rows(10, V, "top_p", seed=2)
    store = kdstore.open(str(write_store(tmp_path / "p", rows, v=V, mode="top_p", row_group_rows=4)))
    batches = list(store.iter_batches(columns=["sample_id", "counts", "no_such_column"], batch_rows=3))
    assert all(b.schema.names == ["sample_id", "counts"] for b in batches)
    assert sum(b.num_rows for b in batches) == 10
    t = store.read_shard(0, columns=["indices", "probs"])
    assert t.schema.names == ["indices", "probs"] and pa.types.is_list(t.schema.field("indices").type)


def test_manifest_rejects_unsafe_or_unknown_values():
    man = kdstore.format.Manifest(teacher=TeacherInfo(name_or_path="t", vocab_size=10), selection=Selection(mode="topk", k=2),
                                  quantization=F.Quantization(probs="sqrt", bits=8))
    man.shards = [F.ShardInfo(file="shards/..weird-but-inside.parquet", rows=0, tokens=0, entries=0, bytes=0, checksum="")]
    man.validate()  # a name starting with '..' is not a parent reference
    for bad, match in (("../x.parquet", "escapes"), ("shards/../../x", "escapes"), ("/etc/passwd", "absolute"),
                       ("s3://bucket/x", "absolute"), ("C:\\x", "absolute"), (".", "root")):
        man.shards[0].file = bad
        with pytest.raises(StoreFormatError, match=match):
            man.validate()
    man.shards = []
    man.quantization = F.Quantization(probs="linear", bits=8)
    with pytest.raises(StoreFormatError, match="unknown quantization"):
        man.validate()
    with pytest.raises(StoreFormatError, match="65535"):
        Selection(mode="top_p", p=0.9, max_k=70000).validate()


def test_decoded_rows_to_torch(tmp_path):
    import torch

    rows, exact = make_rows(3, V, "top_p", seed=8)
    store = kdstore.open(str(write_store(tmp_path / "tt", rows, v=V, mode="top_p")))
    d = next(store.iter_decoded())
    t = d.to_torch()
    assert t["indices"].dtype == torch.int64 and t["probs"].dtype == torch.float32
    assert t["indices"].tolist() == d.indices.tolist() and t["counts"].tolist() == np.concatenate([e.counts for e in exact]).tolist()
    assert t["input_ids"].tolist() == np.concatenate([e.ids for e in exact]).tolist()
    # per position: kept + tail sums to 1
    sums = torch.zeros(len(t["counts"])).index_add_(0, torch.repeat_interleave(torch.arange(len(t["counts"])), t["counts"]), t["probs"])
    assert torch.allclose(sums + t["tail"], torch.ones_like(sums), atol=1e-5)
