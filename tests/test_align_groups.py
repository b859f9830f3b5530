"""1:n group targets and chain-rule products (kdstore.align.groups): the vectorised
formula against a per-position brute force, hand-built groups, and the sequence aligner's
``groups`` / ``chain`` modes on a store over real tokenizers."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from align_synth import corpus_tokenizers, synthetic_store
from kdstore.align import SequenceAligner, VocabAlignment
from kdstore.align.groups import padded_spelling, prefix_targets, prefix_targets_reference, row_layout, teacher_next_logprob
from kdstore.align.sequence import group_closers
from trainer.data.corpora import peoples_daily


def _csr(lists):
    ptr = np.zeros(len(lists) + 1, dtype=np.int64)
    np.cumsum([len(x) for x in lists], out=ptr[1:])
    return ptr, np.array([a for x in lists for a in x], dtype=np.int64)


def _rows(entries):
    cnt = np.array([len(e) for e in entries], dtype=np.int64)
    off = np.zeros(len(entries) + 1, dtype=np.int64)
    np.cumsum(cnt, out=off[1:])
    idx = np.array([t for e in entries for t, _ in e], dtype=np.int64)
    p = np.array([q for e in entries for _, q in e], dtype=np.float32)
    return off, idx, p


def test_hand_example_boundary_and_inside():
    # Teacher ids: 0 = 北京市 -> student [5, 6], 1 = 北京 -> [5], 2 = 上海 -> [7, 8], 3 = unmappable -> [].
    spellings = [[5, 6], [5], [7, 8], []]
    spell, L = padded_spelling(*_csr(spellings), width=4)
    off, idx, p = _rows([[(0, 0.5), (1, 0.2), (2, 0.2), (3, 0.05)]])
    tail = np.array([0.05], np.float32)
    # depth 0 (a boundary): first pieces summed: 5 <- 0.5 + 0.2, 7 <- 0.2; tail = 0.05 + unmappable 0.05.
    # depth 1 after reading [5]: consistent {0, 1} (mass 0.7): next 6 with 0.5/0.7, "ends" (北京) 0.2/0.7 -> tail.
    # depth 1 after reading [9]: nothing consistent -> no target.
    prefix = np.array([[-2, -2, -2, -2], [5, -2, -2, -2], [9, -2, -2, -2]])
    keep, cnt, ids, probs, tl = prefix_targets(spell, L, off, idx, p, tail, np.array([0, 0, 0]), np.array([0, 1, 1]), prefix)
    assert keep.tolist() == [True, True, False]
    assert cnt.tolist() == [2, 1]
    assert ids.tolist() == [5, 7, 6]
    np.testing.assert_allclose(probs, [0.7, 0.2, 0.5 / 0.7], rtol=1e-6)
    np.testing.assert_allclose(tl, [0.1, 0.2 / 0.7], rtol=1e-6)


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_prefix_targets_match_brute_force(data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31 - 1)))
    V_t, V_s, P = data.draw(st.integers(1, 12)), data.draw(st.integers(1, 6)), data.draw(st.integers(1, 5))
    spellings = [list(rng.integers(0, V_s, size=rng.integers(0, 4))) for _ in range(V_t)]
    entries = []
    for _ in range(P):
        k = int(rng.integers(0, V_t + 1))
        ids = rng.choice(V_t, size=k, replace=False)
        w = rng.dirichlet(np.ones(k + 1))
        entries.append([(int(t), float(q)) for t, q in zip(ids, w[:k])])
    tails = [1.0 - sum(q for _, q in e) for e in entries]
    N = data.draw(st.integers(1, 8))
    tpos = rng.integers(0, P, size=N)
    depth = rng.integers(0, 4, size=N)
    # Prefixes mostly taken from real spellings (so they are often consistent), some random.
    prefix = np.full((N, 4), -2, dtype=np.int64)
    for n in range(N):
        src = spellings[int(rng.integers(0, V_t))] if rng.random() < 0.7 else list(rng.integers(0, V_s, size=4))
        src = (list(src) + list(rng.integers(0, V_s, size=4)))[:4]
        prefix[n, : depth[n]] = src[: depth[n]]
    spell, L = padded_spelling(*_csr(spellings), width=4)
    off, idx, p = _rows(entries)
    keep, cnt, ids, probs, tl = prefix_targets(spell, L, off, idx, p.astype(np.float32), np.array(tails, np.float32),
                                               tpos, depth, prefix)
    ref = prefix_targets_reference(spellings, entries, tails, tpos.tolist(), depth.tolist(), prefix.tolist())
    assert keep.tolist() == [r is not None for r in ref]
    e = 0
    for n, r in enumerate(x for x in ref if x is not None):
        q, tail = r
        got = dict(zip(ids[e : e + cnt[n]].tolist(), probs[e : e + cnt[n]].tolist()))
        e += cnt[n]
        assert got.keys() == q.keys()
        for s in q:
            assert got[s] == pytest.approx(q[s], rel=1e-5, abs=1e-7)
        assert tl[n] == pytest.approx(tail, rel=1e-5, abs=1e-6)
        assert sum(got.values()) + tl[n] == pytest.approx(1.0, abs=1e-5)  # a distribution (mass conserved)


def test_row_layout_depths_of_a_one_to_n_group():
    # Teacher: 我 | 北京市 | 人 ; student: 我 | 北 | 京 | 市 | 人 (bytes 0-3, 3-12, 12-15).
    ts, te = np.array([0, 3, 12]), np.array([3, 12, 15])
    ss, se = np.array([0, 3, 6, 9, 12]), np.array([3, 6, 9, 12, 15])
    t_close, s_close, inside, s0 = group_closers(ts, te, ss, se)
    assert t_close.tolist() == [0, 1, 2] and s_close.tolist() == [0, 3, 4]
    tpos, depth, gstart = row_layout(t_close, s_close, inside, s0, context_len=0, deep=False)
    assert tpos.tolist() == [0, -1, -1, 1, 2]  # boundary rule: closers only
    tpos, depth, gstart = row_layout(t_close, s_close, inside, s0, context_len=0, deep=True)
    # 北 and 京 predict from inside the group: teacher position 0 (after 我), having read 1 and 2 pieces.
    assert tpos.tolist() == [0, 0, 0, 1, 2]
    assert depth.tolist() == [0, 1, 2, 0, 0]
    assert gstart.tolist() == [0, 1, 1, 1, 4]
    # Teacher position 0 is overlap context: nothing derives from it.
    tpos, _, _ = row_layout(t_close, s_close, inside, s0, context_len=1, deep=True)
    assert tpos.tolist() == [-1, -1, -1, 1, 2]


def test_teacher_next_logprob_kept_and_bound():
    positions = np.array([0, 3])
    input_ids = np.array([4, 7, 9])
    # pos 0 keeps 7 (0.6): log 0.6; pos 1 keeps {1: 0.3, 2: 0.2}, tail 0.5, actual 9 not kept: bound min(0.5, 0.2).
    off, idx, p = _rows([[(7, 0.6), (1, 0.1)], [(1, 0.3), (2, 0.2)], [(9, 1.0)]])
    lp = teacher_next_logprob(positions, input_ids, off, idx, p, np.array([0.3, 0.5, 0.0], np.float32))
    np.testing.assert_allclose(lp, [np.log(0.6), np.log(0.2), 0.0], rtol=1e-6)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    toks = corpus_tokenizers()
    texts = [s.text for s in peoples_daily("validation")[:60]]
    store = synthetic_store(tmp_path_factory.mktemp("g") / "store", toks["bpe"], texts, k=8)
    return store, toks["unigram"], VocabAlignment.build(store, toks["unigram"], policy="first_piece")


def test_groups_mode_adds_targets_and_keeps_boundary_ones(pair):
    store, student, al = pair
    batch = next(store.iter_batches(batch_rows=64))
    b = SequenceAligner(student=student, alignment=al, mode="boundary").align_batch(store, batch)
    g = SequenceAligner(student=student, alignment=al, mode="groups").align_batch(store, batch)
    assert np.array_equal(b.input_ids, g.input_ids)
    assert g.stats["targets"] > b.stats["targets"]
    assert not (b.target_mask & ~g.target_mask).any()  # every boundary target stays
    # At closers the groups target equals the first_piece remap of the same teacher position.
    eb = np.concatenate([[0], np.cumsum(b.counts)])
    eg = np.concatenate([[0], np.cumsum(g.counts)])
    for j in np.flatnonzero(b.target_mask)[:200]:
        assert b.teacher_pos[j] == g.teacher_pos[j]
        bi, bp = b.indices[eb[j] : eb[j + 1]], b.probs[eb[j] : eb[j + 1]]
        qb = {int(i): 0.0 for i in bi}
        for i, p in zip(bi, bp):
            qb[int(i)] += float(p)
        qb = {i: p for i, p in qb.items() if p > 0}
        qg = dict(zip(g.indices[eg[j] : eg[j + 1]].tolist(), g.probs[eg[j] : eg[j + 1]].tolist()))
        assert qg.keys() == qb.keys()
        assert all(abs(qg[i] - qb[i]) < 1e-5 for i in qg)
        assert abs(b.tail[j] - g.tail[j]) < 1e-5
    # Every target is a distribution over the student's ids.
    sums = np.add.reduceat(g.probs, eg[:-1][g.counts > 0]) if len(g.probs) else np.zeros(0)
    np.testing.assert_allclose(sums + g.tail[g.counts > 0], 1.0, atol=2e-5)
    assert g.indices.max() < al.student_vocab_size
    assert (g.depth[~b.target_mask & g.target_mask] > 0).all()


def test_chain_mode_marks_group_members(pair):
    store, student, al = pair
    batch = next(store.iter_batches(batch_rows=32))
    c = SequenceAligner(student=student, alignment=al, mode="chain").align_batch(store, batch)
    assert (c.chain_logc <= 1e-6).all()  # log of a product of probabilities
    members = np.flatnonzero(c.chain_start >= 0)
    assert len(members)
    row = np.searchsorted(c.positions, members, side="right") - 1
    start_global = c.chain_start[members] + c.positions[row]
    assert (start_global < members).all()  # a group's start precedes its members
    assert c.target_mask[start_global].mean() > 0.9  # and carries the group's target


def test_groups_mode_needs_a_spelling(pair):
    store, student, al = pair
    old = VocabAlignment(**{**{k: getattr(al, k) for k in ("policy", "vocab_size", "student_vocab_size", "rule_codes",
                                                           "ptr", "col", "weight", "input_map")}})
    with pytest.raises(ValueError, match="spelling"):
        SequenceAligner(student=student, alignment=old, mode="groups")


@pytest.mark.parametrize("suffix", [".parquet", ".json"])
def test_spelling_survives_save_and_load(pair, tmp_path, suffix):
    store, student, al = pair
    back = VocabAlignment.load(al.save(tmp_path / f"a{suffix}"), store=store, student=student)
    assert np.array_equal(back.spell_ptr, al.spell_ptr) and np.array_equal(back.spell_col, al.spell_col)
