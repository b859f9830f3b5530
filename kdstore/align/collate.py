"""Student-tokenized batches: :class:`~kdstore.align.sequence.AlignedRows` -> padded tensors.

The layout is the dataset's token-level batch (``kdstore.SoftLabelDataset``), in the
student's own tokenization: ``input_ids`` are the student's ids of each row's text,
``labels`` its next token, and ``kd_*`` the teacher targets at the student positions that
sequence alignment gave one (``kd_mask``). A student that trains on these batches reads at
inference exactly what it read in training.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from kdstore.align.sequence import AlignedRows

IGNORE_INDEX = -100


def collate_aligned(a: AlignedRows, *, pad_id: int = 0) -> dict[str, Any]:
    """Padded ``[B, T]`` / ``[B, T, K]`` tensors of aligned rows (B rows, T = most student
    tokens of a row inside its teacher span, K = most target entries at one position).

    Keys: ``input_ids`` ``attention_mask`` ``labels`` (next student token; -100 at a row's
    last token, in padding, and where the next token starts in the window's overlap context)
    ``kd_indices`` ``kd_probs`` ``kd_tail`` ``kd_counts`` ``kd_mask``; with chain-rule data
    also ``kd_chain_logc`` ``[B, T]`` float32 and ``kd_chain_start`` ``[B, T]`` long (row-local
    position of the group start a prediction belongs to, -1 for none); ``sample_id``,
    ``window``, ``kd_stats`` (dict of counts: student tokens, targets).
    """
    R = len(a.positions) - 1
    keep = a.kind != 0  # student tokens outside the row's teacher span belong to another window
    row_of = np.repeat(np.arange(R), np.diff(a.positions))
    ids, row = a.input_ids[keep], row_of[keep]
    lengths = np.bincount(row, minlength=R)
    offs = np.zeros(R + 1, dtype=np.int64)
    np.cumsum(lengths, out=offs[1:])
    t = np.arange(len(ids)) - offs[row]
    # Row-local index of every original token after dropping the outside ones.
    new_local = np.cumsum(keep) - 1 - np.repeat(offs[:-1], np.diff(a.positions))
    T = max(1, int(lengths.max()) if R else 1)
    inp = np.full((R, T), pad_id, dtype=np.int64)
    inp[row, t] = ids
    att = np.zeros((R, T), dtype=bool)
    att[row, t] = True
    labels = np.full((R, T), IGNORE_INDEX, dtype=np.int64)
    nxt_ok = np.zeros(len(ids), dtype=bool)
    nxt_ok[:-1] = row[1:] == row[:-1]
    starts = a.byte_start[keep]
    if a.context_start is not None and len(ids):
        nxt_start = np.concatenate([starts[1:], [0]])
        nxt_ok &= nxt_start >= a.context_start[row]
    j = np.flatnonzero(nxt_ok)
    labels[row[j], t[j]] = ids[j + 1]

    m = a.target_mask[keep]
    cnt = a.counts[keep]
    K = max(1, int(cnt.max()) if len(cnt) else 1)
    kd_idx = np.zeros((R, T, K), dtype=np.int64)
    kd_p = np.zeros((R, T, K), dtype=np.float32)
    # Entries belong to target positions in order; drop those of removed (outside) tokens.
    all_cnt = a.counts
    ent_keep = np.repeat(keep, all_cnt)
    e_idx, e_p = a.indices[ent_keep], a.probs[ent_keep]
    pos_e = np.repeat(np.arange(len(ids)), cnt)
    slot = np.arange(len(e_idx)) - np.repeat(np.cumsum(cnt) - cnt, cnt)
    kd_idx[row[pos_e], t[pos_e], slot] = e_idx
    kd_p[row[pos_e], t[pos_e], slot] = e_p
    kd_tail = np.zeros((R, T), dtype=np.float32)
    kd_tail[row, t] = a.tail[keep]
    kd_counts = np.zeros((R, T), dtype=np.int64)
    kd_counts[row, t] = cnt
    kd_mask = np.zeros((R, T), dtype=bool)
    kd_mask[row, t] = m
    out: dict[str, Any] = {
        "sample_id": a.sample_id, "input_ids": torch.from_numpy(inp), "attention_mask": torch.from_numpy(att),
        "labels": torch.from_numpy(labels), "kd_indices": torch.from_numpy(kd_idx), "kd_probs": torch.from_numpy(kd_p),
        "kd_tail": torch.from_numpy(kd_tail), "kd_counts": torch.from_numpy(kd_counts), "kd_mask": torch.from_numpy(kd_mask),
        "kd_stats": {"student_tokens": int(len(ids)), "targets": int(m.sum())},
    }
    if a.window is not None:
        out["window"] = torch.from_numpy(np.asarray(a.window, dtype=np.int64))
    if a.chain_logc is not None:
        logc = np.zeros((R, T), dtype=np.float32)
        logc[row, t] = a.chain_logc[keep]
        start = np.full((R, T), -1, dtype=np.int64)
        cs = a.chain_start[keep]
        ok = cs >= 0
        # chain_start is row-local in the original tokens: translate through new_local.
        orig = cs[ok] + np.repeat(a.positions[:-1], np.diff(a.positions))[keep][ok]
        start[row[ok], t[ok]] = new_local[orig]
        out["kd_chain_logc"] = torch.from_numpy(logc)
        out["kd_chain_start"] = torch.from_numpy(start)
    return out
