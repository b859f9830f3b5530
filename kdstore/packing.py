"""Packing a batch's rows into fewer sequences (``SoftLabelDataset(pack=True)``): first-fit
decreasing into a sequence length chosen to minimise padding, and the position ids that let
transformers keep attention inside each row (document masking)."""

from __future__ import annotations

import numpy as np
import torch


def _packing_tensors(seq, col, pos_row, pos_t, S: int, T: int, mask: np.ndarray) -> dict[str, torch.Tensor]:
    """Document masking of a packed batch: position ids restart at every row (and in the
    padding after the last one); with no attention_mask, transformers builds a
    block-diagonal causal mask from them, so no token attends across rows."""
    position_ids = np.arange(T, dtype=np.int64)[None, :].repeat(S, 0)
    fill = np.bincount(seq, minlength=S) if len(seq) else np.zeros(S, np.int64)
    position_ids -= np.where(np.arange(T)[None, :] >= fill[:, None], fill[:, None], 0)
    position_ids[seq, col] = pos_t
    doc = np.full((S, T), -1, dtype=np.int64)
    doc[seq, col] = pos_row
    return {"position_ids": torch.from_numpy(position_ids), "doc_index": torch.from_numpy(doc),
            "valid_mask": torch.from_numpy(mask)}


def pack_rows(lengths: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray, int]:
    """First-fit decreasing packing of rows of ``lengths [R]`` into sequences of ``capacity``.

    Returns ``(seq [R], start [R], S)``: row r occupies positions ``start[r] ..
    start[r] + lengths[r] - 1`` of sequence ``seq[r]`` of ``S``. Deterministic (ties by row
    order), every row whole; rows longer than ``capacity`` are an error.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and int(lengths.max()) > capacity:
        raise ValueError(f"a row of {int(lengths.max())} positions does not fit in a sequence of {capacity}")
    seq = np.zeros(len(lengths), dtype=np.int64)
    start = np.zeros(len(lengths), dtype=np.int64)
    fill: list[int] = []
    for r in np.argsort(-lengths, kind="stable"):
        n = int(lengths[r])
        for b, f in enumerate(fill):
            if f + n <= capacity:
                seq[r], start[r] = b, f
                fill[b] += n
                break
        else:
            seq[r], start[r] = len(fill), 0
            fill.append(n)
    return seq, start, len(fill)


def plan_packing(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Pack rows of ``lengths [R]`` into S sequences of length L, L chosen in ``[T, 2T]`` (T =
    the longest row) to minimise the padded size ``S * L``; returns ``(seq, start, S, L)``.

    With L = T alone, the last sequence's free space is the padding (11 % on People's Daily
    batches of 16); trying lengths up to 2T, in T/32 steps, finds one the rows nearly fill
    (1.5 %). Deterministic: ties go to the shortest L.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    T = int(lengths.max())
    best = None
    for cap in range(T, 2 * T + 1, max(1, T // 32)):
        seq, start, S = pack_rows(lengths, cap)
        if best is None or S * cap < best[2] * best[3]:
            best = (seq, start, S, cap)
        if S == 1:  # one sequence: a longer one only adds padding
            break
    return best  # type: ignore[return-value]
