"""``kd cache --index-order``: the default stores each kept id as its rank by input-token
frequency (format v2 ``rank_delta``); ``id`` stores ids as they are. Both must hold the
same distributions."""

from __future__ import annotations

import numpy as np
import pytest

import kdstore
from kdstore.writer import frequency_order
from pipelines.options import parse_args
from test_capture import _one_torch_thread, corpus, run_capture, teacher, texts, tokenizer_dir, topk_store, verify_store  # noqa: F401

ARGS = ["--select", "topk", "--k", "8", "--max-length", "48", "--max-error-rate", "0.1", "--shard-bytes", "20000",
        "--row-group-rows", "16"]


def _all_decoded(uri: str):
    ds = list(kdstore.open(uri).iter_decoded(batch_rows=1024))
    keys = [(sid, int(w)) for d in ds for sid, w in zip(d.sample_id, d.window)]
    return ds, keys


def test_default_order_is_the_input_token_frequency(topk_store):
    """The order in ``index_order.parquet`` is recomputed here from what the store holds:
    windows do not overlap, so every input token of every stored sample is stored once,
    and the driver's survey counted exactly those tokens."""
    uri, _ = topk_store
    store = verify_store(uri)
    m = store.manifest
    assert m.format_version == 2 and m.index_coding == "rank_delta"
    ds, _ = _all_decoded(uri)
    ids = np.concatenate([d.input_ids for d in ds])
    assert m.index_order["source"]["tokens"] == len(ids)
    want = frequency_order(np.bincount(ids, minlength=m.teacher.vocab_size), m.teacher.vocab_size)
    assert np.array_equal(store.index_order, want)
    # What the order is for: the teacher's kept ids have smaller ranks than ids.
    kept = np.concatenate([d.indices for d in ds])
    rank = np.empty(m.teacher.vocab_size, np.int64)
    rank[store.index_order] = np.arange(m.teacher.vocab_size)
    assert np.median(rank[kept]) < np.median(kept)


@pytest.fixture(scope="module")
def by_id(tmp_path_factory, teacher, corpus):
    out = str(tmp_path_factory.mktemp("by-id") / "store")
    run_capture(["--teacher", str(teacher), "--input", corpus["glob"], "--output", out, "--index-order", "id", *ARGS])
    return out


def test_resuming_an_id_store_with_the_default_says_what_to_pass(tmp_path, teacher, corpus, by_id):
    import shutil

    from kdstore.errors import StoreFormatError
    from pipelines import capture

    shutil.copytree(by_id, tmp_path / "s")
    argv = ["--teacher", str(teacher), "--input", corpus["glob"], "--output", str(tmp_path / "s"), "--resume", *ARGS]
    with pytest.raises(StoreFormatError, match="resume it with --index-order id"):
        capture.plan_capture(parse_args(argv)[0])


def test_id_order_stores_the_same_distributions(topk_store, by_id):
    uri, _ = topk_store
    out = by_id
    m = verify_store(out).manifest
    assert m.index_coding == "sorted_delta" and m.index_order is None
    (a, ka), (b, kb) = _all_decoded(uri), _all_decoded(out)
    ia = {k: i for i, k in enumerate(ka)}
    assert sorted(ka) == sorted(kb)
    A, B = _flat(a), _flat(b)
    for j, key in enumerate(kb):
        pa_, pb = A[ia[key]], B[j]
        assert np.array_equal(pa_[0], pb[0]) and np.array_equal(pa_[1], pb[1]) and np.allclose(pa_[2], pb[2], rtol=1e-6, atol=0)


def _flat(ds) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per row: (input ids, kept ids sorted within each position, their probabilities)."""
    out = []
    for d in ds:
        for r in range(d.num_rows):
            p0, p1 = d.positions[r], d.positions[r + 1]
            e0, e1 = d.entry_offsets[p0], d.entry_offsets[p1]
            pos = np.repeat(np.arange(p1 - p0), d.counts[p0:p1])
            o = np.lexsort((d.indices[e0:e1], pos))
            out.append((d.input_ids[p0:p1], d.indices[e0:e1][o], d.probs[e0:e1][o]))
    return out


def test_index_order_flag_is_checked():
    with pytest.raises(SystemExit):
        parse_args(["--teacher", "t", "--input", "x", "--output", "o", "--index-order", "frequent"])
