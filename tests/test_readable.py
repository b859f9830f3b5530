"""A store is readable without kdstore: DuckDB and Polars read the shards, and plain numpy
following docs/format.md ("Decoding (reference algorithm)") recovers a row's probabilities
and input ids exactly as ``kdstore.open(...).decode(...)`` does."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

import kdstore
from _storeutil import make_rows, write_store

V = 300  # > 256: uint16 index gaps


@pytest.fixture(scope="module", params=["topk", "top_p", "sample"])
def store(request, tmp_path_factory):
    mode = request.param
    rows, _ = make_rows(40, V, mode, seed=5)
    path = write_store(tmp_path_factory.mktemp(mode) / "s", rows, v=V, mode=mode, shard_bytes=2000, row_group_rows=8)
    return mode, Path(path)


def _manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text(encoding="utf-8"))


def _shard_paths(path: Path) -> list[str]:
    # The manifest is the list of shards (a glob would also pick up leftovers of failed writers).
    return [str(path / s["file"]) for s in _manifest(path)["shards"]]


def _decode_row_numpy(man: dict, vocab_id: np.ndarray, vocab_hash: np.ndarray, row: dict) -> dict:
    """docs/format.md, "Decoding (reference algorithm)", one row, in plain numpy."""
    sel, q = man["selection"], man["quantization"]
    gaps = np.asarray(row["indices"], dtype=np.int64)
    P = len(row["tail"])
    if sel["mode"] == "topk":
        counts = np.full(P, min(sel["k"], man["teacher"]["vocab_size"]), dtype=np.int64)
    else:
        counts = np.asarray(row["counts"], dtype=np.int64)
    eoff = np.concatenate([[0], np.cumsum(counts)])
    cs = np.cumsum(gaps)
    idx = cs - np.repeat(cs[eoff[:-1]] - gaps[eoff[:-1]], counts)
    M = 2 ** q["bits"] - 1

    def sqrt_table(c):
        c = np.asarray(c, dtype=np.float64)
        return np.where(c >= 1, (c / M) ** 2, 1.0 / (12 * M**2))

    if q["probs"] == "count":
        probs = np.asarray(row["probs"], dtype=np.float64) / sel["samples"]
        tail = np.zeros(P)
    else:
        assert q["probs"] == "sqrt" and q["tail"] == "sqrt"
        probs, tail = sqrt_table(row["probs"]), sqrt_table(row["tail"])
        Z = np.add.reduceat(probs, eoff[:-1]) + tail if len(probs) else tail
        probs = probs / np.repeat(Z, counts)
        tail = tail / Z
    # vocab.parquet is in id order, not hash order: sort the hashes first, then look up.
    order = np.argsort(vocab_hash)
    tokens = np.asarray(row["tokens"], dtype=np.uint64)
    input_ids = vocab_id[order][np.searchsorted(vocab_hash[order], tokens)]
    return {"idx": idx, "probs": probs, "tail": tail, "counts": counts, "input_ids": input_ids}


def test_duckdb_reads_shards_and_numpy_decodes_like_kdstore(store):
    import duckdb

    mode, path = store
    man = _manifest(path)
    paths = _shard_paths(path)
    con = duckdb.connect()
    n = con.execute("SELECT count(*) FROM read_parquet($p)", {"p": paths}).fetchone()[0]
    assert n == man["totals"]["rows"]
    # `window` is a reserved word in SQL: it must be quoted.
    with pytest.raises(duckdb.Error):
        con.execute("SELECT window FROM read_parquet($p)", {"p": paths}).fetchall()
    sid, w = con.execute('SELECT sample_id, "window" FROM read_parquet($p) ORDER BY sample_id LIMIT 1 OFFSET 17',
                         {"p": paths}).fetchone()
    cols = "sample_id, tokens, indices, probs, tail" + (", counts" if mode != "topk" else "")
    rec = con.execute(f'SELECT {cols} FROM read_parquet($p) WHERE sample_id = $s AND "window" = $w',
                      {"p": paths, "s": sid, "w": w}).fetchone()
    row = dict(zip([c.strip() for c in cols.split(",")], rec))
    vid, vhash = zip(*con.execute(f"SELECT id, hash FROM read_parquet('{path / 'vocab.parquet'}')").fetchall())
    # Hashes are uint64: np.asarray of Python ints above 2**63 would give float64 and lose bits.
    got = _decode_row_numpy(man, np.array(vid, dtype=np.int64), np.array(vhash, dtype=np.uint64), row)

    st = kdstore.open(str(path))
    want = None
    for d in st.iter_decoded():
        for r in range(d.num_rows):
            if d.sample_id[r] == sid and int(d.window[r]) == w:
                a, b = d.positions[r], d.positions[r + 1]
                e0, e1 = d.entry_offsets[a], d.entry_offsets[b]
                want = dict(idx=d.indices[e0:e1], probs=d.probs[e0:e1], tail=d.tail[a:b], counts=d.counts[a:b],
                            input_ids=d.input_ids[a:b])
    assert want is not None
    np.testing.assert_array_equal(got["idx"], want["idx"])
    np.testing.assert_array_equal(got["counts"], want["counts"])
    np.testing.assert_array_equal(got["input_ids"], want["input_ids"])
    np.testing.assert_allclose(got["probs"], want["probs"], rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(got["tail"], want["tail"], rtol=1e-6, atol=1e-9)


def test_the_old_documented_lookup_was_wrong(store):
    """``vocab.id[searchsorted(sorted hash, tokens)]`` (the pre-fix doc) indexes ids in id order
    with positions in hash order: wrong ids."""
    _, path = store
    vocab = pq.read_table(path / "vocab.parquet")
    vid, vhash = vocab.column("id").to_numpy().astype(np.int64), vocab.column("hash").to_numpy()
    assert (np.diff(vhash.astype(np.float64)) < 0).any()  # not sorted by hash
    tokens = vhash[[5, 17, 250]]
    old = vid[np.searchsorted(np.sort(vhash), tokens)]
    order = np.argsort(vhash)
    new = vid[order][np.searchsorted(vhash[order], tokens)]
    assert new.tolist() == [5, 17, 250] and old.tolist() != [5, 17, 250]


def test_polars_reads_the_same_rows(store):
    import polars as pl

    mode, path = store
    df = pl.read_parquet(_shard_paths(path))
    assert df.height == _manifest(path)["totals"]["rows"]
    st = kdstore.open(str(path))
    table = st.read_shard(0)
    first = df.filter(pl.col("sample_id") == table.column("sample_id")[0].as_py()).filter(
        pl.col("window") == table.column("window")[0].as_py())
    assert first.height == 1
    for col in ("tokens", "indices", "probs", "tail") + (("counts",) if mode != "topk" else ()):
        assert first[col][0].to_list() == table.column(col)[0].as_py()
