"""Segmenters, the pair sampler and the word/char vocabulary (trainer/segment.py)."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trainer.classify.segment import (
    BPEDropoutSegmenter,
    SegmentationSampler,
    Vocab,
    char_segment,
    default_word_segmenter,
    mixed_segment,
    random_cut,
)

# Chinese characters, ASCII letters/digits, punctuation and whitespace: what reviews contain.
TEXT = st.text(
    alphabet=st.sampled_from(list("南京市长江大桥我喜欢质量不错很好的东西，。！? abcXYZ019 \t")), min_size=1, max_size=40
)


@pytest.fixture(scope="module")
def sampler() -> SegmentationSampler:
    # Many redraws so a stochastic granularity practically never collides for lack of tries.
    return SegmentationSampler(granularities=("word", "mixed", "random", "char"), p_split=0.5, p_cut=0.3, max_tries=60)


@pytest.fixture(scope="module")
def bpe() -> BPEDropoutSegmenter:
    from trainer.data.corpora import sentiment

    texts = [r.text for r in sentiment("validation")[:1500]]
    return BPEDropoutSegmenter.train(texts, vocab_size=4000, dropout=0.3)


def test_golden_granularities_of_the_seed_example(sampler):
    text = "南京市长江大桥"
    assert char_segment(text) == ("南", "京", "市", "长", "江", "大", "桥")
    assert sampler.segment(text, "word", rng=random.Random(0)) == ("南京市", "长江大桥")  # jieba
    gold = ("南京", "市", "长江", "大桥")
    assert sampler.segment(text, "word", rng=random.Random(0), words=gold) == gold
    assert sampler.segment(text, "jieba", rng=random.Random(0), words=gold) == ("南京市", "长江大桥")
    assert mixed_segment(gold, random.Random(0), p_split=0.0) == gold
    assert mixed_segment(gold, random.Random(0), p_split=1.0) == char_segment(text)
    assert random_cut(text, random.Random(0), p_cut=0.0) == (text,)
    assert random_cut(text, random.Random(0), p_cut=1.0) == char_segment(text)


@settings(max_examples=60, deadline=None)
@given(text=TEXT, seed=st.integers(0, 2**16))
def test_every_granularity_concatenates_to_the_text(sampler, text, seed):
    rng = random.Random(seed)
    for g in ("char", "word", "jieba", "mixed", "random"):
        seg = sampler.segment(text, g, rng=rng)
        assert "".join(seg) == text, g
        assert all(seg), g  # no empty tokens


@settings(max_examples=40, deadline=None)
@given(text=TEXT, seed=st.integers(0, 2**16))
def test_bpe_dropout_segmentations_are_valid(bpe, text, seed):
    for sample in (False, True):
        seg = bpe(text, sample=sample)
        assert "".join(seg) == text and all(seg)


def test_bpe_dropout_gives_several_segmentations_and_no_dropout_is_fixed(bpe):
    text = "质量还不错，内容只适合边上厕所便消遣了。这本书的价格也很便宜"
    fixed = {bpe(text, sample=False) for _ in range(5)}
    assert len(fixed) == 1
    sampled = {bpe(text, sample=True) for _ in range(20)}
    assert len(sampled) >= 3
    # Without dropout, learned merges make tokens longer than characters.
    assert len(next(iter(fixed))) < len(text)


@settings(max_examples=40, deadline=None)
@given(text=TEXT, seed=st.integers(0, 2**16))
def test_pairs_are_different_whenever_the_text_allows(sampler, text, seed):
    a, b = sampler.sample_pair(text, rng=random.Random(seed))
    assert "".join(a) == text and "".join(b) == text
    if len(text) >= 2:
        assert a != b  # chars and a single whole-text cut already differ for 2+ characters
    else:
        assert a == b


def test_distinct_returns_pairwise_different_segmentations(sampler):
    text = "这个东西质量不错，价格也很便宜，推荐购买"
    segs = sampler.distinct(text, 12, rng=random.Random(1))
    assert len(segs) == 12
    assert len(set(segs)) == 12
    assert all("".join(s) == text for s in segs)


def test_single_deterministic_granularity_gives_identical_pair():
    s = SegmentationSampler(granularities=("char",))
    a, b = s.sample_pair("质量不错", rng=random.Random(0))
    assert a == b == tuple("质量不错")


def test_sampler_rejects_bad_settings():
    with pytest.raises(ValueError, match="unknown granularity"):
        SegmentationSampler(granularities=("words",))
    with pytest.raises(ValueError, match="needs a trained BPEDropoutSegmenter"):
        SegmentationSampler(granularities=("bpe",))
    with pytest.raises(ValueError, match="p_split"):
        SegmentationSampler(granularities=("mixed",), p_split=1.5)
    s = SegmentationSampler(granularities=("word",))
    with pytest.raises(ValueError, match="do not concatenate"):
        s.segment("南京市", "word", rng=random.Random(0), words=("南京", "省"))


def test_jieba_is_lazy_and_memoised():
    seg = default_word_segmenter()
    out = seg("我喜欢这本书")
    assert "".join(out) == "我喜欢这本书"
    assert seg._cache["我喜欢这本书"] is out


def test_vocab_build_counts_words_and_keeps_all_characters():
    segs = [("南京市", "长江", "大桥"), ("长江", "很", "长"), tuple("南京市长江大桥"), ("大桥",)]
    v = Vocab.build(segs, min_freq=2)
    assert v.itos[:2] == ["[PAD]", "[UNK]"]
    assert "长江" in v and "大桥" in v  # seen twice
    assert "南京市" not in v  # seen once
    for ch in "南京市长江大桥很":  # every character, including those seen only inside words
        assert ch in v
    # Characters come first, most frequent first: 长 occurs 4 times (长江 x2, 长 x1, chars x1).
    assert v.itos[2] == "长"


def test_vocab_encode_backs_off_to_characters_and_unk():
    v = Vocab(tokens=["[PAD]", "[UNK]", "南", "京", "市", "长江"])
    assert v.encode(["长江"]) == [5]
    assert v.encode(["南京市"]) == [2, 3, 4]  # unknown word -> characters
    assert v.encode(["南京X"]) == [2, 3, 1]  # unknown character inside -> [UNK]
    assert v.encode(["Z"]) == [1]
    assert v.encode(["南京市", "长江"], max_len=2) == [2, 3]
    cov = v.coverage([["长江", "南京市", "Z"]])
    assert cov == pytest.approx({"in_vocab": 1 / 3, "backoff": 1 / 3, "unk_chars_per_token": 1 / 3})


def test_vocab_max_size_never_drops_characters_and_round_trips(tmp_path):
    segs = [("长江", "大桥", "长江", "大桥", "南京")] * 3
    v = Vocab.build(segs, min_freq=1, max_size=6)
    assert set("长江大桥南京") <= set(v.itos)
    assert len([t for t in v.itos if len(t) > 1 and not t.startswith("[")]) == 0  # no room left for words
    v.save(tmp_path / "v.json")
    w = Vocab.load(tmp_path / "v.json")
    assert w.itos == v.itos
    (tmp_path / "bad.json").write_text('{"format": "other", "tokens": []}', encoding="utf-8")
    with pytest.raises(ValueError, match="not a kdstore.vocab.v1"):
        Vocab.load(tmp_path / "bad.json")


def test_bpe_vocab_below_the_alphabet_is_an_error():
    with pytest.raises(ValueError, match="no room for merges"):
        BPEDropoutSegmenter.train(["南京市长江大桥", "我喜欢长江"], vocab_size=5)
