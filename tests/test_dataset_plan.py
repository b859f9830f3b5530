"""The dataset's vectorised shard plan equals the per-batch loop it replaces."""

from __future__ import annotations

import numpy as np
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
