"""Targets for every student position of a 1:n group, and GOLD-style chain-rule merging.

Byte-offset alignment (:mod:`kdstore.align.sequence`) gives a student token a target only
where it *closes* a group (both tokenizers have read the same text). Inside a group — one
teacher token spelled by several student tokens — the teacher never predicted from there,
but its kept distribution still says what comes next. With ``spell(t)`` the student's
spelling of teacher token ``t`` (:attr:`VocabAlignment.spell_ptr` / ``spell_col``) and the
kept distribution ``p`` (tail ``tau``) at the teacher position that closes the previous
group, a student position that has read ``k`` student tokens ``pi = (a_1..a_k)`` of the
current group gets (``docs/alignment.md`` §6.1 derives it)::

    k = 0 (at a teacher boundary):  q(s)   = sum_{t kept, spell(t)[0] = s} p(t)
                                    q_tail = tau + sum_{t kept, spell(t) = ()} p(t)
    k >= 1 (inside a group):        C      = {t kept : spell(t)[:k] = pi}
                                    q(s)   = sum_{t in C, spell(t)[k] = s} p(t) / p(C)
                                    q_tail = sum_{t in C, len(spell(t)) = k} p(t) / p(C)

(no target when ``p(C) = 0``: no kept teacher token agrees with what the student has read).
:func:`prefix_targets` computes it vectorised; :func:`prefix_targets_reference` is the
per-position brute force the tests compare it with.

The *chain rule* merge (TRL GOLD, "observed" strategy) instead scores a whole group as one
unit: the distribution at the group's first position times the probabilities of the tokens
that actually follow inside the group, on both sides. :func:`teacher_next_logprob` gives the
teacher's stored log-probability of each actual next token, from which the per-group
``log C_t`` sums are taken; the loss is :func:`trainer.core.losses.chain_merged_kd_loss`.
"""

from __future__ import annotations

import numpy as np

MAX_DEPTH = 16  # student pieces per teacher token considered (longer spellings are truncated)


def padded_spelling(ptr: np.ndarray, col: np.ndarray, *, width: int = MAX_DEPTH) -> tuple[np.ndarray, np.ndarray]:
    """CSR spelling -> ``(pieces [V_t, width] int64, -1 padded; length [V_t] int64, capped)``."""
    n = np.diff(ptr)
    V = len(n)
    L = np.minimum(n, width)
    out = np.full((V, width), -1, dtype=np.int64)
    row = np.repeat(np.arange(V), L)
    k = np.arange(int(L.sum())) - np.repeat(np.cumsum(L) - L, L)
    out[row, k] = col[np.repeat(ptr[:-1], L) + k]
    return out, L


def prefix_targets(
    spell: np.ndarray,
    spell_len: np.ndarray,
    entry_offsets: np.ndarray,
    indices: np.ndarray,
    probs: np.ndarray,
    tail: np.ndarray,
    tpos: np.ndarray,
    depth: np.ndarray,
    prefix: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Student-vocabulary targets for N student positions (formula in the module doc).

    spell ``[V_t, W]`` / spell_len ``[V_t]``: :func:`padded_spelling`; entry_offsets
    ``[P+1]``, indices/probs ``[E]``, tail ``[P]``: the decoded teacher rows; tpos ``[N]``
    teacher position (into P) of each student position, depth ``[N]`` = k, prefix
    ``[N, W]`` the student ids read so far in the group (columns >= k ignored).

    Returns ``(keep [N] bool, counts [N'] int64, indices [E'] int64, probs [E'] float32,
    tail [N'] float32)`` for the N' = keep.sum() positions that get a target; entries of a
    position ascend by student id.
    """
    N, W = prefix.shape if prefix.ndim == 2 else (len(tpos), spell.shape[1])
    cnt = entry_offsets[tpos + 1] - entry_offsets[tpos]
    first = np.cumsum(cnt) - cnt
    owner = np.repeat(np.arange(N), cnt)
    e = np.repeat(entry_offsets[tpos] - first, cnt) + np.arange(int(cnt.sum()), dtype=np.int64)
    t, p = indices[e], probs[e].astype(np.float64)
    k = depth[owner]
    cols = np.arange(W)
    sp = spell[t]  # [E', W]
    agree = (sp == prefix[owner]) | (cols[None, :] >= k[:, None])
    consistent = agree.all(1) & (spell_len[t] >= k) & (k <= W)
    nxt = np.where(spell_len[t] > k, sp[np.arange(len(t)), np.minimum(k, W - 1)], -1)
    nxt = np.where(k < W, nxt, -1)
    mass = np.bincount(owner, weights=np.where(consistent, p, 0.0), minlength=N)
    deep = depth > 0
    keep = ~deep | (mass > 0)
    norm = np.where(deep, np.maximum(mass, 1e-300), 1.0)
    ends = consistent & (nxt < 0)
    tail_out = np.where(deep, 0.0, tail[tpos].astype(np.float64))
    tail_out += np.bincount(owner, weights=np.where(ends, p, 0.0), minlength=N)
    tail_out /= norm
    live = consistent & (nxt >= 0) & keep[owner]
    V = int(spell.max()) + 2 if spell.size else 1
    key = owner[live].astype(np.int64) * V + nxt[live]
    uniq, inv = np.unique(key, return_inverse=True)
    sums = np.bincount(inv, weights=p[live], minlength=len(uniq)) if len(uniq) else np.zeros(0)
    pos = uniq // V
    out_p = sums / norm[pos]
    counts = np.bincount(pos, minlength=N)[keep]
    return keep, counts.astype(np.int64), (uniq % V).astype(np.int64), out_p.astype(np.float32), tail_out[keep].astype(np.float32)


def prefix_targets_reference(
    spellings: list[list[int]], entries: list[list[tuple[int, float]]], tails: list[float],
    tpos: list[int], depth: list[int], prefix: list[list[int]],
) -> list[tuple[dict[int, float], float] | None]:
    """Brute force of :func:`prefix_targets`, one position at a time, from the definition:
    ``entries[i]`` = kept ``(teacher id, prob)`` pairs of teacher position ``i``,
    ``spellings[t]`` = student ids of teacher id ``t``. Returns ``({student id: prob}, tail)``
    per position, or None where no kept teacher token agrees with the prefix."""
    out: list[tuple[dict[int, float], float] | None] = []
    for i, k, pi in zip(tpos, depth, prefix):
        q: dict[int, float] = {}
        ended, mass = 0.0, 0.0
        for t, pt in entries[i]:
            s = spellings[t]
            if list(s[:k]) != list(pi[:k]) or len(s) < k:
                continue
            mass += pt
            if len(s) == k:
                ended += pt
            else:
                q[s[k]] = q.get(s[k], 0.0) + pt
        if k == 0:
            out.append((q, tails[i] + ended))
        elif mass <= 0:
            out.append(None)
        else:
            out.append(({s: v / mass for s, v in q.items()}, ended / mass))
    return out


def teacher_next_logprob(
    positions: np.ndarray, input_ids: np.ndarray, entry_offsets: np.ndarray, indices: np.ndarray,
    probs: np.ndarray, tail: np.ndarray, *, floor: float = 1e-8, return_found: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """``[P]`` float64: log of the stored teacher probability of the *actual* next teacher
    token at each position (0 at a row's last position, which has no next token).

    When the actual token is not among the kept entries its probability is unknown but at
    most ``min(tail, smallest kept probability)``; that bound is used (floored at ``floor``).
    ``return_found``: also ``[P]`` bool, True where the actual next token was kept (the
    value is its stored probability, not a bound).
    """
    P = len(input_ids)
    out = np.zeros(P, dtype=np.float64)
    if P == 0:
        return (out, np.zeros(0, dtype=bool)) if return_found else out
    nxt = np.full(P, -1, dtype=np.int64)
    nxt[:-1] = input_ids[1:]
    last = positions[1:] - 1
    nxt[last[last >= 0]] = -1
    cnt = np.diff(entry_offsets)
    owner = np.repeat(np.arange(P), cnt)
    hit = indices == nxt[owner]
    found = np.zeros(P, dtype=bool)
    found[owner[hit]] = True
    val = np.zeros(P, dtype=np.float64)
    val[owner[hit]] = probs[hit]
    smallest = np.full(P, np.inf)
    np.minimum.at(smallest, owner, np.where(probs > 0, probs, np.inf).astype(np.float64))
    bound = np.minimum(tail.astype(np.float64), smallest)
    val = np.where(found, val, bound)
    has = nxt >= 0
    out[has] = np.log(np.maximum(val[has], floor))
    return (out, found) if return_found else out


def row_layout(
    t_close: np.ndarray, s_close: np.ndarray, inside: np.ndarray, s0: int, *, context_len: int, deep: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per student token of one row: ``(tpos [S] row-local teacher position or -1, depth [S],
    group start [S])``: the teacher position whose distribution the prediction after token
    ``j`` derives from, the number k of student tokens read since that teacher boundary, and
    the index of the group's first student token. Closers get ``(t_close, 0)``; with
    ``deep`` the tokens inside group ``g >= 1`` get ``(t_close[g-1], j - s_close[g-1])``.
    Teacher positions below ``context_len`` are never used."""
    S = len(inside)
    tpos = np.full(S, -1, dtype=np.int64)
    depth = np.zeros(S, dtype=np.int64)
    gstart = np.zeros(S, dtype=np.int64)
    if not len(t_close):
        return tpos, depth, gstart
    idx = np.arange(S)
    group = np.searchsorted(s_close, idx)
    member = (group < len(s_close)) & inside & (idx >= s0)
    prev_close = np.concatenate([[s0 - 1], s_close])  # closer before group g (s0 - 1 for g = 0)
    gstart[member] = prev_close[group[member]] + 1
    ok = t_close >= context_len
    tpos[s_close[ok]] = t_close[ok]
    if deep:
        inner = member & (group >= 1) & (idx != np.where(group < len(s_close), s_close[np.minimum(group, len(s_close) - 1)], -1))
        g = group[inner]
        tp = t_close[g - 1]
        use = tp >= context_len
        j = idx[inner][use]
        tpos[j] = tp[use]
        depth[j] = j - s_close[g[use] - 1]
    return tpos, depth, gstart


def realized_path_targets(
    counts: np.ndarray, indices: np.ndarray, probs: np.ndarray, tail: np.ndarray, *,
    pos: np.ndarray, delta: np.ndarray, dest: np.ndarray,
    fp_counts: np.ndarray, fp_indices: np.ndarray, fp_weights: np.ndarray, fp_tail: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Move mass of the realized teacher path onto the student token that spells it.

    Targets per student position in CSR form: ``counts [S]``, ``indices [E]`` student ids,
    ``probs [E]``, ``tail [S]``. For each adjusted position ``pos[m]`` (``[M]``, unique), the
    teacher's next token ``t_a`` was mapped onto student ids ``fp_indices`` with weights
    ``fp_weights`` (``fp_counts [M]`` of them) and the share ``fp_tail [M]`` of its mass to the
    tail (the alignment's ``map_targets`` of a unit mass). ``delta[m]`` of ``t_a``'s mass
    (``<=`` its probability) is taken from those entries and the tail in the same shares and
    given to student id ``dest[m]``, appended when the position does not hold it yet.
    Mass is conserved per position; the derivation is in ``docs/alignment.md`` (§6.3).
    Returns new ``(counts, indices, probs, tail)``.
    """
    counts = np.asarray(counts, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64).copy()
    tail = np.asarray(tail, dtype=np.float64).copy()
    S, M = len(counts), len(pos)
    if M == 0:
        return counts, np.asarray(indices, np.int64), probs.astype(np.float32), tail.astype(np.float32)
    off = np.zeros(S + 1, dtype=np.int64)
    np.cumsum(counts, out=off[1:])
    owner = np.repeat(np.arange(S), counts)
    m_of = np.full(S, -1, dtype=np.int64)
    m_of[pos] = np.arange(M)
    em = m_of[owner]  # adjusted position of each entry, -1 for others
    # 1. take delta * w from t_a's mapped entries (the tail when t_a mapped to nothing)
    fm = np.repeat(np.arange(M), fp_counts)
    key_e = np.where(em >= 0, em * (np.int64(1) << 32) + indices, -1)
    key_f = fm * (np.int64(1) << 32) + fp_indices
    hit = np.isin(key_e, key_f)
    if hit.any():
        e = np.flatnonzero(hit)
        ks = np.argsort(key_f, kind="stable")
        w = np.asarray(fp_weights, dtype=np.float64)[ks][np.searchsorted(key_f[ks], key_e[e])]
        probs[e] = np.maximum(probs[e] - delta[em[e]] * w, 0.0)
    tail[pos] = np.maximum(tail[pos] - delta * np.asarray(fp_tail, dtype=np.float64), 0.0)
    # 2. give delta to dest: add where the position holds dest, else append an entry
    has = np.zeros(M, dtype=bool)
    at_dest = (em >= 0) & (np.asarray(indices) == dest[np.maximum(em, 0)])
    probs[at_dest] += delta[em[at_dest]]
    has[em[at_dest]] = True
    add = ~has
    new_counts = counts.copy()
    new_counts[pos[add]] += 1
    new_off = np.zeros(S + 1, dtype=np.int64)
    np.cumsum(new_counts, out=new_off[1:])
    E2 = int(new_off[-1])
    out_i = np.empty(E2, dtype=np.int64)
    out_p = np.empty(E2, dtype=np.float64)
    slot = np.arange(len(owner), dtype=np.int64) - off[owner] + new_off[owner]
    out_i[slot], out_p[slot] = indices, probs
    last = new_off[pos[add] + 1] - 1
    out_i[last], out_p[last] = dest[add], delta[add]
    return new_counts, out_i, out_p.astype(np.float32), tail.astype(np.float32)


def realized_path_reference(counts, indices, probs, tail, *, pos, delta, dest, fp_counts, fp_indices, fp_weights, fp_tail):
    """Per-position brute force of :func:`realized_path_targets` (tests only)."""
    off = np.concatenate([[0], np.cumsum(counts)])
    rows = [dict() for _ in counts]
    order = [[] for _ in counts]
    for s in range(len(counts)):
        for e in range(off[s], off[s + 1]):
            rows[s][int(indices[e])] = float(probs[e])
            order[s].append(int(indices[e]))
    tail = [float(x) for x in tail]
    fo = np.concatenate([[0], np.cumsum(fp_counts)])
    for m, s in enumerate(pos):
        tail[s] = max(tail[s] - delta[m] * fp_tail[m], 0.0)
        for f in range(fo[m], fo[m + 1]):
            i = int(fp_indices[f])
            if i in rows[s]:
                rows[s][i] = max(rows[s][i] - delta[m] * fp_weights[f], 0.0)
        d = int(dest[m])
        if d not in rows[s]:
            order[s].append(d)
            rows[s][d] = 0.0
        rows[s][d] += delta[m]
    return [[(i, rows[s][i]) for i in order[s]] for s in range(len(counts))], tail
