"""Vocabulary alignment: rules, policies, vectorised remapping vs a slow reference, mass
conservation, persistence and the dataset hook — on tokenizers trained on People's Daily."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kdstore
from kdstore.align import POLICIES, TeacherVocab, VocabAlignment, canonicalize, load_student, scan_store
from align_synth import corpus_tokenizers, synthetic_store
from kdstore.align.canonical import byte_decoder
from trainer.data.corpora import peoples_daily

B2U = {b: c for c, b in byte_decoder().items()}
KINDS = ("bpe", "wordpiece", "unigram")


def bl(text: str) -> str:
    return "".join(B2U[b] for b in text.encode("utf-8"))


def teacher(tokens: list[str], special: set[int] = frozenset(), *, convention: str, vocab_size: int | None = None) -> TeacherVocab:
    table = kdstore.vocab_table(ids=list(range(len(tokens))), tokens=tokens, token_bytes=[b""] * len(tokens),
                                special=[i in special for i in range(len(tokens))])
    return TeacherVocab.from_table(table, vocab_size=vocab_size, convention=convention)


def reference_map(al: VocabAlignment, indices, probs, counts):
    """Obviously-correct per-position remap: list of {aligned id: prob}, extra tail."""
    out, extra, e = [], [], 0
    for c in counts:
        acc: dict[int, float] = {}
        lost = 0.0
        for i, p in zip(indices[e : e + c], probs[e : e + c]):
            tg = al.targets(int(i))
            if not tg:
                lost += float(p)
            for a, w in tg:
                acc[a] = acc.get(a, 0.0) + float(p) * w
        out.append(acc)
        extra.append(lost)
        e += c
    return out, np.array(extra)


def as_dicts(indices, probs, counts):
    out, e = [], 0
    for c in counts:
        d: dict[int, float] = {}
        for i, p in zip(indices[e : e + c], probs[e : e + c]):
            assert int(i) not in d, "duplicate aligned id within a position"
            d[int(i)] = float(p)
        out.append(d)
        e += c
    return out


def summed_dicts(indices, probs, counts):
    """Per position {aligned id: summed prob}, ignoring probability-0 (padding-like) entries."""
    out, e = [], 0
    for c in counts:
        d: dict[int, float] = {}
        for i, p in zip(indices[e : e + c], probs[e : e + c]):
            if p != 0:
                d[int(i)] = d.get(int(i), 0.0) + float(p)
        out.append(d)
        e += c
    return out


@pytest.fixture(scope="module")
def toks():
    return corpus_tokenizers()


@pytest.fixture(scope="module")
def stores(toks, tmp_path_factory):
    texts = [s.text for s in peoples_daily("validation")[:40]]
    root = tmp_path_factory.mktemp("align_stores")
    return {k: synthetic_store(root / k, toks[k], texts, k=8, mode="top_p", seed=1) for k in KINDS}


# -- same tokenizer: identity -------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("policy", POLICIES)
def test_same_tokenizer_is_identity(stores, toks, kind, policy):
    store = stores[kind]
    al = VocabAlignment.build(store, toks[kind], policy=policy, compact=True)
    inplace = VocabAlignment.build(store, toks[kind], policy=policy)
    n = len(toks[kind])
    V = store.manifest.teacher.vocab_size
    assert V > n  # the synthetic teacher pads its vocabulary
    assert al.vocab_size == n and not al.new_tokens
    assert (al.rules[:n] == "exact").all() and (al.rules[n:] == "padding").all()
    assert np.array_equal(al.map_inputs(np.arange(n)), np.arange(n))
    for batch in store.iter_batches(batch_rows=16):
        d = store.decode(batch)
        idx, p, c, extra = al.map_targets(d.indices, d.probs, d.counts)
        pad = d.indices >= n
        # Identity except padding rows, whose mass goes to the tail.
        assert np.array_equal(idx, d.indices[~pad]) and np.array_equal(p, d.probs[~pad])
        pos = np.repeat(np.arange(len(d.counts)), d.counts)
        assert np.allclose(extra, np.bincount(pos[pad], weights=d.probs[pad], minlength=len(d.counts)))
        assert np.array_equal(c, d.counts - np.bincount(pos[pad], minlength=len(d.counts)))
        # In place (the default): same layout, padding-row entries become (0, 0.0).
        i3, p3, c3, x3 = inplace.map_targets(d.indices, d.probs, d.counts)
        assert np.array_equal(c3, d.counts) and np.array_equal(x3, extra)
        assert np.array_equal(i3, np.where(pad, 0, d.indices)) and np.array_equal(p3, np.where(pad, 0, d.probs))


# -- cross-tokenizer pairs ----------------------------------------------------------------
@pytest.mark.parametrize("t_kind, s_kind", [(a, b) for a in KINDS for b in KINDS if a != b])
def test_cross_pair_matches_are_the_same_text(stores, toks, t_kind, s_kind):
    store = stores[t_kind]
    al = VocabAlignment.build(store, toks[s_kind], policy="first_piece")
    tv = TeacherVocab.from_store(store)
    s = load_student(toks[s_kind])
    rules = al.rules
    cov = al.coverage()
    assert sum(v["count"] for v in cov.values()) == tv.vocab_size
    assert cov["exact"]["count"] == sum(1 for t in range(len(tv.tokens)) if rules[t] == "exact")
    n_canon = 0
    for t, tok in enumerate(tv.tokens):
        if rules[t] != "canonical":
            continue
        n_canon += 1
        (a, w), = al.targets(t)
        # A canonical match stands for exactly the same bytes of text.
        assert canonicalize(tok, tv.convention).data == canonicalize(s.tokens[a], s.convention).data
        assert w == 1.0 and al.map_inputs(np.array([t]))[0] == a
    assert n_canon > 500  # both vocabularies hold the corpus' common characters
    for t in np.flatnonzero(rules == "exact"):
        assert tv.special[t] and s.tokens[al.targets(int(t))[0][0]] == tv.tokens[t]  # only specials across conventions


def test_wordpiece_to_bpe_covers_nearly_everything(stores, toks):
    # WordPiece words and ##-characters are mostly byte-level BPE tokens too (a continuation
    # "##中" is the unmarked BPE "中"): measured 97 % of the vocabulary rows.
    al = VocabAlignment.build(stores["wordpiece"], toks["bpe"], policy="tail")
    cov = al.coverage()
    matched = sum(cov[r]["count"] for r in ("exact", "canonical", "special", "tokenizer"))
    assert matched / len(toks["wordpiece"]) > 0.9


# -- hand-built edge cases ------------------------------------------------------------------
def _pieces(toks, kind, text):
    return toks[kind].backend_tokenizer.encode(text, add_special_tokens=False).ids


def test_policies_for_a_token_the_student_splits(toks):
    # Byte-level teacher: specials, CJK, a word the student splits, whitespace runs, ASCII
    # digits (the corpus writes digits full-width: WordPiece spells them [UNK]), a fragment
    # of a UTF-8 character.
    tokens = ["<|endoftext|>", "<|pad|>", bl("中"), bl("北京市"), bl(" "), bl("  "), bl("1998"), "ä¸", bl("中国")]
    tv = teacher(tokens, {0, 1}, convention="byte_level", vocab_size=12)
    wp = load_student(toks["wordpiece"])
    unk = wp.roles["unk"]
    bj = _pieces(toks, "wordpiece", "北京市")
    assert len(bj) >= 2 and unk not in bj  # the student splits it
    assert _pieces(toks, "wordpiece", "1998") == [unk] * 4
    by = {p: VocabAlignment.build(tv, toks["wordpiece"], policy=p, compact=True) for p in POLICIES}
    for p, al in by.items():
        r = al.rules.tolist()
        assert r[0] == "special" and wp.tokens[al.targets(0)[0][0]] == "[SEP]"  # eos role
        assert r[1] == "special" and wp.tokens[al.targets(1)[0][0]] == "[PAD]"
        # Unmarked byte-level pieces prefer WordPiece continuations (§1 of docs/alignment.md):
        # in this WordPiece a Han run between punctuation is one word, so most are ##-pieces.
        assert r[2] == r[8] == "canonical" and [wp.tokens[al.targets(t)[0][0]] for t in (2, 8)] == ["##中", "##中国"]
        assert r[9:] == ["padding"] * 3 and all(al.targets(t) == [] for t in (9, 10, 11))
        if p != "extend":
            assert r[4] == r[5] == r[7] == "unmappable"  # whitespace and a byte fragment: WordPiece has no spelling
            assert al.targets(4) == al.targets(7) == []
            assert al.map_inputs(np.array([3, 6, 4])).tolist() == [bj[0], unk, unk]
    assert by["first_piece"].targets(3) == [(bj[0], 1.0)] and by["first_piece"].targets(6) == [(unk, 1.0)]
    assert by["split"].targets(3) == [(i, pytest.approx(1 / len(bj))) for i in sorted(bj)]
    assert by["split"].targets(6) == [(unk, 1.0)]  # four [UNK] pieces merge into one
    assert by["tail"].targets(3) == [] and by["tail"].rules[3] == "tail"
    ext = by["extend"]
    n = wp.vocab_size
    assert ext.vocab_size == n + 5  # 北京市, two whitespace runs, 1998, the fragment
    assert [t["teacher_id"] for t in ext.new_tokens] == [3, 4, 5, 6, 7]
    assert [t["aligned_id"] for t in ext.new_tokens] == list(range(n, n + 5))
    assert ext.new_tokens[0]["pieces"] == bj and ext.new_tokens[0]["token"] == bl("北京市")
    assert ext.targets(3) == [(n, 1.0)] and ext.map_inputs(np.array([3, 7])).tolist() == [n, n + 4]
    # Mass of one position over all of them: each policy puts it where it said.
    idx = np.array([0, 2, 3, 4, 6, 10])
    pr = np.array([0.3, 0.2, 0.2, 0.1, 0.1, 0.05], dtype=np.float32)
    cnt = np.array([6])
    for p, al in by.items():
        i2, p2, c2, x = al.map_targets(idx, pr, cnt)
        got = dict(zip(i2.tolist(), p2.tolist()))
        assert c2.tolist() == [len(got)]
        assert sum(got.values()) + x[0] == pytest.approx(0.95, abs=1e-6)
        sep, canon = wp.roles["eos"], al.targets(2)[0][0]
        assert got[sep] == pytest.approx(0.3) and got[canon] == pytest.approx(0.2)
        if p == "first_piece":
            assert got[bj[0]] == pytest.approx(0.2) and got[unk] == pytest.approx(0.1) and x[0] == pytest.approx(0.15)
        elif p == "split":
            assert [got[i] for i in bj] == [pytest.approx(0.2 / len(bj))] * len(bj) and x[0] == pytest.approx(0.15)
        elif p == "tail":
            assert x[0] == pytest.approx(0.45)
        else:
            assert got[n] == pytest.approx(0.2) and got[n + 1] == pytest.approx(0.1) and x[0] == pytest.approx(0.05)


def test_many_teacher_tokens_to_one_student_token_are_summed(toks):
    # WordPiece teacher: "中" (word start) and "##中" (continuation) are both the student's 中.
    # Specials by role: the byte-level student's <|endoftext|> is its unk and bos (cls falls
    # back to bos); it has no mask token.
    tv = teacher(["[PAD]", "[UNK]", "[CLS]", "中", "##中", "国", "[MASK]"], {0, 1, 2, 6}, convention="wordpiece")
    bpe = load_student(toks["bpe"])
    al = VocabAlignment.build(tv, toks["bpe"], policy="first_piece", compact=True)
    zh, eot = bpe.tokens.index(bl("中")), bpe.tokens.index("<|endoftext|>")
    assert al.targets(3) == al.targets(4) == [(zh, 1.0)] and al.rules[[3, 4]].tolist() == ["canonical"] * 2
    assert al.rules[[0, 1, 2, 6]].tolist() == ["special", "special", "special", "unmappable"]
    assert al.targets(1) == al.targets(2) == [(eot, 1.0)] and al.targets(0) == [(bpe.roles["pad"], 1.0)]
    i, p, c, x = al.map_targets(np.array([3, 4, 1, 6, 4, 5]), np.array([0.5, 0.25, 0.125, 0.0625, 0.5, 0.25], np.float32),
                                np.array([4, 2]))
    assert c.tolist() == [2, 2] and x.tolist() == [0.0625, 0.0]
    assert dict(zip(i[:2].tolist(), p[:2].tolist())) == {zh: 0.75, eot: 0.125}
    assert dict(zip(i[2:].tolist(), p[2:].tolist()))[zh] == 0.5
    # In place (default layout): same counts, the merged-away entry is (0, 0.0).
    i, p, c, x = VocabAlignment.build(tv, toks["bpe"], policy="first_piece").map_targets(
        np.array([3, 4, 1, 6]), np.array([0.5, 0.25, 0.125, 0.0625], np.float32), np.array([4]))
    assert c.tolist() == [4] and i.tolist() == [zh, 0, eot, 0] and p.tolist() == [0.75, 0.0, 0.125, 0.0]


def test_byte_fragments_are_spelled_with_student_bytes(toks):
    # A byte-level fragment (first two bytes of 😀) that the Chinese-trained BPE student has
    # no merged token for is spelled by its single-byte tokens, a Unigram student by its
    # <0xNN> byte-fallback pieces; WordPiece (no byte tokens) cannot spell it.
    frag = "".join(B2U[b] for b in "😀".encode()[:2])
    tv = teacher(["<pad>", frag], {0}, convention="byte_level")
    bpe, uni = load_student(toks["bpe"]), load_student(toks["unigram"])
    assert frag not in bpe.tokens
    al = VocabAlignment.build(tv, toks["bpe"], policy="split")
    singles = [bpe.tokens.index(B2U[b]) for b in "😀".encode()[:2]]
    assert al.rules[1] == "split" and al.targets(1) == [(i, 0.5) for i in sorted(singles)]
    al = VocabAlignment.build(tv, toks["unigram"], policy="split")
    assert al.targets(1) == [(i, 0.5) for i in sorted(uni.tokens.index(f"<0x{b:02X}>") for b in "😀".encode()[:2])]
    assert VocabAlignment.build(tv, toks["wordpiece"], policy="split").rules[1] == "unmappable"


def test_tokenizer_rule_uses_the_student_normalizer():
    # A lowercasing student: the teacher's "AB" has no canonical match (the student only has
    # "ab") but the student spells it as that one piece -> "tokenizer". "CD" is [UNK] for the
    # student: not a match, so the policy applies (tail).
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "ab": 1, "x": 2}, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["[UNK]"])
    tv = teacher(["AB", "CD", "x"], convention="plain")
    al = VocabAlignment.build(tv, tok, policy="tail")
    assert al.rules.tolist() == ["tokenizer", "tail", "exact"]
    assert al.targets(0) == [(1, 1.0)] and al.map_inputs(np.array([1]))[0] == 0


# -- vectorised remap == reference; mass conserved ----------------------------------------
@pytest.fixture(scope="module")
def cross_alignments(stores, toks):
    return {(p, s): VocabAlignment.build(stores["bpe"], toks[s], policy=p, compact=True) for p in POLICIES for s in ("wordpiece", "unigram")}


@st.composite
def sparse_rows(draw, vocab: int):
    n_pos = draw(st.integers(0, 6))
    idx, probs, counts = [], [], []
    for _ in range(n_pos):
        ids = draw(st.lists(st.integers(0, vocab - 1), unique=True, min_size=0, max_size=10))
        ps = draw(st.lists(st.floats(0.0, 1.0, width=32), min_size=len(ids), max_size=len(ids)))
        idx += ids
        probs += ps
        counts.append(len(ids))
    return np.array(idx, np.int64), np.array(probs, np.float32), np.array(counts, np.int64)


@pytest.mark.parametrize("compact", [True, False])
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("student", ["wordpiece", "unigram"])
def test_map_targets_matches_reference(cross_alignments, stores, policy, student, compact):
    al = cross_alignments[(policy, student)]
    al = VocabAlignment(**{**{k: getattr(al, k) for k in ("policy", "vocab_size", "student_vocab_size", "rule_codes", "ptr",
                                                          "col", "weight", "input_map", "new_tokens", "meta")},
                           "compact": compact})
    V = stores["bpe"].manifest.teacher.vocab_size
    # Bias draws to ids whose rule is not a plain 1:1 match, so every rule is exercised.
    interesting = np.flatnonzero(~np.isin(al.rules, ["exact", "canonical"]))

    @given(sparse_rows(V), st.lists(st.sampled_from(interesting.tolist()), max_size=6))
    @settings(max_examples=60, deadline=None)
    def check(rows, extra_ids):
        idx, probs, counts = rows
        if extra_ids and len(counts):
            add = np.array([i for i in dict.fromkeys(extra_ids) if i not in set(idx[-counts[-1]:].tolist())] if counts[-1] else list(dict.fromkeys(extra_ids)), np.int64)
            idx = np.concatenate([idx, add])
            probs = np.concatenate([probs, np.full(len(add), 0.01, np.float32)])
            counts = counts.copy()
            counts[-1] += len(add)
        i2, p2, c2, x = al.map_targets(idx, probs, counts)
        ref, ref_x = reference_map(al, idx, probs, counts)
        if compact or policy == "split":
            got = as_dicts(i2, p2, c2)  # no duplicate ids, no leftovers
        else:
            got = summed_dicts(i2, p2, c2)  # in place: same layout, dropped entries are (0, 0.0)
            assert np.array_equal(c2, counts)
            # Exactly one entry per (position, aligned id) carries probability.
            assert all(len(d) == int(((p2[e0:e0 + c] != 0)).sum()) for d, e0, c in zip(got, np.cumsum(c2) - c2, c2))
            ref = [{k: v for k, v in r.items() if v != 0} for r in ref]
        assert len(got) == len(ref) == len(x)
        for g, r in zip(got, ref):
            assert g.keys() == r.keys()
            for k in r:
                assert g[k] == pytest.approx(r[k], rel=1e-5, abs=1e-7)
        assert np.allclose(x, ref_x, atol=1e-6)
        # Mass conservation per position.
        before = np.bincount(np.repeat(np.arange(len(counts)), counts), weights=probs, minlength=len(counts))
        after = np.bincount(np.repeat(np.arange(len(c2)), c2), weights=p2, minlength=len(c2)) + x
        assert np.allclose(after, before, atol=1e-5)
        assert i2.dtype == np.int64 and p2.dtype == np.float32 and x.dtype == np.float32
        assert (i2 < al.vocab_size).all()

    check()


def test_mass_conserved_on_a_whole_store(stores, cross_alignments):
    store = stores["bpe"]
    for al in cross_alignments.values():
        for batch in store.iter_batches(batch_rows=16):
            d = store.decode(batch)
            i2, p2, c2, x = al.map_targets(d.indices, d.probs, d.counts)
            after = np.bincount(np.repeat(np.arange(len(c2)), c2), weights=p2, minlength=len(c2)) + x + d.tail
            assert np.allclose(after, 1.0, atol=1e-5)  # remapped + tail = stored + tail = 1


def test_map_errors(cross_alignments):
    al = cross_alignments[("split", "wordpiece")]
    with pytest.raises(ValueError, match="another teacher"):
        al.map_targets(np.array([al.teacher_vocab_size]), np.array([1.0], np.float32), np.array([1]))
    with pytest.raises(ValueError, match="counts sum"):
        al.map_targets(np.array([1, 2]), np.array([0.5, 0.5], np.float32), np.array([1]))
    with pytest.raises(ValueError, match="outside the teacher vocabulary"):
        al.map_inputs(np.array([-1]))
    with pytest.raises(ValueError, match="unknown alignment policy"):
        VocabAlignment.build(TeacherVocab.from_table(kdstore.vocab_table(ids=[0], tokens=["a"], token_bytes=[b"a"], special=[False])),
                             load_student(corpus_tokenizers()["bpe"]), policy="nearest")


# -- extend restricted to used tokens ---------------------------------------------------------
def test_extend_only_used_teacher_tokens(stores, toks):
    store = stores["bpe"]
    usage = scan_store(store, progress=False)
    full = VocabAlignment.build(store, toks["wordpiece"], policy="extend")
    used = VocabAlignment.build(store, toks["wordpiece"], policy="extend", used=usage.used)
    assert 0 < len(used.new_tokens) < len(full.new_tokens)
    new_ids = {t["teacher_id"] for t in used.new_tokens}
    assert all(usage.used[t] for t in new_ids)
    assert np.isin(used.rules[~usage.used & (full.rules == "extend")], ["tail", "unmappable"]).all()
    # Every id the store actually uses maps the same way as with the full extension.
    d = store.decode(next(store.iter_batches(batch_rows=8)))
    a = full.map_targets(d.indices, d.probs, d.counts)
    b = used.map_targets(d.indices, d.probs, d.counts)
    assert np.allclose(a[3], b[3]) and np.array_equal(a[2], b[2])


# -- persistence ------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".json", ".parquet"])
def test_save_load_round_trip(tmp_path, stores, toks, suffix):
    store = stores["bpe"]
    al = VocabAlignment.build(store, toks["wordpiece"], policy="extend")
    path = al.save(tmp_path / f"align{suffix}")
    back = VocabAlignment.load(path, store=store, student=toks["wordpiece"])
    for name in ("rule_codes", "ptr", "col", "weight", "input_map"):
        assert np.array_equal(getattr(back, name), getattr(al, name)), name
    assert back.vocab_size == al.vocab_size and back.new_tokens == al.new_tokens and back.policy == "extend"
    d = store.decode(next(store.iter_batches(batch_rows=8)))
    for x, y in zip(al.map_targets(d.indices, d.probs, d.counts), back.map_targets(d.indices, d.probs, d.counts)):
        assert np.array_equal(x, y)
    with pytest.raises(ValueError, match="another teacher"):
        VocabAlignment.load(path, store=stores["unigram"])
    with pytest.raises(ValueError, match="another student"):
        VocabAlignment.load(path, student=toks["unigram"])
    (tmp_path / f"bad{suffix}").write_text("{}" if suffix == ".json" else "not parquet")
    with pytest.raises(ValueError, match="not a kdstore alignment"):
        VocabAlignment.load(tmp_path / f"bad{suffix}")
    with pytest.raises(FileNotFoundError):
        VocabAlignment.load(tmp_path / "missing.parquet")


# -- the dataset hook ---------------------------------------------------------------------------
@pytest.mark.parametrize("policy", ["split", "extend"])
def test_dataset_yields_batches_in_aligned_space(stores, toks, policy):
    pytest.importorskip("torch")
    from kdstore.dataset import SoftLabelDataset

    store = stores["bpe"]
    al = VocabAlignment.build(store, toks["wordpiece"], policy=policy)
    ds = SoftLabelDataset(store, batch_size=8, shuffle=False, remap=al)
    plain = SoftLabelDataset(store, batch_size=8, shuffle=False)
    for b, ref in zip(ds, plain):
        m = ref["attention_mask"]
        assert (b["kd_indices"] < al.vocab_size).all()
        assert np.array_equal(b["input_ids"][m].numpy(), al.map_inputs(ref["input_ids"][m].numpy()))
        total = b["kd_probs"].sum(-1) + b["kd_tail"]
        assert np.allclose(total[m].numpy(), 1.0, atol=1e-5)
        # Dense check against the reference remap, position by position.
        r_idx, r_p, r_t = ref["kd_indices"][m].numpy(), ref["kd_probs"][m].numpy(), ref["kd_tail"][m].numpy()
        g_idx, g_p, g_t = b["kd_indices"][m].numpy(), b["kd_probs"][m].numpy(), b["kd_tail"][m].numpy()
        for q in range(0, len(r_idx), 7):
            keep = r_p[q] > 0
            want, lost = reference_map(al, r_idx[q][keep], r_p[q][keep], [int(keep.sum())])
            dense = np.zeros(al.vocab_size)
            np.add.at(dense, g_idx[q], g_p[q])
            for a, v in want[0].items():
                assert dense[a] == pytest.approx(v, rel=1e-5, abs=1e-7)
            assert dense.sum() == pytest.approx(sum(want[0].values()), abs=1e-5)
            assert g_t[q] == pytest.approx(r_t[q] + lost[0], abs=1e-6)
