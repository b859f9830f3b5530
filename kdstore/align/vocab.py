"""Vocabulary alignment: teacher ids -> aligned ("third vocabulary") ids, applied vectorised.

:meth:`VocabAlignment.build` decides, for every teacher id, where its probability mass
goes in the aligned vocabulary, by the first rule that applies (see ``docs/alignment.md``):

==============  ===========================================================================
rule            meaning
==============  ===========================================================================
``exact``       same token string, same convention (same tokenizer family)
``canonical``   same text bytes with a compatible word-boundary class (Ġ/▁/## conventions)
``special``     special token matched by role (bos/eos/pad/unk/cls/sep/mask)
``tokenizer``   the student tokenizer spells the token's text as one known piece
``first_piece`` (policy) the student spells it with several pieces or [UNK]: all mass to the first
``split``       (policy) ... mass spread evenly over the pieces
``extend``      (policy) ... the token becomes a new entry of the aligned vocabulary
``tail``        (policy) ... mass moves to the tail bucket
``unmappable``  no spelling at all (an unmatched special token, a byte fragment the student
                cannot spell, text the student drops): tail (``extend`` policy: new entry)
``padding``     an index >= the vocabulary table (padded embedding rows): tail
==============  ===========================================================================

The result is stored as CSR arrays (for teacher id ``t``: aligned ids ``col[ptr[t]:ptr[t+1]]``
with weights ``weight[...]`` summing to 1, or no entries = everything to the tail), so
:meth:`VocabAlignment.map_targets` is a handful of numpy gathers with no per-token Python.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kdstore.align.match import TeacherVocab, match, teacher_vocab
from kdstore.align.student import load_student

POLICIES = ("extend", "first_piece", "split", "tail")
RULES = ("exact", "canonical", "special", "tokenizer", "first_piece", "split", "extend", "tail", "unmappable", "padding")
MATCH_RULES = ("exact", "canonical", "special", "tokenizer")
_CODE = {r: i for i, r in enumerate(RULES)}
FILE_FORMAT = "kdstore.alignment"
FILE_VERSION = 1


def _csr(targets: list[list[tuple[int, float]]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-teacher-id ``(aligned id, weight)`` lists as CSR arrays: ``ptr [V+1]``, ``col``, ``weight``."""
    V = len(targets)
    lengths = np.fromiter((len(x) for x in targets), dtype=np.int64, count=V)
    ptr = np.zeros(V + 1, dtype=np.int64)
    np.cumsum(lengths, out=ptr[1:])
    col = np.fromiter((a for x in targets for a, _ in x), dtype=np.int64, count=int(ptr[-1]))
    weight = np.fromiter((w for x in targets for _, w in x), dtype=np.float32, count=int(ptr[-1]))
    return ptr, col, weight


@dataclass
class VocabAlignment:
    """Teacher -> aligned vocabulary map; implements the dataset ``remap`` protocol.

    vocab_size: aligned vocabulary size = student vocabulary (``student_vocab_size``) + new
    entries (``extend``). rule: ``[V_t]`` rule name per teacher id (codes into :data:`RULES`).
    ptr ``[V_t+1]``, col ``[M]`` int64, weight ``[M]`` float32: CSR map. input_map ``[V_t]``
    int64: aligned id fed to the student for a teacher *input* token. new_tokens: one dict per
    appended entry (aligned_id, teacher_id, token, pieces = the student's spelling, e.g. to
    initialise the new embedding row as the mean of the pieces' rows). spell_ptr ``[V_t+1]``,
    spell_col ``[M']``: CSR *spelling* of every teacher id in student ids (a match: its one
    id; otherwise the student tokenizer's pieces; none for unmappable/padding), independent
    of the policy: used by the 1:n group targets (:mod:`kdstore.align.groups`). Alignments
    saved before the spelling existed load with ``None`` there.
    """

    policy: str
    vocab_size: int
    student_vocab_size: int
    rule_codes: np.ndarray
    ptr: np.ndarray
    col: np.ndarray
    weight: np.ndarray
    input_map: np.ndarray
    new_tokens: list[dict[str, Any]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    compact: bool = False
    spell_ptr: np.ndarray | None = None
    spell_col: np.ndarray | None = None

    def __post_init__(self) -> None:
        self._prepare()

    # -- construction --------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        teacher: Any,
        student: Any,
        *,
        policy: str = "first_piece",
        teacher_convention: str | None = None,
        student_vocab_size: int | None = None,
        used: np.ndarray | None = None,
        compact: bool = False,
    ) -> "VocabAlignment":
        """Align a teacher vocabulary with a student tokenizer.

        teacher: a :class:`~kdstore.Store`, a :class:`TeacherVocab` or a vocabulary table.
        student: anything :func:`~kdstore.align.student.load_student` accepts.
        policy: what happens to teacher tokens with no match (:data:`POLICIES`).
        student_vocab_size: the student's embedding rows if padded beyond the tokenizer;
        new (``extend``) entries start there. used: optional ``[V_t]`` bool, the teacher ids
        that occur in the store (:func:`kdstore.align.report.scan_store`); under ``extend``
        only those become new entries (seed 001: "every teacher token among the kept
        entries"), the others go to the tail. compact: see :meth:`map_targets`.
        """
        if policy not in POLICIES:
            raise ValueError(f"unknown alignment policy {policy!r}; choose one of {POLICIES}")
        tv = teacher_vocab(teacher, teacher_convention)
        st = load_student(student)
        s_size = st.vocab_size if student_vocab_size is None else int(student_vocab_size)
        if s_size < st.vocab_size:
            raise ValueError(f"student_vocab_size {s_size} < the student tokenizer's {st.vocab_size} ids")
        matched, pieces, rules = match(tv, st)
        V = tv.vocab_size
        if used is not None and len(used) != V:
            raise ValueError(f"'used' has {len(used)} entries but the teacher vocabulary has {V}")
        fallback = st.roles.get("unk", st.roles.get("pad", 0))
        targets: list[list[tuple[int, float]]] = [[] for _ in range(V)]
        input_map = np.full(V, fallback, dtype=np.int64)
        new_tokens: list[dict[str, Any]] = []
        n_fallback_inputs = 0  # teacher ids whose input falls back to the student's unk/pad id
        for t in range(V):
            rule = rules[t]
            if rule in MATCH_RULES:
                targets[t] = [(matched[t], 1.0)]
                input_map[t] = matched[t]
                continue
            if rule == "padding":
                continue
            pcs = pieces.get(t, [])
            if policy == "extend" and (used is None or used[t]):
                aid = s_size + len(new_tokens)
                new_tokens.append({"aligned_id": aid, "teacher_id": t, "token": tv.tokens[t], "pieces": list(pcs)})
                rules[t] = "extend"
                targets[t] = [(aid, 1.0)]
                input_map[t] = aid
                continue
            if pcs:
                input_map[t] = pcs[0]
            else:
                n_fallback_inputs += 1
            if rule == "unmappable" or policy in ("tail", "extend"):
                rules[t] = "unmappable" if rule == "unmappable" else "tail"
            elif policy == "first_piece":
                rules[t] = "first_piece"
                targets[t] = [(pcs[0], 1.0)]
            else:
                rules[t] = "split"
                ids, cnt = np.unique(np.asarray(pcs, dtype=np.int64), return_counts=True)
                targets[t] = [(int(i), float(c) / len(pcs)) for i, c in zip(ids, cnt)]
        # The student's spelling of every teacher id (its match, else its pieces): 1:n group targets.
        spell_ptr, spell_col, _ = _csr([[(int(matched[t]), 1.0)] if rules[t] in MATCH_RULES
                                        else [(a, 1.0) for a in pieces.get(t, [])] for t in range(V)])
        ptr, col, weight = _csr(targets)
        meta = _identity_meta(tv, st, inputs_without_piece=n_fallback_inputs, input_fallback_id=int(fallback))
        return cls(
            policy=policy, vocab_size=s_size + len(new_tokens), student_vocab_size=s_size,
            rule_codes=np.array([_CODE[r] for r in rules], dtype=np.uint8), ptr=ptr, col=col, weight=weight,
            input_map=input_map, new_tokens=new_tokens, meta=meta, compact=compact, spell_ptr=spell_ptr, spell_col=spell_col,
        )

    def _prepare(self) -> None:
        V = len(self.rule_codes)
        if len(self.ptr) != V + 1 or len(self.input_map) != V or self.ptr[-1] != len(self.col) or len(self.col) != len(self.weight):
            raise ValueError("alignment arrays are inconsistent (ptr/col/weight/input_map sizes); the alignment file is corrupt")
        if len(self.col) and (self.col.min() < 0 or self.col.max() >= self.vocab_size):
            raise ValueError(f"alignment targets outside [0, {self.vocab_size}); the alignment file is corrupt")
        if self.spell_ptr is not None and (len(self.spell_ptr) != V + 1 or self.spell_ptr[-1] != len(self.spell_col)):
            raise ValueError("alignment spelling arrays are inconsistent; the alignment file is corrupt")
        self._len = np.diff(self.ptr)
        self._tail_row = self._len == 0
        if (self._len <= 1).all() and np.all(self.weight == 1.0):
            # Fast path for 1:1 maps; tail-mapped ids get the sentinel id vocab_size.
            single = np.full(V, self.vocab_size, dtype=np.int64)
            single[~self._tail_row] = self.col
            self._single: np.ndarray | None = single
        else:
            self._single = None
        incoming = np.bincount(self.col, minlength=self.vocab_size + 1)
        self._shared_ext = incoming > 1  # [vocab_size + 1]: the sentinel is never shared
        self._any_shared = bool(self._shared_ext.any())

    # -- the dataset remap protocol --------------------------------------------------------
    @property
    def teacher_vocab_size(self) -> int:
        return len(self.rule_codes)

    def map_targets(self, indices: np.ndarray, probs: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Remap sparse teacher distributions into the aligned vocabulary.

        indices ``[E]`` int64 teacher ids grouped by position, probs ``[E]`` float32,
        counts ``[P]`` int64 entries per position. Returns ``(indices [E'] int64, probs [E']
        float32, counts [P] int64, extra_tail [P] float32)``: entries of teacher ids mapped to
        the same aligned id at a position are summed into one; mass with no target is
        returned in ``extra_tail`` so ``sum(probs') + extra_tail == sum(probs)`` per position.
        Positions keep their order; within a position entries are *not* re-sorted.

        Merged-away and tail-mapped entries: with ``compact=False`` (the default) and a 1:1
        map (every policy but ``split``) the layout is kept — ``E' = E``, same counts — and
        those entries become ``(0, 0.0)``, exactly what the dataset uses for padding (losses
        treat probability-0 slots as absent): no compaction pass, and top-k batches keep
        their fixed ``K``. With ``compact=True`` (and always for ``split``) they are removed;
        a position whose whole kept mass went to the tail then has 0 entries.
        """
        indices = np.asarray(indices, dtype=np.int64)
        probs = np.asarray(probs, dtype=np.float32)
        counts = np.asarray(counts, dtype=np.int64)
        P, E = len(counts), len(indices)
        if int(counts.sum()) != E or len(probs) != E:
            raise ValueError(f"map_targets: counts sum to {int(counts.sum())} but there are {E} indices / {len(probs)} probs")
        try:
            if self._single is not None:
                return self._map_single(indices, probs, counts)
            return self._map_csr(indices, probs, counts)
        except IndexError as exc:  # numpy's own range check (no extra pass over the data)
            raise ValueError(
                f"map_targets: a teacher index is outside the alignment's teacher vocabulary ({self.teacher_vocab_size}); "
                f"the alignment was built for another teacher ({exc})"
            ) from exc

    def _map_single(self, indices: np.ndarray, probs: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, ...]:
        P, E = len(counts), len(indices)
        if E and int(indices.min()) < 0:
            raise IndexError(f"negative teacher index {int(indices.min())}")
        tgt = self._single[indices]  # tail-mapped ids -> sentinel vocab_size
        lost = np.flatnonzero(tgt == self.vocab_size)
        extra = np.zeros(P, dtype=np.float64)
        if len(lost):
            extra = np.bincount(_positions(lost, counts), weights=probs[lost], minlength=P)
        p, dup = probs, None
        if self._any_shared and E:
            p, dup = self._merge(tgt, probs, counts)
        drop = lost if dup is None else np.concatenate([lost, dup])
        if not len(drop):
            return tgt, probs, counts, extra.astype(np.float32)
        if not self.compact:
            tgt = tgt.copy()
            p = p.astype(np.float32, copy=True) if p is probs else p.astype(np.float32, copy=False)
            tgt[drop] = 0
            p[drop] = 0.0
            return tgt, p, counts, extra.astype(np.float32)
        keep = np.ones(E, dtype=bool)
        keep[drop] = False
        new_counts = counts - np.bincount(_positions(drop, counts), minlength=P)
        return tgt[keep], p[keep].astype(np.float32, copy=False), new_counts, extra.astype(np.float32)

    def _map_csr(self, indices: np.ndarray, probs: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, ...]:
        P, E = len(counts), len(indices)
        if E and int(indices.min()) < 0:
            raise IndexError(f"negative teacher index {int(indices.min())}")
        n = self._len[indices]
        lost = np.flatnonzero(n == 0)
        extra = np.zeros(P, dtype=np.float64)
        if len(lost):
            extra = np.bincount(_positions(lost, counts), weights=probs[lost], minlength=P)
        # Output slots: entry e's targets go to out[first[e] : first[e] + n[e]]. Entries with
        # one target (most of them) are written directly; only multi-target entries expand.
        cs = np.cumsum(n)
        total = int(cs[-1]) if E else 0
        first = cs - n
        start = self.ptr[indices]
        out_idx = np.empty(total, dtype=np.int64)
        out_p = np.empty(total, dtype=np.float32)
        one = np.flatnonzero(n == 1)
        out_idx[first[one]] = self.col[start[one]]
        out_p[first[one]] = probs[one] * self.weight[start[one]]
        many = np.flatnonzero(n > 1)
        if len(many):
            nm = n[many]
            k = np.arange(int(nm.sum()), dtype=np.int64) - np.repeat(np.cumsum(nm) - nm, nm)
            dst = np.repeat(first[many], nm) + k
            src = np.repeat(start[many], nm) + k
            out_idx[dst] = self.col[src]
            out_p[dst] = np.repeat(probs[many], nm) * self.weight[src]
        ends = np.zeros(P + 1, dtype=np.int64)
        np.cumsum(counts, out=ends[1:])
        out_off = np.concatenate([[0], cs])[ends]
        out_counts = np.diff(out_off)
        if self._any_shared and total:
            merged, dup = self._merge(out_idx, out_p, out_counts)
            if dup is not None:
                keep = np.ones(total, dtype=bool)
                keep[dup] = False
                out_idx, out_p = out_idx[keep], merged[keep]
                out_counts = out_counts - np.bincount(_positions(np.sort(dup), out_counts), minlength=P)
        return out_idx, out_p.astype(np.float32, copy=False), out_counts.astype(np.int64, copy=False), extra.astype(np.float32)

    def _merge(self, idx: np.ndarray, p: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Sum entries of one position with the same aligned id into the first of them.

        Returns ``(p', dup)``: probabilities with each group's sum on its first entry, and the
        indices of the group's other entries (to drop), or ``(p, None)`` without duplicates.
        Entries carrying the sentinel id ``vocab_size`` (tail-mapped) are never merged.

        This is the hot path of remapping. Entries are laid out as a ``[P, K]`` matrix of
        packed keys ``aligned id << bits | slot`` and each row is sorted (many tiny sorts are
        several times faster than one sort of all entries); equal neighbours are duplicates
        and the slot bits say which entry each key came from.
        Very uneven counts (``K * P > 2 E``) use one sort of the packed ``(position, id,
        slot)`` keys of the entries whose id can collide instead.
        """
        P, E = len(counts), len(idx)
        K = int(counts.max()) if P else 0
        if K < 2:
            return p, None
        if K * P > 2 * E:
            return self._merge_sorted(idx, p, counts)
        bits = K.bit_length()
        if (self.vocab_size + 1) >> (62 - bits):
            raise ValueError("map_targets: too many entries per position to pack keys into 64 bits")
        cols = np.arange(K, dtype=np.int64)
        if E == P * K:  # uniform counts (top-k): a reshape, no scatter
            M = (idx.reshape(P, K) << bits) | cols
            base = np.arange(P, dtype=np.int64) * K
        else:  # pad rows with the sentinel (never merged); flat scatter
            base = np.zeros(P, dtype=np.int64)
            np.cumsum(counts[:-1], out=base[1:])
            slot = np.arange(E, dtype=np.int64) - np.repeat(base, counts)
            M = np.full((P, K), self.vocab_size << bits, dtype=np.int64)
            M.ravel()[slot + np.repeat(np.arange(P, dtype=np.int64) * K, counts)] = (idx << bits) | slot
        M.sort(axis=1)
        # Flattened, an entry duplicates its left neighbour when their ids agree (the id is
        # the key without its slot bits), it is not the first of its row, and it is not
        # the sentinel.
        Mf = M.ravel()
        d = np.empty(P * K, dtype=bool)
        d[0] = False
        np.less(Mf[1:] ^ Mf[:-1], 1 << bits, out=d[1:])
        d[::K] = False
        d &= Mf < (self.vocab_size << bits)
        dup = np.flatnonzero(d)
        if not len(dup):
            return p, None
        head = dup - 1
        while True:  # runs of equal ids are short: step back to each run's first entry
            back = d[head]
            if not back.any():
                break
            head -= back
        mask = (1 << bits) - 1
        dup_ent = base[dup // K] + (Mf[dup] & mask)
        head_ent = base[head // K] + (Mf[head] & mask)
        p = p.astype(np.float64)
        np.add.at(p, head_ent, p[dup_ent])
        return p, dup_ent

    def _merge_sorted(self, idx: np.ndarray, p: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        sub = np.flatnonzero(self._shared_ext[idx])
        if len(sub) < 2:
            return p, None
        spos = _positions(sub, counts)
        head = np.ones(len(sub), dtype=bool)
        head[1:] = spos[1:] != spos[:-1]
        starts = np.flatnonzero(head)
        row = np.cumsum(head) - 1
        slot = np.arange(len(sub), dtype=np.int64) - starts[row]
        bits = max(1, int(slot.max()).bit_length())
        if (len(starts) * (self.vocab_size + 1)) >> (62 - bits):
            raise ValueError("map_targets: batch too large to pack keys into 64 bits; remap fewer positions per call")
        # Keys are already ordered by row, so a stable (run-merging) sort is the fast one here.
        key = np.sort(((row * (self.vocab_size + 1) + idx[sub]) << bits) | slot, kind="stable")
        group = key >> bits
        dup = np.zeros(len(key), dtype=bool)
        dup[1:] = group[1:] == group[:-1]
        if not dup.any():
            return p, None
        ent = sub[starts[group // (self.vocab_size + 1)] + (key & ((1 << bits) - 1))]  # entries in key order
        gid = np.cumsum(~dup) - 1
        sums = np.bincount(gid, weights=p[ent])
        p = p.astype(np.float64)
        p[ent[~dup]] = sums  # group heads have the lowest slot: the earliest entry
        return p, ent[dup]

    def map_inputs(self, ids: np.ndarray) -> np.ndarray:
        """Teacher input ids ``[N]`` -> aligned ids ``[N]`` int64 (matched tokens: their match;
        ``extend``: the new entry; otherwise the student's first piece, or the student's unk
        (pad, 0) when there is none)."""
        ids = np.asarray(ids, dtype=np.int64)
        if len(ids) and (ids.min() < 0 or ids.max() >= self.teacher_vocab_size):
            raise ValueError(f"map_inputs: teacher id {int(ids.max())} outside the teacher vocabulary ({self.teacher_vocab_size})")
        return self.input_map[ids]

    # -- inspection ------------------------------------------------------------------------
    @property
    def rules(self) -> np.ndarray:
        """``[V_t]`` rule name per teacher id (object array of str)."""
        return np.asarray(RULES, dtype=object)[self.rule_codes]

    def targets(self, teacher_id: int) -> list[tuple[int, float]]:
        """(aligned id, weight) pairs of one teacher id (empty: all mass to the tail)."""
        a, b = int(self.ptr[teacher_id]), int(self.ptr[teacher_id + 1])
        return [(int(c), float(w)) for c, w in zip(self.col[a:b], self.weight[a:b])]

    def coverage(self, mass: np.ndarray | None = None) -> dict[str, dict[str, float]]:
        """Per rule: ``count`` of teacher ids, ``vocab_share`` (of the padded teacher
        vocabulary) and, given ``mass`` ``[V_t]`` (stored probability per teacher id),
        ``mass_share`` (of the total kept mass)."""
        counts = np.bincount(self.rule_codes, minlength=len(RULES))
        V = max(1, self.teacher_vocab_size)
        out: dict[str, dict[str, float]] = {}
        msum = None
        if mass is not None:
            mass = np.asarray(mass, dtype=np.float64)
            by_rule = np.bincount(self.rule_codes, weights=mass, minlength=len(RULES))
            msum = float(mass.sum()) or 1.0
        for r, code in _CODE.items():
            out[r] = {"count": int(counts[code]), "vocab_share": float(counts[code]) / V}
            if msum is not None:
                out[r]["mass_share"] = float(by_rule[code]) / msum
        return out

    # -- persistence (kdstore/align/vocab_io.py) --------------------------------------------
    def _meta(self) -> dict[str, Any]:
        return {
            "format": FILE_FORMAT, "version": FILE_VERSION, "policy": self.policy, "vocab_size": self.vocab_size,
            "student_vocab_size": self.student_vocab_size, "new_tokens": self.new_tokens, **self.meta,
        }

    def save(self, path: str | Path) -> Path:
        """Write the alignment: ``*.json`` as JSON, anything else as Parquet (one row per
        teacher id: rule, targets, weights, input_id, spelling; metadata in the schema)."""
        from kdstore.align.vocab_io import save_alignment  # noqa: PLC0415

        return save_alignment(self, path)

    @classmethod
    def load(cls, path: str | Path, *, store: Any = None, student: Any = None, compact: bool = False) -> "VocabAlignment":
        """Read an alignment written by :meth:`save`. With ``store`` / ``student`` given,
        check it was built for that teacher vocabulary / student tokenizer. ``compact``: see
        :meth:`map_targets` (a reading option, not stored)."""
        from kdstore.align.vocab_io import load_alignment  # noqa: PLC0415

        return load_alignment(cls, path, store=store, student=student, compact=compact)


def _identity_meta(tv: TeacherVocab, st: Any, **extra: int) -> dict[str, Any]:
    """What an alignment file records of the vocabularies it joins (checked when it is loaded)."""
    return {
        "teacher": {"name": tv.name, "vocab_size": tv.vocab_size, "rows": len(tv.tokens), "convention": tv.convention,
                    "fingerprint": tv.fingerprint},
        "student": {"name": st.name, "vocab_size": st.vocab_size, "convention": st.convention,
                    "fingerprint": st.fingerprint},
        **extra,
    }


def _positions(entries: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Position of each entry index, given entries per position ``counts``."""
    k = int(counts[0]) if len(counts) else 0
    if k and len(entries) and len(counts) * k == int(counts.sum()) and (counts == k).all():
        return entries // k  # uniform counts (top-k)
    ends = np.cumsum(counts)
    return np.searchsorted(ends, entries, side="right")
