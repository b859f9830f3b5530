"""``kd store verify`` checks shards in parallel threads and reports exactly what a serial pass does."""

from __future__ import annotations

from _storeutil import make_rows, write_store

from kdstore.cli import main as kd
from kdstore.tools import verify_store


def test_parallel_verify_reports_the_same_problems_in_shard_order(tmp_path, capsys):
    rows, _ = make_rows(60, 64, "topk", seed=0)
    store = write_store(tmp_path / "s", rows, v=64, mode="topk", row_group_rows=4, shard_bytes=1500)
    shards = sorted((store / "shards").iterdir())
    assert len(shards) >= 6
    for f in (shards[1], shards[4]):  # two corrupt shards, not adjacent
        b = bytearray(f.read_bytes())
        b[len(b) // 3] ^= 0x10
        f.write_bytes(bytes(b))
    serial = verify_store(str(store), workers=1)
    parallel = verify_store(str(store), workers=4)
    assert serial == parallel
    assert [shards[1].name in p for p in serial].count(True) >= 1 and any(shards[4].name in p for p in serial)
    first = [i for i, p in enumerate(serial) if shards[4].name in p][0]
    assert all(shards[1].name not in p for p in serial[first:])  # shard order kept
    assert kd(["store", "verify", str(store), "--workers", "3", "--quiet"]) == 1
    assert shards[4].name in capsys.readouterr().err
