"""The classifier training loop shared by the classifier recipes (R-Drop, every cascade stage).

:func:`train_classifier` reads top to bottom like the LM loop: optimizer and schedule, resume,
then per step: batch -> loss -> backward -> clip -> step -> log, with periodic validation
(plateau stopping and best-weights restore when ``patience`` > 0) and checkpoints. What differs
between recipes is only the loss of a batch of training rows (``loss_fn``) and how the model
is validated (``evaluate``); both are plain functions the recipe passes in.

Batches are length-bucketed (:func:`trainer.core.batching.bucketed_batches`), the schedule is
:func:`trainer.core.schedule.lr_schedule` (linear warm-up and decay), records go to a
:class:`trainer.core.runlog.RunLog` and checkpoints through :mod:`trainer.core.checkpoint`.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from trainer.core import checkpoint as ckpt_io
from trainer.core.batching import bucketed_batches
from trainer.core.runlog import RunLog
from trainer.core.schedule import lr_schedule

# loss_fn(rows) -> (loss to minimise, parts to log as window means); rows index the training set.
LossFn = Callable[[list[int]], tuple[torch.Tensor, dict[str, float]]]


@dataclass
class LoopSpec:
    """Settings of one classifier training run (a recipe maps its config keys onto these).

    AdamW (``lr``, ``weight_decay``); linear warm-up over ``warmup_steps``, then linear decay to
    0 at ``steps``; gradient clipping at ``grad_clip`` (0 = off). A train record every
    ``log_every`` steps (0: at validations only); validation every ``eval_every`` steps and at
    the last step (0: the last step only). With ``patience`` > 0 training stops once the
    validation loss has not improved by ``min_delta`` for ``patience`` validations and the best
    weights are restored. Checkpoints every ``save_every`` steps and at the end when the caller
    gives a run directory; ``stop_at`` ends early with a checkpoint (resume later).
    """

    steps: int
    batch_size: int
    lr: float
    weight_decay: float = 0.01
    warmup_steps: int = 0
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 0
    eval_every: int = 0
    patience: int = 0
    min_delta: float = 1e-3
    save_every: int = 0
    keep_checkpoints: int = 2
    stop_at: int = 0
    device: str = "cpu"
    progress: bool = True
    desc: str = "train"

    def __post_init__(self) -> None:
        for key in ("steps", "batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"{self.desc}: {key} must be >= 1, got {getattr(self, key)}")
        if min(self.eval_every, self.log_every, self.save_every, self.patience, self.warmup_steps) < 0:
            raise ValueError(f"{self.desc}: eval_every, log_every, save_every, patience and warmup_steps must be >= 0")


@dataclass
class LoopResult:
    steps: int  # optimizer steps taken (all of them, or fewer after a plateau stop / stop_at)
    validation: dict[str, float]  # the last validation metrics ({} if none ran)
    best_step: int
    best_val_loss: float
    stopped: str  # "max_steps", "stop_at" or the plateau reason
    train_seconds: float  # wall seconds of the training steps (no validation), summed over resumes
    train_cpu_seconds: float  # process CPU seconds of the same (steadier on a shared machine)
    seconds: float  # wall seconds of this call, validation included
    history: list[dict[str, Any]] = field(default_factory=list)


def train_classifier(
    model: nn.Module,
    *,
    spec: LoopSpec,
    lengths: Sequence[int],
    loss_fn: LossFn,
    evaluate: Callable[[], dict[str, float]] | None,
    log: RunLog,
    run_dir: str | Path | None = None,
    resume: dict[str, Any] | None = None,
    extra_state: Callable[[], dict[str, Any]] | None = None,
    record_extra: Callable[[], dict[str, Any]] | None = None,
) -> LoopResult:
    """Train ``model`` in place on rows ``0 .. len(lengths) - 1`` (``lengths``: a size per row
    for bucketing). ``evaluate()`` returns validation metrics with at least ``loss``.
    ``run_dir`` enables checkpoints (``extra_state()`` adds the recipe's own entries; ``resume``
    is a loaded checkpoint to continue from). ``record_extra()`` adds fields to train records."""
    t_call = time.perf_counter()
    model.to(spec.device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    scheduler = lr_schedule(optimizer, shape="linear", warmup_steps=spec.warmup_steps, total_steps=spec.steps)
    start, timing = 0, {"train_seconds": 0.0, "train_cpu_seconds": 0.0}
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        ckpt_io.set_rng_state(resume["rng"])
        start = int(resume["step"])
        timing = {k: float(resume.get("loop_stats", resume.get("stats", {})).get(k, 0.0)) for k in timing}
    batches = bucketed_batches(lengths, spec.batch_size, seed=spec.seed)
    for _ in range(start):  # batch k depends only on (seed, k): skip what the checkpoint has seen
        next(batches)

    def save(step: int, metrics: dict[str, float]) -> None:
        ckpt_io.save_checkpoint(ckpt_io.checkpoint_path(run_dir, step), {
            "step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "rng": ckpt_io.rng_state(), "loop_stats": timing, "metrics": metrics,
            **(extra_state() if extra_state else {})}, keep=spec.keep_checkpoints)

    last = min(spec.steps, spec.stop_at) if spec.stop_at else spec.steps
    res = LoopResult(steps=start, validation={}, best_step=start, best_val_loss=math.inf, stopped="max_steps",
                     train_seconds=0.0, train_cpu_seconds=0.0, seconds=0.0)
    best_state, bad_evals = None, 0
    window: dict[str, float] = {}
    log_every = spec.log_every or spec.eval_every or spec.steps
    bar = tqdm(total=spec.steps, initial=start, desc=spec.desc, disable=not spec.progress, dynamic_ncols=True, leave=False)
    step = start
    for step in range(start + 1, last + 1):
        # 1. Loss of one length-bucketed batch (the recipe's loss_fn does the forward passes).
        t0, c0 = time.perf_counter(), time.process_time()
        loss, parts = loss_fn(next(batches))
        total = float(loss.detach())
        if not math.isfinite(total):
            raise FloatingPointError(f"{spec.desc}: loss is {total} at step {step}; lower lr={spec.lr} or check the data")

        # 2. Backward, clip, step.
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip or math.inf)
        optimizer.step()
        scheduler.step()
        timing["train_seconds"] += time.perf_counter() - t0
        timing["train_cpu_seconds"] += time.process_time() - c0
        bar.update(1)

        # 3. Log window means.
        for key, value in (("loss", total), *parts.items(), ("grad_norm", float(grad_norm))):
            window[key] = window.get(key, 0.0) + value
        window["n"] = window.get("n", 0) + 1
        if step % log_every == 0 or step == last:
            rec = {"event": "train", "step": step, **{k: v / window["n"] for k, v in window.items() if k != "n"},
                   "lr": scheduler.get_last_lr()[0], **(record_extra() if record_extra else {}),
                   "train_seconds": timing["train_seconds"]}
            log.write(rec)
            bar.set_postfix(loss=f"{rec['loss']:.3f}", val_acc=f"{res.validation.get('acc', math.nan):.3f}")
            window = {}

        # 4. Validate; plateau stopping keeps the best weights.
        if evaluate is not None and ((spec.eval_every and step % spec.eval_every == 0) or step == spec.steps):
            res.validation = evaluate()
            model.train()
            log.write({"event": "eval", "split": "validation", "step": step, **res.validation})
            if res.validation["loss"] < res.best_val_loss - spec.min_delta:
                res.best_val_loss, res.best_step, bad_evals = res.validation["loss"], step, 0
                if spec.patience > 0:
                    best_state = copy.deepcopy(model.state_dict())
            else:
                bad_evals += 1
            if spec.patience > 0 and bad_evals >= spec.patience:
                res.stopped = f"plateau (no val-loss gain > {spec.min_delta:g} in {spec.patience} evals)"
                break

        # 5. Checkpoint.
        if run_dir is not None and ((spec.save_every and step % spec.save_every == 0) or step == last):
            save(step, res.validation)
    bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    else:
        res.best_step = step
    if step < spec.steps and res.stopped == "max_steps":
        res.stopped = "stop_at"
    model.eval()
    res.steps, res.history = step, log.history
    res.train_seconds, res.train_cpu_seconds = timing["train_seconds"], timing["train_cpu_seconds"]
    res.seconds = time.perf_counter() - t_call
    return res
