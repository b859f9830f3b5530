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
MODES = ("boundary", "one_to_one", "groups", "chain", "path")


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


def group_closers(
    teacher_start: np.ndarray,
    teacher_end: np.ndarray,
    student_start: np.ndarray,
    student_end: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """The common boundaries of one row: ``(t_close [G], s_close [G], inside [S] bool, s0)``.

    Group ``g`` closes at teacher position ``t_close[g]`` and student token ``s_close[g]``
    (both ascending); ``inside``: student tokens within the teacher's byte span; ``s0``: the
    first inside student token (group 0 starts there). Empty arrays when nothing aligns.
    """
    ts, te = np.asarray(teacher_start, np.int64), np.asarray(teacher_end, np.int64)
    ss, se = np.asarray(student_start, np.int64), np.asarray(student_end, np.int64)
    S = len(ss)
    none = np.zeros(0, dtype=np.int64)
    t_key, t_pos, t_ok = _closers(ts, te)
    if not t_ok.any() or S == 0:
        return none, none, np.zeros(S, dtype=bool), 0
    lo, hi = int(ts[t_ok].min()), int(t_pos[t_ok].max())
    s_key, s_pos, s_ok = _closers(ss, se)
    inside = (ss >= lo) & (s_pos <= hi)
    s_ok &= inside
    ti = _increasing(np.flatnonzero(t_ok), t_key)
    sj = _increasing(np.flatnonzero(s_ok), s_key)
    _, a, b = np.intersect1d(t_key[ti], s_key[sj], assume_unique=True, return_indices=True)
    first_in = np.flatnonzero(inside)
    s0 = int(first_in[0]) if len(first_in) else 0
    return ti[a], sj[b], inside, s0  # ascending together (keys increase on both sides)


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
    are never targets. (``mode="groups"`` targets come from :mod:`kdstore.align.groups`;
    here they are the ``boundary`` ones.)
    """
    if mode not in MODES:
        raise ValueError(f"unknown sequence alignment mode {mode!r}; choose one of {MODES}")
    S = len(student_start)
    target = np.full(S, -1, dtype=np.int64)
    kind = np.zeros(S, dtype=np.uint8)
    t_close, s_close, inside, s0 = group_closers(teacher_start, teacher_end, student_start, student_end)
    if not len(t_close):
        return target, kind
    # Group sizes in tokens (fragments and markers included) of each side.
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
    target_mask ``[S]`` bool; kind ``[S]`` uint8 group kind (:data:`KINDS`); depth ``[S]``
    student tokens read inside the current group (0 at a boundary; ``groups`` mode);
    counts ``[S]``, indices ``[E]``, probs ``[E]`` float32, tail ``[S]`` float32: the targets
    in the aligned vocabulary (0 entries and tail 0 where masked). ``chain`` mode adds
    chain_logc ``[S]`` (log of the teacher's chain-rule product over the group that the
    position's prediction starts, 0 elsewhere) and chain_start ``[S]`` (row-local index of
    the group-start position a token's prediction belongs to, -1 for none). stats:
    ``student_tokens``, ``in_window`` (student tokens inside their row's teacher span: the
    denominator of the target fraction), ``targets``, ``teacher_tokens``, ``in_<kind>``.
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
    depth: np.ndarray | None = None
    chain_logc: np.ndarray | None = None
    chain_start: np.ndarray | None = None
    window: np.ndarray | None = None
    context_start: np.ndarray | None = None  # [R] first byte of each row's non-context text


def offset_lists(batch: pa.RecordBatch | pa.Table, where: str) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """``(texts, offsets [R+1], byte_start [N], byte_end [N])`` of a batch with text and offsets."""
    names = batch.schema.names
    missing = [c for c in ("text", "byte_start", "byte_end") if c not in names]
    if missing:
        raise ValueError(
            f"{where}: sequence alignment needs the columns {missing}, which this store does not have; "
            f"re-run the capture with text and offsets stored (kd cache stores them unless --no-store-text)"
        )
    texts = batch.column("text").to_pylist()
    bs_col, be_col = batch.column("byte_start"), batch.column("byte_end")
    if isinstance(bs_col, pa.ChunkedArray):
        bs_col, be_col = bs_col.combine_chunks(), be_col.combine_chunks()
    # A sliced list array keeps its parent's values: read them through its own offsets.
    bs_off, bs_all = _list_values(bs_col)
    be_off, be_all = _list_values(be_col)
    if not np.array_equal(bs_off, be_off):
        raise ValueError(f"{where}: byte_start and byte_end lists differ in length; the shard is corrupt")
    return texts, bs_off, bs_all, be_all


class SequenceAligner:
    """Turn stored rows (with ``text`` and byte offsets) into student-tokenized targets.

    >>> aligner = SequenceAligner(student="tok_dir", alignment=VocabAlignment.build(store, "tok_dir"))
    >>> for batch in store.iter_batches(): rows = aligner.align_batch(store, batch)

    ``alignment`` maps teacher ids into the student's vocabulary (None: keep teacher ids —
    only meaningful when both share a vocabulary, or for a vocabulary-free loss such as
    ULD). Offsets are UTF-8 byte offsets into each row's ``text``. Modes: ``boundary``
    (targets where a group closes), ``one_to_one``, ``groups`` (also every position inside
    a 1:n group, :mod:`kdstore.align.groups`; needs an alignment with a spelling) and
    ``chain`` (boundary targets by first piece plus the chain-rule group products).
    """

    def __init__(self, *, student: Any, alignment: Any = None, mode: str = "boundary", add_special_tokens: bool = False) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown sequence alignment mode {mode!r}; choose one of {MODES}")
        if mode in ("groups", "chain") and getattr(alignment, "spell_ptr", None) is None:
            raise ValueError(
                f"sequence alignment mode {mode!r} needs a vocabulary alignment with the student's spelling of every "
                f"teacher token; build one with VocabAlignment.build (or 'kd store align-build'; older files lack it)"
            )
        self.student = load_student(student)
        self.alignment = alignment
        self.mode = mode
        self.add_special_tokens = add_special_tokens
        self._spell = None
        if mode in ("groups", "chain"):
            from kdstore.align.groups import padded_spelling  # noqa: PLC0415

            self._spell = padded_spelling(alignment.spell_ptr, alignment.spell_col)

    @property
    def fingerprint(self) -> str:
        """Identifies what the aligner produces (student vocabulary, mode, alignment)."""
        al = self.alignment
        key = f"{self.student.fingerprint}|{self.mode}|{self.add_special_tokens}|"
        key += "none" if al is None else f"{al.policy}|{al.vocab_size}|{al.meta.get('teacher', {}).get('fingerprint')}"
        return key

    def align_batch(self, store: Any, batch: pa.RecordBatch | pa.Table) -> AlignedRows:
        texts, bs_off, bs_all, be_all = offset_lists(batch, store.uri)
        return self.align_decoded(store.decode(batch), texts, bs_off, bs_all, be_all, where=store.uri)

    def align_decoded(self, d: Any, texts: list[str | None], bs_off: np.ndarray, bs_all: np.ndarray,
                      be_all: np.ndarray, *, where: str = "") -> AlignedRows:
        """Align decoded rows ``d`` (:class:`~kdstore.store.DecodedRows`) given their texts and
        teacher byte offsets (``offset_lists`` layout)."""
        for r, t in enumerate(texts):
            if t is None:
                raise ValueError(f"{where}: row {d.sample_id[r]!r} window {int(d.window[r])} has no text; cannot align it by byte offsets")
        from kdstore.align.groups import row_layout  # noqa: PLC0415

        encs = self.student.encode_offsets(texts, add_special_tokens=self.add_special_tokens)
        deep = self.mode == "groups"
        cols: dict[str, list[np.ndarray]] = {k: [] for k in ("ids", "bs", "be", "tpos", "kind", "depth", "gstart")}
        n_groups = []
        ctx_start = np.zeros(len(texts), dtype=np.int64)
        for r, (sid_ids, s_bs, s_be) in enumerate(encs):
            p0, p1 = int(d.positions[r]), int(d.positions[r + 1])
            o0 = int(bs_off[r])
            t_bs, t_be = bs_all[o0 : o0 + (p1 - p0)], be_all[o0 : o0 + (p1 - p0)]
            if len(t_bs) != p1 - p0:
                raise ValueError(f"{where}: row {d.sample_id[r]!r}: {len(t_bs)} byte offsets for {p1 - p0} tokens")
            c = int(d.context_len[r])
            ctx_start[r] = int(t_bs[c]) if c < len(t_bs) else (int(t_be[-1]) if len(t_be) else 0)
            _, kind = align_offsets(t_bs, t_be, s_bs, s_be, context_len=c, mode="boundary")
            t_close, s_close, inside, s0 = group_closers(t_bs, t_be, s_bs, s_be)
            if self.mode == "one_to_one":
                target, _ = align_offsets(t_bs, t_be, s_bs, s_be, context_len=c, mode="one_to_one")
                depth, gstart = np.zeros(len(target), np.int64), np.zeros(len(target), np.int64)
            else:
                target, depth, gstart = row_layout(t_close, s_close, inside, s0, context_len=c, deep=deep)
            for k, v in zip(cols, (sid_ids, s_bs, s_be, np.where(target >= 0, target + p0, -1), kind, depth, gstart)):
                cols[k].append(v)
            n_groups.append((t_close + p0, s_close, s0))
        lengths = np.fromiter((len(x) for x in cols["ids"]), dtype=np.int64, count=len(encs))
        positions = np.zeros(len(encs) + 1, dtype=np.int64)
        np.cumsum(lengths, out=positions[1:])

        def cat(k: str, dt) -> np.ndarray:
            return np.concatenate(cols[k]).astype(dt) if cols[k] else np.zeros(0, dt)

        input_ids, teacher_pos, kind, depth = cat("ids", np.int64), cat("tpos", np.int64), cat("kind", np.uint8), cat("depth", np.int64)
        mask = teacher_pos >= 0
        if self._spell is not None:
            mask, cnt, indices, probs, tail_sel = self._spelled_targets(
                d, input_ids, positions, teacher_pos, depth, cat("gstart", np.int64) + np.repeat(positions[:-1], lengths))
        else:
            # Gather the selected teacher positions' entries (vectorised), then remap them.
            sel = teacher_pos[mask]
            cnt = d.counts[sel]
            first = np.cumsum(cnt) - cnt
            e = np.repeat(d.entry_offsets[sel] - first, cnt) + np.arange(int(cnt.sum()), dtype=np.int64)
            indices, probs, tail_sel = d.indices[e], d.probs[e], d.tail[sel]
            if self.alignment is not None:
                indices, probs, cnt, extra = self.alignment.map_targets(indices, probs, cnt)
                tail_sel = tail_sel + extra
        teacher_pos = np.where(mask, teacher_pos, -1)
        counts = np.zeros(len(input_ids), dtype=np.int64)
        counts[mask] = cnt
        tail = np.zeros(len(input_ids), dtype=np.float32)
        tail[mask] = tail_sel
        if self.mode == "path":
            counts, indices, probs, tail = self._path(d, input_ids, positions, n_groups, mask, counts, indices, probs, tail)
        kc = np.bincount(kind, minlength=len(KINDS))
        stats = {"student_tokens": int(len(input_ids)), "in_window": int(len(input_ids) - kc[0]),
                 "targets": int(mask.sum()), "teacher_tokens": int(len(d.counts))}
        stats.update({f"in_{k}": int(kc[i]) for i, k in enumerate(KINDS)})
        out = AlignedRows(
            sample_id=d.sample_id, positions=positions, input_ids=input_ids, byte_start=cat("bs", np.int64),
            byte_end=cat("be", np.int64), teacher_pos=teacher_pos, target_mask=mask, kind=kind, counts=counts,
            indices=indices, probs=np.asarray(probs, dtype=np.float32), tail=tail, stats=stats, depth=depth,
            window=d.window, context_start=ctx_start,
        )
        if self.mode == "chain":
            out.chain_logc, out.chain_start = self._chain(d, positions, n_groups, len(input_ids))
        return out

    def _path(self, d: Any, input_ids: np.ndarray, positions: np.ndarray, groups: list, mask: np.ndarray,
              counts: np.ndarray, indices: np.ndarray, probs: np.ndarray, tail: np.ndarray) -> tuple[np.ndarray, ...]:
        """``path`` mode (docs/alignment.md §6.3): where the next student token spans several
        teacher tokens (an n:1 group), the teacher's probability of that realized sequence,
        ``p(t_1) * prod p(t_i | ...)`` from the stored distributions along it, moves from the
        first piece of ``t_1`` to that student token."""
        from kdstore.align.groups import realized_path_targets, teacher_next_logprob  # noqa: PLC0415

        lp, found = teacher_next_logprob(d.positions, d.input_ids, d.entry_offsets, d.indices, d.probs, d.tail, return_found=True)
        csum = np.concatenate([[0.0], np.cumsum(lp)])
        missing = np.concatenate([[0], np.cumsum(~found)])
        sel, delta, dest, first = [], [], [], []
        for r, (tc, sc, _s0) in enumerate(groups):
            if len(tc) < 2:
                continue
            g = np.flatnonzero((np.diff(tc) >= 2) & (np.diff(sc) == 1))  # group g + 1 is n:1, predicted at closer g
            i, iend, j = tc[g], tc[g + 1], int(positions[r]) + sc[g]
            # every step of the path kept by the teacher: its probability is known, not a bound
            ok = mask[j] & (missing[iend] - missing[i] == 0)
            sel.append(j[ok])
            delta.append(np.exp(csum[iend[ok]] - csum[i[ok]]))
            dest.append(input_ids[int(positions[r]) + sc[g + 1][ok]])
            first.append(d.input_ids[i[ok] + 1])
        if not sel or not sum(len(x) for x in sel):
            return counts, indices, probs, tail
        sel, delta, dest, first = (np.concatenate(x) for x in (sel, delta, dest, first))
        if self.alignment is not None:
            fp_i, fp_w, fp_c, fp_t = self.alignment.map_targets(first, np.ones(len(first), np.float32), np.ones(len(first), np.int64))
        else:
            fp_i, fp_w, fp_c, fp_t = first, np.ones(len(first)), np.ones(len(first), np.int64), np.zeros(len(first))
        return realized_path_targets(counts, indices, probs, tail, pos=sel, delta=delta, dest=dest,
                                     fp_counts=fp_c, fp_indices=fp_i, fp_weights=fp_w, fp_tail=fp_t)

    def _spelled_targets(self, d: Any, input_ids: np.ndarray, positions: np.ndarray, teacher_pos: np.ndarray,
                         depth: np.ndarray, gstart: np.ndarray) -> tuple[np.ndarray, ...]:
        """Targets from the student's spelling of the kept teacher tokens (module
        :mod:`kdstore.align.groups`): the first-piece sum at boundaries, the prefix
        conditional inside groups."""
        from kdstore.align.groups import prefix_targets  # noqa: PLC0415

        spell, spell_len = self._spell
        W = spell.shape[1]
        sel = np.flatnonzero(teacher_pos >= 0)
        k = depth[sel]
        # prefix[n, c] = student id at gstart + c (c < k): the tokens read inside the group.
        cidx = gstart[sel][:, None] + np.arange(W)[None, :]
        prefix = np.where(np.arange(W)[None, :] < k[:, None], input_ids[np.minimum(cidx, len(input_ids) - 1)], -2)
        keep, cnt, indices, probs, tail = prefix_targets(spell, spell_len, d.entry_offsets, d.indices, d.probs, d.tail,
                                                         teacher_pos[sel], k, prefix)
        mask = np.zeros(len(teacher_pos), dtype=bool)
        mask[sel[keep]] = True
        return mask, cnt, indices, probs, tail

    def _chain(self, d: Any, positions: np.ndarray, groups: list, S: int) -> tuple[np.ndarray, np.ndarray]:
        """Chain-rule (GOLD "observed") group products: ``log C_t`` at each group's start
        position and, for the student tokens predicted inside a group, that position."""
        from kdstore.align.groups import teacher_next_logprob  # noqa: PLC0415

        lp = teacher_next_logprob(d.positions, d.input_ids, d.entry_offsets, d.indices, d.probs, d.tail)
        csum = np.concatenate([[0.0], np.cumsum(lp)])
        logc = np.zeros(S, dtype=np.float32)
        start = np.full(S, -1, dtype=np.int64)
        for r, (t_close, s_close, _s0) in enumerate(groups):
            if len(t_close) < 2:
                continue
            base = int(positions[r])
            # Group g (>= 1) starts after closer g-1: teacher tokens t_close[g-1]+1 .. t_close[g];
            # its chain product is over the predictions of tokens 2..m, made at positions
            # t_close[g-1]+1 .. t_close[g]-1.
            a, b = t_close[:-1] + 1, t_close[1:]
            logc[base + s_close[:-1]] = (csum[b] - csum[a]).astype(np.float32)
            for g0, g1 in zip(s_close[:-1], s_close[1:]):
                if g1 - g0 > 1:
                    start[base + g0 + 1 : base + g1] = g0
        return logc, start
