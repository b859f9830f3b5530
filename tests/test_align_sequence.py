"""Sequence alignment by byte offsets: hand-built groups, a two-pointer reference, and real
tokenizers trained on People's Daily (same tokenizer = identity)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kdstore.align import KINDS, SequenceAligner, VocabAlignment, align_offsets
from align_synth import corpus_tokenizers, synthetic_store
from trainer.data.corpora import peoples_daily

ONE, ONE_N, N_ONE, N_M = (KINDS.index(k) for k in ("1:1", "1:n", "n:1", "n:m"))


def spans(*pairs):
    a = np.array(pairs, dtype=np.int64).reshape(-1, 2)
    return a[:, 0], a[:, 1]


def run(teacher, student, **kw):
    ts, te = spans(*teacher)
    ss, se = spans(*student)
    target, kind = align_offsets(ts, te, ss, se, **kw)
    return target.tolist(), kind.tolist()


@pytest.mark.parametrize(
    "teacher, student, target, kind",
    [
        # 1:1 everywhere
        ([(0, 3), (3, 6)], [(0, 3), (3, 6)], [0, 1], [ONE, ONE]),
        # 1:n — 北京市 as one teacher token, three student characters: last piece only
        ([(0, 9)], [(0, 3), (3, 6), (6, 9)], [-1, -1, 0], [ONE_N] * 3),
        # n:1 — the student token gets the *last* teacher token's distribution
        ([(0, 3), (3, 6)], [(0, 6)], [1], [N_ONE]),
        # n:m — boundaries 4 and 3 differ, the group closes at 9
        ([(0, 4), (4, 9)], [(0, 3), (3, 9)], [-1, 1], [N_M, N_M]),
        # whitespace run "ab  cd": byte-level teacher ab|Ġ|Ġcd, WordPiece student ab|cd
        ([(0, 2), (2, 3), (3, 6)], [(0, 2), (4, 6)], [0, 2], [ONE, N_ONE]),
        # markers: teacher <s> (0,0) and SentencePiece "▁" reported as (0,1) over "中国" (0,6)
        ([(0, 0), (0, 6)], [(0, 1), (0, 6)], [0, 1], [ONE, ONE]),
        # unrefined byte-level fragments of one character share its span: the first closes nothing
        ([(0, 3), (0, 3), (3, 6)], [(0, 3), (3, 6)], [1, 2], [N_ONE, ONE]),
        # student tokens outside the teacher's window belong to no group
        ([(3, 6), (6, 9)], [(0, 3), (3, 6), (6, 9), (9, 12)], [-1, 0, 1, -1], [0, ONE, ONE, 0]),
    ],
)
def test_groups(teacher, student, target, kind):
    assert run(teacher, student) == (target, kind)


def test_context_and_one_to_one_mode():
    three = [(0, 3), (3, 6), (6, 9)]
    assert run(three, three, context_len=2)[0] == [-1, -1, 2]
    assert run([(0, 3), (3, 6)], [(0, 6)], mode="one_to_one")[0] == [-1]
    assert run([(0, 3), (3, 6), (6, 9)], [(0, 3), (3, 9)], mode="one_to_one") == ([0, -1], [ONE, N_ONE, N_ONE][:2])
    with pytest.raises(ValueError, match="unknown sequence alignment mode"):
        run(three, three, mode="first")


def reference(t_ends, s_ends):
    """Two pointers: student j is a target iff some teacher token ends where j ends."""
    out, i = [], 0
    for e in s_ends:
        while i < len(t_ends) and t_ends[i] < e:
            i += 1
        out.append(i if i < len(t_ends) and t_ends[i] == e else -1)
    return out


@given(st.integers(1, 60).flatmap(lambda n: st.tuples(st.just(n), st.sets(st.integers(1, n - 1)) if n > 1 else st.just(set()),
                                                     st.sets(st.integers(1, n - 1)) if n > 1 else st.just(set()))))
@settings(max_examples=300, deadline=None)
def test_random_segmentations_match_two_pointer_reference(case):
    n, cuts_t, cuts_s = case
    t_b = [0, *sorted(cuts_t), n]
    s_b = [0, *sorted(cuts_s), n]
    target, kind = align_offsets(np.array(t_b[:-1]), np.array(t_b[1:]), np.array(s_b[:-1]), np.array(s_b[1:]))
    assert target.tolist() == reference(t_b[1:], s_b[1:])
    assert target[-1] == len(t_b) - 2  # the text's end is always a common boundary
    assert (kind > 0).all()  # every student token is in a closed group
    one = kind == ONE
    # A 1:1 group is a student token with exactly the span of a teacher token.
    t_spans = set(zip(t_b[:-1], t_b[1:]))
    assert one.tolist() == [(a, b) in t_spans for a, b in zip(s_b[:-1], s_b[1:])]


def flat(col) -> np.ndarray:
    off = col.offsets.to_numpy()
    return col.values.to_numpy()[off[0]:off[-1]].astype(np.int64)


# -- real tokenizers -----------------------------------------------------------------------
KINDS3 = ("bpe", "wordpiece", "unigram")


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    toks = corpus_tokenizers()
    # Non-ASCII text, full-width and ASCII digits, whitespace runs, Latin letters.
    texts = [s.text for s in peoples_daily("validation")[:30]] + ["1998年，中国  ABC 北京市长江大桥 ok", "  多个   空格\t和\n换行 "]
    root = tmp_path_factory.mktemp("seq_stores")
    return {k: synthetic_store(root / k, toks[k], texts, k=4, max_tokens=100_000, seed=3) for k in KINDS3}


@pytest.mark.parametrize("kind", KINDS3)
def test_same_tokenizer_is_identity(stores, kind):
    store = stores[kind]
    tok = corpus_tokenizers()[kind]
    batch = next(store.iter_batches(batch_rows=64))
    d = store.decode(batch)
    for al in (None, VocabAlignment.build(store, tok, policy="first_piece", compact=True)):
        rows = SequenceAligner(student=tok, alignment=al).align_batch(store, batch)
        assert np.array_equal(rows.positions, d.positions)
        assert np.array_equal(rows.input_ids, d.input_ids)
        assert np.array_equal(rows.teacher_pos, np.arange(len(d.counts)))
        assert rows.stats["targets"] == rows.stats["student_tokens"] == rows.stats["in_1:1"]
        keep = d.indices < len(tok)  # padding rows go to the tail under an alignment
        assert np.array_equal(rows.indices, d.indices if al is None else d.indices[keep])


@pytest.mark.parametrize("t_kind, s_kind", [(a, b) for a in KINDS3 for b in KINDS3 if a != b])
def test_cross_tokenizer_targets_share_the_text_prefix(stores, t_kind, s_kind):
    store = stores[t_kind]
    tok = corpus_tokenizers()[s_kind]
    batch = next(store.iter_batches(batch_rows=64))
    d = store.decode(batch)
    t_end = flat(batch.column("byte_end"))
    al = VocabAlignment.build(store, tok, policy="split")
    rows = SequenceAligner(student=tok, alignment=al).align_batch(store, batch)
    m = rows.target_mask
    assert 0.5 < m.mean() < 1.0  # different tokenizers: most but not all positions aligned
    tp = rows.teacher_pos[m]
    ordinary = rows.byte_end[m] > rows.byte_start[m]
    # Every target comes from a teacher token ending exactly where the student token ends ...
    assert np.array_equal(rows.byte_end[m][ordinary], t_end[tp][ordinary])
    # ... of the same row, and the ids the student sees are its own tokenization.
    row_of_t = np.searchsorted(d.positions, tp, side="right") - 1
    row_of_s = np.searchsorted(rows.positions, np.flatnonzero(m), side="right") - 1
    assert np.array_equal(row_of_t, row_of_s)
    texts = batch.column("text").to_pylist()
    for r in range(len(texts)):
        ids = tok.backend_tokenizer.encode(texts[r], add_special_tokens=False).ids
        assert rows.input_ids[rows.positions[r]:rows.positions[r + 1]].tolist() == ids
    # Targets are distributions in the aligned vocabulary: kept + tail = 1, masked = empty.
    pos = np.repeat(np.arange(len(rows.counts)), rows.counts)
    total = np.bincount(pos, weights=rows.probs, minlength=len(rows.counts)) + rows.tail
    assert np.allclose(total[m], 1.0, atol=1e-5) and (rows.counts[~m] == 0).all() and (rows.tail[~m] == 0).all()
    assert (rows.indices < al.vocab_size).all()


def test_store_without_text_is_rejected(tmp_path):
    tok = corpus_tokenizers()["bpe"]
    store = synthetic_store(tmp_path / "s", tok, ["中国人民"], offsets=False)
    with pytest.raises(ValueError, match="re-run the capture with text and offsets stored"):
        SequenceAligner(student=tok).align_batch(store, next(store.iter_batches()))


def test_sliced_batches_align_like_whole_ones(stores):
    # Record batches sliced out of a larger one keep their parent's list values.
    store = stores["bpe"]
    tok = corpus_tokenizers()["wordpiece"]
    batch = next(store.iter_batches(batch_rows=64))
    aligner = SequenceAligner(student=tok)
    whole = aligner.align_batch(store, batch)
    part = aligner.align_batch(store, batch.slice(5, 7))
    s0, s1 = whole.positions[5], whole.positions[12]
    assert np.array_equal(part.input_ids, whole.input_ids[s0:s1])
    assert np.array_equal(part.target_mask, whole.target_mask[s0:s1])
    assert np.array_equal(part.probs, whole.probs[np.sum(whole.counts[:s0]):np.sum(whole.counts[:s1])])
