"""The learning-rate schedule of every recipe: linear warm-up, then linear or cosine decay.

Both shapes are transformers' own (``get_linear_schedule_with_warmup``,
``get_cosine_with_min_lr_schedule_with_warmup``; the warm-up starts from 0: step ``s < warmup``
gets ``s / warmup`` of the learning rate); this module only picks one from a recipe's
settings, so every loop names its schedule the same way and checkpoints hold a plain
``LambdaLR`` state.
"""

from __future__ import annotations

import torch

SHAPES = ("linear", "cosine")


def lr_schedule(
    optimizer: torch.optim.Optimizer,
    *,
    shape: str,
    warmup_steps: int,
    total_steps: int,
    min_lr_ratio: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step ``LambdaLR`` (call ``.step()`` after every optimizer step).

    ``linear``: warm-up from 0 over ``warmup_steps``, then linear decay to 0 at
    ``total_steps``. ``cosine``: the same warm-up, then a half cosine from ``lr`` down to
    ``lr * min_lr_ratio`` at ``total_steps``.
    """
    from transformers import (  # noqa: PLC0415 - transformers is slow to import
        get_cosine_with_min_lr_schedule_with_warmup,
        get_linear_schedule_with_warmup,
    )

    if shape not in SHAPES:
        raise ValueError(f"schedule shape must be one of {SHAPES}, got {shape!r}")
    if total_steps < 1 or warmup_steps < 0:
        raise ValueError(f"need total_steps >= 1 and warmup_steps >= 0, got {total_steps} and {warmup_steps}")
    if shape == "linear":
        if min_lr_ratio:
            raise ValueError("the linear schedule decays to 0; min_lr_ratio applies to the cosine schedule")
        return get_linear_schedule_with_warmup(optimizer, warmup_steps, total_steps)
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    return get_cosine_with_min_lr_schedule_with_warmup(optimizer, warmup_steps, total_steps, min_lr_rate=min_lr_ratio)
