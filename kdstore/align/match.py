"""Matching a teacher vocabulary against a student tokenizer (rules of ``docs/alignment.md`` §2).

:func:`match` decides, per teacher id, whether it matches a student token (``exact``,
``canonical``, ``special``, ``tokenizer``), must be handled by a policy (``unmatched``: the
student spells it with several pieces or [UNK]), cannot be spelled (``unmappable``) or is a
padding row (``padding``); :class:`TeacherVocab` is the teacher side read from a store.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import xxhash

from kdstore.align.canonical import COMPATIBLE, ROLE_FALLBACK, Canonical, canonicalize, infer_convention
from kdstore.align.student import StudentTokenizer


@dataclass
class TeacherVocab:
    """The teacher side: token strings by id (from a store's vocabulary table).

    tokens: ``[rows]`` strings ("" where the table has no row); special/present: ``[rows]``
    bool; vocab_size: the padded size (embedding rows) bounding stored indices.
    """

    tokens: list[str]
    special: np.ndarray
    present: np.ndarray
    vocab_size: int
    convention: str
    fingerprint: str
    name: str = ""

    @classmethod
    def from_table(cls, table: pa.Table, *, vocab_size: int | None = None, convention: str | None = None, name: str = "") -> "TeacherVocab":
        """From a vocabulary table (``kdstore.vocab_table`` schema)."""
        ids = table.column("id").to_numpy().astype(np.int64)
        rows = int(ids.max()) + 1 if len(ids) else 0
        vocab_size = rows if vocab_size is None else int(vocab_size)
        if vocab_size < rows:
            raise ValueError(f"teacher vocab_size {vocab_size} is smaller than the vocabulary table ({rows} ids); the store is inconsistent")
        tokens = [""] * rows
        for i, t in zip(ids.tolist(), table.column("token").to_pylist()):
            tokens[i] = t
        special = np.zeros(rows, dtype=bool)
        special[ids] = table.column("special").to_numpy(zero_copy_only=False)
        present = np.zeros(rows, dtype=bool)
        present[ids] = True
        h = xxhash.xxh3_64()
        h.update(str(vocab_size).encode())
        h.update(np.ascontiguousarray(table.column("hash").to_numpy()[np.argsort(ids)]).tobytes())
        conv = convention or infer_convention(tokens, special)
        return cls(tokens=tokens, special=special, present=present, vocab_size=vocab_size, convention=conv,
                   fingerprint=h.hexdigest(), name=name)

    @classmethod
    def from_store(cls, store: Any, *, convention: str | None = None) -> "TeacherVocab":
        t = store.manifest.teacher
        return cls.from_table(store.vocab, vocab_size=t.vocab_size, convention=convention, name=t.name_or_path)


def teacher_vocab(teacher: Any, convention: str | None) -> TeacherVocab:
    if isinstance(teacher, TeacherVocab):
        if convention and convention != teacher.convention:
            teacher = TeacherVocab(**{**teacher.__dict__, "convention": convention})
        return teacher
    if isinstance(teacher, pa.Table):
        return TeacherVocab.from_table(teacher, convention=convention)
    if hasattr(teacher, "vocab") and hasattr(teacher, "manifest"):
        return TeacherVocab.from_store(teacher, convention=convention)
    raise TypeError(f"teacher must be a Store, a TeacherVocab or a vocabulary table, got {type(teacher).__name__}")


def _student_index(st: StudentTokenizer) -> tuple[dict[tuple[bytes, str], int], dict[str, int], dict[str, int], dict[bytes, int]]:
    """Lookup tables of the student vocabulary: canonical key -> id (ordinary tokens, lowest
    id wins), exact string -> id, special string -> id, raw bytes -> id (for byte spelling)."""
    by_key: dict[tuple[bytes, str], int] = {}
    by_str: dict[str, int] = {}
    specials: dict[str, int] = {}
    by_bytes: dict[bytes, int] = {}
    for i, tok in enumerate(st.tokens):
        if not tok:
            continue
        if st.special[i]:
            specials.setdefault(tok, i)
            continue
        by_str.setdefault(tok, i)
        c = canonicalize(tok, st.convention)
        by_key.setdefault((c.data, c.boundary), i)
        if c.boundary in ("any", "cont"):
            by_bytes.setdefault(c.data, i)
    return by_key, by_str, specials, by_bytes


def _spell_bytes(data: bytes, by_bytes: dict[bytes, int], max_len: int) -> list[int]:
    """Greedy longest-match spelling of raw bytes with the student's unmarked pieces ([] if
    impossible): used for byte fragments that are not valid UTF-8 text."""
    out, i = [], 0
    while i < len(data):
        for n in range(min(max_len, len(data) - i), 0, -1):
            tid = by_bytes.get(data[i : i + n])
            if tid is not None:
                out.append(tid)
                i += n
                break
        else:
            return []
    return out


def match(tv: TeacherVocab, st: StudentTokenizer) -> tuple[np.ndarray, dict[int, list[int]], list[str]]:
    """(matched aligned id per teacher id (-1 if none), student pieces of the unmatched, rule
    per teacher id: a match rule, 'unmatched', 'unmappable' or 'padding')."""
    by_key, by_str, specials, by_bytes = _student_index(st)
    same = tv.convention == st.convention
    V = tv.vocab_size
    matched = np.full(V, -1, dtype=np.int64)
    rules = ["padding"] * V
    pending: list[tuple[int, Canonical]] = []
    unk = st.unk_id
    for t, tok in enumerate(tv.tokens):
        if not tv.present[t]:
            continue
        if tv.special[t]:
            c = canonicalize(tok, tv.convention, special=True)
            if tok in specials:
                matched[t], rules[t] = specials[tok], "exact"
                continue
            role_id = next((st.roles[r] for r in ROLE_FALLBACK.get(c.role or "", ()) if r in st.roles), None)
            if role_id is not None:
                matched[t], rules[t] = role_id, "special"
            else:
                rules[t] = "unmappable"  # a control token the student has no counterpart for
            continue
        if same and tok in by_str:
            matched[t], rules[t] = by_str[tok], "exact"
            continue
        c = canonicalize(tok, tv.convention)
        hit = next((by_key[(c.data, b)] for b in COMPATIBLE[c.boundary] if (c.data, b) in by_key), None)
        if hit is not None:
            matched[t], rules[t] = hit, "canonical"
            continue
        pending.append((t, c))
    # Derive spellings of the rest with the student tokenizer, in one batch.
    texts = [(t, c.text) for t, c in pending]
    encoded = st.pieces([s for _, s in texts if s is not None])
    it = iter(encoded)
    pieces: dict[int, list[int]] = {}
    max_len = max((len(b) for b in by_bytes), default=1)
    for (t, c), (_, s) in zip(pending, texts):
        pcs = next(it) if s is not None else _spell_bytes(c.data, by_bytes, max_len)
        pieces[t] = list(pcs)
        if not pcs:
            rules[t] = "unmappable"
        elif len(pcs) == 1 and pcs[0] != unk and not st.special[pcs[0]]:
            matched[t], rules[t] = pcs[0], "tokenizer"
        else:
            rules[t] = "unmatched"
    return matched, pieces, rules
