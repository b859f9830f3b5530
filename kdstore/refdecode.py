"""The numpy reference decode of stored rows (the path without the native kernel).

``_native.c`` decodes the same rows to the same float32 values (``tests/test_native.py``
compares them); this one is kept readable rather than fast, and serves where the kernel
cannot be built.
"""

from __future__ import annotations

import numpy as np

from kdstore import native
from kdstore.quant import LogQuantizer, SqrtQuantizer, delta_decode
from kdstore.rows import RawRows


def decode_numpy(raw: RawRows, counts: np.ndarray, entry_offsets: np.ndarray, fixed_k: int, *, where: str,
                 vocab_size: int, samples: int, probs_q: SqrtQuantizer | LogQuantizer | None,
                 tail_q: SqrtQuantizer | LogQuantizer,
                 index_order: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The reference decode of ``raw``'s ``E`` entries over ``P`` positions: ``(indices [E]
    int64 teacher ids, probs [E] float32, tail [P] float32)``, probabilities renormalised so
    each position's kept mass plus tail is 1.

    ``counts [P]`` and ``entry_offsets [P + 1]`` are the entries per position and their
    starts; ``fixed_k`` is k for top-k stores (0 otherwise); ``samples`` is the sample count
    of sample-mode stores (0 otherwise: codes go through ``probs_q`` and ``tail_q``);
    ``index_order`` maps stored ranks to ids (None: stored indices are ids).
    """
    n_pos = len(counts)
    gaps = raw.gaps
    if fixed_k and n_pos:
        # Top-k: a [P, k] view; the cumulative sum restarts per row by construction.
        g2 = gaps.reshape(n_pos, fixed_k)
        idx2 = g2.astype(np.int64)
        np.cumsum(idx2, axis=1, out=idx2)  # in place: ~8x faster than cumsum(dtype=...)
        dup = bool((g2[:, 1:] == 0).any())
        last = idx2[:, -1]
        idx = idx2.ravel()
    else:
        idx = delta_decode(gaps, entry_offsets)
        zero = gaps == 0
        zero[entry_offsets[:-1][counts > 0]] = False
        dup = bool(zero.any())
        last = idx[entry_offsets[1:][counts > 0] - 1]
    if len(idx):
        if dup:
            raise native.repeated_index_error(where)
        top = int(last.max())  # stored indices ascend within a position
        if top >= vocab_size:
            raise native.index_range_error(where, top, vocab_size)
    pcodes = raw.pcodes
    if index_order is not None and len(idx):
        # Ranks -> ids; entries stay in rank order (most frequent id first): re-sorting
        # by id would cost ~30 ns/entry, more than the rest of the decode.
        idx = index_order[idx]
    if samples:
        probs = pcodes.astype(np.float32) / np.float32(samples)
        tail = np.zeros(n_pos, dtype=np.float32)
    else:
        probs = probs_q.decode(pcodes)
        tail = tail_q.decode(raw.tail_codes)
        if fixed_k and n_pos:
            kept = probs.reshape(n_pos, fixed_k).sum(axis=1, dtype=np.float32)
        else:
            kept = np.bincount(np.repeat(np.arange(n_pos), counts), weights=probs, minlength=n_pos).astype(np.float32)
        total = kept + tail
        scale = np.where(total > 0, 1.0 / np.maximum(total, 1e-30), 1.0).astype(np.float32)
        if fixed_k and n_pos:
            probs.reshape(n_pos, fixed_k)[...] *= scale[:, None]  # probs is a fresh array
        else:
            probs *= np.repeat(scale, counts)
        tail = tail * scale
    return idx, probs.astype(np.float32, copy=False), tail.astype(np.float32, copy=False)
