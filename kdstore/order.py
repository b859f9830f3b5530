"""The data order: a pure function of (seed, epoch, shard row counts), and the rank defaults
of distributed training (see :mod:`kdstore.dataset`)."""

from __future__ import annotations

import numpy as np
import torch


def epoch_order(shard_rows: list[int], *, seed: int, epoch: int, shuffle: bool = True, shuffle_block: int = 4) -> np.ndarray:
    """Global row ids (``shard offset + row``) of one epoch, in order; a pure function."""
    offsets = np.concatenate([[0], np.cumsum(shard_rows, dtype=np.int64)])
    if not shuffle:
        return np.arange(offsets[-1], dtype=np.int64)
    rng = np.random.default_rng([seed, epoch])
    perm = rng.permutation(len(shard_rows))
    parts = []
    for b in range(0, len(perm), max(1, shuffle_block)):
        ids = np.concatenate([np.arange(offsets[s], offsets[s + 1], dtype=np.int64) for s in perm[b : b + shuffle_block]])
        parts.append(rng.permutation(ids))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def _dist_defaults(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is None or world_size is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank = torch.distributed.get_rank() if rank is None else rank
            world_size = torch.distributed.get_world_size() if world_size is None else world_size
    rank, world_size = rank or 0, world_size or 1
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    return rank, world_size
