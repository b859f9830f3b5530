"""Sequence alignment by byte offsets, for students that tokenize the text themselves.

A stored teacher distribution at position ``i`` is the teacher's prediction of the text
that follows teacher token ``i``. A student token ``j`` can use it as a target exactly when
both have seen the same text, i.e. when token ``i`` and token ``j`` *end at the same byte*.
Walking both token sequences, a **group** closes wherever the two sides' token ends
coincide; the groups partition the text into pieces tokenized 1:1, 1:n (one teacher token,
several student tokens), n:1 or n:m.

Target rule (``mode="boundary"``, the default): the student token that closes a group gets
the distribution of the teacher token that closes it (same prefix, so the same prediction
problem), remapped into the aligned vocabulary; every other student token of the group is
masked (the teacher never predicted from inside its own token). So

* 1:1 — the student token gets the teacher token's distribution;
* 1:n — the last student piece gets it, pieces 1..n-1 are masked;
* n:1 — the student token gets the distribution of the *last* teacher token (the first
  ones predict text inside the student token);
* n:m — the last student token gets the last teacher token's distribution.

``mode="one_to_one"`` keeps targets on 1:1 groups only (stricter, fewer targets).

Offsets: tokens may omit whitespace (WordPiece), include a leading space (Ġ, ▁), share a
character's offsets (byte-level pieces of one character: *fragments*, which close nothing
unless their byte offsets were refined, see :func:`~kdstore.align.student.refine_byte_offsets`)
or be zero-width (*markers*: special tokens, a SentencePiece prefix ``▁`` reported on top
of the next token). A token's end is taken as ``min(end, next token's start)``; a marker
closes at its position, after the tokens ending there, so markers align with markers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from kdstore.align.student import load_student

KINDS = ("outside", "1:1", "1:n", "n:1", "n:m", "open")
MODES = ("boundary", "one_to_one")


_Z = 64  # zero-width tokens at one byte position are ordered by their rank (< 64)


def _closers(start: np.ndarray, end: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(key [N], position [N], candidate [N] bool) of a token sequence.

    A token's boundary is its effective end ``min(end, next start)``. A *fragment* (a piece
    sharing its character span with the next token, see
    :func:`~kdstore.align.student.refine_byte_offsets`) closes nothing. A *marker* (a
    zero-width token: special tokens with empty offsets, a SentencePiece prefix ``▁``
    reported on top of the next token) closes at its start, after any token ending there,
    in order: key = ``position * 64 + rank``; ordinary tokens have rank 0.
    """
    n = len(start)
    eff = end.copy()
    same_next = np.zeros(n, dtype=bool)
    if n > 1:
        eff[:-1] = np.minimum(end[:-1], start[1:])
        same_next[:-1] = (start[:-1] == start[1:]) & (end[:-1] == end[1:])
    zero = eff <= start
    candidate = ~(zero & same_next & (end > start))
    pos = np.where(zero, start, eff)
    rank = np.zeros(n, dtype=np.int64)
    if zero.any():
        cont = np.zeros(n, dtype=bool)  # continues a run of markers at the same position
        cont[1:] = zero[1:] & zero[:-1] & (pos[1:] == pos[:-1])
        head = np.flatnonzero(~cont)
        run = np.cumsum(~cont) - 1
        rank = np.where(zero, np.minimum(np.arange(n) - head[run] + 1, _Z - 1), 0)
    return pos * _Z + rank, pos, candidate


def _increasing(idx: np.ndarray, key: np.ndarray) -> np.ndarray:
    """Closing tokens whose key is beyond every earlier one (guards against offsets that go
    backwards, which would make "the same boundary" ambiguous)."""
    if len(idx) < 2:
        return idx
    e = key[idx]
    keep = np.ones(len(idx), dtype=bool)
    keep[1:] = e[1:] > np.maximum.accumulate(e)[:-1]
    return idx[keep]


def align_offsets(
    teacher_start: np.ndarray,
    teacher_end: np.ndarray,
    student_start: np.ndarray,
    student_end: np.ndarray,
    *,
    context_len: int = 0,
    mode: str = "boundary",
) -> tuple[np.ndarray, np.ndarray]:
    """Align one row's teacher tokens ``[T]`` and student tokens ``[S]`` by byte offsets.

    Returns ``(teacher_index [S] int64, kind [S] uint8)``: the teacher position whose
    distribution is student token ``j``'s target (-1 for none), and the kind of the group
    containing ``j`` (index into :data:`KINDS`: ``outside`` the teacher's byte span — another
    window's text —, ``1:1`` ... ``n:m``, or ``open``: inside the span but after the last
    common boundary). Teacher positions below ``context_len`` (overlap context of a window)
    are never targets.
    """
    if mode not in MODES:
        raise ValueError(f"unknown sequence alignment mode {mode!r}; choose one of {MODES}")
    ts, te = np.asarray(teacher_start, np.int64), np.asarray(teacher_end, np.int64)
    ss, se = np.asarray(student_start, np.int64), np.asarray(student_end, np.int64)
    S = len(ss)
    target = np.full(S, -1, dtype=np.int64)
    kind = np.zeros(S, dtype=np.uint8)
    t_key, t_pos, t_ok = _closers(ts, te)
    if not t_ok.any() or S == 0:
        return target, kind
    lo, hi = int(ts[t_ok].min()), int(t_pos[t_ok].max())
    s_key, s_pos, s_ok = _closers(ss, se)
    inside = (ss >= lo) & (s_pos <= hi)
    s_ok &= inside
    ti = _increasing(np.flatnonzero(t_ok), t_key)
    sj = _increasing(np.flatnonzero(s_ok), s_key)
    common, a, b = np.intersect1d(t_key[ti], s_key[sj], assume_unique=True, return_indices=True)
    if not len(common):
        return target, kind
    t_close, s_close = ti[a], sj[b]  # ascending together (keys increase on both sides)
    # Group sizes in tokens (fragments and markers included) of each side.
    first_in = np.flatnonzero(inside)
    s0 = int(first_in[0]) if len(first_in) else 0
    n_t = np.diff(np.concatenate([[-1], t_close]))
    n_s = np.diff(np.concatenate([[s0 - 1], s_close]))
    gk = np.where(n_t == 1, np.where(n_s == 1, 1, 2), np.where(n_s == 1, 3, 4)).astype(np.uint8)
    # Every student token from the previous closer (exclusive) to this one belongs to it.
    idx = np.arange(S)
    group = np.searchsorted(s_close, idx)  # group of token j: first closer >= j
    member = (group < len(s_close)) & inside & (idx >= s0)
    kind[member] = gk[group[member]]
    kind[inside & ~member] = KINDS.index("open")
    ok = t_close >= context_len
    if mode == "one_to_one":
        ok &= gk == 1
    target[s_close[ok]] = t_close[ok]
    return target, kind


def _list_values(col: pa.ListArray) -> tuple[np.ndarray, np.ndarray]:
    """(offsets [R+1] from 0, values [N] int64) of a possibly sliced list array."""
    off = col.offsets.to_numpy().astype(np.int64)
    values = col.values.to_numpy(zero_copy_only=False)[off[0] : off[-1]].astype(np.int64)
    return off - off[0], values


@dataclass
class AlignedRows:
    """Student-side view of R stored rows with S student tokens in total.

    positions ``[R+1]`` offsets into S; input_ids ``[S]`` student ids (the student's own
    tokenization of each row's text); byte_start/byte_end ``[S]``; teacher_pos ``[S]``
    global teacher position (into the decoded P axis) of the target, -1 for none;
    target_mask ``[S]`` bool; kind ``[S]`` uint8 group kind (:data:`KINDS`); counts ``[S]``,
    indices ``[E]``, probs ``[E]`` float32, tail ``[S]`` float32: the targets in the aligned
    vocabulary (0 entries and tail 0 where masked). stats: ``student_tokens``, ``in_window``
    (student tokens inside their row's teacher span: the denominator of the target
    fraction), ``targets``, ``teacher_tokens`` and ``in_<kind>`` counts.
    """

    sample_id: list[str]
    positions: np.ndarray
    input_ids: np.ndarray
    byte_start: np.ndarray
    byte_end: np.ndarray
    teacher_pos: np.ndarray
    target_mask: np.ndarray
    kind: np.ndarray
    counts: np.ndarray
    indices: np.ndarray
    probs: np.ndarray
    tail: np.ndarray
    stats: dict[str, int] = field(default_factory=dict)


class SequenceAligner:
    """Turn stored rows (with ``text`` and byte offsets) into student-tokenized targets.

    >>> aligner = SequenceAligner(student="tok_dir", alignment=VocabAlignment.build(store, "tok_dir"))
    >>> for batch in store.iter_batches(): rows = aligner.align_batch(store, batch)

    ``alignment`` maps teacher ids into the student's vocabulary (None: keep teacher ids —
    only meaningful when both share a vocabulary). Offsets are UTF-8 byte offsets into each
    row's ``text``.
    """

    def __init__(self, *, student: Any, alignment: Any = None, mode: str = "boundary", add_special_tokens: bool = False) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown sequence alignment mode {mode!r}; choose one of {MODES}")
        self.student = load_student(student)
        self.alignment = alignment
        self.mode = mode
        self.add_special_tokens = add_special_tokens

    def align_batch(self, store: Any, batch: pa.RecordBatch | pa.Table) -> AlignedRows:
        names = batch.schema.names
        missing = [c for c in ("text", "byte_start", "byte_end") if c not in names]
        if missing:
            raise ValueError(
                f"{store.uri}: sequence alignment needs the columns {missing}, which this store does not have; "
                f"re-run the capture with text and offsets stored (columns text=True, offsets=True)"
            )
        d = store.decode(batch)
        texts = batch.column("text").to_pylist()
        bs_col, be_col = batch.column("byte_start"), batch.column("byte_end")
        if isinstance(bs_col, pa.ChunkedArray):
            bs_col, be_col = bs_col.combine_chunks(), be_col.combine_chunks()
        # A sliced list array keeps its parent's values: read them through its own offsets.
        bs_off, bs_all = _list_values(bs_col)
        be_off, be_all = _list_values(be_col)
        if not np.array_equal(bs_off, be_off):
            raise ValueError(f"{store.uri}: byte_start and byte_end lists differ in length; the shard is corrupt")
        for r, t in enumerate(texts):
            if t is None:
                raise ValueError(f"{store.uri}: row {d.sample_id[r]!r} window {int(d.window[r])} has no text; cannot align it by byte offsets")
        encs = self.student.encode_offsets(texts, add_special_tokens=self.add_special_tokens)
        ids, sstart, send, tpos, kinds = [], [], [], [], []
        for r, (sid_ids, s_bs, s_be) in enumerate(encs):
            p0, p1 = int(d.positions[r]), int(d.positions[r + 1])
            o0 = int(bs_off[r])
            t_bs, t_be = bs_all[o0 : o0 + (p1 - p0)], be_all[o0 : o0 + (p1 - p0)]
            if len(t_bs) != p1 - p0:
                raise ValueError(f"{store.uri}: row {d.sample_id[r]!r}: {len(t_bs)} byte offsets for {p1 - p0} tokens")
            target, kind = align_offsets(t_bs, t_be, s_bs, s_be, context_len=int(d.context_len[r]), mode=self.mode)
            ids.append(sid_ids)
            sstart.append(s_bs)
            send.append(s_be)
            tpos.append(np.where(target >= 0, target + p0, -1))
            kinds.append(kind)
        lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
        positions = np.zeros(len(ids) + 1, dtype=np.int64)
        np.cumsum(lengths, out=positions[1:])
        cat = lambda xs, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt)  # noqa: E731
        input_ids, teacher_pos, kind = cat(ids, np.int64), cat(tpos, np.int64), cat(kinds, np.uint8)
        mask = teacher_pos >= 0
        # Gather the selected teacher positions' entries (vectorised), then remap them.
        sel = teacher_pos[mask]
        cnt = d.counts[sel]
        first = np.cumsum(cnt) - cnt
        e = np.repeat(d.entry_offsets[sel] - first, cnt) + np.arange(int(cnt.sum()), dtype=np.int64)
        indices, probs, tail_sel = d.indices[e], d.probs[e], d.tail[sel]
        if self.alignment is not None:
            indices, probs, cnt, extra = self.alignment.map_targets(indices, probs, cnt)
            tail_sel = tail_sel + extra
        counts = np.zeros(len(input_ids), dtype=np.int64)
        counts[mask] = cnt
        tail = np.zeros(len(input_ids), dtype=np.float32)
        tail[mask] = tail_sel
        kc = np.bincount(kind, minlength=len(KINDS))
        stats = {"student_tokens": int(len(input_ids)), "in_window": int(len(input_ids) - kc[0]),
                 "targets": int(mask.sum()), "teacher_tokens": int(len(d.counts))}
        stats.update({f"in_{k}": int(kc[i]) for i, k in enumerate(KINDS)})
        return AlignedRows(
            sample_id=d.sample_id, positions=positions, input_ids=input_ids, byte_start=cat(sstart, np.int64),
            byte_end=cat(send, np.int64), teacher_pos=teacher_pos, target_mask=mask, kind=kind, counts=counts,
            indices=indices, probs=probs.astype(np.float32, copy=False), tail=tail, stats=stats,
        )
