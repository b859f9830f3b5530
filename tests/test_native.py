"""The native decode kernel (kdstore/_native.c) against the numpy reference paths.

Both paths run in the same process: ``kdstore.native.AVAILABLE`` is read at call time, so a
test switches the kernel off with ``monkeypatch`` and compares. Values: indices, counts,
ids, labels and masks exactly; probabilities and tail to float32 rounding (the kernel sums a
position's kept mass in float64, numpy in float32).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kdstore
from kdstore import hashtable, native
from kdstore.dataset import SoftLabelDataset
from kdstore.errors import StoreFormatError
from kdstore.writer import frequency_order
from tests._storeutil import make_rows, plant_shard, write_store

V = 300
needs_kernel = pytest.mark.skipif(not native.AVAILABLE, reason=f"native kernel not available: {native.WHY_NOT}")


def test_the_kernel_is_built_here():
    """The install builds the extension wherever a C compiler exists (CI has one): a silent
    build failure would leave every test below skipped and the reader 2x slower."""
    if os.environ.get("KDSTORE_NATIVE", "1") in ("0", "false", "no", "off"):
        pytest.skip("disabled by KDSTORE_NATIVE")
    assert native.AVAILABLE, f"kdstore._native did not import ({native.WHY_NOT}); reinstall with a C compiler (pip install -e .)"
    assert native.describe().startswith("native kernel")


def _store(path: Path, mode: str, *, seed: int = 0, n_rows: int = 23, max_len: int = 12, bits: int = 8,
           scheme: str = "sqrt", ranked: bool = False, shard_bytes: int | None = None) -> kdstore.Store:
    rows, _ = make_rows(n_rows, V, mode, seed=seed, max_len=max_len)
    kw = {}
    if ranked:  # rank_delta coding: a frequency order that is not the identity
        counts = np.bincount(np.concatenate([r.indices for r in rows]), minlength=V)
        kw["index_order"] = frequency_order(counts, V)
    if shard_bytes is not None:
        kw["shard_bytes"] = shard_bytes
    write_store(path, rows, v=V, mode=mode, bits=bits, scheme=scheme, row_group_rows=4, **kw)
    return kdstore.open(str(path))


def _decode_both(store: kdstore.Store, monkeypatch) -> tuple[list, list]:
    out = []
    for on in (True, False):
        monkeypatch.setattr(native, "AVAILABLE", on)
        out.append(list(store.iter_decoded(batch_rows=5)))
    monkeypatch.setattr(native, "AVAILABLE", True)
    return out[0], out[1]


def _same_decoded(a, b) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.sample_id == y.sample_id
        for name in ("positions", "input_ids", "counts", "entry_offsets", "indices", "window", "context_len"):
            np.testing.assert_array_equal(getattr(x, name), getattr(y, name), err_msg=name)
        assert x.probs.dtype == y.probs.dtype == np.float32 and x.tail.dtype == y.tail.dtype == np.float32
        np.testing.assert_allclose(x.probs, y.probs, rtol=2e-6, atol=1e-7)
        np.testing.assert_allclose(x.tail, y.tail, rtol=2e-6, atol=1e-7)


@needs_kernel
@pytest.mark.parametrize("mode", ["topk", "top_p", "sample"])
@pytest.mark.parametrize("ranked", [False, True])
def test_decode_equals_numpy(tmp_path, monkeypatch, mode, ranked):
    store = _store(tmp_path / "s", mode, ranked=ranked)
    a, b = _decode_both(store, monkeypatch)
    _same_decoded(a, b)
    # and the decoded mass is a distribution per position (sample mode: counts / samples)
    for d in a:
        mass = np.bincount(np.repeat(np.arange(len(d.counts)), d.counts), weights=d.probs, minlength=len(d.counts)) + d.tail
        np.testing.assert_allclose(mass, 1.0, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("bits,scheme", [(16, "sqrt"), (16, "log"), (8, "log")])
def test_decode_equals_numpy_other_code_widths(tmp_path, monkeypatch, bits, scheme):
    store = _store(tmp_path / "s", "top_p", bits=bits, scheme=scheme)
    _same_decoded(*_decode_both(store, monkeypatch))


@needs_kernel
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mode=st.sampled_from(["topk", "top_p", "sample"]), seed=st.integers(0, 10_000), n_rows=st.integers(1, 30),
       max_len=st.integers(1, 40), ranked=st.booleans())
def test_decode_equals_numpy_property(monkeypatch, mode, seed, n_rows, max_len, ranked):
    with tempfile.TemporaryDirectory() as d:
        store = _store(Path(d) / "s", mode, seed=seed, n_rows=n_rows, max_len=max_len, ranked=ranked)
        _same_decoded(*_decode_both(store, monkeypatch))


@needs_kernel
def test_decode_equals_numpy_for_positions_longer_than_the_kernels_buffer(tmp_path, monkeypatch):
    """The kernel scales positions of up to 256 entries from a local copy and longer ones
    from the table: flat logits at p = 0.98 give positions on both sides of 256."""
    sel = dict(p=0.98, max_k=V)
    rows, _ = make_rows(9, V, "top_p", seed=4, max_len=20, scale=1.0, sel=sel)
    counts = np.concatenate([r.counts for r in rows])
    assert (counts > 256).any() and (counts <= 256).any(), np.unique(counts)
    write_store(tmp_path / "s", rows, v=V, mode="top_p", sel=sel, row_group_rows=4)
    store = kdstore.open(str(tmp_path / "s"))
    _same_decoded(*_decode_both(store, monkeypatch))
    _same_batches(*_batches_both(store, monkeypatch, batch_size=4, seed=0))


def _batches_both(store, monkeypatch, **kw) -> tuple[list, list]:
    out = []
    for on in (True, False):
        monkeypatch.setattr(native, "AVAILABLE", on)
        out.append(list(SoftLabelDataset(store, **kw)))
    monkeypatch.setattr(native, "AVAILABLE", True)
    return out[0], out[1]


def _same_batches(a, b) -> None:
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            u, w = x[key], y[key]
            if isinstance(u, torch.Tensor):
                assert u.dtype == w.dtype and u.shape == w.shape, key
                if u.is_floating_point():
                    torch.testing.assert_close(u, w, rtol=2e-6, atol=1e-7, msg=key)
                else:
                    assert torch.equal(u, w), key
            else:
                assert u == w, key


@needs_kernel
@pytest.mark.parametrize("mode", ["topk", "top_p", "sample"])
@pytest.mark.parametrize("pack", [False, True])
def test_dataset_batches_equal_numpy(tmp_path, monkeypatch, mode, pack):
    """Several shards (rows of a batch from different shards), rows of different lengths
    (padding), overlap context (context_len), shuffled: the fused batch is the two-step one."""
    store = _store(tmp_path / "s", mode, n_rows=40, max_len=30, ranked=mode == "topk", shard_bytes=2_000)
    assert len(store.shards) > 2
    _same_batches(*_batches_both(store, monkeypatch, batch_size=6, seed=3, shuffle_block=2, pack=pack))


@needs_kernel
def test_dataset_batch_values_by_hand(tmp_path):
    """The fused batch against the stored rows themselves, position by position."""
    store = _store(tmp_path / "s", "topk", n_rows=7, max_len=9)
    (batch,) = list(SoftLabelDataset(store, batch_size=7, shuffle=False))
    (d,) = list(store.iter_decoded(batch_rows=7))
    for r in range(7):
        a, b = d.positions[r], d.positions[r + 1]
        n = b - a
        assert batch["attention_mask"][r, :n].all() and not batch["attention_mask"][r, n:].any()
        assert torch.equal(batch["input_ids"][r, :n], torch.from_numpy(d.input_ids[a:b]))
        ctx = int(d.context_len[r])
        want = [int(d.input_ids[a + t + 1]) if (t >= ctx and t + 1 < n) else -100 for t in range(n)]
        assert batch["labels"][r, :n].tolist() == want and (batch["labels"][r, n:] == -100).all()
        assert batch["kd_mask"][r, :n].tolist() == [t >= ctx for t in range(n)]
        k = d.counts[0]
        idx = torch.from_numpy(d.indices[d.entry_offsets[a]:d.entry_offsets[b]].reshape(n, k))
        assert torch.equal(batch["kd_indices"][r, :n], idx)
        assert (batch["kd_probs"][r, n:] == 0).all() and (batch["kd_tail"][r, n:] == 0).all()


@needs_kernel
@pytest.mark.parametrize("native_on", [True, False])
def test_corrupt_shard_same_error_on_both_paths(tmp_path, monkeypatch, native_on):
    store = _store(tmp_path / "s", "topk", n_rows=5)
    shard = plant_shard(tmp_path / "s", _zero_gap(store.read_shard(0)))
    monkeypatch.setattr(native, "AVAILABLE", native_on)
    store = kdstore.open(str(tmp_path / "s"))
    with pytest.raises(StoreFormatError, match=rf"{shard.name}.*repeats a kept index"):
        list(store.iter_decoded())
    with pytest.raises(StoreFormatError, match=rf"{shard.name}.*repeats a kept index"):
        list(SoftLabelDataset(store, batch_size=2))


def _zero_gap(table: pa.Table) -> pa.Table:
    """``table`` with the second entry of its first position repeating the first (a zero gap)."""
    col = table.column("indices").combine_chunks()
    gaps = col.values.to_numpy(zero_copy_only=False).copy()
    gaps[col.offsets.to_numpy()[0] + 1] = 0
    return table.set_column(table.schema.get_field_index("indices"), table.schema.field("indices"),
                            pa.ListArray.from_arrays(col.offsets, pa.array(gaps, type=col.type.value_type)))


@needs_kernel
def test_batch_error_names_the_shard_at_fault(tmp_path):
    """A batch's shards are decoded in one kernel call; the error names the corrupt shard
    alone, not every shard of the batch."""
    store = _store(tmp_path / "s", "topk", n_rows=40, max_len=30, shard_bytes=2_000)
    assert len(store.shards) > 2
    bad = plant_shard(tmp_path / "s", _zero_gap(store.read_shard(1)), shard=1)
    store = kdstore.open(str(tmp_path / "s"))
    with pytest.raises(StoreFormatError, match="repeats a kept index") as err:
        list(SoftLabelDataset(store, batch_size=40, shuffle=False))  # one batch: every shard
    msg = str(err.value)
    assert f"shards/{bad.name}" in msg
    assert not any(s.file in msg for i, s in enumerate(store.shards) if i != 1), msg


@needs_kernel
def test_sources_must_cover_the_rows(tmp_path):
    """The kernel's source list: each source's n_rows consume the next rows; a mismatch or a
    malformed source is an error naming it, not a read past the arrays."""
    store = _store(tmp_path / "s", "topk", n_rows=3)
    raw = store.raw(store.read_shard(0))
    P, K = len(raw.tail_codes), 8
    decode = native.bound_decoder(**store._kernel_tables(raw), k_out=K, out_idx=np.zeros(P * K, np.int64),
                                  out_probs=np.zeros(P * K, np.float32), out_tail=np.zeros(P, np.float32))
    src = (raw.gaps, raw.pcodes, raw.tail_codes, None, None, None)
    rows = (raw.pos_off[:-1], np.diff(raw.pos_off), raw.pos_off[:-1], None, None, None)
    R = len(rows[0])
    decode([(*src, 1), (*src, R - 1)], *rows, "x")  # two sources, the same shard twice
    for sources in ([(*src, R - 1)], [(*src, R), (*src, 1)], [(*src, -1), (*src, R + 1)]):
        with pytest.raises(ValueError, match="n_rows"):
            decode(sources, *rows, "x")
    with pytest.raises(TypeError, match=r"sources\[1\]\.pcodes"):
        decode([(*src, 1), (raw.gaps, raw.pcodes.astype(np.float32), raw.tail_codes, None, None, None, R - 1)], *rows, "x")
    with pytest.raises(TypeError, match=r"sources\[0\]: expected a \(gaps"):
        decode([src], *rows, "x")


@needs_kernel
def test_code_outside_the_table_is_an_error(tmp_path):
    """Stored code widths (8/16 bits) always fit their tables; the kernel still checks, so a
    table shorter than the codes (a caller's mistake) cannot be read past."""
    store = _store(tmp_path / "s", "topk", n_rows=3)
    raw = store.raw(store.read_shard(0))
    P, K = len(raw.tail_codes), 8
    with pytest.raises(StoreFormatError, match=r"x: probability code \d+ outside the store's quantization table"):
        native.decode_rows(gaps=raw.gaps, pcodes=raw.pcodes, tail_codes=raw.tail_codes, counts=None, pos_entries=None,
                           fixed_k=K, tokens=None, row_pos=raw.pos_off[:-1], row_len=np.diff(raw.pos_off),
                           row_out=raw.pos_off[:-1], k_out=K, ptable=np.zeros(4, np.float32), ttable=None, order=None,
                           vocab_size=V, out_idx=np.zeros(P * K, np.int64), out_probs=np.zeros(P * K, np.float32),
                           out_tail=np.zeros(P, np.float32), where="x")


@needs_kernel
def test_a_plan_outside_the_arrays_raises_instead_of_reading_past_them(tmp_path):
    store = _store(tmp_path / "s", "topk", n_rows=3)
    raw = store.raw(store.read_shard(0))
    P, K = len(raw.tail_codes), 8
    outs = dict(out_idx=np.zeros(P * K, np.int64), out_probs=np.zeros(P * K, np.float32), out_tail=np.zeros(P, np.float32))
    ok = dict(row_pos=raw.pos_off[:-1], row_len=np.diff(raw.pos_off), row_out=raw.pos_off[:-1], k_out=K)
    store.decode_rows_into(raw, where="x", **ok, **outs)  # in bounds
    for bad in (dict(row_len=np.diff(raw.pos_off) + 1),  # past the source positions
                dict(row_out=raw.pos_off[:-1] + 1),  # past the output positions
                dict(k_out=K - 1)):  # a position's entries do not fit its slots
        with pytest.raises(IndexError, match="outside the source or output arrays"):
            store.decode_rows_into(raw, where="x", **{**ok, **bad}, **outs)
    with pytest.raises(TypeError, match="out_probs"):
        store.decode_rows_into(raw, where="x", **ok, **{**outs, "out_probs": np.zeros(P * K, np.float64)})


@needs_kernel
def test_token_ids_equal_numpy_and_report_unknown_hashes(tmp_path, monkeypatch):
    store = _store(tmp_path / "s", "topk", n_rows=9)
    hashes = store.vocab.column("hash").to_numpy()
    rng = np.random.default_rng(0)
    q = hashes[rng.integers(0, V, 5000)]
    got = store.token_ids(q)
    np.testing.assert_array_equal(got, hashtable.lookup(*store._hash_lookup, q))
    np.testing.assert_array_equal(hashes[got], q)  # ids are the vocabulary rows here
    q[17] ^= np.uint64(1)
    for on in (True, False):
        monkeypatch.setattr(native, "AVAILABLE", on)
        with pytest.raises(StoreFormatError, match=r"1 token hash\(es\) not in the vocabulary table \(first: 0x"):
            store.token_ids(q)


def test_read_threads_change_nothing_but_speed(tmp_path):
    """Shards read two at a time (the default) or one at a time: the same batches, in order."""
    store = _store(tmp_path / "s", "top_p", n_rows=40, max_len=30, shard_bytes=2_000)
    a = list(SoftLabelDataset(store, batch_size=5, seed=1, shuffle_block=3, read_threads=1))
    b = list(SoftLabelDataset(store, batch_size=5, seed=1, shuffle_block=3))
    _same_batches(a, b)
    with pytest.raises(ValueError, match="read_threads must be >= 1"):
        SoftLabelDataset(store, batch_size=5, read_threads=0)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([0, 1, 2**63, 2**64 - 2, 2**64 - 1]),
                          # crowded home slots: many hashes sharing their top bits
                          st.builds(lambda top, low: (top << 56) | low, st.integers(0, 3), st.integers(0, 2**56 - 1))),
                min_size=1, max_size=200, unique=True),
       st.lists(st.integers(0, 2**64 - 1), max_size=50))
def test_hash_table_lookup_finds_every_token_and_nothing_else(vocab_hashes, others):
    """The ordered linear-probing table (kdstore.hashtable) against a dict, in C and numpy:
    crowded home slots, the extreme hashes (the empty-slot marker 2**64 - 1 included) and
    hashes not in the vocabulary."""
    hashes = np.array(vocab_hashes, dtype=np.uint64)
    ids = np.random.default_rng(len(hashes)).permutation(len(hashes)).astype(np.int64)
    table, bits = hashtable.build(hashes, ids)
    want = dict(zip(vocab_hashes, ids.tolist()))
    q = np.array(vocab_hashes + others, dtype=np.uint64)
    expected = np.array([want.get(int(x), -1) for x in q], dtype=np.int64)
    np.testing.assert_array_equal(hashtable.lookup(table, bits, q), expected)
    if native.AVAILABLE:
        got, missing, first = native.token_ids(q, table, bits)
        np.testing.assert_array_equal(got, expected)
        assert missing == int((expected < 0).sum())
        assert first == (int(np.flatnonzero(expected < 0)[0]) if missing else -1)
