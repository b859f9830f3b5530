"""``path`` targets (docs/alignment.md §6.3): where the next student token spells several
teacher tokens, the teacher's probability of that realized path moves from the first piece
of its first token onto the student token. Hand-computed values, a brute force, and the
aligner on a real-tokenizer store."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from kdstore.align import SequenceAligner
from kdstore.align.groups import realized_path_reference, realized_path_targets
from kdstore.align.sequence import group_closers, offset_lists
from test_align_groups import pair  # noqa: F401  (BPE teacher store, Unigram student, first_piece alignment)


def test_hand_example():
    # position 0: {5: .5, 7: .3}, tail .2; t_a -> student 5 (weight 1); path probability .3 to student 9 (absent)
    # position 1: untouched; position 2: {7: .6}, tail .4; t_a unmappable (all of it in the tail); .1 to student 7
    counts, idx = np.array([2, 1, 1]), np.array([5, 7, 3, 7])
    probs, tail = np.array([.5, .3, 1.0, .6]), np.array([.2, 0.0, .4])
    c, i, p, t = realized_path_targets(counts, idx, probs, tail, pos=np.array([0, 2]), delta=np.array([.3, .1]),
                                       dest=np.array([9, 7]), fp_counts=np.array([1, 0]), fp_indices=np.array([5]),
                                       fp_weights=np.array([1.0]), fp_tail=np.array([0.0, 1.0]))
    assert c.tolist() == [3, 1, 1] and i.tolist() == [5, 7, 9, 3, 7]
    np.testing.assert_allclose(p, [.2, .3, .3, 1.0, .7], rtol=1e-6)
    np.testing.assert_allclose(t, [.2, 0.0, .3], rtol=1e-6)


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_matches_brute_force_and_conserves_mass(data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31 - 1)))
    S, V = data.draw(st.integers(1, 6)), data.draw(st.integers(2, 12))
    counts = rng.integers(0, min(5, V) + 1, S)
    idx = np.concatenate([rng.choice(V, c, replace=False) for c in counts]).astype(np.int64)
    probs = rng.dirichlet(np.ones(len(idx) + 1))[:-1] if len(idx) else np.zeros(0)
    tail = rng.random(S) * 0.3
    M = int(rng.integers(0, S + 1))
    pos = rng.choice(S, M, replace=False)
    # t_a's mapping: a kept entry of the position (as map_targets guarantees), or nothing (tail)
    fp_c, fp_i, fp_t, delta = np.zeros(M, np.int64), [], np.zeros(M), np.zeros(M)
    off = np.concatenate([[0], np.cumsum(counts)])
    for m, s in enumerate(pos):
        if counts[s] and rng.random() < 0.8:
            e = off[s] + int(rng.integers(counts[s]))
            fp_c[m], delta[m] = 1, probs[e] * rng.random()
            fp_i.append(idx[e])
        else:
            fp_t[m], delta[m] = 1.0, tail[s] * rng.random()
    dest = rng.integers(0, V + 3, M)
    kw = dict(pos=pos, delta=delta, dest=dest, fp_counts=fp_c, fp_indices=np.array(fp_i, np.int64),
              fp_weights=np.ones(len(fp_i)), fp_tail=fp_t)
    c, i, p, t = realized_path_targets(counts, idx, probs, tail, **kw)
    ref, ref_tail = realized_path_reference(counts, idx, probs, tail, **kw)
    o = np.concatenate([[0], np.cumsum(c)])
    for s in range(S):
        got = list(zip(i[o[s]:o[s + 1]].tolist(), p[o[s]:o[s + 1]].tolist()))
        assert [a for a, _ in got] == [a for a, _ in ref[s]]
        np.testing.assert_allclose([b for _, b in got], [b for _, b in ref[s]], atol=1e-6)
        before = probs[off[s]:off[s + 1]].sum() + tail[s]
        assert abs(p[o[s]:o[s + 1]].sum() + t[s] - before) < 1e-5  # mass conserved
    np.testing.assert_allclose(t, ref_tail, atol=1e-6)


def test_path_mode_on_real_tokenizers(pair):  # noqa: F811
    store, student, al = pair
    batch = next(store.iter_batches(batch_rows=64))
    b = SequenceAligner(student=student, alignment=al, mode="boundary").align_batch(store, batch)
    aligner = SequenceAligner(student=student, alignment=al, mode="path")
    q = aligner.align_batch(store, batch)
    assert np.array_equal(b.target_mask, q.target_mask) and np.array_equal(b.teacher_pos, q.teacher_pos)
    eb, eq = np.concatenate([[0], np.cumsum(b.counts)]), np.concatenate([[0], np.cumsum(q.counts)])
    sums = np.add.reduceat(q.probs, eq[:-1][q.counts > 0])
    np.testing.assert_allclose(sums + q.tail[q.counts > 0], 1.0, atol=2e-5)
    # Recompute the moved mass by hand at every n:1 group: the product of the stored
    # probabilities of the realized teacher tokens, added to the student token that spells them.
    d = store.decode(batch)
    texts, bs_off, bs_all, be_all = offset_lists(batch, "")
    encs = aligner.student.encode_offsets(texts)
    checked = 0
    for r, (_, s_bs, s_be) in enumerate(encs):
        p0, p1 = int(d.positions[r]), int(d.positions[r + 1])
        tc, sc, _, _ = group_closers(bs_all[bs_off[r]:bs_off[r] + p1 - p0], be_all[bs_off[r]:bs_off[r] + p1 - p0], s_bs, s_be)
        for g in range(len(tc) - 1):
            j = int(q.positions[r]) + int(sc[g])
            if not (tc[g + 1] - tc[g] >= 2 and sc[g + 1] - sc[g] == 1 and q.target_mask[j]):
                continue
            prod = 1.0
            for t in range(p0 + int(tc[g]), p0 + int(tc[g + 1])):
                ents = dict(zip(d.indices[d.entry_offsets[t]:d.entry_offsets[t + 1]].tolist(),
                                d.probs[d.entry_offsets[t]:d.entry_offsets[t + 1]].tolist()))
                prod *= ents.get(int(d.input_ids[t + 1]), 0.0)
            dest = int(q.input_ids[int(q.positions[r]) + int(sc[g + 1])])
            before = dict(zip(b.indices[eb[j]:eb[j + 1]].tolist(), b.probs[eb[j]:eb[j + 1]].tolist())).get(dest, 0.0)
            after = dict(zip(q.indices[eq[j]:eq[j + 1]].tolist(), q.probs[eq[j]:eq[j + 1]].tolist())).get(dest, 0.0)
            assert abs(after - before - prod) < 1e-5, (r, g, after, before, prod)
            checked += 1
    assert checked > 20
