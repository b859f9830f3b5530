"""Packed batches: the same rows, whole, in fewer sequences, with attention kept inside each row."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _storeutil import make_rows, write_store
from hypothesis import given, settings
from hypothesis import strategies as st

from kdstore.dataset import SoftLabelDataset, pack_rows


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 64), min_size=1, max_size=60))
def test_pack_rows_places_every_row_whole_without_overlap(lengths):
    cap = max(lengths)
    seq, start, S = pack_rows(np.array(lengths), cap)
    assert S <= len(lengths)
    used = {}
    for r, n in enumerate(lengths):
        assert 0 <= start[r] and start[r] + n <= cap
        for t in range(start[r], start[r] + n):
            assert (seq[r], t) not in used
            used[(seq[r], t)] = r
    # First fit: a row went to a later sequence only because it did not fit an earlier one,
    # so no two sequences could have been merged (hence at most one is half empty).
    fill = np.bincount(seq, weights=lengths, minlength=S)
    assert all(fill[i] + fill[j] > cap for i in range(S) for j in range(i + 1, S))
    s2, t2, n2 = pack_rows(np.array(lengths), cap)
    assert n2 == S and (s2 == seq).all() and (t2 == start).all()  # deterministic


def test_pack_rows_refuses_a_row_longer_than_the_sequence():
    with pytest.raises(ValueError, match="does not fit"):
        pack_rows(np.array([3, 9]), 8)


@pytest.fixture(scope="module", params=["topk", "top_p", "sample"])
def store(request, tmp_path_factory):
    rows, _ = make_rows(90, 64, request.param, seed=1, max_len=20)
    # Overlap context on some rows: their first positions carry no target.
    import dataclasses

    rows = [dataclasses.replace(r, context_len=min(3, len(r.tokens) - 1) if i % 4 == 0 else 0) for i, r in enumerate(rows)]
    return write_store(tmp_path_factory.mktemp(request.param) / "s", rows, v=64, mode=request.param, row_group_rows=8)


def _by_row(batch, packed: bool):
    """{(sample_id, window): {name: per-position values}} of a collated batch."""
    out = {}
    names = ["input_ids", "labels", "kd_mask", "kd_tail", "kd_counts", "kd_indices", "kd_probs"]
    for r, (sid, w) in enumerate(zip(batch["sample_id"], batch["window"].tolist())):
        if packed:
            where = batch["doc_index"] == r
        else:
            where = batch["attention_mask"].bool() & (torch.arange(batch["input_ids"].shape[0])[:, None] == r)
        out[(sid, w)] = {n: batch[n][where].tolist() for n in names}
    return out


def test_packed_batches_hold_the_same_rows_and_targets_with_less_padding(store):
    plain = list(SoftLabelDataset(str(store), batch_size=16, seed=3))
    packed = list(SoftLabelDataset(str(store), batch_size=16, seed=3, pack=True))
    assert len(plain) == len(packed)
    pad_plain = pad_packed = real = 0
    for a, b in zip(plain, packed):
        assert a["sample_id"] == b["sample_id"] and a["batch_index"] == b["batch_index"]
        assert _by_row(a, False) == _by_row(b, True)
        assert "attention_mask" not in b and b["input_ids"].shape[0] <= a["input_ids"].shape[0]
        n = int(a["attention_mask"].sum())
        real += n
        pad_plain += a["attention_mask"].numel() - n
        pad_packed += b["valid_mask"].numel() - int(b["valid_mask"].sum())
        # Position ids restart at every row and run 0..len-1 within it.
        for r in range(len(b["sample_id"])):
            pos = b["position_ids"][b["doc_index"] == r]
            assert pos.tolist() == list(range(len(pos)))
    assert pad_packed / (real + pad_packed) < 0.5 * pad_plain / (real + pad_plain)


def test_packed_forward_equals_the_unpacked_one_at_every_position(store):
    # transformers masks packed rows from position ids only without an attention mask and
    # without a KV cache (use_cache=False), as in training.
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=4)).eval()
    a = next(iter(SoftLabelDataset(str(store), batch_size=16, seed=5)))
    b = next(iter(SoftLabelDataset(str(store), batch_size=16, seed=5, pack=True)))
    with torch.no_grad():
        la = model(input_ids=a["input_ids"], attention_mask=a["attention_mask"].long()).logits
        lb = model(input_ids=b["input_ids"], position_ids=b["position_ids"], use_cache=False).logits
    for r in range(len(a["sample_id"])):
        got = lb[b["doc_index"] == r]
        want = la[r][a["attention_mask"][r].bool()]
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 128), min_size=1, max_size=40))
def test_plan_packing_is_never_worse_than_packing_at_the_longest_row(lengths):
    from kdstore.dataset import plan_packing

    seq, start, S, L = plan_packing(np.array(lengths))
    T = max(lengths)
    assert T <= L <= 2 * T
    assert all(start[r] + n <= L for r, n in enumerate(lengths))
    assert S * L <= pack_rows(np.array(lengths), T)[2] * T
