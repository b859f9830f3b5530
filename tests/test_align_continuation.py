"""The ``continuation`` third vocabulary (kdstore.align.continuation): hand-computed weights, a
brute force over a real tokenizer pair, save/load, and its refusals."""

from __future__ import annotations

import types

import numpy as np
import pytest

from kdstore.align import VocabAlignment
from kdstore.align.continuation import (build_continuation, student_token_counts, store_texts, whole_characters,
                                        with_continuations)
from kdstore.align.student import load_student
from test_align_groups import pair  # noqa: F401  (BPE teacher store with text, Unigram student)


def _alignment(targets, *, policy="first_piece", student_vocab=6):
    ptr = np.zeros(len(targets) + 1, dtype=np.int64)
    np.cumsum([len(t) for t in targets], out=ptr[1:])
    return VocabAlignment(policy=policy, vocab_size=student_vocab, student_vocab_size=student_vocab,
                          rule_codes=np.zeros(len(targets), np.uint8), ptr=ptr,
                          col=np.array([s for t in targets for s, _ in t], np.int64),
                          weight=np.array([w for t in targets for _, w in t], np.float32),
                          input_map=np.zeros(len(targets), np.int64))


def test_hand_example():
    # student tokens: 0 "<unk>" (special), 1 "中", 2 "中国", 3 "中国人", 4 "美", 5 "国"
    student = types.SimpleNamespace(tokens=["<unk>", "中", "中国", "中国人", "美", "国"], convention="plain",
                                    special=np.array([True, False, False, False, False, False]))
    counts = np.array([0, 2, 6, 2, 5, 0], dtype=np.float64)
    # teacher 0 -> 中, 1 -> 美, 2 -> 国 (never emitted: kept as is), 3 -> split over two, 4 -> tail
    al = _alignment([[(1, 1.0)], [(4, 1.0)], [(5, 1.0)], [(1, 0.5), (4, 0.5)], []])
    c = with_continuations(al, student, counts, counted_tokens=15)
    rows = [list(zip(c.col[c.ptr[t]:c.ptr[t + 1]].tolist(), np.round(c.weight[c.ptr[t]:c.ptr[t + 1]].astype(np.float64), 6).tolist()))
            for t in range(5)]
    assert rows[0] == [(1, 0.2), (2, 0.6), (3, 0.2)]  # 中 continues as 中 (2), 中国 (6), 中国人 (2)
    assert rows[1] == [(4, 1.0)]
    assert rows[2] == [(5, 1.0)] and rows[3] == [(1, 0.5), (4, 0.5)] and rows[4] == []
    assert c.policy == "continuation" and c.meta["continuation"] == {"counted_tokens": 15, "spread_ids": 1, "fragments_kept": 0}
    # mass is conserved through map_targets: teacher 0 with p = 0.5 -> 0.1 / 0.3 / 0.1
    idx, p, cnt, extra = c.map_targets(np.array([0, 4]), np.array([0.5, 0.25], np.float32), np.array([2]))
    assert cnt.tolist() == [3] and idx.tolist() == [1, 2, 3]
    np.testing.assert_allclose(p, [0.1, 0.3, 0.1], rtol=1e-6)
    np.testing.assert_allclose(extra, [0.25], rtol=1e-6)
    with pytest.raises(ValueError, match="first_piece"):
        with_continuations(_alignment([[(1, 1.0)]], policy="tail"), student, counts)


def test_a_byte_fragment_keeps_its_first_piece():
    # Byte-level student: 1 "ä" is the lone byte 0xE4 (the lead byte of 中, 丝, 乐, ...),
    # 2 "ä¸Ń" = 中, 3 "ä¸ŃåĽ½" = 中国, 4 "ç¾İ" = 美. A teacher token whose first piece is the
    # fragment would otherwise be spread over every character with that lead byte.
    student = types.SimpleNamespace(tokens=["<unk>", "ä", "ä¸Ń", "ä¸ŃåĽ½", "ç¾İ"], convention="byte_level",
                                    special=np.array([True, False, False, False, False]))
    assert not whole_characters("ä", "byte_level") and whole_characters("ä¸Ń", "byte_level")
    counts = np.array([0, 1, 3, 1, 4], dtype=np.float64)
    al = _alignment([[(1, 1.0)], [(2, 1.0)], [(4, 1.0)]], student_vocab=5)
    c = with_continuations(al, student, counts)
    rows = [dict(zip(c.col[c.ptr[t]:c.ptr[t + 1]].tolist(), c.weight[c.ptr[t]:c.ptr[t + 1]].tolist())) for t in range(3)]
    assert rows[0] == {1: 1.0}  # the fragment: not spread over 中 / 中国
    assert rows[1] == pytest.approx({2: 0.75, 3: 0.25}) and rows[2] == {4: 1.0}
    assert c.meta["continuation"]["fragments_kept"] == 1 and c.meta["continuation"]["spread_ids"] == 1


def test_matches_a_brute_force_on_real_tokenizers(pair, tmp_path):  # noqa: F811
    store, student, _ = pair
    st = load_student(student)
    c = build_continuation(store, student)
    fp = VocabAlignment.build(store, student, policy="first_piece")
    texts = store_texts(store)
    counts, n = student_token_counts(st, texts, vocab_size=fp.student_vocab_size)
    assert n > 0 and c.meta["continuation"]["counted_tokens"] == n
    # the counts are of the ids the aligner reads (encode_offsets), counted without offsets
    direct = np.bincount(np.concatenate([ids for ids, _, _ in st.encode_offsets(texts)]), minlength=fp.student_vocab_size)
    assert np.array_equal(counts, direct[: fp.student_vocab_size]) and n == int(direct.sum())
    spread = 0
    for t in range(fp.teacher_vocab_size):
        a, b = fp.ptr[t], fp.ptr[t + 1]
        got = dict(zip(c.col[c.ptr[t]:c.ptr[t + 1]].tolist(), c.weight[c.ptr[t]:c.ptr[t + 1]].tolist()))
        if b - a != 1 or st.special[fp.col[a]]:
            assert got == dict(zip(fp.col[a:b].tolist(), fp.weight[a:b].tolist()))
            continue
        first = st.tokens[int(fp.col[a])]
        want = {s: counts[s] for s, w in enumerate(st.tokens) if w.startswith(first) and not st.special[s] and counts[s] > 0}
        if not want or not whole_characters(first, st.convention):
            assert got == {int(fp.col[a]): 1.0}
            continue
        z = sum(want.values())
        assert got.keys() == want.keys() and all(abs(got[s] - want[s] / z) < 1e-6 for s in want)
        spread += len(want) > 1
    assert spread > 10
    back = VocabAlignment.load(c.save(tmp_path / "c.parquet"), store=store, student=student)
    assert back.policy == "continuation" and np.array_equal(back.col, c.col) and np.allclose(back.weight, c.weight)

