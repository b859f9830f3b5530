"""The learning-rate schedule of every recipe: linear warm-up, then linear or cosine decay.

Both shapes are transformers' own (``get_linear_schedule_with_warmup``,
``get_cosine_with_min_lr_schedule_with_warmup``); this module only picks one from a recipe's
settings, so every loop names its schedule the same way and checkpoints hold a plain
``LambdaLR`` state. One convention differs from transformers': the warm-up counts the step
being taken, so optimizer step ``s < warmup`` runs at ``(s + 1) / warmup`` of the learning rate
and the first step is not spent at lr 0 (transformers gives step ``s`` the factor ``s / warmup``).
That is the schedule every recipe of this project was measured and shipped with (the
reference teacher artifact is rebuilt from it bit for bit); after the warm-up both agree.
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
        base = get_linear_schedule_with_warmup(optimizer, warmup_steps, total_steps)
    else:
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
        base = get_cosine_with_min_lr_schedule_with_warmup(optimizer, warmup_steps, total_steps, min_lr_rate=min_lr_ratio)
    factor = base.lr_lambdas[0]

    def counting_the_step_taken(step: int) -> float:
        # A plain function, not a callable object: LambdaLR then keeps it out of its
        # state_dict, so checkpoints stay loadable with weights_only=True.
        return factor(step + 1) if step < warmup_steps else factor(step)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, counting_the_step_taken)
