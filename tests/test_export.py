"""``kd store export``: decoded rows in JSONL / plain-column Parquet, against the reader."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

import kdstore
from _storeutil import make_rows, write_store
from kdstore.cli import main as kd

V = 64


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    rows, _ = make_rows(12, V, "top_p", seed=3)
    return str(write_store(tmp_path_factory.mktemp("exp") / "s", rows, v=V, mode="top_p"))


def _decoded(uri):
    d = next(kdstore.open(uri).iter_decoded())
    return d


def test_jsonl_matches_the_reader_with_token_strings_and_limit(store, tmp_path, capsys):
    out = tmp_path / "x.jsonl"
    assert kd(["store", "export", store, "-o", str(out), "--format", "jsonl", "--limit", "3", "--no-progress"]) == 0
    assert "exported 3 of 12 rows" in capsys.readouterr().out
    recs = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    assert len(recs) == 3
    d = _decoded(store)
    for r, rec in enumerate(recs):
        assert rec["sample_id"] == d.sample_id[r] and rec["window"] == int(d.window[r])
        a = d.positions[r]
        assert len(rec["positions"]) == d.positions[r + 1] - a
        for t, pos in enumerate(rec["positions"]):
            q = a + t
            e0, e1 = d.entry_offsets[q], d.entry_offsets[q + 1]
            assert pos["id"] == int(d.input_ids[q]) and pos["token"] == f"tok{int(d.input_ids[q])}"
            want = sorted(zip(d.probs[e0:e1].tolist(), d.indices[e0:e1].tolist()), key=lambda x: -x[0])
            assert [(e["p"], e["id"]) for e in pos["top"]] == want  # float32 values round-trip exactly
            assert all(e["token"] == f"tok{e['id']}" for e in pos["top"])
            assert sum(e["p"] for e in pos["top"]) + pos["tail"] == pytest.approx(1.0, abs=1e-5)


def test_parquet_dense_topk_one_row_per_position_plain_columns(store, tmp_path):
    out = tmp_path / "x.parquet"
    assert kd(["store", "export", store, "-o", str(out), "--format", "parquet-dense-topk", "--limit", "0", "--top", "2",
               "--no-progress"]) == 0
    st = kdstore.open(store)
    t = pq.read_table(out)
    assert t.num_rows == st.manifest.totals["tokens"]
    md = pq.ParquetFile(out).metadata
    encodings = {e for g in range(md.num_row_groups) for c in range(md.num_columns) for e in md.row_group(g).column(c).encodings}
    assert not encodings & {"BYTE_STREAM_SPLIT", "RLE_DICTIONARY", "PLAIN_DICTIONARY"}
    probs = t.column("topk_probs").to_pylist()
    assert all(1 <= len(p) <= 2 and p == sorted(p, reverse=True) for p in probs)
    d = _decoded(store)
    first = t.slice(0, 1).to_pylist()[0]
    e0, e1 = d.entry_offsets[0], d.entry_offsets[1]
    top = np.argsort(-d.probs[e0:e1], kind="stable")[:2]
    assert first["sample_id"] == d.sample_id[0] and first["position"] == 0
    assert first["topk_ids"] == d.indices[e0:e1][top].tolist()
    assert first["topk_tokens"] == [f"tok{i}" for i in first["topk_ids"]]
    assert first["input_token"] == f"tok{int(d.input_ids[0])}"


def test_export_refuses_to_overwrite_and_bad_arguments(store, tmp_path, capsys):
    out = tmp_path / "x.jsonl"
    out.write_text("keep me")
    assert kd(["store", "export", store, "-o", str(out), "--format", "jsonl"]) == 2
    assert "--overwrite" in capsys.readouterr().err and out.read_text() == "keep me"
    assert kd(["store", "export", store, "-o", str(tmp_path / "y"), "--format", "jsonl", "--limit", "-1"]) == 2
    with pytest.raises(SystemExit):
        kd(["store", "export", store, "-o", str(tmp_path / "y"), "--format", "csv"])
    assert kd(["store", "export", str(tmp_path / "nope"), "-o", str(tmp_path / "z"), "--format", "jsonl"]) == 1
    assert not (tmp_path / "z").exists()
