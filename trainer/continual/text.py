"""People's Daily articles encoded for the continual encoder: BPE ids, word spans, entities.

Every task of a run, and the downstream fine-tuning, uses **one tokenization: the teacher's
byte-level BPE**. The KD task's targets are distributions over the teacher's vocabulary at
the teacher's token positions; with the same tokenization they are the encoder's own targets
(no alignment, nothing lost), and the word-level tasks only need to know which tokens cover a
gold word, which the tokenizer's character offsets give. (A character encoder would have to
align every stored position to characters and merge or split distributions across
tokenizations: a lossy mapping for the one task whose targets are exact.)

Encoder vocabulary = the teacher's padded vocabulary ``V`` plus three ids: ``[MASK]`` = V,
``[CLS]`` = V+1, ``[SEP]`` = V+2; padding reuses the teacher's pad id (masked out anyway).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from trainer.data.corpora import Document, TaggedSentence

ENTITY_TAGS = ("nr", "ns", "nt", "nz")  # person, place, organisation, other proper noun
_SENT_END = re.compile(r"(?<=[。！？])")


@dataclass(frozen=True)
class SpecialIds:
    """Ids the encoder adds to the teacher's vocabulary (see the module docstring)."""

    base: int  # teacher's padded vocabulary size
    pad: int

    @property
    def mask(self) -> int:
        return self.base

    @property
    def cls(self) -> int:
        return self.base + 1

    @property
    def sep(self) -> int:
        return self.base + 2

    @property
    def size(self) -> int:
        return self.base + 3


@dataclass(frozen=True)
class EncodedLine:
    """One line: ``ids`` (teacher BPE, no specials), and per gold word the token span
    ``[start, end)`` of the tokens that overlap its characters; ``units`` are the knowledge
    units (word spans merged into entities), each ``(start_word, end_word, is_entity)``."""

    ids: tuple[int, ...]
    word_spans: tuple[tuple[int, int], ...]
    words: tuple[str, ...]
    tags: tuple[str, ...]
    units: tuple[tuple[int, int, bool], ...]


def knowledge_units(sent: TaggedSentence) -> list[tuple[int, int, bool]]:
    """Gold words as masking units; a run of ``nr`` words (surname + given name, 江/nr 泽民/nr)
    is one person entity; single ``ns``/``nt``/``nz`` words are entities; punctuation (``w``)
    is never a unit."""
    out: list[tuple[int, int, bool]] = []
    i, n = 0, len(sent.words)
    while i < n:
        tag = sent.tags[i]
        if tag == "w":
            i += 1
            continue
        j = i + 1
        if tag == "nr":
            while j < n and sent.tags[j] == "nr":
                j += 1
        out.append((i, j, tag in ENTITY_TAGS))
        i = j
    return out


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer  # noqa: PLC0415

    tok = AutoTokenizer.from_pretrained(str(path))
    if not getattr(tok, "is_fast", False):
        raise ValueError(f"tokenizer {path}: a fast tokenizer is needed (character offsets of tokens)")
    return tok


def encode_lines(tokenizer: Any, sents: list[TaggedSentence]) -> list[EncodedLine]:
    """Tokenize lines once (batched) and map gold words to token spans via character offsets."""
    if not sents:
        return []
    enc = tokenizer([s.text for s in sents], add_special_tokens=False, return_offsets_mapping=True)
    out = []
    for sent, ids, offs in zip(sents, enc["input_ids"], enc["offset_mapping"]):
        starts = np.asarray([a for a, _ in offs], dtype=np.int64)
        ends = np.asarray([b for _, b in offs], dtype=np.int64)
        spans, pos = [], 0
        for w in sent.words:
            a, b = pos, pos + len(w)
            pos = b
            lo = int(np.searchsorted(ends, a, side="right"))  # first token ending after a
            hi = int(np.searchsorted(starts, b, side="left"))  # first token starting at/after b
            spans.append((lo, max(hi, lo + 1) if lo < len(ids) else lo))
        out.append(EncodedLine(ids=tuple(ids), word_spans=tuple(spans), words=sent.words, tags=sent.tags,
                               units=tuple(knowledge_units(sent))))
    return out


def split_sentences(text: str) -> list[str]:
    """Cut a paragraph after 。！？ (the sentence units of reordering and distance)."""
    return [s for s in _SENT_END.split(text) if s.strip()]


@dataclass
class Corpus:
    """The articles of one split, encoded: ``lines[d]`` per article, ``sentences[d]`` (BPE ids
    of each sentence of the article), and document frequencies of gold words."""

    docs: list[Document]
    lines: list[list[EncodedLine]]
    sentences: list[list[tuple[int, ...]]]

    @classmethod
    def build(cls, docs: list[Document], tokenizer: Any) -> "Corpus":
        flat = [s for d in docs for s in d.lines]
        enc = encode_lines(tokenizer, flat)
        lines, k = [], 0
        for d in docs:
            lines.append(enc[k : k + len(d.lines)])
            k += len(d.lines)
        pieces = [[p for s in d.lines for p in split_sentences(s.text)] for d in docs]
        flat_p = [p for ps in pieces for p in ps]
        ids = tokenizer(flat_p, add_special_tokens=False)["input_ids"] if flat_p else []
        sentences, k = [], 0
        for ps in pieces:
            sentences.append([tuple(x) for x in ids[k : k + len(ps)] if x])
            k += len(ps)
        return cls(docs=docs, lines=lines, sentences=sentences)


def document_frequency(docs: list[Document]) -> dict[str, int]:
    """Number of articles each gold word occurs in."""
    df: dict[str, int] = {}
    for d in docs:
        for w in {w for s in d.lines for w in s.words}:
            df[w] = df.get(w, 0) + 1
    return df
