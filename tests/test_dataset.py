"""SoftLabelDataset / StoreLoader: deterministic order, rank x worker partition, exact
mid-epoch resume, collation to padded tensors, remapping hook."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import kdstore
from kdstore import Selection, SoftLabelRow, StoreWriter, TeacherInfo
from kdstore.dataset import SoftLabelDataset, StoreLoader, epoch_order

from _storeutil import entry_sets, make_rows, write_store

V = 200


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    rows, exact = make_rows(53, V, "top_p", seed=11, max_len=9)
    path = write_store(tmp_path_factory.mktemp("ds") / "s", rows, v=V, mode="top_p", shard_bytes=2500, row_group_rows=6)
    s = kdstore.open(str(path))
    assert len(s.shards) >= 4  # several shards so that shard order and blocks matter
    return s, rows, exact


def _keys(batches):
    return [[(sid, int(w)) for sid, w in zip(b["sample_id"], b["window"])] for b in batches]


def test_epoch_order_is_deterministic_permutation():
    rows = [5, 7, 3, 9]
    a = epoch_order(rows, seed=1, epoch=0, shuffle_block=2)
    assert sorted(a.tolist()) == list(range(24))
    assert np.array_equal(a, epoch_order(rows, seed=1, epoch=0, shuffle_block=2))
    assert not np.array_equal(a, epoch_order(rows, seed=1, epoch=1, shuffle_block=2))
    assert not np.array_equal(a, epoch_order(rows, seed=2, epoch=0, shuffle_block=2))
    assert epoch_order(rows, seed=1, epoch=0, shuffle=False).tolist() == list(range(24))
    # block = 1 shard: each shard's rows are contiguous in the epoch (bounded memory)
    b = epoch_order(rows, seed=3, epoch=0, shuffle_block=1)
    shard_of = np.searchsorted(np.cumsum(rows), b, side="right")
    assert (np.diff(shard_of) != 0).sum() == len(rows) - 1


def test_resume_mid_epoch_equals_uninterrupted_run(store):
    s, rows, _ = store
    full_loader = StoreLoader(SoftLabelDataset(s, batch_size=4, seed=7), num_workers=0)
    epoch0 = _keys(list(full_loader))
    epoch1 = _keys(list(full_loader))
    assert sorted(k for b in epoch0 for k in b) == sorted((r.sample_id, r.window) for r in rows)
    assert epoch0 != epoch1  # reshuffled per epoch

    # interrupted: 2 workers, stop after 5 batches, save the state ...
    loader = StoreLoader(SoftLabelDataset(s, batch_size=4, seed=7), num_workers=2)
    first = []
    for b in loader:
        first.append(b)
        if len(first) == 5:
            break
    state = loader.state_dict()
    assert state["epoch"] == 0 and state["batches_done"] == 5
    del loader
    # ... rebuild everything (new store object too) and resume with another worker count
    resumed = StoreLoader(SoftLabelDataset(kdstore.open(s.uri), batch_size=4, seed=7), num_workers=1)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert _keys(first) + _keys(rest) == epoch0  # exactly one epoch, same order
    assert [b["batch_index"] for b in first + rest] == list(range(len(epoch0)))
    assert _keys(list(resumed)) == epoch1  # and the next epoch continues identically


def test_rank_and_worker_partition_is_disjoint_and_complete(store):
    s, rows, _ = store
    seen = []
    per_rank = []
    for rank in range(3):
        ds = SoftLabelDataset(s, batch_size=4, seed=3, rank=rank, world_size=3)
        batches = list(StoreLoader(ds, num_workers=2))
        keys = [k for b in _keys(batches) for k in b]
        per_rank.append(len(batches))
        # the two workers' batches arrive in batch order: same as a single process
        assert keys == [k for b in _keys(list(StoreLoader(ds, num_workers=0))) for k in b]
        seen += keys
    assert len(seen) == len(set(seen)) == len(rows)
    assert set(seen) == {(r.sample_id, r.window) for r in rows}
    assert max(per_rank) - min(per_rank) <= 1


def test_drop_last_gives_every_rank_the_same_full_batches(store):
    s, rows, _ = store
    counts = []
    for rank in range(3):
        ds = SoftLabelDataset(s, batch_size=4, seed=0, rank=rank, world_size=3, drop_last=True)
        batches = list(ds)
        assert all(len(b["sample_id"]) == 4 for b in batches)
        counts.append(len(batches))
    assert counts == [len(rows) // 12] * 3


def test_collate_matches_decoded_store(store):
    s, rows, exact = store
    ds = SoftLabelDataset(s, batch_size=8, shuffle=False)
    by_id = {r.sample_id: (r, e) for r, e in zip(rows, exact)}
    want_sets = {r.sample_id: entry_sets([e]) for r, e in zip(rows, exact)}
    n = 0
    for b in ds:
        B, T = b["input_ids"].shape
        K = b["kd_indices"].shape[-1]
        assert b["kd_probs"].shape == (B, T, K) and b["kd_tail"].shape == (B, T)
        assert b["kd_probs"].dtype == torch.float32 and b["kd_indices"].dtype == torch.long
        for i, sid in enumerate(b["sample_id"]):
            r, e = by_id[sid]
            t = len(e.ids)
            assert b["attention_mask"][i].tolist() == [True] * t + [False] * (T - t)
            assert b["input_ids"][i, :t].tolist() == e.ids.tolist() and not b["input_ids"][i, t:].any()
            # next-token labels; -100 on the last position, on padding and on overlap context
            want = e.ids[1:].tolist() + [-100] + [-100] * (T - t)
            want[: r.context_len] = [-100] * r.context_len
            assert b["labels"][i].tolist() == want
            assert b["kd_mask"][i].tolist() == [r.context_len <= j < t for j in range(T)]
            assert not b["kd_counts"][i, t:].any()
            for j in range(t):
                c = int(e.counts[j])
                assert int(b["kd_counts"][i, j]) == c
                got = dict(zip(b["kd_indices"][i, j, :c].tolist(), b["kd_probs"][i, j, :c].tolist()))
                assert got.keys() == want_sets[sid][j].keys()
                assert not b["kd_probs"][i, j, c:].any()
                assert abs(sum(got.values()) + float(b["kd_tail"][i, j]) - 1) < 1e-5
            n += 1
    assert n == len(rows)


class _MergePairs:
    """Toy remap: target index = teacher index // 2 (pairs merge), ids >= 2*cut leave the
    target vocabulary and their mass goes to the tail."""

    def __init__(self, cut):
        self.vocab_size = cut

    def map_inputs(self, ids):
        return ids // 2

    def map_targets(self, indices, probs, counts):
        pos = np.repeat(np.arange(len(counts)), counts)
        new = indices // 2
        keep = new < self.vocab_size
        extra = np.bincount(pos[~keep], weights=probs[~keep], minlength=len(counts)).astype(np.float32)
        key = pos[keep] * self.vocab_size + new[keep]
        uniq, inv = np.unique(key, return_inverse=True)
        p = np.bincount(inv, weights=probs[keep]).astype(np.float32)
        return uniq % self.vocab_size, p, np.bincount(uniq // self.vocab_size, minlength=len(counts)), extra


def test_remap_hook_conserves_mass(store):
    s, _, _ = store
    plain = next(iter(SoftLabelDataset(s, batch_size=6, shuffle=False)))
    b = next(iter(SoftLabelDataset(s, batch_size=6, shuffle=False, remap=_MergePairs(40))))
    m = b["kd_mask"]
    assert int(b["kd_indices"][m].max()) < 40
    total = b["kd_probs"].sum(-1) + b["kd_tail"]
    assert torch.allclose(total[m], torch.ones_like(total[m]), atol=1e-5)
    assert torch.equal(b["input_ids"], plain["input_ids"] // 2)
    assert (b["kd_tail"][m] >= plain["kd_tail"][m] - 1e-6).all()


def test_sequence_level_batches(tmp_path):
    with StoreWriter(str(tmp_path / "seq"), teacher=TeacherInfo(name_or_path="clf", vocab_size=3), selection=Selection(mode="topk", k=2),
                     level="sequence", columns={"label": True}) as w:
        w.write([SoftLabelRow(sample_id=f"s{i}", tokens=np.zeros(0, np.uint64), counts=np.array([2]), indices=np.array([i % 3, 2 - i % 3 if i % 3 != 1 else 0]),
                              probs=np.array([0.7, 0.2]), tail=np.array([0.1]), label=None if i == 4 else i % 3) for i in range(7)])
    b = next(iter(SoftLabelDataset(str(tmp_path / "seq"), batch_size=7, shuffle=False)))
    assert b["kd_indices"].shape == (7, 2) and b["kd_tail"].shape == (7,) and b["kd_counts"].tolist() == [2] * 7
    assert b["labels"].tolist() == [0, 1, 2, 0, -100, 2, 0]
    assert torch.allclose(b["kd_probs"].sum(-1) + b["kd_tail"], torch.ones(7))
    assert b["kd_indices"][1].tolist() == [0, 1]  # ascending index order


def test_state_for_another_store_or_setting_is_rejected(store):
    s, _, _ = store
    state = StoreLoader(SoftLabelDataset(s, batch_size=4, seed=1)).state_dict()
    with pytest.raises(ValueError, match="different store or sharding"):
        StoreLoader(SoftLabelDataset(s, batch_size=5, seed=1)).load_state_dict(state)
    with pytest.raises(ValueError, match="outside world_size"):
        SoftLabelDataset(s, batch_size=4, rank=3, world_size=3)


def test_stopping_early_releases_the_prefetch_thread(store):
    import threading

    s, _, _ = store
    before = threading.active_count()
    it = iter(SoftLabelDataset(s, batch_size=4, seed=2, shuffle_block=1))
    first = [next(it), next(it)]
    assert len(first[0]["sample_id"]) == 4
    assert threading.active_count() > before  # shards are loaded in a background thread
    it.close()
    assert threading.active_count() == before
