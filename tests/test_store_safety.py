"""Store safety (issue 17): one writer per store, verify never crashes on a corrupt shard,
shards outside the store are refused, stats into a missing folder."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

import kdstore
from _storeutil import make_rows, write_store
from kdstore.lease import LEASE, StoreLockedError, WriterLease, check_lease, read_lease
from kdstore.tools import stats_main, verify_main, verify_shard, verify_store


# -- item 1: the writer lease ------------------------------------------------------------------
def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_second_writer_is_refused_naming_the_holder(tmp_path):
    uri = str(tmp_path / "store")
    with WriterLease.acquire(uri, command="kd cache (first)", heartbeat_s=0):
        with pytest.raises(StoreLockedError) as e:
            WriterLease.acquire(uri, command="kd cache (second)", break_stale=True)
        msg = str(e.value)
        assert f"pid {os.getpid()}" in msg and socket.gethostname() in msg and "kd cache (first)" in msg
    assert not (tmp_path / "store" / LEASE).exists()  # released on exit
    WriterLease.acquire(uri, heartbeat_s=0).release()  # and free again


def test_stale_lease_is_detected_and_broken_only_with_the_flag(tmp_path):
    uri = str(tmp_path / "store")
    lease = WriterLease.acquire(uri, heartbeat_s=0)
    info = json.loads((tmp_path / "store" / LEASE).read_text())
    info["pid"] = _dead_pid()  # the holder was killed
    (tmp_path / "store" / LEASE).write_text(json.dumps(info))
    with pytest.raises(StoreLockedError, match="--break-lock") as e:
        WriterLease.acquire(uri, heartbeat_s=0)
    assert "not running" in str(e.value)
    new = WriterLease.acquire(uri, heartbeat_s=0, break_stale=True)
    assert read_lease(new.loc).token == new.info.token != info["token"]
    with pytest.raises(StoreLockedError, match="lost the store's lease"):
        lease.check()  # the old writer is fenced off: it cannot publish a manifest
    check_lease(uri, new.info.token)
    new.release()


def test_other_host_lease_is_stale_only_after_its_heartbeat_stops(tmp_path):
    uri = str(tmp_path / "store")
    (tmp_path / "store").mkdir()
    now = __import__("time").time()
    held = {"host": "worker-7", "pid": 1, "started": now - 50, "token": "x", "acquired": now - 50, "heartbeat": now - 5}
    (tmp_path / "store" / LEASE).write_text(json.dumps(held))
    with pytest.raises(StoreLockedError, match="worker-7 pid 1"):
        WriterLease.acquire(uri, break_stale=True, stale_after_s=60)  # alive: never broken
    held["heartbeat"] = now - 120
    (tmp_path / "store" / LEASE).write_text(json.dumps(held))
    WriterLease.acquire(uri, break_stale=True, stale_after_s=60, heartbeat_s=0).release()


def test_lease_on_an_object_store_path(tmp_path):
    """Non-local filesystems (here fsspec memory://) take the write-then-read-back path."""
    pytest.importorskip("fsspec")
    uri = f"memory://kd-lease-{os.getpid()}/store"
    a = WriterLease.acquire(uri, heartbeat_s=0, settle_s=0.0)
    assert not a.loc.is_local
    with pytest.raises(StoreLockedError, match=f"pid {os.getpid()}"):
        WriterLease.acquire(uri, heartbeat_s=0, settle_s=0.0)
    a.release()
    WriterLease.acquire(uri, heartbeat_s=0, settle_s=0.0).release()


def test_heartbeat_refreshes_the_lease(tmp_path):
    lease = WriterLease.acquire(str(tmp_path / "s"), heartbeat_s=0.05)
    first = read_lease(lease.loc).heartbeat
    for _ in range(100):
        if read_lease(lease.loc).heartbeat > first:
            break
        __import__("time").sleep(0.02)
    assert read_lease(lease.loc).heartbeat > first
    lease.release()


# -- item 9: verify reports every single-bit flip of a shard, never crashes -------------------------
def test_verify_reports_every_single_bit_flip_of_a_shard(tmp_path):
    """Exhaustive sweep: every bit of a tiny shard flipped in turn; verify's shard check
    (in-process, what ``kd store verify`` runs per shard) must name the shard and report a
    problem each time, never raise."""
    rows, _ = make_rows(1, 8, "topk", max_len=2)
    d = write_store(tmp_path / "s", rows, v=8, mode="topk", columns={"text": False, "offsets": False, "label": False})
    store = kdstore.open(str(d))
    shard = d / store.shards[0].file
    data = shard.read_bytes()
    assert len(data) < 4000  # keeps the sweep to seconds
    missed, crashed = [], []
    for i in range(len(data)):
        for bit in range(8):
            bad = bytearray(data)
            bad[i] ^= 1 << bit
            shard.write_bytes(bad)
            try:
                problems = verify_shard(store, 0)
            except Exception as exc:  # noqa: BLE001 - the point of the test
                crashed.append((i, bit, repr(exc)[:80]))
                continue
            if not problems or not all(store.shards[0].file in p for p in problems):
                missed.append((i, bit, problems))
    shard.write_bytes(data)
    assert not crashed, f"{len(crashed)} flips crashed verify, e.g. {crashed[:3]}"
    assert not missed, f"{len(missed)} flips not reported, e.g. {missed[:3]}"
    assert verify_store(store) == []


def test_verify_cli_exits_1_on_a_flip_that_breaks_parsing(tmp_path, capsys):
    rows, _ = make_rows(3, 16, "top_p", max_len=4, text=True)
    d = write_store(tmp_path / "s", rows, v=16, mode="top_p")
    shard = d / kdstore.open(str(d)).shards[0].file
    data = bytearray(shard.read_bytes())
    data[-12] ^= 0x40  # inside the footer's thrift metadata
    shard.write_bytes(data)
    assert verify_main([str(d), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "CORRUPT" in err and shard.name in err and "Traceback" not in err


# -- item 13: shards that are symlinks out of the store are refused ----------------------------------
def test_symlinked_shard_outside_the_store_is_refused(tmp_path):
    rows, _ = make_rows(4, 16, "topk", max_len=4)
    d = write_store(tmp_path / "s", rows, v=16, mode="topk")
    store = kdstore.open(str(d))
    rel = store.shards[0].file
    outside = tmp_path / "elsewhere.parquet"
    os.replace(d / rel, outside)
    os.symlink(outside, d / rel)
    with pytest.raises(kdstore.StoreFormatError, match="outside the store"):
        kdstore.open(str(d)).read_shard(0)
    with pytest.raises(kdstore.StoreFormatError, match="outside the store"):
        list(kdstore.open(str(d)).iter_batches())
    problems = verify_store(str(d))
    assert any("outside the store" in p for p in problems)
    # A symlink that stays inside the store is fine.
    inside = d / "shards" / "real.parquet"
    os.replace(outside, inside)
    os.remove(d / rel)
    os.symlink(inside, d / rel)
    assert kdstore.open(str(d)).read_shard(0).num_rows == store.shards[0].rows


# -- item 9: stats --plot into a folder that does not exist -------------------------------------------
def test_stats_plot_into_missing_folder(tmp_path, capsys):
    rows, _ = make_rows(4, 16, "top_p", max_len=4)
    d = write_store(tmp_path / "s", rows, v=16, mode="top_p")
    png = tmp_path / "new" / "deeper" / "stats.png"
    assert stats_main([str(d), "--plot", str(png)]) == 0
    assert png.stat().st_size > 1000
    blocked = tmp_path / "file"
    blocked.write_text("x")
    assert stats_main([str(d), "--plot", str(blocked / "stats.png")]) == 1  # parent is a file
    assert "cannot write" in capsys.readouterr().err


def test_shard_record_is_written_at_close_and_dropped_with_the_manifest(tmp_path):
    """Each closed shard leaves a record (rows, bytes, checksum, samples), which a resumed
    capture checks the file against; the manifest replaces the records when it is written."""
    from kdstore.writer import SHARD_RECORD_DIR, read_shard_record

    rows, _ = make_rows(5, 16, "topk", max_len=4)
    w = kdstore.StoreWriter(str(tmp_path / "s"), teacher=kdstore.TeacherInfo(name_or_path="t", vocab_size=16),
                            selection=kdstore.Selection(mode="topk", k=8), row_group_rows=2, shard_bytes=1)
    from _storeutil import vocab

    w.write_vocab(vocab(16))
    w.write(rows)  # row groups of 2, each closing a shard (shard_bytes=1)
    closed = list(w._shards)
    assert len(closed) == 2
    for s in closed:
        rec = read_shard_record(w.location, s.file)
        assert rec is not None and rec["checksum"] == s.checksum and rec["rows"] == s.rows == 2 and rec["bytes"] == s.bytes
        want = int((pq.read_table(tmp_path / "s" / s.file, columns=["window"]).column("window").to_numpy() == 0).sum())
        assert rec["samples"] == want
    w.close()
    assert not (tmp_path / "s" / SHARD_RECORD_DIR).exists()
