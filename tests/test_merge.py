"""``kd store merge``: stores of separate capture jobs become one, nothing lost silently."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest
from _storeutil import edit_manifest, make_rows, write_store

import kdstore
from kdstore.cli import main as kd
from kdstore.merge import MergeError, first_occurrence, merge_stores
from kdstore.tools import verify_store

V = 64


def _rows(n: int, *, offset: int, mode: str = "topk", seed: int = 0):
    rows, _ = make_rows(n, V, mode, seed=seed, text=True)
    return [dataclasses.replace(r, sample_id=f"{offset + i:016x}") for i, r in enumerate(rows)]


def _store(path, rows, *, mode: str = "topk", dead: int = 0, **kw):
    out = write_store(path, rows, v=V, mode=mode, row_group_rows=4, shard_bytes=4000, **kw)
    if dead:
        # Dead letters as a capture writes them: a file under errors/ counted in the manifest.
        (out / "errors").mkdir(exist_ok=True)
        (out / "errors" / "job-errors.jsonl").write_text(
            "".join(json.dumps({"reason": "empty line", "source": f"c.txt:{i}"}) + "\n" for i in range(dead)))
        edit_manifest(out, lambda m: m.update(errors={"files": ["errors/job-errors.jsonl"], "count": dead},
                                               totals={**m["totals"], "dead_letters": dead}))
    return out


def _decoded(uri):
    """{sample_id: decoded (indices, probs, tail) of that row} of a whole store, via the public reader."""
    st = kdstore.open(str(uri))
    out = {}
    for i in range(len(st.shards)):
        t = st.read_shard(i)
        d = st.decode(t)
        for r, sid in enumerate(t.column("sample_id").to_pylist()):
            one = st.decode(t.slice(r, 1))
            out[sid] = (one.indices.tolist(), np.round(one.probs, 7).tolist(), np.round(one.tail, 7).tolist())
        assert d.num_rows == t.num_rows
    return out


def test_first_occurrence_keeps_the_first_of_each_key():
    keys = np.array([[1, 2], [3, 4], [1, 2], [5, 6], [3, 4], [3, 4]], dtype=np.uint64)
    assert first_occurrence(keys).tolist() == [True, True, False, True, False, False]
    assert first_occurrence(np.zeros((0, 2), np.uint64)).tolist() == []


def test_merge_disjoint_stores_keeps_every_row_and_verifies(tmp_path):
    a = _store(tmp_path / "a", _rows(20, offset=0), dead=2)
    b = _store(tmp_path / "b", _rows(15, offset=1000, seed=1), dead=3)
    r = merge_stores(str(tmp_path / "m"), [str(a), str(b)])
    assert (r.rows_in, r.rows_out, r.duplicates, r.shards_rewritten) == (35, 35, 0, 0)
    assert verify_store(str(tmp_path / "m")) == []
    m = kdstore.open(str(tmp_path / "m"))
    assert m.num_rows == 35 and m.manifest.totals["duplicates_dropped"] == 0
    # counts in = counts out + dead letters: every dead letter is carried over.
    assert m.manifest.errors["count"] == 5 and m.manifest.totals["dead_letters"] == 5
    assert len(kdstore.store.read_dead_letters(m)) == 5
    merged, da, db = _decoded(tmp_path / "m"), _decoded(a), _decoded(b)
    assert merged == {**da, **db}
    assert [s["uri"] for s in m.manifest.pipeline["sources"]] == [str(a), str(b)]


def test_merge_drops_duplicates_first_store_wins_and_counts_them(tmp_path):
    a_rows = _rows(12, offset=0)
    # b repeats 4 of a's samples (with other targets, so we can tell which copy survives).
    b_rows = _rows(10, offset=100, seed=5)
    for j, k in enumerate((0, 3, 7, 11)):
        b_rows[j] = dataclasses.replace(b_rows[j], sample_id=a_rows[k].sample_id)
    a, b = _store(tmp_path / "a", a_rows), _store(tmp_path / "b", b_rows)
    r = merge_stores(str(tmp_path / "m"), [str(a), str(b)])
    assert (r.rows_in, r.rows_out, r.duplicates) == (22, 18, 4)
    assert r.shards_rewritten >= 1
    assert verify_store(str(tmp_path / "m")) == []
    merged, da = _decoded(tmp_path / "m"), _decoded(a)
    assert len(merged) == 18
    for sid, v in da.items():
        assert merged[sid] == v  # the first store's copy
    m = kdstore.open(str(tmp_path / "m"))
    assert m.manifest.totals["duplicates_dropped"] == 4
    assert m.manifest.totals["rows"] == 18


def test_merge_is_associative(tmp_path):
    a = _store(tmp_path / "a", _rows(8, offset=0))
    b = _store(tmp_path / "b", _rows(8, offset=4, seed=2))  # overlaps a by 4 ids
    c = _store(tmp_path / "c", _rows(8, offset=10, seed=3))  # overlaps b by 2
    merge_stores(str(tmp_path / "ab"), [str(a), str(b)])
    merge_stores(str(tmp_path / "ab_c"), [str(tmp_path / "ab"), str(c)])
    merge_stores(str(tmp_path / "abc"), [str(a), str(b), str(c)])
    assert _decoded(tmp_path / "ab_c") == _decoded(tmp_path / "abc")
    assert kdstore.open(str(tmp_path / "abc")).num_rows == 18


def test_link_mode_hard_links_untouched_shards(tmp_path):
    a = _store(tmp_path / "a", _rows(10, offset=0))
    b = _store(tmp_path / "b", _rows(10, offset=50, seed=1))
    r = merge_stores(str(tmp_path / "m"), [str(a), str(b)], shards="link")
    assert r.bytes_written == 0 and r.shards_taken == len(kdstore.open(str(a)).shards) + len(kdstore.open(str(b)).shards)
    src = {os.stat(p).st_ino for p in (tmp_path / "a" / "shards").iterdir()}
    dst = {os.stat(p).st_ino for p in (tmp_path / "m" / "shards").iterdir()}
    assert src <= dst
    assert verify_store(str(tmp_path / "m")) == []


@pytest.mark.parametrize("field, value, named", [
    ("teacher", {"tokenizer_hash": "0123456789abcdef"}, "teacher.tokenizer_hash"),
    ("teacher", {"weights_hash": "deadbeef"}, "teacher.weights_hash"),
    ("selection", {"temperature": 2.0}, "selection.temperature"),
    ("quantization", {"bits": 16}, "quantization.bits"),
])
def test_incompatible_stores_are_refused_naming_the_difference(tmp_path, field, value, named):
    a = _store(tmp_path / "a", _rows(5, offset=0))
    b = _store(tmp_path / "b", _rows(5, offset=10))
    edit_manifest(b, lambda m: m[field].update(value))
    with pytest.raises(MergeError, match=named.replace(".", r"\.")):
        merge_stores(str(tmp_path / "m"), [str(a), str(b)])
    assert not (tmp_path / "m" / "manifest.json").exists()


def test_different_selection_mode_is_refused(tmp_path):
    a = _store(tmp_path / "a", _rows(5, offset=0))
    b = _store(tmp_path / "b", _rows(5, offset=10, mode="sample"), mode="sample")
    with pytest.raises(MergeError, match="selection"):
        merge_stores(str(tmp_path / "m"), [str(a), str(b)])


@pytest.mark.parametrize("where", [0.5, 0.97])  # a data page; the footer
def test_corrupt_source_shard_is_refused_and_no_manifest_written(tmp_path, where):
    a = _store(tmp_path / "a", _rows(10, offset=0))
    b = _store(tmp_path / "b", _rows(10, offset=50, seed=1))
    shard = sorted((tmp_path / "b" / "shards").iterdir())[-1]
    data = bytearray(shard.read_bytes())
    data[int(len(data) * where)] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(kdstore.StoreError, match=shard.name):
        merge_stores(str(tmp_path / "m"), [str(a), str(b)])
    with pytest.raises(kdstore.IncompleteStoreError):
        kdstore.open(str(tmp_path / "m"))


def test_output_must_be_empty(tmp_path):
    a = _store(tmp_path / "a", _rows(4, offset=0))
    b = _store(tmp_path / "b", _rows(4, offset=10))
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "notes.txt").write_text("mine")
    with pytest.raises(MergeError, match="not empty"):
        merge_stores(str(tmp_path / "m"), [str(a), str(b)])
    with pytest.raises(MergeError, match="not empty"):
        merge_stores(str(a), [str(b), str(tmp_path / "a")])


def test_cli_merge_and_clear_errors(tmp_path, capsys):
    a = _store(tmp_path / "a", _rows(6, offset=0))
    b = _store(tmp_path / "b", _rows(6, offset=3, seed=1))
    assert kd(["store", "merge", str(tmp_path / "m"), str(a), str(b), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "9 rows from 2 stores (12 in, 3 duplicate sample ids dropped)" in out
    assert kd(["store", "merge", str(tmp_path / "m2"), str(a), str(tmp_path / "missing"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "missing" in err and "Traceback" not in err
    with pytest.raises(SystemExit):
        kd(["store", "merge", str(tmp_path / "m3"), str(a), str(b), "--shards", "symlink"])
