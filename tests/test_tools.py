"""``kd store inspect | verify | stats`` through the real CLI dispatcher."""

from __future__ import annotations

import json

import numpy as np
import pytest

import kdstore
from kdstore import native
from kdstore.cli import main as kd
from kdstore.tools import position_stats

from _storeutil import make_rows, write_store

V = 300


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    base = tmp_path_factory.mktemp("tools")
    out = {}
    for mode in ("topk", "top_p", "sample"):
        rows, exact = make_rows(10, V, mode, seed=21, max_len=10)
        out[mode] = (write_store(base / mode, rows, v=V, mode=mode, row_group_rows=4), exact)
    return out


def test_inspect_json(stores, capsys):
    path, exact = stores["top_p"]
    assert kd(["store", "inspect", str(path), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    m = kdstore.open(str(path)).manifest
    tokens = sum(len(e.ids) for e in exact)
    entries = sum(len(e.indices) for e in exact)
    assert s["totals"]["tokens"] == tokens and s["totals"]["entries"] == entries
    assert s["bytes_per_token"] == pytest.approx(m.totals["bytes"] / tokens)
    assert s["bytes_per_entry"] == pytest.approx(m.totals["bytes"] / entries)
    k = np.concatenate([e.counts for e in exact])
    assert s["k"]["mean"] == pytest.approx(k.mean()) and s["k"]["max"] == k.max() and s["k"]["min"] == k.min()
    # per-column bytes come from the Parquet footers and add up to (almost) the file size
    assert set(s["column_bytes_per_token"]) >= {"indices", "probs", "tail", "tokens", "counts"}
    assert 0.5 * s["bytes_per_token"] < sum(s["column_bytes_per_token"].values()) < s["bytes_per_token"]


def test_inspect_text(stores, capsys):
    path, _ = stores["topk"]
    assert kd(["store", "inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "selection    topk {'k': 8" in out
    assert "quantization probs=sqrt tail=sqrt bits=8; indices uint16 sorted_delta" in out
    assert "B per kept entry" in out and "k/position   mean 8.00" in out
    assert f"decoder      {native.describe()}" in out


def test_inspect_missing_store(tmp_path, capsys):
    assert kd(["store", "inspect", str(tmp_path / "nope")]) == 1
    assert "no such store" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["topk", "top_p", "sample"])
def test_verify_ok(stores, capsys, mode):
    path, _ = stores[mode]
    assert kd(["store", "verify", str(path), "--quiet"]) == 0
    assert capsys.readouterr().out.startswith("OK:")


def test_stats_numbers_and_plot(stores, tmp_path, capsys):
    path, exact = stores["top_p"]
    png = tmp_path / "stats.png"
    assert kd(["store", "stats", str(path), "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    st = position_stats(kdstore.open(str(path)))
    tail = np.concatenate([e.tail for e in exact])
    assert np.array_equal(st["k"], np.concatenate([e.counts for e in exact]))
    assert np.allclose(st["tail"], tail, atol=2 * np.sqrt(tail) / 255 + 1e-5)  # sqrt8 bound
    assert np.allclose(st["kept"] + st["tail"], 1.0, atol=1e-6)
    # entropy of kept + tail bucket, computed by hand from the exact values
    h = []
    off = 0
    for e in exact:
        for q, c in enumerate(e.counts):
            p = np.append(e.probs[off:off + c], e.tail[q])
            p = p[p > 0] / p.sum()
            h.append(-(p * np.log(p)).sum())
            off += c
        off = 0
    assert np.allclose(st["entropy"], h, atol=0.03)
    assert f"{len(tail):,} positions (top_p)" in out and "entropy" in out


def test_stats_sample_mode_reports_uncovered_mass(stores):
    path, exact = stores["sample"]
    st = position_stats(kdstore.open(str(path)), max_positions=5)
    assert len(st["k"]) == 5
    tail = np.concatenate([e.tail for e in exact])[:5]
    assert np.allclose(st["tail"], tail, atol=2 * np.sqrt(tail) / 255 + 1e-5)
