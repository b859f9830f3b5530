"""The dataset's vectorised shard plan equals the per-batch loop it replaces."""

from __future__ import annotations

import numpy as np
import torch
from _storeutil import make_rows, write_store
from hypothesis import given, settings
from hypothesis import strategies as st

from kdstore.dataset import SoftLabelDataset


def _loop_plan(ds, rows, n_batches, first, step):
    first_use, last_use = [], {}
    for n, j in enumerate(range(first, n_batches, step)):
        ids = rows[j * ds.batch_size : (j + 1) * ds.batch_size]
        for s in np.unique(np.searchsorted(ds._offsets, ids, side="right") - 1).tolist():
            if s not in last_use:
                first_use.append(s)
            last_use[s] = n
    return first_use, last_use


def test_shard_plan_equals_the_per_batch_loop(tmp_path):
    rows, _ = make_rows(70, 32, "topk", seed=0, max_len=4)
    store = write_store(tmp_path / "s", rows, v=32, mode="topk", row_group_rows=3, shard_bytes=600)
    assert len(list((store / "shards").iterdir())) >= 8

    @settings(max_examples=60, deadline=None)
    @given(st.integers(1, 9), st.integers(0, 5), st.integers(1, 4), st.integers(0, 3), st.integers(1, 3))
    def check(batch, seed, step, wid, block):
        ds = SoftLabelDataset(str(store), batch_size=batch, seed=seed, shuffle_block=block)
        r = ds.rank_rows()
        nb = ds.num_batches()
        first = min(wid, step - 1)
        assert ds._shard_plan(r, nb, first, step) == _loop_plan(ds, r, nb, first, step)

    check()


def test_a_worker_reads_only_the_row_groups_of_its_rows(tmp_path, monkeypatch):
    """With one row group per batch (no shuffle, batch = row group), worker 0 of 2 needs only
    the even row groups: it must read those and no other, and yield exactly the batches
    0, 2, 4... of a single-process run."""
    import types

    import kdstore
    from kdstore import dataset as D

    rows, _ = make_rows(48, 32, "topk", seed=1, max_len=4)
    uri = write_store(tmp_path / "s", rows, v=32, mode="topk", row_group_rows=4, shard_bytes=10**9)
    store = kdstore.open(str(uri))
    assert len(store.shards) == 1
    whole = [b["kd_indices"] for b in SoftLabelDataset(store, batch_size=4, shuffle=False)]
    read = []
    real = kdstore.Store.read_row_groups

    def spy(self, i, rows, **kw):
        table, row_map = real(self, i, rows, **kw)
        read.append((i, table.num_rows, np.flatnonzero(row_map >= 0)))
        return table, row_map

    monkeypatch.setattr(kdstore.Store, "read_row_groups", spy)
    monkeypatch.setattr(D, "get_worker_info", lambda: types.SimpleNamespace(id=0, num_workers=2))
    mine = [b["kd_indices"] for b in SoftLabelDataset(store, batch_size=4, shuffle=False)]
    assert len(mine) == 6 and all(torch.equal(a, b) for a, b in zip(mine, whole[::2]))
    assert len(read) == 1 and read[0][1] == 24  # half of the shard's 48 rows
    assert read[0][2].tolist() == [r for g in range(0, 12, 2) for r in range(4 * g, 4 * g + 4)]
