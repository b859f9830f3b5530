"""Continuation targets: a teacher token's mass spread over the student tokens that start with it.

With the ``first_piece`` third vocabulary, teacher mass on token ``t`` lands on the student's
first piece ``a`` of ``t``. When the student's own tokenization writes the text as a longer
token ``s`` that starts with ``a`` (a Unigram word piece over two BPE characters), the
target names a token the student does not emit there. The ``continuation`` policy maps
``t`` to every student token ``s`` whose string starts with ``a``'s string, weighted by how
often the student's tokenization of the stored text emits ``s``:

    w(t -> s) = c(s) / sum_{s' : a prefix of s'} c(s')

an estimate of which student token comes next when the text continues with ``t`` (the
teacher does not say what follows ``t``; the student's token statistics do). Matched and
first-piece teacher tokens are spread this way; ``split``/tail/unmappable ones and ids
whose continuations never occur keep their ``first_piece`` map, and so do teacher ids whose
first piece is a byte fragment (part of a UTF-8 character: its string prefixes thousands of
unrelated characters in a byte-level student vocabulary). See
``docs/alignment.md`` §3 and the measurement in ``docs/benchmarks.md`` ("Cross-tokenizer KD").
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from kdstore.align.canonical import canonicalize

MAX_CHARS = 16 << 20  # characters of stored text tokenized for the counts (a deterministic prefix)


def student_token_counts(student: Any, texts: Sequence[str], *, vocab_size: int) -> tuple[np.ndarray, int]:
    """``([vocab_size] float64 counts of each student id, tokens counted)`` over ``texts``
    tokenized as running text by ``student`` (a :class:`~kdstore.align.student.StudentTokenizer`)."""
    counts = np.zeros(vocab_size, dtype=np.float64)
    n = 0
    for s in range(0, len(texts), 1024):
        for ids in student.encode_ids(list(texts[s:s + 1024])):
            ids = ids[ids < vocab_size]
            counts += np.bincount(ids, minlength=vocab_size)
            n += len(ids)
    return counts, n


def store_texts(store: Any, *, max_chars: int = MAX_CHARS) -> list[str]:
    """The stored text of the first rows of ``store`` (store order), up to ``max_chars``."""
    if not store.manifest.columns.get("text"):
        raise ValueError(f"{store.uri}: training on the student's own tokenization needs the stored text and byte "
                         f"offsets (the continuation vocabulary also counts the student's tokens on that text); this "
                         f"store has no text: re-capture with text (kd cache stores it unless --no-store-text)")
    out, total = [], 0
    for b in store.iter_batches(columns=["text"]):
        for t in b.column("text").to_pylist():
            if t:
                out.append(t)
                total += len(t)
            if total >= max_chars:
                return out
    return out


def whole_characters(token: str, convention: str) -> bool:
    """Whether a student token stands for whole UTF-8 characters (not a byte fragment)."""
    try:
        canonicalize(token, convention).data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def with_continuations(al: Any, student: Any, counts: np.ndarray, *, counted_tokens: int = 0) -> Any:
    """A copy of a ``first_piece`` :class:`~kdstore.align.VocabAlignment` with policy
    ``continuation``: every teacher id mapped to one student id ``a`` (weight 1) is spread
    over the student ids whose token string starts with ``a``'s, by ``counts``; ``a`` that is
    a byte fragment (not whole UTF-8 characters) is not spread."""
    if al.policy != "first_piece":
        raise ValueError(f"continuations extend a first_piece alignment, got policy {al.policy!r}")
    tokens = student.tokens
    special = np.asarray(student.special, dtype=bool)
    by_prefix: dict[str, list[int]] = {}
    for s, w in enumerate(tokens):
        if w and not special[s] and s < len(counts) and counts[s] > 0:
            for L in range(1, len(w) + 1):
                by_prefix.setdefault(w[:L], []).append(s)
    targets: list[list[tuple[int, float]]] = []
    spread = fragments = 0
    for t in range(al.teacher_vocab_size):
        a, b = int(al.ptr[t]), int(al.ptr[t + 1])
        one = b - a == 1 and al.weight[a] == 1.0 and int(al.col[a]) < len(tokens)
        piece = tokens[int(al.col[a])] if one else ""
        cands = by_prefix.get(piece, []) if one and not special[int(al.col[a])] else []
        if cands and not whole_characters(piece, student.convention):
            # A byte fragment (byte-level BPE's lead byte of a CJK character) prefixes every
            # token that starts with the same bytes, thousands of unrelated characters: the
            # spread would say nothing about which character follows. It keeps its first piece.
            fragments += 1
            cands = []
        if not cands:
            targets.append(list(zip(al.col[a:b].tolist(), al.weight[a:b].tolist())))
            continue
        c = counts[cands]
        spread += len(cands) > 1
        targets.append([(s, float(x / c.sum())) for s, x in zip(cands, c)])
    ptr = np.zeros(len(targets) + 1, dtype=np.int64)
    np.cumsum([len(x) for x in targets], out=ptr[1:])
    col = np.array([s for x in targets for s, _ in x], dtype=np.int64)
    weight = np.array([q for x in targets for _, q in x], dtype=np.float32)
    meta = {**al.meta, "continuation": {"counted_tokens": int(counted_tokens), "spread_ids": spread,
                                           "fragments_kept": fragments}}
    return dataclasses.replace(al, policy="continuation", ptr=ptr, col=col, weight=weight, meta=meta)


def build_continuation(store: Any, student: Any, **build_kw: Any) -> Any:
    """``first_piece`` alignment of ``store``'s teacher with ``student``, spread over
    continuations counted on the store's own text (:func:`with_continuations`)."""
    from kdstore.align.student import load_student  # noqa: PLC0415
    from kdstore.align.vocab import VocabAlignment  # noqa: PLC0415

    st = load_student(student)
    al = VocabAlignment.build(store, st, policy="first_piece", **build_kw)
    counts, n = student_token_counts(st, store_texts(store), vocab_size=al.student_vocab_size)
    return with_continuations(al, st, counts, counted_tokens=n)
