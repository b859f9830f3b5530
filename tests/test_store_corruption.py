"""Bad stores: every corruption gives a clear error naming the file (reader) and makes
``kd store verify`` exit 1 with a message naming the file and the problem."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

import kdstore
from kdstore import CorruptShardError, IncompleteStoreError, StoreFormatError
from kdstore.dataset import SoftLabelDataset
from kdstore.tools import verify_main, verify_store

from _storeutil import edit_manifest, make_rows, plant_shard, write_store

V = 300


@pytest.fixture
def store_dir(tmp_path):
    rows, _ = make_rows(12, V, "top_p", seed=4, max_len=10)
    return write_store(tmp_path / "s", rows, v=V, mode="top_p", row_group_rows=4)


def _verify(path, capsys):
    rc = verify_main([str(path), "--quiet"], prog="kd store verify")
    return rc, capsys.readouterr().err


def _shard(store_dir):
    return next((store_dir / "shards").iterdir())


def test_clean_store_verifies(store_dir, capsys):
    rc = verify_main([str(store_dir), "--quiet"], prog="kd store verify")
    out, err = capsys.readouterr()
    assert rc == 0 and err == ""
    assert out.startswith(f"OK: {store_dir}: 1 shard(s), 12 rows")


def test_missing_manifest(store_dir, capsys):
    (store_dir / "manifest.json").unlink()
    with pytest.raises(IncompleteStoreError, match="no manifest.json.*incomplete"):
        kdstore.open(str(store_dir))
    rc, err = _verify(store_dir, capsys)
    assert rc == 1 and "manifest.json" in err


def test_unknown_format_version(store_dir, capsys):
    edit_manifest(store_dir, lambda m: m.update(format_version=99))
    with pytest.raises(StoreFormatError, match=r"manifest.json: store format version 99 is not supported.*upgrade kdstore"):
        kdstore.open(str(store_dir))
    rc, err = _verify(store_dir, capsys)
    assert rc == 1 and "version 99" in err


def test_not_json_manifest(store_dir):
    (store_dir / "manifest.json").write_text("{ truncated")
    with pytest.raises(StoreFormatError, match="manifest.json: not valid JSON"):
        kdstore.open(str(store_dir))


def test_truncated_shard(store_dir, capsys):
    shard = _shard(store_dir)
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    store = kdstore.open(str(store_dir))
    with pytest.raises(CorruptShardError, match=rf"{shard.name}: {len(data) // 2} bytes but the manifest says {len(data)} \(truncated"):
        store.read_shard(0)
    with pytest.raises(CorruptShardError, match=rf"{shard.name}: cannot read shard.*truncated or corrupt"):
        store.open_shard(0)
    with pytest.raises(CorruptShardError, match=shard.name):
        list(store.iter_batches())
    rc, err = _verify(store_dir, capsys)
    assert rc == 1
    assert f"{shard.name}: {len(data) // 2} bytes but the manifest says {len(data)}" in err
    assert f"{shard.name}: checksum mismatch" in err


def _flip_in_column(shard, column):
    """Flip one bit inside the data page of ``column`` (found from the Parquet footer)."""
    import pyarrow.parquet as pq

    md = pq.ParquetFile(shard).metadata.row_group(0)
    cc = next(md.column(i) for i in range(md.num_columns) if md.column(i).path_in_schema.startswith(column))
    data = bytearray(shard.read_bytes())
    pos = cc.data_page_offset + cc.total_compressed_size - 5  # inside the compressed page body
    data[pos] ^= 0x10
    shard.write_bytes(bytes(data))


@pytest.mark.parametrize("column", ["indices", "probs"])
def test_bit_flip(store_dir, capsys, column):
    shard = _shard(store_dir)
    _flip_in_column(shard, column)
    rc, err = _verify(store_dir, capsys)
    assert rc == 1 and f"{shard.name}: checksum mismatch" in err
    store = kdstore.open(str(store_dir))
    # reading the whole shard checks the file's checksum; streaming it or reading some of its
    # row groups checks page CRCs: both name the file
    with pytest.raises(CorruptShardError, match=rf"{shard.name}: checksum mismatch .*the shard is corrupt"):
        store.read_shard(0)
    with pytest.raises(CorruptShardError, match=rf"{shard.name}: checksum mismatch"):
        list(SoftLabelDataset(store, batch_size=4))
    with pytest.raises(CorruptShardError, match=rf"{shard.name}: cannot decode shard"):
        list(store.iter_batches())
    with pytest.raises(CorruptShardError, match=rf"{shard.name}: cannot decode shard"):
        store.read_row_groups(0, np.arange(4))  # row group 0 of 3, the flipped page in it


def test_reading_every_row_group_checks_every_byte(store_dir, tmp_path):
    """What page CRCs do not cover (the footer; a whole file swapped for another valid one)
    is caught where the reader reads every row group of a shard: the dataset, read_shard."""
    shard = _shard(store_dir)
    good = shard.read_bytes()
    at = good.index(b"parquet-cpp")  # the footer's created_by: no page CRC covers it
    shard.write_bytes(good[:at] + b"P" + good[at + 1:])
    store = kdstore.open(str(store_dir))
    assert store.read_row_groups(0, np.arange(4))[0].num_rows == 4  # one row group: its pages are intact
    for read in (lambda: store.read_row_groups(0, np.arange(12)), lambda: store.read_row_groups(0, np.array([0, 5, 9])),
                 lambda: list(SoftLabelDataset(store, batch_size=4)), lambda: store.read_shard(0)):
        with pytest.raises(CorruptShardError, match=rf"{shard.name}: checksum mismatch \(manifest xxh3_128:.*re-run the capture"):
            read()
    # another capture's shard, valid Parquet with the same schema, put in its place
    rows, _ = make_rows(12, V, "top_p", seed=5, max_len=10)
    other = write_store(tmp_path / "other", rows, v=V, mode="top_p", row_group_rows=4)
    shard.write_bytes(_shard(other).read_bytes())
    with pytest.raises(CorruptShardError, match=rf"{shard.name}: (checksum mismatch|\d+ bytes but the manifest says)"):
        list(SoftLabelDataset(kdstore.open(str(store_dir)), batch_size=4))
    shard.write_bytes(good)
    assert sum(b["kd_mask"].sum().item() for b in SoftLabelDataset(kdstore.open(str(store_dir)), batch_size=4)) > 0


def test_schema_mismatch_other_index_dtype(store_dir, capsys):
    store = kdstore.open(str(store_dir))
    t = store.read_shard(0)
    i = t.schema.get_field_index("indices")
    t2 = t.set_column(i, pa.field("indices", pa.list_(pa.uint32()), nullable=False), t.column("indices").cast(pa.list_(pa.uint32())))
    shard = plant_shard(store_dir, t2)
    store = kdstore.open(str(store_dir))
    with pytest.raises(StoreFormatError, match=rf"{shard.name}: column 'indices' has type list<\w+: uint32>, expected list<\w+: uint16>"):
        store.read_shard(0)
    rc, err = _verify(store_dir, capsys)
    assert rc == 1 and f"{shard.name}: schema mismatch" in err and "'indices'" in err


def test_schema_mismatch_missing_column(store_dir, capsys):
    store = kdstore.open(str(store_dir))
    shard = plant_shard(store_dir, store.read_shard(0).drop_columns(["counts"]))
    with pytest.raises(StoreFormatError, match=rf"{shard.name}: missing column\(s\) \['counts'\]"):
        kdstore.open(str(store_dir)).read_shard(0)
    rc, err = _verify(store_dir, capsys)
    assert rc == 1 and "missing column" in err


def _with_list(table, name, values_fn):
    col = table.column(name).combine_chunks()
    vals = values_fn(col.values.to_numpy(zero_copy_only=False).copy())
    new = pa.ListArray.from_arrays(col.offsets, pa.array(vals, type=col.type.value_type))
    return table.set_column(table.schema.get_field_index(name), table.schema.field(name), new)


def test_index_out_of_vocab(store_dir, capsys):
    store = kdstore.open(str(store_dir))
    t = store.read_shard(0)
    # the last gap of the first row's last position grows so that its index passes V
    t = _with_list(t, "indices", lambda g: np.where(np.arange(len(g)) == len(g) - 1, g + V, g))
    shard = plant_shard(store_dir, t)
    store = kdstore.open(str(store_dir))
    with pytest.raises(StoreFormatError, match=rf"{shard.name}.*index \d+ >= teacher vocab size {V}"):
        list(store.iter_decoded())
    rc, err = _verify(store_dir, capsys)
    assert rc == 1 and f">= teacher vocab size {V}" in err and shard.name in err


def test_unsafe_shard_paths(store_dir):
    for bad, match in (("../outside.parquet", "escapes the store root"), ("/tmp/abs.parquet", "absolute")):
        edit_manifest(store_dir, lambda m: m["shards"][0].update(file=bad))
        with pytest.raises(StoreFormatError, match=match):
            kdstore.open(str(store_dir))


def test_missing_shard_file(store_dir, capsys):
    shard = _shard(store_dir)
    shard.unlink()
    with pytest.raises(CorruptShardError, match=rf"{shard.name}: shard listed in the manifest is missing"):
        kdstore.open(str(store_dir)).read_shard(0)
    rc, err = _verify(store_dir, capsys)
    assert rc == 1 and f"{shard.name}: listed in the manifest but missing" in err


def test_nan_and_negative_probabilities_found_by_verify(store_dir, capsys):
    """A shard written without the encoder, with float probabilities holding NaN and < 0."""
    store = kdstore.open(str(store_dir))
    t = store.read_shard(0)
    probs = t.column("probs").combine_chunks()
    vals = probs.values.to_numpy().astype(np.float32) / 255
    vals[3], vals[7] = np.nan, -0.25
    f = pa.ListArray.from_arrays(probs.offsets, pa.array(vals, pa.float32()))
    t = t.set_column(t.schema.get_field_index("probs"), pa.field("probs", f.type, nullable=False), f)
    shard = plant_shard(store_dir, t)
    problems = verify_store(str(store_dir))
    assert any(shard.name in p and "'probs' holds 1 NaN value(s)" in p for p in problems)
    assert any(shard.name in p and "'probs' holds 1 negative value(s) (min -0.25)" in p for p in problems)
    assert _verify(store_dir, capsys)[0] == 1


def test_mass_above_one_found_by_verify(store_dir, capsys):
    """Valid codes whose probabilities cannot be a distribution (kept mass > 1, i.e. a
    negative implied tail) are reported."""
    store = kdstore.open(str(store_dir))
    t = _with_list(store.read_shard(0), "probs", lambda c: np.full_like(c, 200))  # p̂ = 0.62 each
    shard = plant_shard(store_dir, t)
    rc, err = _verify(store_dir, capsys)
    assert rc == 1 and shard.name in err and "kept probabilities sum to more than 1" in err


def test_count_mismatch_against_manifest(store_dir, capsys):
    edit_manifest(store_dir, lambda m: m["shards"][0].update(rows=m["shards"][0]["rows"] + 1))
    with pytest.raises(CorruptShardError, match="rows but the manifest says"):
        kdstore.open(str(store_dir)).read_shard(0)
    rc, err = _verify(store_dir, capsys)
    assert rc == 1 and "rows but the manifest says" in err and "totals.rows" in err


def test_foreign_vocabulary(store_dir, capsys, tmp_path):
    other = write_store(tmp_path / "other", make_rows(1, V + 1, "topk")[0], v=V + 1, mode="topk")
    (store_dir / "vocab.parquet").write_bytes((other / "vocab.parquet").read_bytes())
    rc, err = _verify(store_dir, capsys)
    assert rc == 1 and "vocab.parquet: checksum mismatch" in err
    man = json.loads((other / "manifest.json").read_text())
    edit_manifest(store_dir, lambda m: m.update(vocab=man["vocab"]))
    rc, err = _verify(store_dir, capsys)  # checksum now matches, but the hashes do not belong to the shards
    assert rc == 1 and "token id 300 >= teacher vocab size 300" in err


def test_shard_from_a_store_with_another_code(store_dir, tmp_path, capsys):
    """Same column types, different meaning (log instead of sqrt codes): the shard's schema
    metadata gives it away."""
    rows, _ = make_rows(12, V, "top_p", seed=4, max_len=10)
    other = write_store(tmp_path / "log", rows, v=V, mode="top_p", scheme="log")
    shard = _shard(store_dir)
    shard.write_bytes(_shard(other).read_bytes())
    edit_manifest(store_dir, lambda m: m["shards"][0].update(
        bytes=shard.stat().st_size, checksum=json.loads((other / "manifest.json").read_text())["shards"][0]["checksum"]))
    with pytest.raises(StoreFormatError, match=r"kdstore.probs='log8' but the manifest implies 'sqrt8'.*another store"):
        kdstore.open(str(store_dir)).read_shard(0)
    rc, err = _verify(store_dir, capsys)
    assert rc == 1 and "kdstore.probs='log8'" in err
