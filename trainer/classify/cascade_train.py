"""Training loop pieces of the cascade (seed 002): encoded text sets, length-bucketed batches,
a step-based fit with periodic validation and plateau stopping, evaluation, throughput and
loss-curve plots. Model-agnostic: any module ``(input_ids [B, T], attention_mask [B, T]) ->
logits [B, C]`` from :mod:`trainer.classify.classifiers`.
"""

from __future__ import annotations

import copy
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from trainer.classify.classifiers import pad_batch
from trainer.classify.segment import SegmentationSampler, Vocab


@dataclass
class Encoded:
    """A text set as token ids: ids (N lists, each <= max_len, non-empty), labels ``[N]`` long,
    sample_ids (N content hashes)."""

    ids: list[list[int]]
    labels: torch.Tensor
    sample_ids: list[str]

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, rows: Sequence[int]) -> "Encoded":
        return Encoded(ids=[self.ids[i] for i in rows], labels=self.labels[list(rows)], sample_ids=[self.sample_ids[i] for i in rows])


def encode_texts(texts: Sequence[str], labels: Sequence[int], sample_ids: Sequence[str], *, vocab: Vocab,
                 segmentation: str, max_len: int) -> Encoded:
    """Segment (deterministic granularity: char / word / jieba) and map to ids, truncated to
    ``max_len``; the same path :class:`trainer.classify.classifiers.TextClassifier` uses at inference."""
    sampler = SegmentationSampler(granularities=(segmentation,))
    rng = random.Random(0)  # deterministic granularities ignore it
    ids = []
    for text, sid in zip(texts, sample_ids):
        row = vocab.encode(sampler.segment(text, segmentation, rng=rng), max_len=max_len)
        if not row:
            raise ValueError(f"sample {sid}: text encodes to no tokens (empty text?); remove it from the data")
        ids.append(row)
    return Encoded(ids=ids, labels=torch.as_tensor(list(labels), dtype=torch.long), sample_ids=list(sample_ids))


def bucketed_batches(lengths: Sequence[int], batch_size: int, *, seed: int, pool: int = 50) -> Iterator[list[int]]:
    """Endless batches of row indices: each epoch is shuffled, cut into pools of ``pool`` batches,
    sorted by length inside a pool (less padding) and the pool's batches shuffled."""
    rng = random.Random(seed)
    n = len(lengths)
    if n == 0:
        raise ValueError("cannot draw batches from an empty training set")
    while True:
        order = list(range(n))
        rng.shuffle(order)
        chunk = batch_size * pool
        for s in range(0, n, chunk):
            block = sorted(order[s : s + chunk], key=lambda i: lengths[i])
            batches = [block[j : j + batch_size] for j in range(0, len(block), batch_size)]
            rng.shuffle(batches)
            yield from batches


def _eval_batches(enc: Encoded, batch_size: int) -> Iterator[list[int]]:
    order = sorted(range(len(enc)), key=lambda i: len(enc.ids[i]))
    for s in range(0, len(order), batch_size):
        yield order[s : s + batch_size]


@torch.inference_mode()
def predict_logits(model: nn.Module, enc: Encoded, *, batch_size: int = 256, device: str = "cpu") -> torch.Tensor:
    """Logits ``[N, C]`` float32 on CPU, in the order of ``enc``."""
    was_training = model.training
    model.eval()
    out: list[tuple[list[int], torch.Tensor]] = []
    for idx in _eval_batches(enc, batch_size):
        ids, mask = pad_batch([enc.ids[i] for i in idx], pad_id=0)
        out.append((idx, model(ids.to(device), mask.to(device)).float().cpu()))
    model.train(was_training)
    n_cls = out[0][1].shape[1] if out else 0
    logits = torch.empty(len(enc), n_cls)
    for idx, lg in out:
        logits[torch.tensor(idx, dtype=torch.long)] = lg
    return logits


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """``loss`` (mean CE, nats), ``acc`` and ``macro_f1`` of logits ``[N, C]`` vs labels ``[N]``."""
    if len(labels) == 0:
        return {"loss": float("nan"), "acc": float("nan"), "macro_f1": float("nan")}
    pred = logits.argmax(-1)
    f1s = []
    for c in range(logits.shape[1]):
        tp = int(((pred == c) & (labels == c)).sum())
        fp = int(((pred == c) & (labels != c)).sum())
        fn = int(((pred != c) & (labels == c)).sum())
        f1s.append(2 * tp / max(2 * tp + fp + fn, 1))
    return {
        "loss": float(F.cross_entropy(logits.float(), labels)),
        "acc": float((pred == labels).float().mean()),
        "macro_f1": sum(f1s) / len(f1s),
    }


def evaluate(model: nn.Module, enc: Encoded, *, batch_size: int = 256, device: str = "cpu") -> dict[str, float]:
    return classification_metrics(predict_logits(model, enc, batch_size=batch_size, device=device), enc.labels)


def throughput(model: nn.Module, enc: Encoded, *, batch_size: int = 256, device: str = "cpu", repeats: int = 1) -> float:
    """Inference samples per second over ``enc`` (length-sorted batches; best of ``repeats``)."""
    best = 0.0
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        predict_logits(model, enc, batch_size=batch_size, device=device)
        best = max(best, len(enc) / max(time.perf_counter() - t0, 1e-9))
    return best


@dataclass
class FitSpec:
    """One training run: AdamW with linear warm-up then linear decay to 0 at ``max_steps``;
    validation every ``eval_every`` steps; with ``patience`` > 0 training stops once the
    validation loss has not improved by ``min_delta`` for ``patience`` evaluations and the best
    weights are restored (patience 0: run all steps, keep the last weights)."""

    max_steps: int
    batch_size: int
    lr: float
    eval_every: int
    patience: int = 0
    min_delta: float = 1e-3
    weight_decay: float = 0.01
    warmup: float = 0.05
    seed: int = 0
    grad_clip: float = 1.0


@dataclass
class FitResult:
    history: list[dict] = field(default_factory=list)
    steps: int = 0
    best_step: int = 0
    best_val_loss: float = float("inf")
    stopped: str = "max_steps"
    seconds: float = 0.0


LossFn = Callable[[torch.Tensor, list[int]], tuple[torch.Tensor, dict[str, float]]]


def fit(model: nn.Module, train: Encoded, val: Encoded | None, spec: FitSpec, loss_fn: LossFn, *,
        device: str = "cpu", desc: str = "train", progress: bool = True) -> FitResult:
    """Train ``model`` in place. ``loss_fn(logits [B, C], rows)`` returns (loss, parts) for the
    batch rows (indices into ``train``)."""
    if spec.max_steps < 1 or spec.eval_every < 1 or spec.batch_size < 1:
        raise ValueError(f"{desc}: max_steps, eval_every and batch_size must be >= 1 ({spec})")
    torch.manual_seed(spec.seed)
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    warm = max(1, int(spec.warmup * spec.max_steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (spec.max_steps - s) / max(1, spec.max_steps - warm)))
    )
    res = FitResult()
    best_state = None
    bad_evals = 0
    window: list[float] = []
    t0 = time.perf_counter()
    batches = bucketed_batches([len(r) for r in train.ids], spec.batch_size, seed=spec.seed)
    bar = tqdm(total=spec.max_steps, desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
    step = 0
    while step < spec.max_steps:
        rows = next(batches)
        ids, mask = pad_batch([train.ids[i] for i in rows], pad_id=0)
        logits = model(ids.to(device), mask.to(device))
        loss, _parts = loss_fn(logits, rows)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{desc}: non-finite loss at step {step + 1}; lower the learning rate")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if spec.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip)
        opt.step()
        sched.step()
        step += 1
        window.append(float(loss.detach()))
        bar.update(1)
        if step % spec.eval_every == 0 or step == spec.max_steps:
            rec = {"step": step, "train_loss": sum(window) / len(window), "lr": sched.get_last_lr()[0]}
            window = []
            if val is not None and len(val):
                m = evaluate(model, val, device=device)
                rec.update(val_loss=m["loss"], val_acc=m["acc"])
                model.train()
                if m["loss"] < res.best_val_loss - spec.min_delta:
                    res.best_val_loss, res.best_step, bad_evals = m["loss"], step, 0
                    if spec.patience > 0:
                        best_state = copy.deepcopy(model.state_dict())
                else:
                    bad_evals += 1
            res.history.append(rec)
            bar.set_postfix({k: f"{v:.3f}" for k, v in rec.items() if k in ("train_loss", "val_loss", "val_acc")})
            if spec.patience > 0 and bad_evals >= spec.patience:
                res.stopped = f"plateau (no val-loss gain > {spec.min_delta:g} in {spec.patience} evals)"
                break
    bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    else:
        res.best_step = step
    res.steps = step
    res.seconds = time.perf_counter() - t0
    model.eval()
    return res


def plot_curves(history: list[dict], path: str | Path, *, title: str) -> None:
    """Training/validation loss and validation accuracy against steps (PNG)."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    if not history:
        return
    steps = [h["step"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax1.plot(steps, [h["train_loss"] for h in history], label="train loss (window mean)")
    if "val_loss" in history[0]:
        ax1.plot(steps, [h["val_loss"] for h in history], label="validation CE")
        ax2.plot(steps, [h["val_acc"] for h in history], color="tab:green")
    ax1.set_xlabel("step")
    ax1.set_ylabel("nats")
    ax1.legend()
    ax2.set_xlabel("step")
    ax2.set_ylabel("validation accuracy")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_scores(scores, threshold: float, path: str | Path, *, title: str) -> None:
    """Histogram of A's per-sample scores with the split threshold."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.hist(scores, bins=50, color="tab:blue")
    ax.axvline(threshold, color="tab:red", linestyle="--", label=f"threshold {threshold:g}")
    ax.set_yscale("log")
    ax.set_xlabel("score of A's soft label against the gold label")
    ax.set_ylabel("samples")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
