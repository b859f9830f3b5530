"""Length-bucketed batches of row indices for variable-length samples (classifier recipes)."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence


def bucketed_batches(lengths: Sequence[int], batch_size: int, *, seed: int, pool: int = 50) -> Iterator[list[int]]:
    """Endless, reproducible index batches.

    Each epoch is shuffled (by ``seed`` and the epoch), cut into pools of ``pool`` batches,
    each pool sorted by length (the cost of a batch grows with its longest row, so similar
    lengths waste less padding), and a pool's batches are yielded in random order. Batch ``k``
    depends only on ``seed`` and ``k``: a resumed run skips ahead by drawing ``k`` batches.
    """
    if not len(lengths):
        raise ValueError("cannot draw batches from an empty training set")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    epoch = 0
    while True:
        rng = random.Random(seed * 1_000_003 + epoch)
        order = list(range(len(lengths)))
        rng.shuffle(order)
        for s in range(0, len(order), batch_size * pool):
            chunk = sorted(order[s : s + batch_size * pool], key=lambda i: lengths[i])
            group = [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
            rng.shuffle(group)
            yield from group
        epoch += 1
