"""Token hash -> teacher id: an ordered linear-probing table (built once per store).

Shards carry each kept token as a 64-bit xxh3 hash of its string (DESIGN: the store outlives
the tokenizer's id assignment); ``vocab.parquet`` maps hashes back to teacher ids. This module
builds the lookup table and holds the numpy reference lookup; ``_native.c``'s ``token_ids``
is the fast one over the same table.
"""

from __future__ import annotations

import numpy as np

EMPTY = np.iinfo(np.uint64).max  # hash of an empty slot (and its id is -1)


def build(hashes: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, int]:
    """``(table [M, 2] uint64, bits)``: the (hash, id) pairs ``hashes [V]`` uint64, ``ids
    [V]`` int64 in an ordered linear-probing table keyed by the top ``bits`` hash bits.

    Pairs are sorted by hash and pair i sits in slot ``max(home_i, slot_{i-1} + 1)``
    (home: its top bits), so a lookup starts at the hash's home slot and steps while the
    slot's hash is smaller: xxh3 hashes are uniform, and with ~2 slots per token that is
    one slot (one cache line: hash and id side by side) for most lookups. Empty slots hold
    hash 2**64 - 1 and id -1, and the table ends with one, so every scan stops inside it.
    """
    h = np.asarray(hashes).astype(np.uint64)
    ids = np.asarray(ids).astype(np.int64)
    order = np.argsort(h, kind="stable")
    hs, ids = h[order], ids[order]
    bits = int(min(24, max(1, np.ceil(np.log2(max(2, len(hs)))) + 1)))
    home = (hs >> np.uint64(64 - bits)).astype(np.int64)
    rank = np.arange(len(hs), dtype=np.int64)
    slot = rank + np.maximum.accumulate(home - rank) if len(hs) else rank
    size = max(1 << bits, int(slot[-1]) + 2 if len(hs) else 1)
    table = np.full((size, 2), EMPTY, dtype=np.uint64)
    table[slot, 0] = hs
    table[slot, 1] = ids.view(np.uint64)
    return table, bits


def lookup(table: np.ndarray, bits: int, hashes: np.ndarray) -> np.ndarray:
    """The reference lookup: ``hashes [N]`` uint64 -> ids ``[N]`` int64, -1 for a hash not
    in ``table`` (from :func:`build`); vectorised probe steps."""
    hashes = np.asarray(hashes, dtype=np.uint64)
    th = table[:, 0]
    slot = (hashes >> np.uint64(64 - bits)).astype(np.int64)
    todo = np.arange(len(hashes))
    while len(todo):  # step the lookups whose slot holds a smaller hash (see build)
        todo = todo[th[slot[todo]] < hashes[todo]]
        slot[todo] += 1
    tid = table[slot, 1].view(np.int64)
    return np.where((th[slot] == hashes) & (tid >= 0), tid, -1)
